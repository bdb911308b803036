#!/usr/bin/env python3
"""delay-proxy.py UPSTREAM_PORT LOG [--delay-ms 20] [--rate-mbs 50] [--port-file FILE]

An HTTP proxy on 127.0.0.1 (a free port, written to --port-file and stdout) in front of a
registry on 127.0.0.1:UPSTREAM_PORT that makes network cost visible on one host (bench.sh,
issue 14): every request waits --delay-ms before it is forwarded, and every response body
shares one --rate-mbs (MB/s, 10^6 bytes) link with the others, as a real network would.

LOG gets one line per request, written as the response ends:
    METHOD PATH STATUS BODY_BYTES_SENT SECONDS RANGE
so the bytes a command fetched are the sum of the lines it added (bench.sh counts lines before
and after). Plain HTTP only; stops on SIGTERM/SIGINT.
"""
import argparse
import http.client
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}
CHUNK = 256 * 1024


class Link:
    """One shared link of `rate` bytes/s: a sender reserves the next free slot for each chunk."""

    def __init__(self, rate):
        self.rate = rate
        self.free_at = 0.0
        self.lock = threading.Lock()

    def send(self, n):
        with self.lock:
            start = max(time.monotonic(), self.free_at)
            self.free_at = start + n / self.rate
            done = self.free_at
        pause = done - time.monotonic()
        if pause > 0:
            time.sleep(pause)


def handler(upstream_port, delay, link, log, log_lock):
    class Proxy(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as registry clients expect

        def log_message(self, *args):
            pass

        def forward(self):
            began = time.monotonic()
            sent, status = 0, 0
            try:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    self.send_error(501, "chunked request bodies are not supported by delay-proxy")
                    return
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else None
                time.sleep(delay)
                conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=600)
                try:
                    # putheader, not a dict: a header may repeat (skopeo sends several Accept).
                    conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                    for k, v in self.headers.items():
                        if k.lower() not in HOP and k.lower() != "content-length":
                            conn.putheader(k, v)
                    if body is not None:
                        conn.putheader("Content-Length", str(len(body)))
                    conn.endheaders(body)
                    resp = conn.getresponse()
                    status = resp.status
                    length = resp.getheader("Content-Length")
                    # A body of unknown length is read whole so the client still gets one.
                    data = None
                    if length is None and self.command != "HEAD" and status not in (204, 304):
                        data = resp.read()
                        length = str(len(data))
                    self.send_response(status)
                    for k, v in resp.getheaders():
                        if k.lower() not in HOP and k.lower() != "content-length":
                            self.send_header(k, v)
                    if length is not None:
                        self.send_header("Content-Length", length)
                    self.end_headers()
                    if self.command == "HEAD":
                        return
                    if data is not None:
                        for i in range(0, len(data), CHUNK):
                            link.send(len(data[i:i + CHUNK]))
                            self.wfile.write(data[i:i + CHUNK])
                            sent += len(data[i:i + CHUNK])
                        return
                    while True:
                        chunk = resp.read(CHUNK)
                        if not chunk:
                            break
                        link.send(len(chunk))
                        self.wfile.write(chunk)
                        sent += len(chunk)
                finally:
                    conn.close()
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client went away mid-body (an aborted read)
            finally:
                rng = (self.headers.get("Range") or "-").replace(" ", "")
                line = f"{self.command} {self.path} {status} {sent} {time.monotonic() - began:.3f} {rng}\n"
                with log_lock:
                    log.write(line)
                    log.flush()

        do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = forward

    return Proxy


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("upstream_port", type=int)
    p.add_argument("log")
    p.add_argument("--delay-ms", type=float, default=20.0)
    p.add_argument("--rate-mbs", type=float, default=50.0)
    p.add_argument("--port-file")
    a = p.parse_args()
    log = open(a.log, "a", encoding="utf-8")
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler(
        a.upstream_port, a.delay_ms / 1000, Link(a.rate_mbs * 1e6), log, threading.Lock()))
    server.daemon_threads = True
    port = server.server_address[1]
    if a.port_file:
        with open(a.port_file + ".tmp", "w") as f:
            f.write(f"{port}\n")
        os.replace(a.port_file + ".tmp", a.port_file)
    print(port, flush=True)

    def stop(*_):
        threading.Thread(target=server.shutdown).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
