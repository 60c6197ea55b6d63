"""The table of a bench/run.sh run: per scenario and server, the median over
rounds of the scenario's figure, its min-max, and how sluice compares with
each server (above 1 means sluice is better, for every kind of figure).

    python3 bench/table.py OUT ROUNDS "SCENARIOS" SERVER...
"""
import json
import statistics
import sys


def figure(scenario):
    """(what is measured, how to read it from a run's JSON, unit, higher is better)."""
    kind = scenario.split("-")[0]
    if kind == "fanout":
        return "deliveries/s", lambda j: j["arrivals_per_second"], "M", True
    if kind == "memory":
        return "bytes per idle connection", lambda j: (j.get("memory") or {}).get("bytes_per_connection"), "", False
    if kind == "latency":
        return "p99 latency (µs)", lambda j: j["latency_us"]["p99"], "", False
    if kind == "churn":
        return "connect-echo-close cycles/s", lambda j: j["messages_per_second"], "k", True
    return "msg/s", lambda j: j["messages_per_second"], "M", True


def scaled(v, unit):
    if unit == "M":
        return f"{v / 1e6:.2f} M"
    if unit == "k":
        return f"{v / 1e3:.1f} k"
    return f"{v:,.0f}"


def runs(out, sc, sv, rounds):
    found = []
    for r in range(1, rounds + 1):
        try:
            with open(f"{out}/{sc}-{sv}-{r}.json") as f:
                found.append(json.load(f))
        except (OSError, ValueError):
            pass
    return found


def summary(out, rounds, scenarios, servers):
    """One row per scenario: each server's median, and sluice against the best peer."""
    print("| scenario | figure | " + " | ".join(servers) + " | sluice vs the best peer |")
    print("| --- | --- | " + " | ".join("---" for _ in servers) + " | --- |")
    for sc in scenarios:
        what, read, unit, higher = figure(sc)
        meds = {}
        for sv in servers:
            vals = [v for v in (read(j) for j in runs(out, sc, sv, rounds)) if v is not None]
            if vals:
                meds[sv] = statistics.median(vals)
        cells = [scaled(meds[sv], unit) if sv in meds else "-" for sv in servers]
        peers = {sv: m for sv, m in meds.items() if sv != "sluice" and m > 0}
        vs = ""
        if "sluice" in meds and meds["sluice"] > 0 and peers:
            best = (max if higher else min)(peers, key=peers.get)
            ratio = meds["sluice"] / peers[best] if higher else peers[best] / meds["sluice"]
            vs = f"{ratio:.2f}x ({best})"
        print(f"| {sc} | {what} | " + " | ".join(cells) + f" | {vs} |")
    print()


def main():
    out, rounds, scenarios, servers = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(), sys.argv[4:]
    summary(out, rounds, scenarios, servers)
    print("| scenario | server | median | min-max | p50 / p99 / p99.9 / p99.99 µs (medians) | server CPU per message | errors | sluice vs this |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for sc in scenarios:
        what, read, unit, higher = figure(sc)
        rows = {}
        for sv in servers:
            found = runs(out, sc, sv, rounds)
            vals = [v for v in (read(j) for j in found) if v is not None]
            if not vals:
                continue
            pct_key = "arrival_us" if sc.startswith("fanout") else "handshake_us" if sc.startswith("memory") else "latency_us"
            pcts = [statistics.median(j[pct_key][p] for j in found) for p in ("p50", "p99", "p99_9", "p99_99")]
            errors = sum(sum(j["failed"].values()) + j["errors"] for j in found)
            cpu = [j["cpu"].get("server_ns_per_message") for j in found]
            cpu = statistics.median(c for c in cpu if c is not None) if any(c is not None for c in cpu) else None
            rows[sv] = (statistics.median(vals), min(vals), max(vals), pcts, errors, cpu)
        for sv in servers:
            if sv not in rows:
                print(f"| {sc} | {sv} | no result | | | | | |")
                continue
            m, lo, hi, pcts, errors, cpu = rows[sv]
            vs = ""
            if sv != "sluice" and "sluice" in rows and m > 0 and rows["sluice"][0] > 0:
                s = rows["sluice"][0]
                vs = f"{s / m:.2f}x" if higher else f"{m / s:.2f}x"
                if sc.startswith("latency"):
                    vs += f" (p99.9 {pcts[2] / max(rows['sluice'][3][2], 1):.2f}x)"
            pct = " / ".join(f"{p:,.0f}" for p in pcts)
            cpu = "" if cpu is None or sc.startswith("memory") else f"{cpu:,.0f} ns"
            print(f"| {sc} | {sv} | {scaled(m, unit)} {what} | {scaled(lo, unit)} - {scaled(hi, unit)} | {pct} | {cpu} | {errors} | {vs} |")


main()
