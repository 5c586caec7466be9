"""Security identities: reserved numbers, and allocation of numbers to label sets.

Reserved identities are Cilium's. Label-set identities are allocated through the store so every
node that shares the store sees the same number for the same label set (see IdentityAllocator).
"""

from __future__ import annotations

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
