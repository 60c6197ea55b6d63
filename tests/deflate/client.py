"""Python's websockets (which offers permessage-deflate by default)
against a running sluice: the extension is agreed, and messages of 0 B,
100 B and 1 MiB, text and binary, round-trip on /echo and through a
publish on /ws. Against `--deflate dedicated` (second argument), context
takeover is agreed both ways, and a client that asks for a window of 9
bits for the server's messages reads them with that window (its zlib
refuses a reference further back). Prints "ok" last when all is well.

usage: client.py ws://HOST:PORT [dedicated]
"""

import asyncio
import sys

import websockets
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory

DEDICATED = sys.argv[2:] == ["dedicated"]
AGREED = "permessage-deflate" if DEDICATED else (
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
)
SIZES = (0, 100, 1 << 20)


def text(n):
    return ('{"k":"v","n":[1,2,3]}' * (n // 20 + 1))[:n]


async def main(base):
    async with websockets.connect(base + "/echo", max_size=None) as ws:
        agreed = ws.response.headers.get("Sec-WebSocket-Extensions")
        assert agreed == AGREED, agreed
        # Twice: with context takeover, the second refer back to the first.
        for n in SIZES + SIZES:
            await ws.send(text(n))
            assert await ws.recv() == text(n), n
            data = bytes(range(256)) * (n // 256 + 1)
            await ws.send(data[:n])
            assert await ws.recv() == data[:n], n
            print("echo", n, "ok")
    async with websockets.connect(base + "/ws", max_size=None) as sub, websockets.connect(
        base + "/ws", max_size=None
    ) as pub:
        for ws in (sub, pub):
            assert (await ws.recv()).startswith("HELLO ")
        await sub.send("SUB news")
        await asyncio.sleep(0.2)
        for n in SIZES:
            await pub.send("PUB news " + text(n))
            assert await sub.recv() == "MSG news " + text(n), n
            print("publish", n, "ok")
    if DEDICATED:
        small = ClientPerMessageDeflateFactory(server_max_window_bits=9)
        async with websockets.connect(base + "/echo", extensions=[small], max_size=None) as ws:
            agreed = ws.response.headers.get("Sec-WebSocket-Extensions")
            assert agreed == "permessage-deflate; server_max_window_bits=9", agreed
            for i in range(20):
                await ws.send(text(1000 + i))
                assert await ws.recv() == text(1000 + i), i
            print("window 9 ok")
    print("ok")


asyncio.run(asyncio.wait_for(main(sys.argv[1]), 30))
