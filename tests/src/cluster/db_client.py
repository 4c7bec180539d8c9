"""A MariaDB client that inserts rows in autocommit and logs every id whose COMMIT returned.

Runs in the client namespace and talks to the VIP through the `mariadb` CLI (no python DB
module is installed): one long-lived `mariadb --batch` process per connection, fed
"INSERT IGNORE INTO t (id) VALUES (N); SELECT N;" line by line. The SELECT's answer arrives
only after the INSERT returned, i.e. after its autocommit; only then is "ok N" appended to
LOG (O_APPEND, one write per line). An id whose statement failed is retried on the next
connection (INSERT IGNORE: if the failed attempt did commit, the retry changes nothing), so
the table must end up holding exactly 1..=last acknowledged id.

Failures are logged as "fail N connect|statement OK_ON_CONN ERROR...": `connect` when the
CLI could not connect at all (VIP moving), `statement` when a connected session lost its
statement; OK_ON_CONN is how many commits that session had acknowledged before. A session
answers within TIMEOUT seconds or is killed (a dead primary sends no RST).

Stops cleanly (after the current statement) when STOPFILE exists.

Usage: db_client.py HOST LOG STOPFILE
"""
import os
import select
import subprocess
import sys
import time

host, log, stopfile = sys.argv[1], sys.argv[2], sys.argv[3]
TIMEOUT = 5.0
fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)


def out(line):
    os.write(fd, (line + "\n").encode())


def session(next_id):
    """One connection; returns the next id to insert when it fails or the stop file shows."""
    cli = ["mariadb", "--no-defaults", "-h", host, "--protocol=TCP", "-u", "app", "-papp",
           "--connect-timeout=2", "--batch", "--skip-column-names", "--unbuffered",
           "--skip-reconnect", "app"]
    p = subprocess.Popen(cli, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    ok = 0
    why = "timeout"
    try:
        while not os.path.exists(stopfile):
            p.stdin.write(b"INSERT IGNORE INTO t (id) VALUES (%d); SELECT %d;\n"
                          % (next_id, next_id))
            p.stdin.flush()
            ready, _, _ = select.select([p.stdout], [], [], TIMEOUT)
            line = p.stdout.readline() if ready else b""
            if line.strip() != str(next_id).encode():
                why = "eof" if ready else "timeout"
                break
            out("ok %d" % next_id)
            ok += 1
            next_id += 1
        else:
            p.stdin.close()
            p.wait(timeout=10)
            return next_id, None
    except (BrokenPipeError, OSError) as e:
        why = "pipe: %s" % e
    p.kill()
    p.wait()
    err = p.stderr.read().decode(errors="replace").strip().replace("\n", " | ")
    kind = "statement" if " at line " in err or ok > 0 else "connect"
    if not err:
        kind = "statement" if ok > 0 else "connect"
    out("fail %d %s %d %s %s" % (next_id, kind, ok, why, err[-300:]))
    return next_id, kind


next_id = 1
while not os.path.exists(stopfile):
    next_id, failed = session(next_id)
    if failed:
        time.sleep(0.1)
out("end %d" % next_id)
