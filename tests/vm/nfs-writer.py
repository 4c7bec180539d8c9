"""Writes files of 1 KiB to 64 MiB into DIR (an NFS mount) until STOP exists, and logs each
file that was closed successfully: `closed NAME SIZE SHA256 STALL` (STALL: the longest time,
in seconds, any single write, fsync or close has taken so far). Each file is written in
64 KiB pieces, fsync'ed, closed; only then logged (log line fsync'ed too), so a logged file
was acknowledged by the server as stable. Usage: nfs-writer.py DIR LOG STOP SEED"""
import hashlib
import os
import sys
import time

SIZES = [1 << 10, 64 << 10, 1 << 20, 8 << 20, 64 << 20]
PIECE = 64 << 10


def piece(seed, n, i, length):
    block = hashlib.sha256(b"%d:%d:%d" % (seed, n, i)).digest()
    return (block * (length // len(block) + 1))[:length]


def main():
    root, log_path, stop, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    stall = 0.0
    log = open(log_path, "a", buffering=1)

    def timed(f, *args):
        nonlocal stall
        t = time.monotonic()
        r = f(*args)
        stall = max(stall, time.monotonic() - t)
        return r

    n = 0
    while not os.path.exists(stop):
        size = SIZES[n % len(SIZES)]
        name = "f%04d-%d" % (n, size)
        h = hashlib.sha256()
        fd = timed(os.open, os.path.join(root, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        for i in range(0, size, PIECE):
            data = piece(seed, n, i, min(PIECE, size - i))
            h.update(data)
            timed(os.write, fd, data)
        timed(os.fsync, fd)
        timed(os.close, fd)
        log.write("closed %s %d %s %.3f\n" % (name, size, h.hexdigest(), stall))
        os.fsync(log.fileno())
        n += 1
    log.write("end %d %.3f\n" % (n, stall))
    os.fsync(log.fileno())


main()
