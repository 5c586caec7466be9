"""The cluster store: every node's shared state, as JSON objects under slash-path keys.

Backends (the node config's ``store``):

    dir:///PATH                    one JSON file per key under PATH (agent/store/dir.py); the nodes
                                   of one machine share it
    etcd://HOST:2379[,HOST:2379]   etcd v3 through its gRPC gateway (agent/store/etcd.py), as in
                                   Cilium's kvstore mode; several machines share it

Keys are slash paths without a leading slash ("resources/Service/default/web"), values JSON
objects (dicts). Both backends behave the same (tests/etcd/test_store_interface.py runs one suite
on both):

    get(key) -> dict | None           the value, or None if absent; a value that is not a JSON
                                      object is a StoreError naming the key
    list(prefix) -> {key: dict}       every key under the directory-like prefix ("" for all),
                                      corrupt values left out with a warning
    put(key, value, *, owned=False)   write one key
    create(key, value, *, owned=False) -> bool
                                      write it only if absent; False if it exists
    create_all(items, *, owned=False) -> bool
                                      write all of them atomically, only if none exists (identity
                                      allocation: agent/identity.py); after False, get() of those
                                      keys answers what the store holds now
    delete(key) -> bool               remove it; False if it was absent
    put_all(items)                    several writes at once (`meshagent apply`): all or none
    generation() -> int               changes whenever a key outside heartbeats/ changes, by
                                      anyone: the agent's periodic loop reconciles when it moves
    changed                           a threading.Event set when generation() moves (etcd: on the
                                      watch's news; dir: on this process's writes, others' are
                                      polled): the agent's loop wakes on it instead of waiting
    status() -> dict                  {"backend": "etcd"|"dir", "url", "connected": bool, "since":
                                      epoch of the last change of connected, "last_sync": epoch of
                                      the last time reads were known current, "revision": int,
                                      "error": one line or "", "lease": {"id", "ttl"} or None}
    close()                           stop background work (etcd: threads; the lease is left to
                                      expire, so an agent restarted within its TTL keeps its keys)

``owned=True``: the key belongs to this node. With etcd it is bound to the node's lease and
disappears when the node has been gone longer than store_lease_ttl; the dir store ignores it.

put_all and create_all take at most MAX_TXN_OPS (128) items: etcd's default --max-txn-ops. More
is refused (StoreError), never split, so "all or none" holds on both backends.

With etcd, get()/list()/generation() are served from a local mirror kept by a watch, never a round
trip: while etcd is unreachable they answer the last known state (status() says since when), and a
write raises a StoreError at once. Every error a user or operator can fix is a StoreError (a
MeshError, culprit "store") with one line naming the store and what to do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent.store.base import HEARTBEATS, MAX_TXN_OPS, Store, StoreError
from agent.store.dir import DirStore

if TYPE_CHECKING:
    from agent.node_config import NodeConfig

__all__ = ["HEARTBEATS", "MAX_TXN_OPS", "DirStore", "Store", "StoreError", "open_store"]


def open_store(url: str, cfg: NodeConfig | None = None) -> Store:
    """The store at ``url``. ``cfg``, the node's config, gives the etcd store its TLS files
    (store_ca, store_cert, store_key), lease TTL (store_lease_ttl) and where to keep its cache and
    lease id (state_dir, per node_name); without it an etcd store uses plain HTTP, the default TTL
    and no files."""
    if url.startswith("dir://"):
        return DirStore.from_url(url)
    if url.startswith("etcd://"):
        from agent.store.etcd import DEFAULT_LEASE_TTL_S, EtcdStore

        if cfg is None:
            return EtcdStore(url)
        return EtcdStore(url, ca=cfg.store_ca, cert=cfg.store_cert, key=cfg.store_key,
                         lease_ttl=cfg.store_lease_ttl or DEFAULT_LEASE_TTL_S, state_dir=cfg.state_dir,
                         node_name=cfg.node_name)
    raise StoreError(f"store {url!r}: use dir:///PATH or etcd://HOST:PORT[,HOST:PORT...]")
