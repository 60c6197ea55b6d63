#!/usr/bin/env python3
"""Opens a page in headless Chromium (the Chrome DevTools Protocol, over
the `websockets` package) and waits until the text of its element `#log`
holds every expected line, or a deadline passes. Prints the text; exits
0 when everything expected came, 1 otherwise.

usage: drive.py URL SECONDS EXPECTED...
"""

import asyncio
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


async def drive(url, seconds, expected):
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
        deadline = time.monotonic() + seconds
        port_file = os.path.join(profile, "DevToolsActivePort")
        while not os.path.exists(port_file):
            if time.monotonic() > deadline:
                sys.exit("chromium did not start")
            await asyncio.sleep(0.05)
        # The file may be there before its port is written, and the
        # endpoint before the first page is listed: both are waited for.
        page = None
        while page is None:
            if time.monotonic() > deadline:
                sys.exit("chromium's DevTools endpoint listed no page")
            await asyncio.sleep(0.1)
            try:
                port = open(port_file).read().split()[0]
                targets = json.load(urllib.request.urlopen("http://127.0.0.1:%s/json/list" % port))
            except (IndexError, OSError, ValueError):
                continue
            page = next((t for t in targets if t["type"] == "page"), None)
        async with websockets.connect(page["webSocketDebuggerUrl"], max_size=None) as cdp:
            ids = iter(range(1, 1 << 30))

            async def call(method, **params):
                n = next(ids)
                await cdp.send(json.dumps({"id": n, "method": method, "params": params}))
                while True:
                    answer = json.loads(await cdp.recv())
                    if answer.get("id") == n:
                        return answer.get("result", {})

            await call("Page.enable")
            await call("Page.navigate", url=url)
            text = ""
            while time.monotonic() < deadline:
                result = await call(
                    "Runtime.evaluate",
                    expression="(document.getElementById('log') || {}).textContent || ''",
                    returnByValue=True,
                )
                text = result.get("result", {}).get("value", "")
                if all(e in text for e in expected):
                    print(text)
                    return 0
                await asyncio.sleep(0.1)
            print(text)
            return 1
    finally:
        browser.terminate()
        try:
            browser.wait(10)
        except subprocess.TimeoutExpired:
            browser.kill()
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(asyncio.run(drive(sys.argv[1], float(sys.argv[2]), sys.argv[3:])))
