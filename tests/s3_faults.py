"""A fault-injecting HTTP proxy on 127.0.0.1 in front of a real S3 endpoint (moto's server).

Clients reach it exactly as they reach S3 (``AWS_ENDPOINT_URL``); every request is
forwarded unchanged unless a fault rule matches it. Rules fire on the next matching
requests only, so a fault lands where the test wants it (e.g. on the first Parquet
part PUT) and every injected fault is recorded in ``injected``:

- ``error(status, code, times)``: answer with an S3 error (503 SlowDown, 500 InternalError,
  403 AccessDenied, ...) instead of forwarding;
- ``reset(times)``: read the request head, then reset the connection (RST) mid-request;
- ``lose_response(times)``: forward the request, then reset the connection instead of
  answering: the server did the work, the client does not know (a retry repeats it);
- ``outage(seconds)``: reset the matching request and stop listening for ``seconds``
  (connections refused), as an endpoint restarting mid-write does, then come back.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import urlparse

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection", "upgrade"}


@dataclass
class Rule:
    kind: str  # "error" | "reset" | "lost" | "outage"
    method: str | None
    key: str | None  # substring of the request path
    times: int
    status: int = 0
    code: str = ""
    seconds: float = 0.0
    after: int = 0  # matching requests to let through before the first fault

    def matches(self, method: str, path: str) -> bool:
        return (self.method in (None, method)) and (self.key is None or self.key in path)


class FaultyEndpoint:
    """Start with ``FaultyEndpoint(upstream_url)``; ``url`` is what clients use; ``stop()`` ends it."""

    def __init__(self, upstream: str):
        parsed = urlparse(upstream)
        self.upstream = (parsed.hostname, parsed.port)
        self.rules: list[Rule] = []
        self.injected: list[str] = []  # one line per fault actually injected
        self.requests = 0
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._down_until = 0.0
        self._listener = self._listen(0)
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    # --- what tests call -------------------------------------------------------------
    # Each rule fires on the next `times` requests whose method is `method` (any if None)
    # and whose path contains `key`, after letting the first `after` of them through.
    def error(self, status: int, code: str, times: int = 1, method: str | None = None, key: str | None = None,
              after: int = 0):
        self._add(Rule("error", method, key, times, status=status, code=code, after=after))

    def reset(self, times: int = 1, method: str | None = None, key: str | None = None, after: int = 0):
        self._add(Rule("reset", method, key, times, after=after))

    def lose_response(self, times: int = 1, method: str | None = None, key: str | None = None, after: int = 0):
        self._add(Rule("lost", method, key, times, after=after))

    def outage(self, seconds: float, method: str | None = None, key: str | None = None, after: int = 0):
        self._add(Rule("outage", method, key, 1, seconds=seconds, after=after))

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()

    def pending(self) -> int:
        """Faults armed but not injected yet."""
        with self._lock:
            return sum(rule.times for rule in self.rules)

    def stop(self) -> None:
        self._stopped.set()
        self._listener.close()

    # --- the proxy ---------------------------------------------------------------------
    def _add(self, rule: Rule) -> None:
        with self._lock:
            self.rules.append(rule)

    def _listen(self, port: int) -> socket.socket:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(64)
        listener.settimeout(0.2)
        return listener

    def _serve(self) -> None:
        while not self._stopped.is_set():
            wait = self._down_until - time.monotonic()
            if wait > 0:  # down: nothing listens, connections are refused
                if self._stopped.wait(wait):
                    break
                self._listener = self._listen(self.port)
                continue
            try:
                connection, address = self._listener.accept()
            except (socket.timeout, OSError):
                continue
            connection.settimeout(None)
            threading.Thread(target=self._handle, args=(connection, address), daemon=True).start()

    def _handle(self, connection: socket.socket, address) -> None:
        try:
            _Handler(connection, address, self)
        except OSError:  # the client went away, or the connection was reset on purpose
            pass

    def take(self, method: str, path: str) -> Rule | None:
        """The rule that fires on this request, if any (consumed)."""
        with self._lock:
            self.requests += 1
            fired = None
            for rule in self.rules:
                if not rule.matches(method, path) or rule.times == 0:
                    continue
                if rule.after > 0:
                    rule.after -= 1
                elif fired is None:
                    fired = rule
            if fired is None:
                return None
            fired.times -= 1
            what = {"error": f"{fired.status} {fired.code}", "reset": "connection reset",
                    "lost": "response lost (request applied)", "outage": f"endpoint down {fired.seconds:g} s"}
            self.injected.append(f"{what[fired.kind]} on {method} {path.split('?')[0]}")
            if fired.kind == "outage":
                self._down_until = time.monotonic() + fired.seconds
                self._listener.close()
            return fired


def _reset(connection: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), as a crashed server or a middlebox does."""
    try:
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    connection.close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect
    server: FaultyEndpoint

    def log_message(self, *args) -> None:  # quiet
        pass

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except (ConnectionError, OSError):
            self.close_connection = True

    def __getattr__(self, name: str):
        if name.startswith("do_"):
            return self._proxy
        raise AttributeError(name)

    def handle_expect_100(self) -> bool:
        return True  # the body is read (or the connection reset) in _proxy, 100 Continue sent there

    def _proxy(self) -> None:
        endpoint = self.server
        if endpoint._down_until > time.monotonic():
            return self._abort()
        rule = endpoint.take(self.command, self.path)
        if rule is not None and rule.kind in ("reset", "outage"):
            return self._abort()
        if self.headers.get("Expect", "").lower() == "100-continue":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.wfile.flush()
        body = self._read_body()
        if rule is not None and rule.kind == "error":
            return self._send(rule.status, {"Content-Type": "application/xml"}, _error_xml(rule.code))
        upstream = http.client.HTTPConnection(*endpoint.upstream, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            if body is not None:
                headers["Content-Length"] = str(len(body))
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
            if rule is not None:  # "lost": the server applied it; the client never hears back
                return self._abort()
            reply = {k: v for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP}
            if self.command != "HEAD":
                reply["Content-Length"] = str(len(data))
            self._send(response.status, reply, data)
        finally:
            upstream.close()

    def _read_body(self) -> bytes | None:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = self.headers.get("Content-Length")
        return self.rfile.read(int(length)) if length is not None else None

    def _send(self, status: int, headers: dict, data: bytes) -> None:
        self.send_response_only(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if "Content-Length" not in headers and self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self.wfile.flush()

    def _abort(self) -> None:
        self.close_connection = True
        _reset(self.connection)


def _error_xml(code: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>injected {code}</Message><RequestId>fault</RequestId></Error>").encode()


def build_through(endpoint: FaultyEndpoint, args: list[str], cache: Path, ray_address: str,
                  timeout: float = 300) -> subprocess.CompletedProcess:
    """``python jobs/build_dataset.py ARGS`` as its own driver on a running Ray cluster, it and
    its workers reaching S3 through ``endpoint`` only: the runtime environment a user passes
    with ``ray job submit --runtime-env-json '{"env_vars": {...}}'``. ``timeout`` turns a hang
    into a failure."""
    variables = {"AWS_ENDPOINT_URL": endpoint.url, "FACTORY_CACHE": str(cache)}
    env = dict(os.environ, **variables, RAY_ADDRESS=ray_address,
               RAY_JOB_CONFIG_JSON_ENV_VAR=json.dumps({"runtime_env": {"env_vars": variables}}))
    script = Path(__file__).resolve().parent.parent / "jobs" / "build_dataset.py"
    return subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
