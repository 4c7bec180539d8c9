#!/usr/bin/python3
"""Durable 4 KiB random writes at queue depth 1, which fio's nbd engine cannot send (no FUA).

Usage: sync_qd1.py MODE TARGET SIZE RUNTIME RAMP OUT
  MODE    fua   every write carries FUA (NBD) / RWF_DSYNC (a file, O_DIRECT)
          flush every write is followed by a FLUSH (NBD) / fdatasync (a file)
  TARGET  an NBD URI (nbd+unix://...), or a file path (opened O_DIRECT)
  SIZE    bytes of the target the offsets are drawn from (4 KiB aligned)
  RUNTIME, RAMP  seconds measured, seconds run before measuring
  OUT     where fio-shaped JSON goes (jobs[0].write.iops, .lat_ns.percentile, usr/sys_cpu),
          so bench/report.py reads it like fio's

A request's latency is the write plus, in flush mode, its flush: what a database's commit
waits for. Run with /usr/bin/python3 (the libnbd bindings).
"""

import json
import mmap
import os
import random
import sys
import time

BS = 4096


def nbd_target(uri, mode):
    import nbd  # only the NBD rows need libnbd

    h = nbd.NBD()
    h.connect_uri(uri)
    buf = os.urandom(BS)
    if mode == "fua":
        return lambda off: h.pwrite(buf, off, nbd.CMD_FLAG_FUA)

    def write_flush(off):
        h.pwrite(buf, off)
        h.flush()

    return write_flush


def file_target(path, mode):
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    buf = mmap.mmap(-1, BS)  # page aligned, as O_DIRECT needs
    buf.write(os.urandom(BS))
    if mode == "fua":
        return lambda off: os.pwritev(fd, [buf], off, os.RWF_DSYNC)

    def write_flush(off):
        os.pwritev(fd, [buf], off)
        os.fdatasync(fd)

    return write_flush


def main(argv):
    mode, target, size, runtime, ramp, out = argv[1:7]
    size, runtime, ramp = int(size), float(runtime), float(ramp)
    if mode not in ("fua", "flush"):
        raise SystemExit(f"unknown mode {mode}")
    op = nbd_target(target, mode) if "://" in target else file_target(target, mode)
    blocks = size // BS
    rng = random.Random()
    end_ramp = time.monotonic() + ramp
    while time.monotonic() < end_ramp:
        op(rng.randrange(blocks) * BS)
    lat = []
    t0, c0 = time.monotonic(), os.times()
    stop = t0 + runtime
    now = t0
    while now < stop:
        off = rng.randrange(blocks) * BS
        start = time.monotonic_ns()
        op(off)
        lat.append(time.monotonic_ns() - start)
        now = time.monotonic()
    elapsed, c1 = now - t0, os.times()
    lat.sort()
    pct = lambda p: lat[min(len(lat) - 1, int(len(lat) * p / 100))]
    job = {
        "jobname": f"{mode}4k1",
        "error": 0,
        "write": {
            "iops": len(lat) / elapsed,
            "bw_bytes": len(lat) * BS / elapsed,
            "lat_ns": {"percentile": {"50.000000": pct(50), "99.000000": pct(99)}},
        },
        "usr_cpu": 100 * (c1.user - c0.user) / elapsed,
        "sys_cpu": 100 * (c1.system - c0.system) / elapsed,
    }
    with open(out, "w", encoding="utf-8") as f:
        json.dump({"jobs": [job]}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
