"""Security identities: reserved numbers, and allocation of numbers to label sets.

Reserved identities are Cilium's. Label-set identities are allocated through the store so every
node that shares the store sees the same number for the same label set (see IdentityAllocator).
"""

from __future__ import annotations

import hashlib
import json

from agent.store import StoreError

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
    gets the same number even on nodes with separate stores; a number already taken probes upwards.
    The store holds both directions, by-labels/HASH and by-id/N, written together by one
    `create_all` (all or nothing, only if neither exists), so every node sharing the store agrees:
    two nodes racing for one label set end up with the same number (the loser reads the winner's
    by-labels record), and two label sets never share one (by-id/N exists once).
    """

    def __init__(self, store):
        self.store = store

    def lookup(self, labels: dict[str, str]) -> int | None:
        rec = self.store.get(f"identities/by-labels/{_labels_key(labels)}")
        return rec["id"] if rec else None

    def allocate(self, labels: dict[str, str]) -> int:
        lkey = f"identities/by-labels/{_labels_key(labels)}"
        rec = self.store.get(lkey)
        if rec:
            return rec["id"]
        span = MAX_CLUSTER - MIN_CLUSTER + 1
        start = int(_labels_key(labels), 16) % span
        for i in range(span):
            candidate = MIN_CLUSTER + (start + i) % span
            ikey = f"identities/by-id/{candidate}"
            if self.store.get(ikey) is not None:
                continue  # taken, as far as we know: no need to ask
            value = {"id": candidate, "labels": labels}
            if self.store.create_all({ikey: value, lkey: value}):
                return candidate
            rec = self.store.get(lkey)  # after a refused create_all the store answers what it holds now
            if rec:
                return rec["id"]  # another node allocated this label set first
        raise StoreError(f"no free identity numbers left ({span} label sets in use); delete endpoints "
                         "whose label sets are no longer needed")

    def labels_of(self, number: int) -> dict[str, str] | None:
        rec = self.store.get(f"identities/by-id/{number}")
        return rec["labels"] if rec else None

    def release(self, labels: dict[str, str]) -> None:
        """Forget a label set's identity (the caller checked no endpoint uses it any more). The
        by-labels record goes first: until by-id/N goes too, no other label set can take N."""
        lkey = f"identities/by-labels/{_labels_key(labels)}"
        rec = self.store.get(lkey)
        if rec:
            self.store.delete(lkey)
            self.store.delete(f"identities/by-id/{rec['id']}")

    def all(self) -> dict[int, dict[str, str]]:
        return {rec["id"]: rec["labels"] for rec in self.store.list("identities/by-id").values()}
