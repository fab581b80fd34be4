"""Minimal DNS A query: python3 dns_query.py SERVER NAME udp|tcp — prints the A records."""
import random
import socket
import struct
import sys

server, name, transport = sys.argv[1], sys.argv[2], sys.argv[3]
qid = random.randint(0, 0xFFFF)
question = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
query = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + question + struct.pack(">HH", 1, 1)
family = socket.AF_INET6 if ":" in server else socket.AF_INET
if transport == "udp":
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.settimeout(3)
    s.sendto(query, (server, 53))
    reply = s.recv(4096)
else:
    s = socket.create_connection((server, 53), timeout=3)
    s.sendall(struct.pack(">H", len(query)) + query)
    length = struct.unpack(">H", s.recv(2))[0]
    reply = b""
    while len(reply) < length:
        reply += s.recv(length - len(reply))
rid, flags, qd, an = struct.unpack(">HHHH", reply[:8])
assert rid == qid, "reply id differs"
pos = 12 + len(question) + 4
for _ in range(an):
    if reply[pos] & 0xC0 == 0xC0:
        pos += 2
    else:
        while reply[pos]:
            pos += reply[pos] + 1
        pos += 1
    rtype, _, _, rdlen = struct.unpack(">HHIH", reply[pos : pos + 10])
    pos += 10
    if rtype == 1:
        print(socket.inet_ntoa(reply[pos : pos + rdlen]))
    pos += rdlen
