"""ICMP echo (there is no ping(8) here): sends one echo request a second to ADDR until a
reply from ADDR arrives (exit 0) or SECS seconds pass (exit 1).

Usage: python3 -c "$(cat ping.py)" ADDR SECS
"""
import os
import select
import socket
import struct
import sys
import time

addr, secs = sys.argv[1], float(sys.argv[2])


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
ident = os.getpid() & 0xFFFF
deadline = time.time() + secs
seq = 0
while time.time() < deadline:
    seq += 1
    body = struct.pack("!HH", ident, seq) + b"blockd-failover-test"
    hdr = struct.pack("!BBH", 8, 0, checksum(struct.pack("!BBH", 8, 0, 0) + body))
    sock.sendto(hdr + body, (addr, 0))
    until = min(deadline, time.time() + 1.0)
    while time.time() < until:
        ready, _, _ = select.select([sock], [], [], max(0.0, until - time.time()))
        if not ready:
            break
        pkt, src = sock.recvfrom(2048)
        ihl = (pkt[0] & 0x0F) * 4
        typ, _, _, rid, rseq = struct.unpack("!BBHHH", pkt[ihl:ihl + 8])
        if src[0] == addr and typ == 0 and rid == ident:
            print("reply from %s seq %d" % (addr, rseq))
            sys.exit(0)
print("no reply from %s in %.0f s" % (addr, secs))
sys.exit(1)
