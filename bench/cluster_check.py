"""An independent check of bench/cluster.sh's latency figures.

Another client, of the most ordinary shape: Python's `websockets` library
on one asyncio loop, one frame per write. SUBSCRIBERS clients subscribe to
topic `check` on node b; one publisher, on node b ("same") or node a
("cross"), alternately ROUNDS times, publishes RATE messages/s for SECONDS,
each stamped with its send time (time.monotonic_ns, one clock: one
machine). Prints publish-to-read percentiles per mode, medians over the
rounds.

    python3 bench/cluster_check.py ws://A/ws ws://B/ws [SUBSCRIBERS RATE SECONDS ROUNDS]

Needs `websockets` (scripts/test.sh installs it into target/python).
"""

import asyncio
import statistics
import sys
import time

import websockets


def percentile(sorted_values, p):
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, int(p / 100 * len(sorted_values)))
    return sorted_values[i]


async def subscriber(url, latencies, ready, stop):
    async with websockets.connect(url, max_size=None, compression=None) as ws:
        await ws.recv()  # HELLO
        await ws.send("SUB check")
        ready.set()
        while not stop.is_set():
            try:
                message = await asyncio.wait_for(ws.recv(), 0.5)
            except asyncio.TimeoutError:
                continue
            now = time.monotonic_ns()
            body = message.split(" ", 2)[2]
            if body.startswith("t="):
                latencies.append((now - int(body[2:].split(";")[0])) / 1000)


async def publish(url, rate, seconds):
    async with websockets.connect(url, compression=None) as ws:
        await ws.recv()  # HELLO
        interval = 1 / rate
        start = time.monotonic()
        n = 0
        while time.monotonic() - start < seconds:
            due = start + n * interval
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await ws.send(f"PUB check t={time.monotonic_ns()};" + "." * 32)
            n += 1
        return n


async def round_trip(pub_url, sub_url, subscribers, rate, seconds):
    latencies = []
    stop = asyncio.Event()
    readies = [asyncio.Event() for _ in range(subscribers)]
    tasks = [asyncio.create_task(subscriber(sub_url, latencies, r, stop)) for r in readies]
    await asyncio.gather(*(r.wait() for r in readies))
    # Subscriptions reach the other node's bus before publishing starts.
    await asyncio.sleep(1.0)
    sent = await publish(pub_url, rate, seconds)
    await asyncio.sleep(1.0)
    stop.set()
    await asyncio.gather(*tasks)
    latencies.sort()
    return sent, latencies


async def main():
    node_a, node_b = sys.argv[1], sys.argv[2]
    subscribers = int(sys.argv[3]) if len(sys.argv) > 3 else 10
    rate = int(sys.argv[4]) if len(sys.argv) > 4 else 1000
    seconds = float(sys.argv[5]) if len(sys.argv) > 5 else 5
    rounds = int(sys.argv[6]) if len(sys.argv) > 6 else 3
    results = {"same": [], "cross": []}
    for _ in range(rounds):
        for mode, pub in (("same", node_b), ("cross", node_a)):
            sent, lat = await round_trip(pub, node_b, subscribers, rate, seconds)
            expected = sent * subscribers
            results[mode].append((len(lat), expected, [percentile(lat, p) for p in (50, 99, 99.9)]))
    print(f"independent client (Python websockets), {subscribers} subscribers on node b, "
          f"{rate} publishes/s for {seconds} s, medians of {rounds}:")
    print("| publisher on | received / sent x subscribers | read p50 | p99 | p99.9 |")
    print("| --- | --- | --- | --- | --- |")
    for mode in ("same", "cross"):
        runs = results[mode]
        got = sum(r[0] for r in runs)
        want = sum(r[1] for r in runs)
        cells = [f"{statistics.median(r[2][i] for r in runs) / 1000:.2f} ms" for i in range(3)]
        print(f"| node {'b' if mode == 'same' else 'a'} ({mode}) | {got} / {want} | " + " | ".join(cells) + " |")


asyncio.run(main())
