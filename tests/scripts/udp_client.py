"""UDP echo client: python3 udp_client.py ADDR PORT SIZE... — sends one datagram of each size
and checks the echo comes back whole (same length, same bytes). Prints "ok SIZE" per size;
exits non-zero on the first failure."""
import os
import socket
import sys

addr, port = sys.argv[1], int(sys.argv[2])
family = socket.AF_INET6 if ":" in addr else socket.AF_INET
s = socket.socket(family, socket.SOCK_DGRAM)
s.settimeout(3)
s.connect((addr, port))
for size in map(int, sys.argv[3:]):
    payload = os.urandom(size)
    for attempt in range(3):
        s.send(payload)
        try:
            got = s.recv(65536)
            break
        except socket.timeout:
            continue
    else:
        sys.exit(f"no echo for {size} bytes")
    if got != payload:
        sys.exit(f"echo of {size} bytes came back as {len(got)} different bytes")
    print("ok", size)
