"""The one reconcile path: desired state -> computed map contents -> incremental map updates.

`compute()` is pure: from the store's view of the cluster it computes what the ipcache, the policy
map and the endpoint tables (by ifindex, and by ep_id) must hold. `MapSync` owns the kernel side:
it reads what the maps hold (so a restarted agent adopts pinned state instead of rewriting it),
diffs, writes only the differences, and bumps the policy revision so tracked flows re-check policy.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from agent import identity as ids
from agent.datapath import maps
from agent.endpoint import EndpointRecord
from agent.labels import security_labels
from agent.policy.compiler import PolicyInput, compile_policies
from agent.policy.types import (
    EGRESS,
    INGRESS,
    CompiledPolicy,
    EndpointInfo,
    Enforcement,
    IdentityInfo,
    PolicyEntry,
    PolicyKey,
)

POLICY_KINDS = ("CiliumNetworkPolicy", "NetworkPolicy")


@dataclass(frozen=True)
class DesiredState:
    """Everything the maps are computed from; built by the agent from the store."""

    local_endpoints: Sequence[tuple[EndpointRecord, int]]  # (record, host-side ifindex)
    all_endpoints: Sequence[EndpointRecord]  # every node's, for the ipcache
    identities: Mapping[int, Mapping[str, str]]
    policies: Sequence[PolicyInput]
    local_node_ips: Iterable[str]
    remote_node_ips: Iterable[str]
    mode: str
    cidr_identities: Mapping[str, int]


@dataclass
class MapContents:
    ipcache: dict[str, int] = field(default_factory=dict)  # prefix -> identity
    policy: dict[PolicyKey, PolicyEntry] = field(default_factory=dict)
    endpoints: dict[int, bytes] = field(default_factory=dict)  # ifindex -> endpoint_info bytes
    # ep_id -> the same bytes: the L7 processor's marks name a client endpoint by ep_id
    endpoints_by_id: dict[int, bytes] = field(default_factory=dict)


def compute(desired: DesiredState) -> tuple[MapContents, CompiledPolicy]:
    endpoints = [
        EndpointInfo(
            ep_id=rec.ep_id, name=rec.name, namespace=rec.namespace, ip=rec.ip, identity=rec.identity,
            labels=security_labels(rec.labels, rec.namespace, rec.serviceaccount),
        )
        for rec, _ in desired.local_endpoints
    ]
    identities = [IdentityInfo(id=i, labels=dict(lbls)) for i, lbls in sorted(desired.identities.items())]
    compiled = compile_policies(
        desired.policies, identities, endpoints, mode=desired.mode, cidr_identities=desired.cidr_identities
    )
    out = MapContents(policy=dict(compiled.entries))
    for prefix, identity in compiled.cidr_identities.items():
        out.ipcache[prefix] = identity
    for ip in desired.remote_node_ips:
        out.ipcache[f"{ip}/32"] = ids.REMOTE_NODE
    for ip in desired.local_node_ips:
        out.ipcache[f"{ip}/32"] = ids.HOST
    for rec in desired.all_endpoints:
        out.ipcache[f"{rec.ip}/32"] = rec.identity
    no = Enforcement(enforced=False)
    for rec, ifindex in desired.local_endpoints:
        info = maps.endpoint_info_to_c(
            rec.ip, rec.identity, rec.ep_id,
            compiled.enforcement.get((rec.ep_id, INGRESS), no),
            compiled.enforcement.get((rec.ep_id, EGRESS), no),
        )
        out.endpoints[ifindex] = bytes(info)
        out.endpoints_by_id[rec.ep_id] = bytes(info)
    return out, compiled


@dataclass
class SyncStats:
    added: int = 0
    updated: int = 0
    deleted: int = 0

    @property
    def changed(self) -> bool:
        return bool(self.added or self.updated or self.deleted)


class MapSync:
    """Keeps the kernel maps equal to computed contents, writing only differences."""

    def __init__(self, datapath):
        self.dp = datapath
        self.lock = threading.Lock()
        self.ops_total = 0  # meshagent_bpf_map_ops_total
        self.current = self.read_kernel()

    def read_kernel(self, endpoints: bool = True) -> MapContents:
        """What the maps hold now. The endpoint table is a 64k-slot array: skip it (and its by-id
        twin) when not needed."""
        cur = MapContents()
        for k, v in self.dp.table("ipcache").items():
            cur.ipcache[maps.ipcache_key_from_c(k)] = v.identity
        for k, v in self.dp.table("policy_map").items():
            cur.policy[maps.policy_key_from_c(k)] = maps.policy_entry_from_c(v)
        if endpoints:
            cur.endpoints = self.dp.read_endpoints()
            cur.endpoints_by_id = self.dp.read_endpoints_by_id()
        return cur

    def sync(self, want: MapContents) -> SyncStats:
        """Write ``want`` into the maps. Additions go first and removals last, so a flow never
        meets a half-written state that denies more than either the old or the new one."""
        with self.lock:
            stats = SyncStats()
            ipcache = self.dp.table("ipcache")
            policy = self.dp.table("policy_map")
            cur = self.current

            for key, entry in want.policy.items():
                old = cur.policy.get(key)
                if old != entry:
                    policy[maps.policy_key_to_c(key)] = maps.policy_entry_to_c(key, entry)
                    stats.updated += old is not None
                    stats.added += old is None
            for prefix, identity in want.ipcache.items():
                old = cur.ipcache.get(prefix)
                if old != identity:
                    ipcache[maps.ipcache_key_to_c(prefix)] = maps.IpcacheEntryC(identity=identity)
                    stats.updated += old is not None
                    stats.added += old is None
            for ifindex, blob in want.endpoints.items():
                old = cur.endpoints.get(ifindex)
                if old != blob:
                    self.dp.write_endpoint(ifindex, maps.EndpointInfoC.from_buffer_copy(blob))
                    stats.updated += old is not None
                    stats.added += old is None
            for ep_id, blob in want.endpoints_by_id.items():
                old = cur.endpoints_by_id.get(ep_id)
                if old != blob:
                    self.dp.write_endpoint_by_id(ep_id, maps.EndpointInfoC.from_buffer_copy(blob))
                    stats.updated += old is not None
                    stats.added += old is None
            for key in set(cur.policy) - set(want.policy):
                _delete(policy, maps.policy_key_to_c(key))
                stats.deleted += 1
            for prefix in set(cur.ipcache) - set(want.ipcache):
                _delete(ipcache, maps.ipcache_key_to_c(prefix))
                stats.deleted += 1
            for ifindex in set(cur.endpoints) - set(want.endpoints):
                self.dp.delete_endpoint(ifindex)
                stats.deleted += 1
            for ep_id in set(cur.endpoints_by_id) - set(want.endpoints_by_id):
                self.dp.delete_endpoint_by_id(ep_id)
                stats.deleted += 1

            self.current = MapContents(dict(want.ipcache), dict(want.policy), dict(want.endpoints),
                                       dict(want.endpoints_by_id))
            self.ops_total += stats.added + stats.updated + stats.deleted
            if stats.changed:
                self.bump_revision()
            return stats

    def revision(self) -> int:
        return int(self.dp.table("config_map")[0].policy_revision)

    def bump_revision(self) -> None:
        table = self.dp.table("config_map")
        cfg = table[0]  # keep the element's other fields (the L7 processor's address)
        cfg.policy_revision = (cfg.policy_revision + 1) & 0xFFFFFFFF
        table[0] = cfg
        self.ops_total += 1


def _delete(table, key) -> None:
    try:
        del table[key]
    except KeyError:
        pass
