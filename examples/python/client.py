#!/usr/bin/env python3
"""A native-protocol client of sluice (docs/PROTOCOL.md): subscribes to
the topics given, prints every message as `MSG <topic> <payload>`, and
keeps at it: when the connection drops it reconnects with a capped,
jittered backoff and subscribes to everything again. With a token file,
it sends the token at the handshake and, before the token expires,
re-reads the file and hands the server the fresh one with `AUTH`.

Status lines go to stdout beside the messages: `connected <session>`,
`subscribed <topic>`, `closed <code> <reason>`, `reconnecting in <n> ms`,
`refreshed token`. A token is never printed, nor a control character of
what the server sent (it is shown as `\\xNN`, so that a message cannot
drive the terminal). Needs websockets 14 or newer.

usage: client.py [--url URL] [--token-file PATH] [--refresh-margin SECS]
                 [--backoff-ms MS] [--max-backoff-ms MS] [--stable-ms MS] TOPIC...
"""

import argparse
import asyncio
import base64
import json
import math
import random
import re
import sys
import time
import unicodedata

import websockets
from websockets.asyncio.client import connect


def shown(text):
    """`text` with its control characters (C0, DEL, C1) but tab spelled
    out: another publisher's message must not reach the terminal as an
    escape sequence."""
    return "".join(c if c == "\t" or unicodedata.category(c) != "Cc" else "\\x%02x" % ord(c) for c in text)


def status(line):
    print(shown(line), flush=True)


# A JWT: three base64url parts with dots between (the signature may be empty).
JWT = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


class TokenError(ValueError):
    """A token file that holds no usable token. Its message never quotes
    the token."""


def read_token(path):
    """The file's first non-empty line, trimmed, if it is a JWT (what
    follows, a comment of whatever rotates the file, is not sent)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError as e:
        raise TokenError("cannot read %s: %s" % (path, e.strerror or e)) from None
    token = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if not token:
        raise TokenError("%s holds no token" % path)
    if not JWT.fullmatch(token):
        raise TokenError("the token in %s is not a JWT (base64url parts and dots)" % path)
    return token


def expiry(token):
    """The token's `exp` (seconds since the epoch), read without checking
    the signature: that is the server's business, the client only needs to
    know when to bring a fresh one. A token without a finite number there
    is refused: the client could not tell when to refresh it."""
    payload = token.split(".")[1]
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except ValueError:  # bad base64, bad UTF-8 and bad JSON all are
        raise TokenError("the token's payload is not base64url JSON") from None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    if isinstance(exp, bool) or not isinstance(exp, (int, float)):
        raise TokenError("the token has no numeric exp")
    try:
        # An integer too large for a float overflows here.
        exp = float(exp)
    except OverflowError:
        raise TokenError("the token's exp is out of range") from None
    if not math.isfinite(exp):
        raise TokenError("the token has no numeric exp")
    return exp


def describe(e):
    """An exception as a status line's tail."""
    if isinstance(e, TokenError):
        return "token refused: %s" % e
    return "%s: %s" % (type(e).__name__, e) if str(e) else type(e).__name__


class Client:
    def __init__(self, args):
        self.url = args.url
        self.topics = list(dict.fromkeys(args.topics))
        self.token_file = args.token_file
        self.margin_secs = args.refresh_margin
        self.backoff_ms = args.backoff_ms
        self.max_backoff_ms = args.max_backoff_ms
        self.stable_secs = args.stable_ms / 1000

    async def run(self):
        attempt = 0
        while True:
            connected = None  # when HELLO came
            try:
                headers = {}
                token = None
                if self.token_file:
                    token = read_token(self.token_file)
                    expiry(token)  # a token the client cannot refresh fails this attempt
                    headers["Authorization"] = "Bearer " + token
                async with connect(self.url, additional_headers=headers, subprotocols=["sluice"]) as ws:
                    hello = await asyncio.wait_for(ws.recv(), 10)
                    if not isinstance(hello, str) or not hello.startswith("HELLO "):
                        kind = "a text" if isinstance(hello, str) else "a binary"
                        raise ConnectionError("expected HELLO, got %s message of %d bytes" % (kind, len(hello)))
                    connected = time.monotonic()
                    status("connected " + hello[len("HELLO ") :])
                    # A new connection has no subscriptions: make them all again.
                    for topic in self.topics:
                        await ws.send("SUB " + topic)
                        status("subscribed " + topic)
                    refresher = asyncio.create_task(self.refresh(ws, token)) if token else None
                    if refresher:
                        refresher.add_done_callback(lambda task: self.refresher_done(task, ws))
                    try:
                        async for message in ws:
                            if isinstance(message, bytes):
                                message = message.decode("utf-8", "replace")
                            print(shown(message), flush=True)  # MSG <topic> <payload>, or ERR ...
                    finally:
                        if refresher:
                            refresher.cancel()
                    status("closed %s %s" % (ws.close_code, ws.close_reason or ""))
            except Exception as e:  # whatever the server or the file holds, try again later
                if connected is not None and isinstance(e, websockets.ConnectionClosed):
                    status("closed %s %s" % (e.rcvd.code if e.rcvd else 1006, e.rcvd.reason if e.rcvd else ""))
                else:
                    status("connection failed: %s" % describe(e))
            # Exponential backoff, capped, with jitter so that many clients
            # dropped at once do not return at once. Only a connection that
            # stayed up a while starts it over: a server that takes the
            # connection and drops it at once sees the delays grow.
            if connected is not None and time.monotonic() - connected >= self.stable_secs:
                attempt = 0
            delay_ms = min(self.max_backoff_ms, self.backoff_ms * 2**attempt)
            delay_ms = int(random.uniform(delay_ms / 2, delay_ms))
            attempt = min(attempt + 1, 30)
            status("reconnecting in %d ms" % delay_ms)
            await asyncio.sleep(delay_ms / 1000)

    def refresher_done(self, task, ws):
        """The refresher ends only when cancelled, or when its connection
        has closed; anything else is a fault: said, and the connection
        closed, so that the next one starts with a fresh refresher."""
        if task.cancelled():
            return
        e = task.exception()
        if e is None or isinstance(e, websockets.ConnectionClosed):
            return
        status("token refresh failed: %s; closing the connection" % describe(e))
        asyncio.ensure_future(ws.close(1011, "client token refresh failed"))

    async def refresh(self, ws, token):
        """Sends a fresh token with AUTH `margin` seconds before the current
        one expires (halfway there if it lives shorter than twice that).
        Until the file holds a fresher token it looks again, 1 s later, then
        2, 4... up to 30 (no later than the current token's exp while that
        is further off), and says what is wrong once for each content of
        the file."""
        current = expiry(token)
        left = current - time.time()
        await asyncio.sleep(max(left - self.margin_secs, left / 2, 0))
        retry = 1.0
        said = None  # what the file held when the client last complained
        while True:
            try:
                with open(self.token_file, "rb") as f:
                    content = f.read()
            except OSError as e:
                content = "error %s" % e.errno
            try:
                fresh = read_token(self.token_file)
                fresh_exp = expiry(fresh)
                problem = None if fresh_exp > current else "token file holds no fresher token"
            except TokenError as e:
                problem = "token refused: %s" % e
            if problem is None:
                await ws.send("AUTH " + fresh)
                current = fresh_exp
                status("refreshed token")
                retry, said = 1.0, None
                left = current - time.time()
                await asyncio.sleep(max(left - self.margin_secs, left / 2, 0))
                continue
            if content != said:
                status(problem)
                said = content
            left = current - time.time()
            await asyncio.sleep(min(retry, left) if left > 1 else retry)
            retry = min(retry * 2, 30.0)


def at_least(low, kind=int):
    """An argparse type: a finite `kind` not below `low` (a delay of NaN
    or below zero would reconnect in a tight loop)."""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError("not a number: %r" % text) from None
        if not math.isfinite(value) or value < low:
            raise argparse.ArgumentTypeError("must be at least %s: %r" % (low, text))
        return value

    return parse


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("topics", nargs="+", metavar="TOPIC")
    parser.add_argument("--url", default="ws://127.0.0.1:8080/ws")
    parser.add_argument("--token-file", help="a file holding a JWT, re-read before each refresh and reconnect")
    parser.add_argument(
        "--refresh-margin", type=at_least(0, float), default=30, help="seconds before exp to refresh (default 30)"
    )
    parser.add_argument("--backoff-ms", type=at_least(1), default=500, help="first reconnect delay (default 500)")
    parser.add_argument(
        "--max-backoff-ms", type=at_least(1), default=30000, help="longest reconnect delay (default 30000)"
    )
    parser.add_argument(
        "--stable-ms",
        type=at_least(0),
        default=10000,
        help="a connection up this long starts the backoff over (default 10000)",
    )
    try:
        asyncio.run(Client(parser.parse_args()).run())
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
