"""HTTP server for the transfer tests: python3 http_server.py PORT DIR

Listens on [::]:PORT (IPv4 too, as mapped addresses). GET /NAME serves DIR/NAME; PUT /NAME
stores the body in DIR/NAME and answers with its SHA-256, so the client can compare."""
import hashlib
import http.server
import os
import socket
import sys

port, root = int(sys.argv[1]), sys.argv[2]


class Handler(http.server.SimpleHTTPRequestHandler):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, directory=root, **kwargs)

    def log_message(self, *args):
        pass

    def do_PUT(self):
        length = int(self.headers["Content-Length"])
        digest = hashlib.sha256()
        path = os.path.join(root, os.path.basename(self.path))
        with open(path, "wb") as out:
            while length > 0:
                chunk = self.rfile.read(min(length, 1 << 20))
                if not chunk:
                    break
                digest.update(chunk)
                out.write(chunk)
                length -= len(chunk)
        body = (digest.hexdigest() + "\n").encode()
        self.send_response(201 if length == 0 else 400)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


Server(("::", port), Handler).serve_forever()
