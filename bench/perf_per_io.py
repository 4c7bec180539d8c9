#!/usr/bin/env python3
"""Per-I/O kernel event counts of the servers (bench/run with BENCH_PERF=1).

Usage: perf_per_io.py JSON_DIR RUNTIME

bench/run's sampler counts, with `perf stat -p PID` over the measured window (RUNTIME - 0.4 s),
each server's syscalls by kind, context switches, page faults and wake-ups (ROW.ID.server.perf; a mirror
row's peer in beta: ROW.ID.peer.perf). This divides them by the I/Os fio completed in that
window (its IOPS times the window) and prints one line per row, workload and process.
"""
import glob
import json
import os
import sys

SHORT = {
    "task-clock": "cpu_us",
    "context-switches": "switches",
    "page-faults": "faults",
    "raw_syscalls:sys_enter": "syscalls",
    "sched:sched_wakeup": "wakeups",
}


def counts(path):
    """{event: value} from a `perf stat -x,` file."""
    out = {}
    with open(path) as fh:
        for line in fh:
            parts = line.strip().split(",")
            if len(parts) < 3 or line.startswith("#"):
                continue
            try:
                value = float(parts[0])
            except ValueError:
                continue  # "<not counted>"
            out[parts[2]] = value
    return out


def ios(fio_json, window):
    with open(fio_json) as fh:
        job = json.load(fh)["jobs"][0]
    return (job["read"]["iops"] + job["write"]["iops"]) * window


def main():
    jdir, runtime = sys.argv[1], float(sys.argv[2])
    window = runtime - 0.4
    print("\nPer I/O over the measured window (perf stat; cpu_us = task-clock µs):")
    for path in sorted(glob.glob(os.path.join(jdir, "*.perf"))):
        base, tag, _ = os.path.basename(path).rsplit(".", 2)
        fio = os.path.join(jdir, base + ".json")
        if not os.path.exists(fio):
            continue
        n = ios(fio, window)
        if n <= 0:
            continue
        c = counts(path)
        if "task-clock" in c:
            c["task-clock"] *= 1000.0  # msec -> µs
        head = [f"{SHORT[k]} {c[k] / n:.2f}" for k in SHORT if k in c]
        calls = sorted(
            ((k.split("sys_enter_")[1], v / n) for k, v in c.items() if "sys_enter_" in k),
            key=lambda kv: -kv[1],
        )
        rest = [f"{name} {v:.2f}" for name, v in calls if v >= 0.01]
        print(f"- {base} {tag}: " + ", ".join(head) + "; " + ", ".join(rest))


if __name__ == "__main__":
    main()
