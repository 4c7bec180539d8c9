#!/usr/bin/env python3
"""Starts the qsd-mirror row's active mirror over QMP and waits until it is READY.

Usage: qmp_mirror.py QMP_SOCKET QSD_PID   (called by bench/mirror.sh)
Sends blockdev-mirror from node "src" to node "tgt" with sync=full and copy-mode=write-blocking
(every guest write completes only once it is on both sides: the synchronous mirror this row
stands for) and returns once BLOCK_JOB_READY arrives, i.e. the initial copy is done and the job
is in its steady mirroring state. Exit status 0 when READY, 1 otherwise (message on stderr).
"""

import json
import os
import socket
import sys
import time

JOB = "bench-mirror"
CONNECT_TIMEOUT = 30
READY_TIMEOUT = 600


def connect(path, pid):
    """Connects to the QMP socket, waiting for qemu-storage-daemon to create it."""
    deadline = time.monotonic() + CONNECT_TIMEOUT
    while True:
        try:
            os.kill(pid, 0)
        except OSError:
            raise RuntimeError("qemu-storage-daemon exited before its QMP socket appeared")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return s
        except OSError:
            s.close()
            if time.monotonic() > deadline:
                raise RuntimeError(f"no QMP socket at {path} after {CONNECT_TIMEOUT} s")
            time.sleep(0.1)


class Qmp:
    """A minimal QMP client: one JSON object per line in both directions."""

    def __init__(self, sock):
        self.file = sock.makefile("rwb")

    def recv(self):
        line = self.file.readline()
        if not line:
            raise RuntimeError("QMP connection closed")
        return json.loads(line)

    def command(self, name, **args):
        """Sends one command and returns its result; events that arrive first are skipped."""
        self.file.write(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        self.file.flush()
        while True:
            msg = self.recv()
            if "error" in msg:
                raise RuntimeError(f"{name}: {msg['error'].get('desc', msg['error'])}")
            if "return" in msg:
                return msg["return"]

    def wait_ready(self):
        """Waits for BLOCK_JOB_READY of our job; a job that ends or fails first is an error."""
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            msg = self.recv()
            event, data = msg.get("event"), msg.get("data", {})
            if data.get("device", data.get("id")) != JOB:
                continue
            if event == "BLOCK_JOB_READY":
                return
            if event in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED", "BLOCK_JOB_ERROR"):
                raise RuntimeError(f"mirror job: {event} {data}")
        raise RuntimeError(f"mirror not READY after {READY_TIMEOUT} s")


def main(argv):
    if len(argv) != 3:
        print("usage: qmp_mirror.py QMP_SOCKET QSD_PID", file=sys.stderr)
        return 2
    try:
        sock = connect(argv[1], int(argv[2]))
        sock.settimeout(READY_TIMEOUT)
        qmp = Qmp(sock)
        qmp.recv()  # greeting
        qmp.command("qmp_capabilities")
        start = time.monotonic()
        qmp.command(
            "blockdev-mirror",
            **{"job-id": JOB, "device": "src", "target": "tgt", "sync": "full",
               "copy-mode": "write-blocking"},
        )
        qmp.wait_ready()
        job = next((j for j in qmp.command("query-block-jobs") if j.get("device") == JOB), {})
        # qemu before 8.2 has no "actively-synced": there write-blocking mode mirrors every
        # guest write synchronously from the job's start, so READY (the copy done) is enough.
        if "actively-synced" in job and not job["actively-synced"]:
            raise RuntimeError(f"READY but not actively synced: {job}")
        print(f"qmp_mirror: {JOB} READY and actively synced after {time.monotonic() - start:.1f} s")
        # The job keeps running after we disconnect; the daemon owns it, not this connection.
        return 0
    except (OSError, RuntimeError, ValueError) as e:
        print(f"qmp_mirror: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
