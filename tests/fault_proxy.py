"""A fault-injecting HTTP proxy for the storage tests: it stands between boto3 and the S3 server on
loopback and, for the requests its plan picks, answers 503 SlowDown (as S3 does when throttling),
holds the answer past the client's read timeout ("stall": the server never sees the request), or
forwards the request and then withholds the server's answer ("lost": it was done, the client cannot
know), or sends the answer's headers and half its body and drops the connection ("cut"). Everything
else is forwarded as it came. A real S3
server cannot be made to fail one chosen request; the proxy makes the fault real HTTP all the same."""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)

# (request number from 1, method, path) -> None (forward), "503", "stall", "lost" or "cut"
Plan = Callable[[int, str, str], str | None]


class FaultProxy:
    def __init__(self, upstream: str, plan: Plan, stall_s: float = 5.0):
        self.upstream = urlsplit(upstream)
        self.plan = plan
        self.stall_s = stall_s
        self.requests = 0
        self.injected: list[tuple[int, str, str, str]] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # quiet
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with proxy._lock:
                    proxy.requests += 1
                    number = proxy.requests
                fault = proxy.plan(number, self.command, self.path)
                if fault is not None:
                    with proxy._lock:
                        proxy.injected.append((number, self.command, self.path, fault))
                if fault == "503":
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(SLOW_DOWN)
                    return
                if fault == "stall":
                    time.sleep(proxy.stall_s)  # the client gives up first; its retry is a new request
                    self.close_connection = True
                    return
                upstream = http.client.HTTPConnection(
                    proxy.upstream.hostname, proxy.upstream.port, timeout=30
                )
                upstream.request(self.command, self.path, body=body, headers=dict(self.headers.items()))
                answer = upstream.getresponse()
                data = answer.read()
                if fault == "lost":
                    upstream.close()
                    time.sleep(proxy.stall_s)  # done upstream; the client times out and retries
                    self.close_connection = True
                    return
                self.send_response(answer.status)
                for name, value in answer.getheaders():
                    if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if fault == "cut":  # the whole length announced, half of it sent
                    self.wfile.write(data[: len(data) // 2])
                    self.close_connection = True
                elif self.command != "HEAD":
                    self.wfile.write(data)
                upstream.close()

            do_GET = do_PUT = do_POST = do_PATCH = do_HEAD = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
