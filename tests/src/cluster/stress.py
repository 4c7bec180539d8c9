"""Overlapping concurrent requests on one NBD connection: DEPTH in flight for SECONDS, all
inside the first SPAN bytes, at 512-byte granularity with lengths from 512 B to 16 KiB, so
most requests overlap others in flight (on this and on the other connections). The mix:
75% writes of fresh random data (5% of them FUA), 10% write-zeroes, 10% trims, 5% flushes.
Exits 0 only if every request succeeded; prints the counts.

Usage: stress.py URI SEED SECONDS DEPTH SPAN
"""
import os
import random
import sys
import time

import nbd

uri, seed = sys.argv[1], int(sys.argv[2])
secs, depth, span = float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
rng = random.Random(seed)
h = nbd.NBD()
h.connect_uri(uri)
counts = {"write": 0, "zero": 0, "trim": 0, "flush": 0}
errors = []
keep = {}  # buffers stay alive until their command completes


def on_done(n):
    def cb(err):
        if err.value:
            errors.append(err.value)
        keep.pop(n, None)
        return 1

    return cb


def issue(n):
    off = rng.randrange(0, span // 512) * 512
    length = min(rng.choice([512, 1024, 4096, 8192, 12288, 16384]), span - off)
    op = rng.random()
    if op < 0.75:
        buf = os.urandom(length)
        keep[n] = buf
        flags = nbd.CMD_FLAG_FUA if rng.random() < 0.05 else 0
        h.aio_pwrite(buf, off, completion=on_done(n), flags=flags)
        counts["write"] += 1
    elif op < 0.85:
        h.aio_zero(length, off, completion=on_done(n))
        counts["zero"] += 1
    elif op < 0.95:
        h.aio_trim(length, off, completion=on_done(n))
        counts["trim"] += 1
    else:
        h.aio_flush(completion=on_done(n))
        counts["flush"] += 1


n = 0
end = time.monotonic() + secs
while time.monotonic() < end:
    while h.aio_in_flight() < depth:
        n += 1
        issue(n)
    h.poll(-1)
while h.aio_in_flight() > 0:
    h.poll(-1)
h.flush()
h.shutdown()
print("requests", counts, "errors", errors[:10], flush=True)
sys.exit(1 if errors else 0)
