"""Connection rate: python3 crr.py ADDR PORT SECONDS

Repeats connect, 1-byte request, 1-byte response, close for SECONDS; prints connections per
second and the p50 time of one such transaction in µs. The server is tcp_echo.py."""
import socket
import sys
import time

addr, port, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
samples = []
end = time.perf_counter() + secs
start = time.perf_counter()
while time.perf_counter() < end:
    t0 = time.perf_counter_ns()
    with socket.create_connection((addr, port), timeout=5) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(b"x")
        if s.recv(1) != b"x":
            sys.exit("echo lost")
    samples.append(time.perf_counter_ns() - t0)
elapsed = time.perf_counter() - start
samples.sort()
print(f"{len(samples) / elapsed:.1f} {samples[len(samples) // 2] / 1000:.1f}")
