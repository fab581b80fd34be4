"""Request/response latency: python3 rr.py ADDR PORT SECONDS

One TCP connection (TCP_NODELAY); sends 1 byte and waits for the echo, as fast as it can for
SECONDS. Prints "p50_us p99_us count". The server is tcp_echo.py."""
import socket
import sys
import time

addr, port, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.create_connection((addr, port), timeout=5)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
samples = []
end = time.perf_counter() + secs
while time.perf_counter() < end:
    t0 = time.perf_counter_ns()
    s.sendall(b"x")
    if s.recv(1) != b"x":
        sys.exit("echo lost")
    samples.append(time.perf_counter_ns() - t0)
samples.sort()
p = lambda q: samples[min(len(samples) - 1, int(q * len(samples)))] / 1000
print(f"{p(0.5):.1f} {p(0.99):.1f} {len(samples)}")
