#!/usr/bin/env python3
"""Turns the sysbench outputs of one bench/db run into Markdown tables and the target checks.

Usage: db_report.py RES_DIR "ROWS" "LOADS" "CLIENTS"   (called by bench/db; RES_DIR holds
ROW.LOAD.CLIENTS.txt, sysbench's output, and ROW.LOAD.CLIENTS.stat, the row's loop device's
/sys/block/*/stat before and after the cell).
Exit status: 0 when every target check passes, 1 when one fails or cannot be computed.
The targets are issue 13's, as ratios to rows of the same run.
"""

import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import verdict  # noqa: E402 (the bench's one PASS/FAIL format)

TXN = re.compile(r"^\s*transactions:\s+(\d+)\s+\(([\d.]+) per sec\.\)", re.M)
P95 = re.compile(r"^\s*95th percentile:\s+([\d.]+)", re.M)
# Fields of /sys/block/<dev>/stat (Documentation/block/stat.rst), 0-based.
WRITES, WSECT, WTICKS, FLUSHES, FTICKS = 4, 6, 7, 15, 16


def load_cell(res, row, load, clients):
    """Returns {"txn", "tps", "p95"} plus the device's deltas, or None if the cell has no run."""
    base = os.path.join(res, f"{row}.{load}.{clients}")
    try:
        with open(base + ".txt", encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return None
    txn, p95 = TXN.search(text), P95.search(text)
    if not txn or not p95:
        return None
    cell = {"txn": int(txn[1]), "tps": float(txn[2]), "p95": float(p95[1])}
    try:
        with open(base + ".stat", encoding="utf-8") as f:
            before, after = ([int(x) for x in line.split()] for line in f.read().splitlines()[:2])
        cell["dev"] = [a - b for a, b in zip(after, before)]
    except (OSError, ValueError):
        pass
    return cell


def tps_table(cells, rows, load, clients):
    head = "| row | " + " | ".join(f"{n} client{'s' * (n != '1')} TPS | p95 ms" for n in clients)
    lines = [f"{load}:", "", head + " |", "|---|" + "---:|---:|" * len(clients)]
    for row in rows:
        out = []
        for n in clients:
            c = cells.get((row, load, n))
            out += [f"{c['tps']:,.0f}", f"{c['p95']:.2f}"] if c else ["n/a", "n/a"]
        lines.append(f"| {row} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def device_figures(c):
    """Flushes and writes per transaction, their mean latency and the flushes' share of the
    commit time, from the loop device's counters (which count the warm-up of the connections
    too: a slight overcount)."""
    d, txn = c.get("dev"), c["txn"]
    if not d or len(d) <= FTICKS or not txn:
        return None
    per_txn_ms = 1000 / c["tps"] if c["tps"] else 0
    flush_ms = d[FTICKS] / d[FLUSHES] if d[FLUSHES] else 0
    flushes = d[FLUSHES] / txn
    return {
        "flushes": flushes,
        "flush_ms": flush_ms,
        "writes": d[WRITES] / txn,
        "kib": d[WSECT] / 2 / txn,
        "write_ms": d[WTICKS] / d[WRITES] if d[WRITES] else 0,
        "share": flushes * flush_ms / per_txn_ms if per_txn_ms else 0,
        "per_txn_ms": per_txn_ms,
    }


def device_table(cells, rows, loads, n):
    lines = [
        f"Loop device per transaction at {n} client{'s' * (n != '1')} (/sys/block/loopN/stat):",
        "",
        "| row | load | ms per txn | flushes/txn | flush ms | flushes × flush ms | writes/txn "
        "| KiB/txn | write ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for load in loads:
        for row in rows:
            c = cells.get((row, load, n))
            f = device_figures(c) if c else None
            if not f:
                lines.append(f"| {row} | {load} |" + " n/a |" * 7)
                continue
            lines.append(
                f"| {row} | {load} | {f['per_txn_ms']:.2f} | {f['flushes']:.1f} | "
                f"{f['flush_ms']:.2f} | {f['flushes'] * f['flush_ms']:.2f} ({f['share']:.0%}) | "
                f"{f['writes']:.1f} | {f['kib']:.0f} | {f['write_ms']:.2f} |"
            )
    return "\n".join(lines)


def tps(cells, row, load, n):
    c = cells.get((row, load, n))
    return c["tps"] if c else None


def checks(cells, loads, clients):
    """Issue 13: mirrored >= 2x qsd-mirror TPS at 1 client and >= 70% of unmirrored."""
    out, ok = [], True
    for load in loads:
        ours, qsd, alone = (tps(cells, r, load, "1") for r in ("blockd-mirror", "qsd-mirror", "blockd"))
        for name, theirs, good in (
            ("2x qsd-mirror", qsd, lambda o, t: o >= 2 * t),
            ("70% of blockd", alone, lambda o, t: o >= 0.7 * t),
        ):
            label = f"blockd-mirror >= {name} TPS, {load}, 1 client"
            if not ours or not theirs:
                out.append(verdict(False, f"{label}: a row is missing"))
                ok = False
                continue
            passed = good(ours, theirs)
            ok &= passed
            out.append(verdict(passed, f"{label}: {ours:,.0f} vs {theirs:,.0f} ({ours / theirs:.2f}x)"))
    for load in loads:
        parts = []
        for n in clients:
            ours, qsd, alone = (tps(cells, r, load, n) for r in ("blockd-mirror", "qsd-mirror", "blockd"))
            if ours and qsd and alone:
                parts.append(f"{n}: {ours / qsd:.2f}x qsd-mirror, {ours / alone:.0%} of blockd")
        if parts:
            out.append(f"info  blockd-mirror {load} by clients: " + "; ".join(parts))
    return out, ok


def main(argv):
    res, rows, loads, clients = argv[1], argv[2].split(), argv[3].split(), argv[4].split()
    cells = {}
    for row in rows:
        for load in loads:
            for n in clients:
                c = load_cell(res, row, load, n)
                if c:
                    cells[(row, load, n)] = c
    for load in loads:
        print(tps_table(cells, rows, load, clients))
        print()
    print(device_table(cells, rows, loads, clients[0]))
    print()
    lines, ok = checks(cells, loads, clients)
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
