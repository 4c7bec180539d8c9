#!/usr/bin/env python3
"""The table of bench/ab: per workload and log configuration, each build's median (min..max)
IOPS and p50 latency over the repetitions, B/A; with BENCH_PERF=1 also the medians of the
per-I/O counts (bench/perf_per_io.py) of both nodes.

Usage: ab_report.py WORK A B SMALL "WORKLOAD IDS" "LOGS" RUNTIME
"""
import glob
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import perf_per_io  # noqa: E402

NAMES = {"w4k1": "4k randwrite QD1", "w4k32": "4k randwrite QD32", "seq1m8": "1M seq write QD8",
         "r4k32": "4k randread QD32"}
ROW = "blockd-mirror"


def runs(work, build, logcfg, wid):
    """[(iops, p50 µs, json path, mean µs, p99 µs)] of every repetition."""
    out = []
    for f in sorted(glob.glob(f"{work}/{build}/{logcfg}/*/json/{ROW}.{wid}.json")):
        with open(f) as fh:
            job = json.load(fh)["jobs"][0]
        side = job["write"] if job["write"]["iops"] > 0 else job["read"]
        pct = side["lat_ns"].get("percentile", {})
        p50 = pct.get("50.000000", 0) / 1000.0
        p99 = pct.get("99.000000", 0) / 1000.0
        out.append((side["iops"], p50, f, side["lat_ns"]["mean"] / 1000.0, p99))
    return out


def cell(vals, fmt="{:.0f}"):
    m = statistics.median(vals)
    return f"{fmt.format(m)} ({fmt.format(min(vals))}..{fmt.format(max(vals))}, n={len(vals)})", m


def perf_medians(rs, tag, window):
    """Median per-I/O switches, syscalls, wake-ups, cpu µs of node `tag` over the runs."""
    keys = ("context-switches", "raw_syscalls:sys_enter", "sched:sched_wakeup", "task-clock")
    per = {k: [] for k in keys}
    for iops, _, f, *_ in rs:
        p = f[: -len(".json")] + f".{tag}.perf"
        if not os.path.exists(p) or iops <= 0:
            continue
        c = perf_per_io.counts(p)
        n = iops * window
        for k in keys:
            if k in c:
                per[k].append(c[k] * (1000.0 if k == "task-clock" else 1.0) / n)
    if not per["context-switches"]:
        return None
    med = {k: statistics.median(v) for k, v in per.items() if v}
    return (f"sw {med.get('context-switches', 0):.2f} sc {med.get('raw_syscalls:sys_enter', 0):.2f}"
            f" wk {med.get('sched:sched_wakeup', 0):.2f} cpu {med.get('task-clock', 0):.0f}µs")


def main():
    work, a, b, small, wids, logs, runtime = sys.argv[1:8]
    window = float(runtime) - 0.4
    print(f"A = {a}\nB = {b}\nsmall log = {small} extents\n")
    print("| workload | log | A IOPS | B IOPS | B/A | A p50 µs | B p50 µs | A mean / p99 µs |"
          " B mean / p99 µs |")
    print("|---|---|---|---|---|---|---|---|---|")
    prof = []
    for wid in wids.split():
        name = NAMES.get(wid, wid)
        for logcfg in logs.split():
            ra, rb = runs(work, "A", logcfg, wid), runs(work, "B", logcfg, wid)
            if not ra or not rb:
                print(f"| {name} | {logcfg} | {len(ra)} runs | {len(rb)} runs | n/a | | | | |")
                continue
            (ca, ma), (cb, mb) = cell([r[0] for r in ra]), cell([r[0] for r in rb])
            (la, _), (lb, _) = cell([r[1] for r in ra]), cell([r[1] for r in rb])
            tails = [f"{statistics.median([r[3] for r in rs]):.0f} / "
                     f"{statistics.median([r[4] for r in rs]):.0f}" for rs in (ra, rb)]
            print(f"| {name} | {logcfg} | {ca} | {cb} | {mb / ma:.3f} | {la} | {lb} | "
                  f"{tails[0]} | {tails[1]} |")
            for build, rs in (("A", ra), ("B", rb)):
                for tag, node in (("server", "alpha"), ("peer", "beta")):
                    m = perf_medians(rs, tag, window)
                    if m:
                        prof.append(f"- {name}, {logcfg} log, {build} {node}: {m}")
    if prof:
        print("\nPer I/O, medians over the repetitions (perf stat over the window): switches,"
              " syscalls, wake-ups issued, CPU time")
        print("\n".join(prof))


if __name__ == "__main__":
    main()
