"""The directory store (`dir:///PATH`): one JSON file per key, shared by the nodes of one machine.

Every write takes the store's lock (an flock on PATH/.lock), so several agents can share one
directory; create/create_all check and write under it, which makes them atomic against every other
writer. A file is replaced by rename, so a reader (who takes no lock) sees the old value or the new
one. Every write outside heartbeats/ bumps PATH/.generation, which agents poll to notice others'
changes. ``owned`` is accepted and ignored: a directory has no lease, nothing expires.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from agent.files import FILE_MODE, make_dirs, open_private, private_dir, write_atomic, write_json
from agent.store.base import (
    MAX_TXN_OPS,
    StoreError,
    check_key,
    check_prefix,
    check_value,
    corrupt_error,
    decode,
    encode,
    moves_generation,
    status_record,
)

log = logging.getLogger("meshagent.store")


class DirStore:
    """A store kept as one JSON file per key under a directory."""

    backend = "dir"

    def __init__(self, root: str):
        self.root = Path(root)
        self.url = f"dir://{root}"
        try:
            private_dir(str(self.root))
        except OSError as e:
            raise StoreError(f"cannot create store directory {root}: {e.strerror}") from None
        self._lock_path = self.root / ".lock"
        self._gen_path = self.root / ".generation"
        self._opened = time.time()
        self._warned: set[tuple[str, int]] = set()  # (key, mtime) of corrupt files already reported
        # Set when this process moves generation(); other processes' writes are found by polling it.
        self.changed = threading.Event()

    @classmethod
    def from_url(cls, url: str) -> DirStore:
        path = url[len("dir://"):] if url.startswith("dir://") else ""
        if not path.startswith("/"):
            raise StoreError(f"store {url!r}: use dir:///ABSOLUTE/PATH")
        return cls(path)

    def _path(self, key: str) -> Path:
        return self.root / f"{check_key(key)}.json"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the store's write lock (shared by every agent using this directory)."""
        try:
            fd = open_private(str(self._lock_path))
        except OSError as e:
            raise StoreError(f"dir store {self.root}: cannot open its lock file: {e.strerror}") from None
        with os.fdopen(fd, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # ---- reads -----------------------------------------------------------------------------------

    def _read(self, path: Path) -> bytes | None:
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreError(f"dir store {self.root}: cannot read {path}: {e.strerror}") from None

    def get(self, key: str) -> dict | None:
        raw = self._read(self._path(key))
        if raw is None:
            return None
        value = decode(raw)
        if value is None:
            raise corrupt_error(f"dir store {self.root}", key, f"rewrite or remove {self._path(key)}")
        return value

    def list(self, prefix: str) -> dict[str, dict]:
        """Every key under ``prefix`` ("" for all); a corrupt file is skipped with a warning."""
        base = self.root / check_prefix(prefix)
        out: dict[str, dict] = {}
        if not base.is_dir():
            return out
        for path in sorted(base.rglob("*.json")):
            key = str(path.relative_to(self.root))[: -len(".json")]
            raw = self._read(path)
            if raw is None:
                continue  # deleted while we listed
            value = decode(raw)
            if value is None:
                self._warn_corrupt(key, path)
                continue
            out[key] = value
        return out

    def _warn_corrupt(self, key: str, path: Path) -> None:
        with contextlib.suppress(OSError):
            mark = (key, path.stat().st_mtime_ns)
            if mark not in self._warned:
                self._warned.add(mark)
                log.warning("dir store %s: skipped key %s: its value is not a JSON object (rewrite or remove %s)",
                            self.root, key, path)

    # ---- writes ----------------------------------------------------------------------------------

    def put(self, key: str, value: dict, *, owned: bool = False) -> None:
        path, value = self._path(key), check_value(key, value)
        with self._locked():
            write_json(str(path), value)  # a reader never sees half a file
            self._bump([key])

    def create(self, key: str, value: dict, *, owned: bool = False) -> bool:
        """Write ``key`` only if it does not exist; return whether it was written."""
        return self.create_all({key: value}, owned=owned)

    def create_all(self, items: dict[str, dict], *, owned: bool = False) -> bool:
        """Write every item only if none of the keys exists; return whether they were written."""
        paths = self._checked(items)
        with self._locked():
            if any(path.exists() for path in paths.values()):
                return False
            self._write_all(items, paths)
            return True

    def put_all(self, items: dict[str, dict]) -> None:
        """Write every item, or (on an error before the first rename) none of them."""
        paths = self._checked(items)
        with self._locked():
            self._write_all(items, paths)

    def delete(self, key: str) -> bool:
        path = self._path(key)
        with self._locked():
            try:
                path.unlink()
            except FileNotFoundError:
                return False
            self._bump([key])
            return True

    def _checked(self, items: dict[str, dict]) -> dict[str, Path]:
        if len(items) > MAX_TXN_OPS:  # the etcd store's limit, kept here so both behave the same
            raise StoreError(f"dir store {self.root}: {len(items)} writes at once, more than the store's limit of "
                             f"{MAX_TXN_OPS}; write fewer at a time")
        paths = {}
        for key, value in items.items():
            paths[key] = self._path(key)
            check_value(key, value)
        return paths

    def _write_all(self, items: dict[str, dict], paths: dict[str, Path]) -> None:
        """Write every value to a temporary file beside its key first, then rename them all: a failure
        while writing leaves nothing behind."""
        staged: list[tuple[str, Path]] = []
        try:
            for key, path in paths.items():
                make_dirs(str(path.parent))
                fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
                staged.append((tmp, path))
                with os.fdopen(fd, "wb") as f:
                    f.write(encode(items[key]))
                os.chmod(tmp, FILE_MODE)
        except OSError as e:
            for tmp, _ in staged:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            raise StoreError(f"dir store {self.root}: cannot write: {e.strerror}; nothing was changed") from None
        for tmp, path in staged:
            os.replace(tmp, path)
        self._bump(list(items))

    # ---- generation and status -------------------------------------------------------------------

    def generation(self) -> int:
        try:
            return int(self._gen_path.read_text() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def _bump(self, keys: list[str]) -> None:
        """Called with the lock held, after writing ``keys``."""
        if any(moves_generation(k) for k in keys):
            self.changed.set()
            write_atomic(str(self._gen_path), str(self.generation() + 1))

    def status(self) -> dict:
        return status_record("dir", self.url, connected=True, since=self._opened, last_sync=time.time(),
                             revision=self.generation())

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"DirStore({str(self.root)!r})"

