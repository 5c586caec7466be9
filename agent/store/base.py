"""What both store backends share: the error, the key rules, which keys move `generation()`, the
status record and the `Store` protocol (agent/store/__init__.py documents the interface)."""

from __future__ import annotations

import json
import re
import threading
import time
from typing import Any, Protocol

from agent.errors import MeshError

# Slash paths without a leading slash; each part starts with a letter or digit (no "..", no "").
_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]*(/[A-Za-z0-9][A-Za-z0-9._\-]*)*$")

# Keys under this prefix change every few seconds (each node's liveness): they never move
# generation(), so a heartbeat does not make every node reconcile.
HEARTBEATS = "heartbeats"

# etcd's default --max-txn-ops: the most writes (or compares) one transaction may hold. put_all and
# create_all refuse more, so "all or none" stays true (see agent/store/etcd.py).
MAX_TXN_OPS = 128


class StoreError(MeshError):
    """The store cannot be read or written; the one-line message names the store and what to do."""

    culprit = "store"


def check_key(key: object) -> str:
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise StoreError(f"invalid store key {key!r}: use slash-separated parts of letters, digits, '.', '_' "
                         "and '-', without a leading slash")
    return key


def check_prefix(prefix: object) -> str:
    """A list() prefix: "" (everything) or a key, with or without one trailing slash."""
    if not isinstance(prefix, str):
        raise StoreError(f"invalid store prefix {prefix!r}")
    prefix = prefix[:-1] if prefix.endswith("/") else prefix
    return prefix if prefix == "" else check_key(prefix)


def under(key: str, prefix: str) -> bool:
    """Whether ``key`` lies under the directory-like ``prefix`` ("" holds every key)."""
    return prefix == "" or key.startswith(prefix + "/")


def moves_generation(key: str) -> bool:
    return not under(key, HEARTBEATS)


def check_value(key: str, value: object) -> dict:
    """A value to write must be a JSON object (a programming error otherwise, not the user's)."""
    if not isinstance(value, dict):
        raise TypeError(f"store value for {key} must be a dict (a JSON object), not {type(value).__name__}")
    return value


def encode(value: dict) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def decode(raw: bytes | str) -> dict | None:
    """The JSON object stored in ``raw``, or None if it is not one (a corrupt value)."""
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def corrupt_error(store: str, key: str, fix: str) -> StoreError:
    return StoreError(f"{store}: key {key} holds a value that is not a JSON object; {fix}")


def store_name(backend: str, url: str) -> str:
    """How errors name a store: "etcd store etcd://10.0.0.1:2379"."""
    return f"{backend} store {url}"


def hhmmss(epoch: float) -> str:
    """A time of day as errors and `status` give it (local time)."""
    return time.strftime("%H:%M:%S", time.localtime(epoch))


def status_record(backend: str, url: str, *, connected: bool, since: float, last_sync: float, revision: int,
                  error: str = "", lease: dict | None = None) -> dict[str, Any]:
    return {"backend": backend, "url": url, "connected": connected, "since": since, "last_sync": last_sync,
            "revision": revision, "error": error, "lease": lease}


class Store(Protocol):
    """The interface both backends implement; agent/store/__init__.py says what each call means."""

    changed: threading.Event

    def get(self, key: str) -> dict | None: ...

    def list(self, prefix: str) -> dict[str, dict]: ...

    def put(self, key: str, value: dict, *, owned: bool = False) -> None: ...

    def create(self, key: str, value: dict, *, owned: bool = False) -> bool: ...

    def create_all(self, items: dict[str, dict], *, owned: bool = False) -> bool: ...

    def delete(self, key: str) -> bool: ...

    def put_all(self, items: dict[str, dict]) -> None: ...

    def generation(self) -> int: ...

    def status(self) -> dict[str, Any]: ...

    def close(self) -> None: ...
