#!/usr/bin/env python3
"""Opens a page in headless Chromium (DevTools protocol, as drive.py) and
runs steps on it, one JSON list per line on standard input:

    ["wait", EXPR]   evaluate EXPR in the page until it is truthy
    ["do", EXPR]     evaluate EXPR once (a statement's value is ignored)
    ["say", TEXT]    print TEXT on a line of its own

Each step is answered with a line `done N` (N counts from 1) once carried
out; a step that fails prints `failed N: why` and the page's text, and
exits 1. At the end of its input it closes Chromium and exits 0. The caller thus interleaves its own actions with the page's. The
whole run, and each wait, is bounded by SECONDS.

usage: steps.py URL SECONDS < steps
"""

import asyncio
import json
import sys
import time

from drive import page


def out(line):
    print(line, flush=True)


async def run(url, seconds):
    deadline = time.monotonic() + seconds
    async with page(url, deadline) as call:

        async def evaluate(expression):
            answer = await call("Runtime.evaluate", expression=expression, returnByValue=True)
            if "error" in answer:
                # The protocol refused the request itself: nothing ran.
                raise RuntimeError("DevTools: %s" % answer["error"].get("message", answer["error"]))
            result = answer.get("result", {})
            if "exceptionDetails" in result:
                raise RuntimeError(result["exceptionDetails"].get("text", "exception"))
            return result.get("result", {}).get("value")

        loop = asyncio.get_running_loop()
        number = 0
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                return 0
            number += 1
            kind, arg = json.loads(line)
            try:
                if kind == "say":
                    out(arg)
                elif kind == "do":
                    await evaluate(arg)
                elif kind == "wait":
                    # An expression that throws (the page not yet parsed,
                    # say) is tried again, as a false one is.
                    while True:
                        try:
                            if await evaluate(arg):
                                break
                            why = "false"
                        except RuntimeError as e:
                            why = str(e)
                        if time.monotonic() > deadline:
                            raise RuntimeError("timed out waiting for %s (%s)" % (arg, why))
                        await asyncio.sleep(0.1)
                else:
                    raise RuntimeError("no step " + kind)
            except Exception as e:  # noqa: BLE001 - any failure ends the run
                out("failed %d: %s" % (number, e))
                try:
                    out(await evaluate("document.body.innerText"))
                except Exception:  # noqa: BLE001
                    pass
                return 1
            out("done %d" % number)


if __name__ == "__main__":
    sys.exit(asyncio.run(run(sys.argv[1], float(sys.argv[2]))))
