#!/usr/bin/env python3
"""Userspace memory per idle WebSocket connection of a running server.

Opens N upgraded connections to URL (spreading source addresses over
127.0.0.2.. so N can exceed one address's ephemeral ports), waits, and reads
the server's VmRSS from /proc before and after. Kernel socket memory is not
in RSS and not counted.

    scripts/idle_memory.py --pid PID --port PORT [--path /echo] [-n 15000]

Needs `ulimit -n` above N. Talks to 127.0.0.1 only.
"""
import argparse
import socket
import time

REQUEST = (
    "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", default="/echo")
    p.add_argument("-n", type=int, default=15000)
    p.add_argument("--settle", type=float, default=2.0, help="seconds to wait before the second reading")
    a = p.parse_args()
    request = REQUEST.format(path=a.path).encode()
    before = rss_kb(a.pid)
    socks = []
    for i in range(a.n):
        s = socket.socket()
        s.bind((f"127.0.0.{2 + i // 10000}", 0))
        s.connect(("127.0.0.1", a.port))
        s.sendall(request)
        socks.append(s)
    upgraded = 0
    for s in socks:
        s.settimeout(10)
        upgraded += s.recv(256).startswith(b"HTTP/1.1 101")
    time.sleep(a.settle)
    after = rss_kb(a.pid)
    print(
        f"upgraded {upgraded}/{a.n}  rss before {before} KiB  after {after} KiB  "
        f"per connection {(after - before) * 1024 / a.n:.0f} B"
    )
    for s in socks:
        s.close()
    return 0 if upgraded == a.n else 1


if __name__ == "__main__":
    raise SystemExit(main())
