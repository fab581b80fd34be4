"""Tells each client its own address: python3 peer_server.py tcp|udp PORT

TCP: accepts on [::]:PORT (IPv4 too), writes "HOST PORT\n" of the peer and closes.
UDP: answers each datagram with "HOST PORT" of its sender. IPv4-mapped peers are printed
as plain IPv4."""
import socket
import sys

proto, port = sys.argv[1], int(sys.argv[2])


def show(addr):
    host = addr[0]
    if host.startswith("::ffff:"):
        host = host[7:]
    return f"{host} {addr[1]}".encode()


kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
s = socket.socket(socket.AF_INET6, kind)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", port))
if proto == "tcp":
    s.listen(64)
    while True:
        c, addr = s.accept()
        c.sendall(show(addr) + b"\n")
        c.close()
else:
    while True:
        data, addr = s.recvfrom(65535)
        s.sendto(show(addr), addr)
