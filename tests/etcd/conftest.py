"""Fixtures for the store tests that need a real etcd (Debian's etcd-server; no root needed).

Each test that stops, restarts or compacts etcd gets its own server (`etcd_server`); the others
share one per module and keep apart by a key prefix of their own. Every server is ended by its PID,
every store closed and every temporary directory removed, also when a test fails.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.store.dir import DirStore
from agent.store.etcd import EtcdStore
from tests.etcd.etcd_server import ETCD, EtcdServer, scratch_dir


def _server(workdir: Path) -> EtcdServer:
    if not Path(ETCD).exists():
        pytest.fail("the etcd binary is missing: `make install` installs Debian's etcd-server")
    return EtcdServer(workdir)


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A temporary directory removed at the end of the test (state dirs, dir stores)."""
    path = scratch_dir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def shared_etcd() -> Iterator[EtcdServer]:
    path = scratch_dir()
    server = _server(path)
    try:
        yield server.start()
    finally:
        server.cleanup()
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def etcd_server(workdir) -> Iterator[EtcdServer]:
    """An etcd of this test's own, to stop, restart or compact."""
    server = _server(workdir / "etcd")
    try:
        yield server.start()
    finally:
        server.cleanup()


class Stores:
    """Opens stores and closes every one of them at the end of the test."""

    def __init__(self) -> None:
        self.opened: list = []

    def etcd(self, url: str, **kw) -> EtcdStore:
        store = EtcdStore(url, **kw)
        self.opened.append(store)
        return store

    def dir(self, path: Path) -> DirStore:
        store = DirStore(str(path))
        self.opened.append(store)
        return store

    def close_all(self) -> None:
        while self.opened:
            self.opened.pop().close()


@pytest.fixture
def stores() -> Iterator[Stores]:
    s = Stores()
    try:
        yield s
    finally:
        s.close_all()


class Backend:
    """One store of either kind, and more handles on the same one (other nodes)."""

    def __init__(self, kind: str, stores: Stores, workdir: Path, server: EtcdServer | None):
        self.kind, self.stores, self.workdir, self.server = kind, stores, workdir, server
        self.prefix = f"/t-{uuid.uuid4().hex[:8]}/"

    def open(self, **kw):
        if self.kind == "dir":
            return self.stores.dir(self.workdir / "store")
        return self.stores.etcd(self.server.url, prefix=self.prefix, **kw)

    def write_raw(self, key: str, raw: bytes) -> None:
        """Put bytes under ``key`` behind the store's back (a corrupt value)."""
        if self.kind == "dir":
            path = self.workdir / "store" / f"{key}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(raw)
        else:
            self.server.put_raw(self.prefix + key, raw)


@pytest.fixture(params=["dir", "etcd"])
def backend(request, stores, workdir) -> Backend:
    server = request.getfixturevalue("shared_etcd") if request.param == "etcd" else None
    return Backend(request.param, stores, workdir, server)
