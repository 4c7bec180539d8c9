"""The oracle of "every acknowledged write survives": writes numbered 4 KiB blocks through
NBD, DEPTH requests in flight, round after round over blocks 0..NBLOCKS, until the connection
fails. A line "ROUND BLOCK" is appended to LOG (unbuffered, O_APPEND) inside the completion
callback, i.e. only after the server's reply said success; nothing else is logged there.

Block BLOCK of round ROUND holds b"R%06dB%08d" % (ROUND, BLOCK) repeated 256 times. Since
DEPTH < NBLOCKS, two rounds of the same block are never in flight together: after a crash a
block holds its last acknowledged round or, if the next one was in flight, that one.

Usage: acked_writer.py URI LOG NBLOCKS DEPTH
"""
import os
import sys

import nbd

uri, log, nblocks, depth = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
assert depth < nblocks
fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
h = nbd.NBD()
h.connect_uri(uri)
in_flight = {}  # keeps each buffer alive until its command completes
errors = []


def payload(rnd, block):
    return (b"R%06dB%08d" % (rnd, block)) * 256


def on_done(rnd, block):
    def cb(err):
        if err.value == 0:
            os.write(fd, b"%d %d\n" % (rnd, block))
        else:
            errors.append(err.value)
        in_flight.pop((rnd, block), None)
        return 1

    return cb


rnd, block = 1, 0
try:
    while not errors:
        while h.aio_in_flight() < depth:
            buf = payload(rnd, block)
            in_flight[(rnd, block)] = buf
            h.aio_pwrite(buf, block * 4096, completion=on_done(rnd, block))
            block += 1
            if block == nblocks:
                rnd, block = rnd + 1, 0
        h.poll(-1)
    print("writer stopped: a write failed with errno %d" % errors[0], flush=True)
except nbd.Error as e:
    print("writer stopped: %s" % e, flush=True)
sys.exit(3)
