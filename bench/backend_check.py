#!/usr/bin/env python3
"""An independent check of bench/backend.sh's figures: an ordinary client
(Python's asyncio, one epoll loop, the `websockets` package, one frame
per send) against a gateway's backend route.

- closed loop: C connections, each sends a message and waits for its echo;
- open loop (--rate R): R messages a second over C connections, each sent
  on schedule whatever the replies, latency from the scheduled time.

Prints one JSON object: messages per second and latency percentiles (µs).

usage: backend_check.py --url ws://127.0.0.1:PORT/app [--connections C]
                        [--seconds S] [--warmup W] [--rate R] [--size N]
"""

import argparse
import asyncio
import json
import time

import websockets


def percentile(sorted_values, p):
    if not sorted_values:
        return None
    i = min(len(sorted_values) - 1, int(round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[i]


async def closed_loop(ws, payload, stop, measuring_from, latencies, counts):
    while time.monotonic() < stop:
        sent = time.monotonic()
        await ws.send(payload)
        await ws.recv()
        done = time.monotonic()
        if sent >= measuring_from:
            latencies.append((done - sent) * 1e6)
            counts[0] += 1


async def open_loop(ws, payload, interval, start, stop, measuring_from, latencies, counts):
    due = {}
    n = 0

    async def reader():
        while True:
            message = await ws.recv()
            scheduled = due.pop(message, None)
            if scheduled is not None and scheduled >= measuring_from:
                latencies.append((time.monotonic() - scheduled) * 1e6)
                counts[0] += 1

    task = asyncio.create_task(reader())
    try:
        while True:
            scheduled = start + n * interval
            if scheduled >= stop:
                break
            wait = scheduled - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            # The message names itself, so its echo finds its schedule.
            message = f"{n:012d}".encode().ljust(len(payload), b"x").decode()
            due[message] = scheduled
            await ws.send(message)
            n += 1
        await asyncio.sleep(1.0)
    finally:
        task.cancel()


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--rate", type=float, default=0.0)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()
    payload = "x" * args.size
    sockets = [
        await websockets.connect(args.url, compression=None, max_queue=None, ping_interval=None)
        for _ in range(args.connections)
    ]
    latencies, counts = [], [0]
    start = time.monotonic() + 0.1
    measuring_from = start + args.warmup
    stop = measuring_from + args.seconds
    if args.rate > 0:
        interval = args.connections / args.rate
        tasks = [
            open_loop(ws, payload, interval, start + i * interval / args.connections, stop, measuring_from, latencies, counts)
            for i, ws in enumerate(sockets)
        ]
    else:
        tasks = [closed_loop(ws, payload, stop, measuring_from, latencies, counts) for ws in sockets]
    await asyncio.gather(*tasks)
    for ws in sockets:
        await ws.close()
    latencies.sort()
    print(
        json.dumps(
            {
                "url": args.url,
                "connections": args.connections,
                "rate": args.rate or None,
                "messages_per_second": counts[0] / args.seconds,
                "p50_us": percentile(latencies, 50),
                "p99_us": percentile(latencies, 99),
                "p99_9_us": percentile(latencies, 99.9),
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
