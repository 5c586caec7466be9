"""Fixtures of the L7 processor's real-socket tests (harness: l7_harness.py)."""

from __future__ import annotations

import threading

import pytest

from .l7_harness import L7, BackendServer


@pytest.fixture(scope="module")
def backend_servers():
    servers = {name: BackendServer(name) for name in ("v1", "v2", "v3")}
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers.values()]
    for t in threads:
        t.start()
    try:
        yield servers
    finally:
        for s in servers.values():
            s.shutdown()
            s.server_close()


@pytest.fixture
def backends(backend_servers):
    """The three backends, started once per module, reset for each test."""
    for b in backend_servers.values():
        b.failing = False
        b.hosts.clear()
    return backend_servers


@pytest.fixture
def start(tmp_path):
    """Start processors (`L7`) for this test; they are stopped at its end, and none may have printed a
    traceback or an internal error (config reload errors are expected)."""
    started: list[L7] = []

    def _start(config: dict, *extra: str) -> L7:
        p = L7(tmp_path, config, *extra)
        started.append(p)
        return p

    errors = []
    try:
        yield _start
    finally:
        for p in started:
            errors.append(p.stop())
    for err in errors:
        assert "Traceback" not in err and "internal error" not in err, err
