"""Security identities: reserved numbers, and allocation of numbers to label sets.

Reserved identities are Cilium's. Label-set identities are allocated through the store so every
node that shares the store sees the same number for the same label set (see IdentityAllocator).
"""

from __future__ import annotations

import hashlib
import json

HOST = 1
WORLD = 2
UNMANAGED = 3
HEALTH = 4
INIT = 5
REMOTE_NODE = 6

RESERVED = {
    HOST: "reserved:host",
    WORLD: "reserved:world",
    UNMANAGED: "reserved:unmanaged",
    HEALTH: "reserved:health",
    INIT: "reserved:init",
    REMOTE_NODE: "reserved:remote-node",
}

# Label-set identities of endpoints live in [MIN_CLUSTER, MAX_CLUSTER].
MIN_CLUSTER = 256
MAX_CLUSTER = 65535
# Node-local identities for CIDR prefixes used in policy (as Cilium's 1<<24 local scope).
CIDR_BASE = 1 << 24


def is_reserved(identity: int) -> bool:
    return identity in RESERVED


def _labels_key(labels: dict[str, str]) -> str:
    canonical = json.dumps(sorted(labels.items()), separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


class IdentityAllocator:
    """Allocates identity numbers to label sets through the store.

    The first number tried is derived from a hash of the labels, so the same label set usually
    gets the same number even on nodes with separate stores; collisions probe upwards. The store
    holds both directions (by-labels and by-id), written under the store lock, so every node
    sharing the store agrees.
    """

    def __init__(self, store):
        self.store = store

    def lookup(self, labels: dict[str, str]) -> int | None:
        rec = self.store.get(f"identities/by-labels/{_labels_key(labels)}")
        return rec["id"] if rec else None

    def allocate(self, labels: dict[str, str]) -> int:
        lkey = f"identities/by-labels/{_labels_key(labels)}"
        with self.store.locked():
            rec = self.store.get(lkey)
            if rec:
                return rec["id"]
            span = MAX_CLUSTER - MIN_CLUSTER + 1
            start = int(_labels_key(labels), 16) % span
            for i in range(span):
                candidate = MIN_CLUSTER + (start + i) % span
                if self.store.create(f"identities/by-id/{candidate}", {"id": candidate, "labels": labels}):
                    self.store.put(lkey, {"id": candidate, "labels": labels})
                    return candidate
            raise RuntimeError("no free identity numbers left (65280 label sets in use)")

    def release(self, labels: dict[str, str]) -> None:
        """Forget a label set's identity (the caller checked no endpoint uses it any more)."""
        with self.store.locked():
            rec = self.store.get(f"identities/by-labels/{_labels_key(labels)}")
            if rec:
                self.store.delete(f"identities/by-id/{rec['id']}")
                self.store.delete(f"identities/by-labels/{_labels_key(labels)}")

    def all(self) -> dict[int, dict[str, str]]:
        return {rec["id"]: rec["labels"] for rec in self.store.list("identities/by-id").values()}
