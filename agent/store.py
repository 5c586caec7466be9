"""The cluster store: a small key-value interface with a directory backend.

Keys are slash-separated paths ("resources/CiliumNetworkPolicy/default/allow-web"), values JSON
objects. Writers take the store lock, so several agents can share one directory (several nodes on
one machine); every write bumps a generation number that agents poll to notice others' changes.
An etcd backend implements the same interface for multi-node deployments.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

from agent.errors import MeshError
from agent.files import FILE_MODE, make_dirs, open_private, private_dir, write_atomic, write_json

_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]*(/[A-Za-z0-9][A-Za-z0-9._\-]*)*$")


class StoreError(MeshError):
    """The store cannot be read or written; the message names it."""

    culprit = "store"


class DirStore:
    """A store kept as one JSON file per key under a directory."""

    def __init__(self, root: str):
        self.root = Path(root)
        try:
            private_dir(str(self.root))
        except OSError as e:
            raise StoreError(f"cannot create store directory {root}: {e.strerror}") from None
        self._lock_path = self.root / ".lock"
        self._gen_path = self.root / ".generation"

    @classmethod
    def from_url(cls, url: str) -> DirStore:
        if not url.startswith("dir://"):
            raise StoreError(f"store {url!r}: only dir:///PATH is supported by DirStore")
        return cls(url[len("dir://"):])

    def _path(self, key: str) -> Path:
        if not _KEY_RE.match(key):
            raise StoreError(f"invalid store key {key!r}")
        return self.root / f"{key}.json"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the store's write lock (shared by every agent using this directory)."""
        with os.fdopen(open_private(str(self._lock_path)), "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def get(self, key: str) -> dict | None:
        try:
            return json.loads(self._path(key).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise StoreError(f"cannot read {self._path(key)}: {e}") from None

    def list(self, prefix: str) -> dict[str, dict]:
        """Every key under ``prefix`` (a directory-like prefix without trailing slash)."""
        base = self.root / prefix
        out: dict[str, dict] = {}
        if not base.is_dir():
            return out
        for path in sorted(base.rglob("*.json")):
            key = str(path.relative_to(self.root))[: -len(".json")]
            value = self.get(key)
            if value is not None:
                out[key] = value
        return out

    def put(self, key: str, value: dict) -> None:
        write_json(str(self._path(key)), value)  # a reader never sees half a file
        self._bump()

    def create(self, key: str, value: dict) -> bool:
        """Write ``key`` only if it does not exist; return whether it was written."""
        path = self._path(key)
        make_dirs(str(path.parent))
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(value, f, sort_keys=True)
        self._bump()
        return True

    def delete(self, key: str) -> bool:
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            return False
        self._bump()
        return True

    def generation(self) -> int:
        try:
            return int(self._gen_path.read_text() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def _bump(self) -> None:
        write_atomic(str(self._gen_path), str(self.generation() + 1))


def open_store(url: str) -> DirStore:
    if url.startswith("dir://"):
        return DirStore.from_url(url)
    raise StoreError(f"store {url!r}: the etcd backend is not available in this build; use dir:///PATH")
