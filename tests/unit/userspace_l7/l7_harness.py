"""The L7 processor's real-socket harness shared by the test_server*.py modules: three tiny backends
(http.server threads) standing for reviews v1/v2/v3, the processor as a subprocess (`L7`), config
builders and a raw-socket client. Fixtures (conftest.py): ``backends``, ``start``."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.paths import REPO


class BackendServer(ThreadingHTTPServer):
    daemon_threads = True
    fail_once_seen: set[str] = set()  # shared by all backends: the retry lands on a fresh one
    _lock = threading.Lock()

    def __init__(self, name: str) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.name = name
        self.failing = False
        self.hosts: list[str] = []
        self.port = self.server_address[1]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # head and body are two writes: without this, 40 ms delayed-ACK stalls

    def log_message(self, *args):  # quiet
        pass

    def _serve(self) -> None:
        srv: BackendServer = self.server
        n = int(self.headers.get("content-length") or 0)
        body_in = self.rfile.read(n) if n else b""
        srv.hosts.append(self.headers.get("host", ""))
        status = 200
        if self.path.startswith("/ws"):
            self._websocket()
            return
        if self.path.startswith("/big"):
            self._big()
            return
        if self.path.startswith("/close"):  # gone before the response head
            self.close_connection = True
            return
        if self.path.startswith("/slow"):
            time.sleep(1.0)
        elif self.path.startswith("/status/"):
            status = int(self.path[len("/status/"):][:3])
        elif self.path.startswith("/fail-once/"):
            with BackendServer._lock:
                first = self.path not in BackendServer.fail_once_seen
                BackendServer.fail_once_seen.add(self.path)
            status = 503 if first else 200
        if srv.failing:
            status = 500
        body = json.dumps({"backend": srv.name, "path": self.path, "body": body_in.decode(),
                           "headers": {k.lower(): v for k, v in self.headers.items()}}).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("x-backend", srv.name)
        self.send_header("x-internal", "secret")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _big(self) -> None:
        """1 MiB in 64 KiB chunked pieces: the processor must stream and re-frame it."""
        self.send_response(200)
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for i in range(16):
            piece = bytes([65 + i]) * 65536
            self.wfile.write(b"%x\r\n%b\r\n" % (len(piece), piece))
        self.wfile.write(b"0\r\n\r\n")

    def _websocket(self) -> None:
        """A WebSocket handshake (RFC 6455 accept key), then the new protocol: an echo of raw bytes,
        each chunk prefixed with the backend's name, until the client half-closes. /ws-refuse: 426."""
        key = self.headers.get("sec-websocket-key", "")
        if self.path.startswith("/ws-refuse") or self.headers.get("upgrade", "").lower() != "websocket":
            self.send_response(426)
            self.send_header("content-length", "0")
            self.end_headers()
            return
        accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
        self.send_response(101)
        self.send_header("upgrade", "websocket")
        self.send_header("connection", "Upgrade")
        self.send_header("sec-websocket-accept", accept.decode())
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        conn = self.connection
        while data := conn.recv(65536):
            conn.sendall(self.server.name.encode() + b":" + data)
        conn.shutdown(socket.SHUT_WR)

    do_GET = do_POST = do_HEAD = _serve


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def l7_config(backends, virtual_services=(), destination_rules=()) -> dict:
    return {
        "services": [
            {"name": "reviews", "namespace": "default", "vip": "10.96.0.10",
             "ports": [{"port": 80, "target_port": 9080}],
             "backends": [{"ip": "127.0.0.1", "port": b.port, "workload": f"reviews-{n}",
                           "labels": {"app": "reviews", "version": n}} for n, b in backends.items()]},
            {"name": "shadow", "namespace": "default", "vip": "10.96.0.11",
             "ports": [{"port": 80, "target_port": 9080}],
             "backends": [{"ip": "127.0.0.1", "port": backends["v3"].port, "labels": {"app": "shadow"}}]},
        ],
        "virtual_services": list(virtual_services),
        "destination_rules": list(destination_rules),
    }


def vs(*http) -> dict:
    return {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": "reviews", "namespace": "default"},
            "spec": {"hosts": ["reviews"], "http": list(http)}}


def dr(policy=None) -> dict:
    spec = {"host": "reviews", "subsets": [{"name": n, "labels": {"version": n}} for n in ("v1", "v2", "v3")]}
    if policy:
        spec["trafficPolicy"] = policy
    return {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
            "metadata": {"name": "reviews", "namespace": "default"}, "spec": spec}


def to(subset: str, weight: int | None = None, **extra) -> dict:
    d = {"destination": {"host": "reviews", "subset": subset}, **extra}
    if weight is not None:
        d["weight"] = weight
    return d


class L7:
    def __init__(self, tmp: Path, config: dict, *extra: str) -> None:
        self.tmp = tmp
        self.config_path = tmp / "l7.json"
        self.flows_path = tmp / "flows.jsonl"
        self.port = _free_port()
        self.metrics_port = _free_port()
        self.write(config)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "userspace_l7", "--config", str(self.config_path),
             "--listen", f"127.0.0.1:{self.port}", "--flows", str(self.flows_path),
             "--metrics", f"127.0.0.1:{self.metrics_port}", *extra],
            cwd=REPO, stderr=subprocess.PIPE, text=True)
        line = self.proc.stderr.readline()  # "l7: listening on ..." once bound
        assert "listening" in line, line + self.proc.stderr.read()

    def write(self, config: dict) -> None:
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(config))
        os.replace(tmp, self.config_path)

    def conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)

    def get(self, path="/", headers=None, conn=None, method="GET", body=None):
        c = conn or self.conn()
        try:
            c.request(method, path, body=body, headers={"Host": "reviews", **(headers or {})})
            r = c.getresponse()
            data = r.read()
            return r, data
        finally:
            if conn is None:
                c.close()

    def stop(self) -> str:
        """Stop the processor; returns what it printed on stderr after startup."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        err = self.proc.stderr.read()
        self.proc.stderr.close()
        return err


def five_sigma(count: int, n: int, p: float) -> bool:
    return abs(count - n * p) <= 5 * math.sqrt(n * p * (1 - p))


def _raw(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        with contextlib.suppress(OSError):
            s.sendall(data)
        out = b""
        with contextlib.suppress(OSError):
            while chunk := s.recv(65536):
                out += chunk
        return out


