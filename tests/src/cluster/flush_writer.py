"""The oracle of "every write acknowledged before the last completed FLUSH survives a power
cut": random 4 KiB writes over blocks 0..NBLOCKS, DEPTH in flight, and a FLUSH after every
FLUSH_EVERY acknowledged writes, for SECS seconds or until the connection fails.

LOG (unbuffered, O_APPEND) gets, in the order the replies arrived:
  "W SEQ BLOCK"  write SEQ of BLOCK acknowledged (logged in the completion callback)
  "S N"          flush N sent: it covers every write logged before this line
  "F N"          flush N acknowledged

Write SEQ of BLOCK holds b"Q%014dB%016d" % (SEQ, BLOCK) repeated 128 times. A block is never
written twice at once, so a later acknowledged write of a block is also a later one on disk.

Usage: flush_writer.py URI LOG SEED SECS NBLOCKS DEPTH FLUSH_EVERY
"""
import os
import random
import sys
import time

import nbd

uri, log = sys.argv[1], sys.argv[2]
seed, secs, nblocks, depth, every = (int(a) for a in sys.argv[3:8])
rng = random.Random(seed)
fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
h = nbd.NBD()
h.connect_uri(uri)
busy = {}  # block -> buffer, alive until its write completes
errors = []
state = {"acked": 0, "flushes": 0, "flushing": False}


def on_write(seq, block):
    def cb(err):
        if err.value == 0:
            os.write(fd, b"W %d %d\n" % (seq, block))
            state["acked"] += 1
        else:
            errors.append(err.value)
        busy.pop(block, None)
        return 1

    return cb


def on_flush(n):
    def cb(err):
        if err.value == 0:
            os.write(fd, b"F %d\n" % n)
        else:
            errors.append(err.value)
        state["flushing"] = False
        return 1

    return cb


seq, end = 0, time.monotonic() + secs
try:
    while not errors and time.monotonic() < end:
        if state["acked"] >= every and not state["flushing"]:
            state["acked"], state["flushing"] = 0, True
            state["flushes"] += 1
            os.write(fd, b"S %d\n" % state["flushes"])
            h.aio_flush(completion=on_flush(state["flushes"]))
        while h.aio_in_flight() < depth + 1:
            block = rng.randrange(nblocks)
            if block in busy:
                continue
            seq += 1
            buf = (b"Q%014dB%016d" % (seq, block)) * 128
            busy[block] = buf
            h.aio_pwrite(buf, block * 4096, completion=on_write(seq, block))
        h.poll(100)
    while h.aio_in_flight() > 0 and not errors:
        h.poll(100)
except nbd.Error as e:
    print("writer stopped: %s" % e, flush=True)
    sys.exit(3)
if errors:
    print("writer stopped: a request failed with errno %d" % errors[0], flush=True)
    sys.exit(3)
print("writer done: %d writes, %d flushes" % (seq, state["flushes"]), flush=True)
