"""Writes files of 1 KiB to 64 MiB into DIR (an NFS mount) until STOP exists, and logs each
file that was closed successfully: `closed NAME SIZE SHA256 STALL FROM TO` (STALL: the longest
time, in seconds, any single write, fsync or close has taken so far; FROM and TO: when that
call began and ended, Unix time). Each file is written in 64 KiB pieces, fsync'ed, closed; only
then logged (log line fsync'ed too), so a logged file was acknowledged by the server as stable.
STOP is also looked for between pieces: the file being written then is closed unlogged
(`left NAME`), so stopping never waits for the rest of a 64 MiB file.
Usage: nfs-writer.py DIR LOG STOP SEED"""
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
    stall = [0.0, 0.0, 0.0]
    log = open(log_path, "a", buffering=1)

    def timed(f, *args):
        t, start = time.monotonic(), time.time()
        r = f(*args)
        took = time.monotonic() - t
        if took > stall[0]:
            stall[:] = [took, start, start + took]
        return r

    def note(line):
        log.write(line + " %.3f %.3f %.3f\n" % tuple(stall))
        os.fsync(log.fileno())

    n = 0
    while not os.path.exists(stop):
        size = SIZES[n % len(SIZES)]
        name = "f%04d-%d" % (n, size)
        h = hashlib.sha256()
        fd = timed(os.open, os.path.join(root, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        for i in range(0, size, PIECE):
            if os.path.exists(stop):
                break
            data = piece(seed, n, i, min(PIECE, size - i))
            h.update(data)
            timed(os.write, fd, data)
        else:
            timed(os.fsync, fd)
            timed(os.close, fd)
            note("closed %s %d %s" % (name, size, h.hexdigest()))
            n += 1
            continue
        os.close(fd)
        note("left %s" % name)
    note("end %d" % n)


main()
