"""A wss:// client on Python's websockets and ssl, for tests/tls.rs.

usage: client.py wss://localhost:PORT CA_FILE
Echoes text and binary on /echo (compressed: websockets offers
permessage-deflate, and sluice agrees), then reads HELLO on /ws and gets
its own publish back; prints "ok" when every step matched.
"""
import asyncio
import ssl
import sys

from websockets.asyncio.client import connect


async def main(base: str, ca_file: str) -> None:
    context = ssl.create_default_context(cafile=ca_file)
    async with connect(base + "/echo", ssl=context) as ws:
        agreed = ws.response.headers.get("Sec-WebSocket-Extensions", "")
        assert agreed.startswith("permessage-deflate"), agreed
        for message in ["hello", "é" * 1000, b"\x00\x01" * 40000]:
            await ws.send(message)
            assert await ws.recv() == message
    async with connect(base + "/ws", ssl=context) as ws:
        hello = await ws.recv()
        assert hello.startswith("HELLO "), hello
        await ws.send("SUB py")
        await asyncio.sleep(0.2)
        await ws.send("PUB py from-python")
        assert await ws.recv() == "MSG py from-python"
    print("ok")


asyncio.run(main(sys.argv[1], sys.argv[2]))
