#!/usr/bin/env python3
"""A WebSocket application that is a plain HTTP service, behind sluice.

It has the shape of the most common WebSocket handler:
- a connection opens: log it;
- a message comes: answer it at once, and push a second message one
  second later;
- the connection closes: log its close code.

sluice holds the WebSocket and sends each connection's events here as
WebSocket-over-HTTP (docs/BACKEND.md): one POST per batch of events,
answered with events for the client. The push a second later goes
through sluice's admin API, to the connection's Connection-Id.

Standard library only. Run it as examples/backend/README.md says.
"""

import argparse
import http.server
import json
import pathlib
import sys
import threading
import urllib.request

EVENTS = "application/websocket-events"
HERE = pathlib.Path(__file__).resolve().parent


def parse_events(body):
    """The events of a body: [(type, content)]."""
    events = []
    while body:
        line, _, body = body.partition(b"\r\n")
        kind, _, size = line.decode("ascii").partition(" ")
        content = b""
        if size:
            n = int(size, 16)
            content, body = body[:n], body[n + 2:]
        events.append((kind, content))
    return events


def encode_event(kind, content=None):
    if content is None:
        return kind.encode() + b"\r\n"
    return b"%s %x\r\n%s\r\n" % (kind.encode(), len(content), content)


def log(*words):
    print(*words, flush=True)


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    admin = None
    admin_token = None

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path.split("?")[0] not in ("/", "/index.html"):
            self.send_error(404)
            return
        page = (HERE / "index.html").read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(page)))
        self.end_headers()
        self.wfile.write(page)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path.split("?")[0] != "/ws" or self.headers.get("Content-Type") != EVENTS:
            self.send_error(404)
            return
        cid = self.headers["Connection-Id"]
        out = b""
        for kind, content in parse_events(body):
            if kind == "OPEN":
                # afterConnectionEstablished
                log("open", cid)
                out += encode_event("OPEN")
            elif kind == "TEXT":
                # handleTextMessage: answer now, push again in a second.
                text = content.decode()
                out += encode_event("TEXT", ("you said: " + text).encode())
                threading.Timer(1.0, self.push, (cid, "a second later: " + text)).start()
            elif kind == "CLOSE":
                # afterConnectionClosed
                code = int.from_bytes(content[:2], "big") if len(content) >= 2 else None
                log("close", cid, "code=%s" % code)
                out += encode_event("CLOSE", content[:2])
            elif kind == "DISCONNECT":
                log("close", cid, "code=1006 (disconnected)")
        self.send_response(200)
        self.send_header("Content-Type", EVENTS)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def push(self, cid, text):
        request = urllib.request.Request(
            "%s/connections/%s/send" % (self.admin, cid), data=text.encode(), method="POST"
        )
        if self.admin_token:
            request.add_header("Authorization", "Bearer " + self.admin_token)
        try:
            urllib.request.urlopen(request, timeout=5).read()
        except OSError as e:
            # The connection may have gone meanwhile (404).
            log("push to", cid, "failed:", e)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=3000)
    parser.add_argument("--admin", default="http://127.0.0.1:9090", help="sluice's admin API")
    parser.add_argument("--admin-token", default=None)
    args = parser.parse_args()
    Handler.admin = args.admin.rstrip("/")
    Handler.admin_token = args.admin_token
    server = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    log("listening on 127.0.0.1:%d" % server.server_address[1])
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
