#!/usr/bin/env python3
"""Opens a page in headless Chromium (the Chrome DevTools Protocol, over
the `websockets` package) and waits until the text of its element `#log`
holds every expected line, or a deadline passes. Prints the text; exits
0 when everything expected came, 1 otherwise. With --follow, prints each
line of `#log` as it appears instead (flushed), for a caller that acts on
what the page has done so far.

usage: drive.py [--follow] URL SECONDS EXPECTED...
"""

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

import websockets


def chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    sys.exit("no chromium: apt-get install chromium")


@contextlib.asynccontextmanager
async def page(url, deadline):
    """Headless Chromium with one page on `url`; yields `call(method,
    **params)`, a DevTools request on that page that returns its result.
    Chromium is closed, and its profile removed, however the block ends;
    it exits (status 1) if Chromium cannot be reached by `deadline`."""
    profile = tempfile.mkdtemp(prefix="sluice-chromium-")
    browser = subprocess.Popen(
        [
            chromium(),
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--remote-debugging-port=0",
            "--user-data-dir=" + profile,
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port_file = os.path.join(profile, "DevToolsActivePort")
        # The file may be there before its port is written, and the
        # endpoint before the first page is listed: both are waited for.
        target = None
        while target is None:
            if time.monotonic() > deadline:
                sys.exit("chromium's DevTools endpoint listed no page")
            await asyncio.sleep(0.1)
            try:
                port = open(port_file).read().split()[0]
                targets = json.load(urllib.request.urlopen("http://127.0.0.1:%s/json/list" % port))
            except (IndexError, OSError, ValueError):
                continue
            target = next((t for t in targets if t["type"] == "page"), None)
        async with websockets.connect(target["webSocketDebuggerUrl"], max_size=None) as cdp:
            ids = iter(range(1, 1 << 30))

            async def call(method, **params):
                n = next(ids)
                await cdp.send(json.dumps({"id": n, "method": method, "params": params}))
                while True:
                    answer = json.loads(await cdp.recv())
                    if answer.get("id") == n:
                        return answer

            await call("Page.enable")
            await call("Page.navigate", url=url)
            yield call
    finally:
        browser.terminate()
        try:
            browser.wait(10)
        except subprocess.TimeoutExpired:
            browser.kill()
        shutil.rmtree(profile, ignore_errors=True)


async def drive(url, seconds, expected, follow=False):
    deadline = time.monotonic() + seconds
    async with page(url, deadline) as call:
        text = ""
        shown = 0
        while time.monotonic() < deadline:
            answer = await call(
                "Runtime.evaluate",
                expression="(document.getElementById('log') || {}).textContent || ''",
                returnByValue=True,
            )
            text = answer.get("result", {}).get("result", {}).get("value", "")
            if follow:
                # Whole lines only: the page may be midway through one.
                done = text[: text.rfind("\n") + 1]
                if len(done) > shown:
                    print(done[shown:], end="", flush=True)
                    shown = len(done)
            if all(e in text for e in expected):
                if not follow:
                    print(text)
                return 0
            await asyncio.sleep(0.1)
        if not follow:
            print(text)
        return 1


if __name__ == "__main__":
    args = sys.argv[1:]
    follow = args[:1] == ["--follow"]
    if follow:
        args = args[1:]
    sys.exit(asyncio.run(drive(args[0], float(args[1]), args[2:], follow)))
