"""The oracle of "every fsync'ed file survives a power cut" on a filesystem.

write ROOT LOG STOP SEED: until the file STOP exists (or the process dies), writes files
ROOT/fNNN (200 names, rewritten over and over) of random contents and sizes, each as a new
version: write ROOT/fNNN.tmp, fsync it, rename it over ROOT/fNNN, fsync ROOT (the atomic
replace: after a cut a name holds one whole version, never a torn one). LOG (O_APPEND, a line per write(2)) gets
  "B NAME SHA256"  before the version is written
  "D NAME SHA256"  once the version is durable (file and directory fsync'ed)
so the last line of a name may be a "B" whose version the power cut interrupted.

check ROOT LOG: every name with a "D" line holds its last durable version, or the version
begun after it (the cut may have come after the data was durable but before the "D" line).
Prints "checked N files, M versions durable" or the mismatches, exit 1.
"""
import hashlib
import os
import random
import sys


def write(root, log, stop, seed):
    rng = random.Random(seed)
    os.makedirs(root, exist_ok=True)
    lf = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
    dfd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    while not os.path.exists(stop):
        name = "f%03d" % rng.randrange(200)
        data = rng.randbytes(rng.choice([512, 4096, 20000, 65536, 300000]))
        digest = hashlib.sha256(data).hexdigest()
        os.write(lf, ("B %s %s\n" % (name, digest)).encode())
        path = os.path.join(root, name)
        target = path + ".tmp"
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        os.close(fd)
        os.rename(target, path)
        os.fsync(dfd)
        os.write(lf, ("D %s %s\n" % (name, digest)).encode())


def check(root, log):
    durable, begun = {}, {}
    with open(log) as f:
        for line in f:
            parts = line.split()
            if len(parts) != 3 or len(parts[2]) != 64:
                continue  # a torn last line
            kind, name, digest = parts
            if kind == "B":
                begun[name] = digest
            elif kind == "D":
                durable[name] = digest
                begun.pop(name, None)
    bad = []
    for name, digest in sorted(durable.items()):
        try:
            with open(os.path.join(root, name), "rb") as f:
                got = hashlib.sha256(f.read()).hexdigest()
        except OSError as e:
            bad.append("%s: %s" % (name, e))
            continue
        if got not in (digest, begun.get(name)):
            bad.append("%s: holds %s, durable %s" % (name, got[:12], digest[:12]))
    if bad:
        print("%d of %d files lost or wrong:" % (len(bad), len(durable)))
        print("\n".join(bad[:20]))
        sys.exit(1)
    versions = sum(1 for line in open(log) if line.startswith("D "))
    print("checked %d files, %d versions durable" % (len(durable), versions))


if __name__ == "__main__":
    if sys.argv[1] == "write":
        write(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    else:
        check(sys.argv[2], sys.argv[3])
