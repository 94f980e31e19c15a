#!/usr/bin/env python3
"""A TLS-terminating front for a local test server: every real S3 and CloudWatch endpoint is
HTTPS, and this lets a test run nightcopy's real rustls path against a server on 127.0.0.1.

It accepts TLS connections with the given certificate and key, and pipes the decrypted bytes to
the plain-http upstream and back, byte for byte (no HTTP parsing: whatever the client sends
reaches the server unchanged). Prints the port it listens on as its first stdout line.

    tls_proxy.py --listen 127.0.0.1:0 --upstream 127.0.0.1:PORT --cert cert.pem --key key.pem

Standard library only.
"""

import argparse
import socket
import ssl
import sys
import threading


def pipe(src, dst):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def serve(conn, context, upstream):
    try:
        tls = context.wrap_socket(conn, server_side=True)
    except (ssl.SSLError, OSError):
        # A client that refuses the certificate ends the handshake: that is the test's point.
        conn.close()
        return
    try:
        up = socket.create_connection(upstream)
    except OSError:
        tls.close()
        return
    t = threading.Thread(target=pipe, args=(up, tls), daemon=True)
    t.start()
    pipe(tls, up)
    t.join(timeout=5)
    tls.close()
    up.close()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--listen", default="127.0.0.1:0")
    p.add_argument("--upstream", required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    a = p.parse_args()
    host, port = a.listen.rsplit(":", 1)
    up_host, up_port = a.upstream.rsplit(":", 1)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(a.cert, a.key)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, int(port)))
    listener.listen(64)
    print(listener.getsockname()[1], flush=True)
    while True:
        conn, _ = listener.accept()
        threading.Thread(
            target=serve, args=(conn, context, (up_host, int(up_port))), daemon=True
        ).start()


if __name__ == "__main__":
    sys.exit(main())
