"""Connection churn: python3 conn_client.py ADDR PORT sequential|concurrent N

Each connection sends a line, reads the same line back and closes. Concurrent mode opens all N
first, then exchanges on each, then closes them all. Prints "ok N"; exits non-zero on any
failure."""
import socket
import sys

addr, port, mode, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
family = socket.AF_INET6 if ":" in addr else socket.AF_INET


def exchange(s, i):
    line = f"hello {i}\n".encode()
    s.sendall(line)
    got = b""
    while len(got) < len(line):
        chunk = s.recv(100)
        if not chunk:
            sys.exit(f"connection {i}: closed early")
        got += chunk
    if got != line:
        sys.exit(f"connection {i}: got {got!r}")


if mode == "sequential":
    for i in range(n):
        with socket.create_connection((addr, port), timeout=5) as s:
            exchange(s, i)
else:
    conns = [socket.create_connection((addr, port), timeout=5) for _ in range(n)]
    for i, s in enumerate(conns):
        exchange(s, i)
    for s in conns:
        s.close()
print("ok", n)
