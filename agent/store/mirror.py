"""The etcd store's local mirror: every key under the store's prefix, as the watch last told it.

Sans-IO: the etcd backend (agent/store/etcd.py) feeds it what etcd answered (a full range read,
watch events, the results of its own writes) and serves get()/list() from it, so the agent keeps
answering from its last known state while etcd is away.

Ordering. Two sources update a key: the watch, in revision order, and our own writes, applied at
once (read-your-writes) and delivered again later by the watch. Each entry keeps the revision that
wrote it, and a change is taken only if it is newer than what the mirror holds for that key. A key we
deleted leaves a tombstone with the delete's revision until the watch has passed it, so an older
put still in flight on the watch cannot bring it back.

`generation` counts the changes of keys outside heartbeats/ (see agent/store/base.py).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from agent.store.base import moves_generation, under

CORRUPT = object()  # a value that is not a JSON object: kept out of list(), named by get()


@dataclass(frozen=True)
class Entry:
    revision: int  # etcd's mod_revision of the value
    value: dict | None  # None: corrupt (CORRUPT was given)
    lease: int = 0

    @property
    def corrupt(self) -> bool:
        return self.value is None


@dataclass(frozen=True)
class Change:
    """One key as etcd reported it: value is a dict, CORRUPT, or None for a delete."""

    key: str
    revision: int
    value: object
    lease: int = 0


class Mirror:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kv: dict[str, Entry] = {}
        self._tombstones: dict[str, int] = {}  # key -> revision of our delete, until the watch passes it
        self.revision = 0  # every change up to this revision is in the mirror (the watch resumes after it)
        self.cluster_id = ""  # etcd's cluster the revisions belong to
        self.generation = 0

    # ---- reads -----------------------------------------------------------------------------------

    def get(self, key: str) -> Entry | None:
        with self._lock:
            return self._kv.get(key)

    def list(self, prefix: str) -> dict[str, dict]:
        with self._lock:
            return {k: e.value for k, e in sorted(self._kv.items()) if under(k, prefix) and e.value is not None}

    def leased(self, lease: int) -> dict[str, dict]:
        """The keys bound to ``lease`` (an adopted lease's owned keys)."""
        with self._lock:
            return {k: e.value for k, e in self._kv.items() if e.lease == lease and e.value is not None}

    def __len__(self) -> int:
        with self._lock:
            return len(self._kv)

    # ---- updates ---------------------------------------------------------------------------------

    def apply(self, changes: list[Change], *, watched: bool = False) -> bool:
        """Take every change newer than what the mirror holds; return whether generation moved.
        ``watched``: the changes come from the watch in revision order, so the mirror is complete up
        to the last one's revision."""
        moved = False
        with self._lock:
            for change in changes:
                moved |= self._apply(change)
                if watched and change.revision > self.revision:
                    self.revision = change.revision
            if watched:
                self._prune()
        return moved

    def caught_up(self, revision: int) -> None:
        """The watch says every change up to ``revision`` has been delivered (a progress notice)."""
        with self._lock:
            if revision > self.revision:
                self.revision = revision
                self._prune()

    def replace(self, changes: list[Change], revision: int, cluster_id: str) -> bool:
        """A full read of the prefix at ``revision``: it becomes the mirror, except for keys our own
        writes changed after that revision. Returns whether generation moved."""
        moved = False
        with self._lock:
            fresh = {c.key: c for c in changes}
            for key in list(self._kv):
                if key not in fresh and self._kv[key].revision <= revision:
                    moved |= self._set(key, None)
            for change in changes:
                moved |= self._apply(change)
            self.revision, self.cluster_id = revision, cluster_id
            self._prune()
        return moved

    def _apply(self, change: Change) -> bool:
        held = self._kv.get(change.key)
        if held is not None and change.revision <= held.revision:
            return False  # we hold this write or a newer one
        if change.revision <= self._tombstones.get(change.key, 0):
            return False  # we deleted the key after this write
        if change.value is None:
            return held is not None and self._set(change.key, None)
        value = None if change.value is CORRUPT else change.value
        return self._set(change.key, Entry(change.revision, value, change.lease))

    def forget(self, key: str, revision: int) -> bool:
        """The key is known to be absent at ``revision`` (our own delete, or a read that did not find
        it): drop it unless we hold a newer write, and keep out older writes still on the watch."""
        with self._lock:
            held = self._kv.get(key)
            if held is not None and held.revision > revision:
                return False
            self._tombstones[key] = max(revision, self._tombstones.get(key, 0))
            return self._set(key, None)

    def _set(self, key: str, entry: Entry | None) -> bool:
        old = self._kv.get(key)
        if entry is None:
            self._kv.pop(key, None)
        else:
            self._kv[key] = entry
        changed = (old.value if old else None) != (entry.value if entry else None) or (old is None) != (entry is None)
        if changed and moves_generation(key):
            self.generation += 1
            return True
        return False

    def _prune(self) -> None:
        for key in [k for k, rev in self._tombstones.items() if rev <= self.revision]:
            del self._tombstones[key]

    # ---- the cache file --------------------------------------------------------------------------

    def to_json(self) -> dict:
        with self._lock:
            return {"revision": self.revision, "cluster_id": self.cluster_id,
                    "keys": {k: {"revision": e.revision, "value": e.value, "lease": e.lease}
                             for k, e in sorted(self._kv.items()) if e.value is not None}}

    def load_json(self, data: dict) -> None:
        """Fill an empty mirror from to_json()'s output; raises ValueError/KeyError/TypeError if it is not."""
        entries = {}
        for key, item in data["keys"].items():
            if not isinstance(key, str) or not isinstance(item["value"], dict):
                raise ValueError(f"bad cached key {key!r}")
            entries[key] = Entry(int(item["revision"]), item["value"], int(item.get("lease", 0)))
        with self._lock:
            self._kv = entries
            self.revision, self.cluster_id = int(data["revision"]), str(data["cluster_id"])
            self.generation += 1
