"""The one reconcile path: desired state -> computed contents -> incremental updates.

    store + node facts  --agent.state.read_desired-->  DesiredState          (reads, no writes)
    DesiredState        --compute()-->                 Computed              (pure)
    Computed.tables     --Sync.apply()-->              kernel maps, store records, files

`Sync.apply` is the one engine that writes: per table it diffs what the table holds against what
it should hold, writes additions and updates table by table in `TABLE_ORDER`, then removals in the
reverse order, then bumps the policy revision if a policy table changed, so that established flows
re-check policy. Additions come before removals, so a flow never meets a half-written state that
denies more than either the old or the new one, and a reference (a VIP in a hosts file, an L7 flag
on a service) is written after what it refers to. At start-up every kernel table is read back
(adoption): a restarted agent writes only what differs from its predecessor's pinned maps.

Who writes what. Every table below is written here and nowhere else:

    table            holds                                              source (bpf/lib, store, file)
    vips             VIP allocations, owner -> VIP                      store services/vips/*
    node_files       node-local CIDR identity numbers                   state_dir/cidr-identities-NODE.json
    l7_snapshot      the L7 processor's config snapshot                 state_dir/l7-NODE.json
    ipcache          prefix -> identity                                 ipcache.h  ipcache
    ipblock_cidrs    NetworkPolicy ipBlock prefix -> CIDR identity      ipcache.h  ipblock_cidrs
    policy           (ep, dir, identity, proto, port) -> verdict        policy.h   policy_map
    endpoints        host-side ifindex -> endpoint_info                 common.h   endpoints, endpoints_hi
    endpoints_by_id  ep_id -> endpoint_info (the L7 processor's marks)  common.h   endpoints_by_id
    routes           other nodes' pod CIDRs -> their node IPs           the node's routing table (proto 201)
    datapath_config  the L7 processor's address, for TC                 common.h   config_map (proxy_*)
    dns_redirect     the DNS proxy's port: endpoints' DNS goes there    config.h   config_map (dns_port)
    endpoint_netns   netns cookie -> (ep_id, identity)                  netns.h    endpoint_netns
    lb_services      (VIP, port, proto) -> backends, flags              lb.h       lb_services, lb_backends
    lb_config        the L7 processor's address, for the socket hooks   lb.h       lb_config
    fastpath_config  socket fast path switch, node netns, pod CIDR      sockmap.h  fastpath_config
    hosts_files      /etc/hosts of each endpoint we created             /etc/netns/NAME/hosts (in place)

`config_map.policy_revision` is written by `Sync.bump_revision` only.

Writers that stay outside, and why:
- `ct_map`: the TC programs create entries; `Agent.ct_gc` deletes closed and idle ones on a timer
  (time-driven, not desired state: nothing in the store says which flows exist).
- `l7_origdst`: sock_ops files an entry per redirected connection; the L7 processor deletes it as it
  takes it (userspace_l7/origdst.py, lookup-and-delete), since only it knows when it accepted one.
- `l7_pending`, `lb_revnat`, `fastpath_socks`, `fastpath_flows`, `events`, `metrics_map`,
  `lost_events`, `fastpath_metrics`: written by the kernel programs alone; the agent only reads.
- The store's `endpoints/*`, `identities/*` and `resources/*`: the inputs of the desired state,
  written by requests (agent.endpoint_manager, agent.identity, Agent.apply/delete), and by
  `EndpointManager.reidentify` before compute when a local endpoint's security labels changed (its
  Namespace relabelled): identities are the cluster's, agreed through the store, not a table.
- Veths, namespaces, cgroups and TC filters: plumbing, not table contents (agent.endpoint_manager).
- The FQDN cache (agent/dns/fqdn.py) and its file state_dir/fqdn-NODE.json: an input of the desired
  state (what the DNS proxy answered), like the store, written by the proxy's policy hook and aged
  by `Agent.fqdn_gc`; compute reads its snapshot, and each change that matters runs this path.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from agent import identity as ids
from agent.datapath import maps
from agent.datapath.maps import Lb4BackendKeyC, Lb4ServiceC
from agent.datapath.sockets import (
    LB_F_L7,
    MAX_BACKENDS,
    backend_to_c,
    normalize_backend,
    normalize_key,
    service_key_to_c,
)
from agent.dns.rules import DnsPolicy, DnsRule
from agent.endpoint import EndpointRecord
from agent.files import DIR_MODE, FILE_MODE, PUBLIC_DIR_MODE, PUBLIC_FILE_MODE, write_text_if_changed
from agent.flows import EndpointRef, FlowContext
from agent.l7_snapshot import l7_config, l7_services
from agent.named_ports import ports_of
from agent.node import delete_pod_route, pod_routes, set_pod_route
from agent.policy.compiler import PolicyInput, compile_policies
from agent.policy.types import EGRESS, INGRESS, EndpointInfo, Enforcement, IdentityInfo, RuleInfo
from agent.services import ServicePlan, ServiceView, hosts_file, plan_services
from agent.state import DesiredState

POLICY_KINDS = ("CiliumNetworkPolicy", "NetworkPolicy")

# Additions and updates go in this order; removals in the reverse one.
TABLE_ORDER = ("vips", "node_files", "l7_snapshot", "ipcache", "ipblock_cidrs", "policy", "endpoints",
               "endpoints_by_id", "routes", "datapath_config", "dns_redirect", "endpoint_netns", "lb_services",
               "lb_config", "fastpath_config", "hosts_files")
# A change to one of these makes established flows re-check policy (a policy revision bump).
POLICY_TABLES = frozenset({"ipcache", "ipblock_cidrs", "policy", "endpoints", "endpoints_by_id"})
PROXY = "proxy"  # the one key of datapath_config and lb_config
DNS = "dns"  # the one key of dns_redirect
FASTPATH = "fastpath"  # the one key of fastpath_config


def policy_inputs(resources: Mapping[str, Sequence[dict]]) -> list[PolicyInput]:
    return [PolicyInput.from_body(kind, body) for kind in POLICY_KINDS for body in resources.get(kind, ())]


def named_port_endpoints(records: Sequence[EndpointRecord]) -> list[EndpointInfo]:
    """The endpoints of every node that name ports, against which egress rules' named ports resolve.
    Compiled on every reconcile, so an endpoint that comes or goes changes what they resolve to."""
    return [EndpointInfo(ep_id=rec.ep_id, name=rec.name, namespace=rec.namespace, ip=rec.ip, identity=rec.identity,
                         labels={}, ports=ports) for rec in records if (ports := ports_of(rec.ports))]


# ---- compute: pure -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Computed:
    """What the node should hold (``tables``), plus what was learnt on the way for the API and flows."""

    tables: Mapping[str, Mapping[Any, Any]]
    rules: Mapping[int, RuleInfo]
    services: tuple[ServiceView, ...]
    cidr_identities: Mapping[str, int]
    # DNS policy of each local endpoint (ep_id), its toFQDNs selectors, the FQDN /32s with the selectors
    # that chose them, and the FQDN cache generation this round compiled (agent/dns/hook.py waits for it)
    dns: Mapping[int, DnsPolicy] = field(default_factory=dict)
    fqdn_selectors: Mapping[int, tuple[DnsRule, ...]] = field(default_factory=dict)
    fqdn_prefixes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    fqdn_allowed: Mapping[int, frozenset[str]] = field(default_factory=dict)
    fqdn_generation: int = 0


def compute(desired: DesiredState) -> Computed:
    """Desired state -> the contents of every table of the module doc. No I/O. Raises
    PolicyCompileError for a stored policy that cannot be enforced, ValueError for impossible
    service tables."""
    node = desired.node
    local = [rec for rec in desired.local_endpoints if rec.name in node.ifindex]  # plumbed and attached
    namespaces = desired.namespaces
    compiled = compile_policies(
        policy_inputs(desired.resources),
        [IdentityInfo(id=i, labels=dict(lbls)) for i, lbls in sorted(desired.identities.items())],
        [EndpointInfo(ep_id=rec.ep_id, name=rec.name, namespace=rec.namespace, ip=rec.ip, identity=rec.identity,
                      labels=desired.security_labels(rec, namespaces),
                      ports=ports_of(rec.ports)) for rec in local],
        mode=node.policy_mode, cidr_identities=desired.cidr_identities,
        cluster_endpoints=named_port_endpoints(desired.endpoints), fqdn=desired.fqdn.names,
    )
    ipcache: dict[str, int] = dict(compiled.cidr_identities)
    routes = {}
    for peer in desired.remote_nodes:
        # Traffic another node sends itself (its L7 processor, its host) comes from its node IP or
        # its own pod CIDR address: both are that node, as Cilium's remote-node identity means.
        for ip in (peer.node_ip, peer.router_ip):
            if ip != "0.0.0.0":
                ipcache[f"{ip}/32"] = ids.REMOTE_NODE
        if peer.node_ip != "0.0.0.0" and peer.pod_cidr != node.pod_cidr:
            routes[peer.pod_cidr] = peer.node_ip
    for ip in (*node.local_ips, node.router_ip):
        ipcache[f"{ip}/32"] = ids.HOST
    for rec in desired.endpoints:
        ipcache[f"{rec.ip}/32"] = rec.identity

    no = Enforcement(enforced=False)
    endpoints, by_id, netns = {}, {}, {}
    for rec in local:
        info = bytes(maps.endpoint_info_to_c(
            rec.ip, rec.identity, rec.ep_id,
            compiled.enforcement.get((rec.ep_id, INGRESS), no), compiled.enforcement.get((rec.ep_id, EGRESS), no)))
        endpoints[node.ifindex[rec.name]] = info
        by_id[rec.ep_id] = info
        cookie = node.netns_cookies.get(rec.name)
        if cookie is not None:
            netns[cookie] = (rec.ep_id, rec.identity)

    vs_bodies, dr_bodies = list(desired.kind("VirtualService")), list(desired.kind("DestinationRule"))
    plan = plan_services(
        desired.kind("Service"), desired.kind("ServiceEntry"), desired.vips, desired.endpoints, desired.resolved,
        l7_services(vs_bodies, dr_bodies, node.cluster_domain),
        pod_cidr=node.pod_cidr, service_cidr=node.service_cidr, cluster_domain=node.cluster_domain,
    )
    proxy = (node.router_ip, node.l7_port)
    labels_by_ip = {e.ip: dict(e.labels) for e in desired.endpoints}
    snapshot = l7_config(plan.views, vs_bodies, dr_bodies, labels_by_ip, node.cluster_domain, local)
    l7_snapshot = {node.l7_config_path: json.dumps(snapshot, sort_keys=True, indent=1)} if node.l7_config_path else {}
    node_files = {}
    if node.cidr_identities_path:
        node_files[node.cidr_identities_path] = json.dumps(compiled.cidr_identities, sort_keys=True)
    # With the DNS proxy the names come from it (for every process, however started, and fresh) and
    # the hosts file keeps localhost alone; it is written in place all the same (Files), since a
    # process keeps the inode `ip netns exec` mounted when it started.
    hosts = {hosts_path(rec): hosts_file(plan.views, rec.namespace, node.cluster_domain, bool(node.dns_port))
             for rec in local if hosts_path(rec)}
    tables = {
        "vips": dict(plan.vips),
        "node_files": node_files,
        "l7_snapshot": l7_snapshot,
        "ipcache": ipcache,
        "ipblock_cidrs": dict(compiled.ipblock_cidrs),
        "policy": dict(compiled.entries),
        "endpoints": endpoints,
        "endpoints_by_id": by_id,
        "routes": routes,
        "datapath_config": {PROXY: proxy},
        "dns_redirect": {DNS: node.dns_port} if node.dns_port else {},
        "endpoint_netns": netns,
        "lb_services": lb_services(plan),
        "lb_config": {PROXY: proxy},
        "fastpath_config": {FASTPATH: (node.fastpath, node.node_netns, node.pod_cidr)},
        "hosts_files": hosts,
    }
    return Computed(tables=tables, rules=dict(compiled.rules), services=plan.views,
                    cidr_identities=dict(compiled.cidr_identities), dns=dict(compiled.dns),
                    fqdn_selectors=dict(compiled.fqdn_selectors), fqdn_prefixes=dict(compiled.fqdn_prefixes),
                    fqdn_allowed=dict(compiled.fqdn_allowed), fqdn_generation=desired.fqdn.generation)


def lb_services(plan: ServicePlan) -> dict[tuple, tuple[tuple[tuple[str, int], ...], int]]:
    """The kernel's service table for the node's services: every TCP/UDP port of each view, its
    backends' addresses, and LB_F_L7 on an L7 service's HTTP ports (connect goes to the processor)."""
    services, flags = {}, {}
    for v in plan.views:
        l7 = set(v.redirected_ports())
        for p in v.ports:
            if p.protocol in ("tcp", "udp"):
                key = (v.vip, p.port, p.protocol)
                if key in services:
                    raise ValueError(f"service {key} given twice")
                services[key] = [(b.ip, b.port_for(p)) for b in v.backends]
                flags[key] = LB_F_L7 if p in l7 else 0
    return lb_table(services, flags)


def lb_table(services: Mapping[tuple, Sequence[tuple]], flags: Mapping[tuple, int] | None = None
             ) -> dict[tuple, tuple[tuple[tuple[str, int], ...], int]]:
    """(VIP, port, "tcp"|"udp"|proto number) -> [(ip, port), ...] -> the lb_services table's contents:
    (VIP, port, IP proto) -> (backends in slot order, LB_F_* flags). Raises ValueError on bad input
    (an address, a port, a protocol, a service given twice, too many backends)."""
    flags = {normalize_key(k): v for k, v in (flags or {}).items()}
    out = {}
    for key, backends in services.items():
        nkey = normalize_key(key)
        if nkey in out:
            raise ValueError(f"service {nkey} given twice")
        bes = tuple(normalize_backend(b) for b in backends)
        if len(bes) > MAX_BACKENDS:
            raise ValueError(f"service {nkey}: {len(bes)} backends, at most {MAX_BACKENDS}")
        out[nkey] = (bes, flags.get(nkey, 0))
    return out


def hosts_path(rec: EndpointRecord) -> str | None:
    """/etc/netns/NAME/hosts, which `ip netns exec` (and `meshagent exec`) mount over /etc/hosts; only
    for namespaces we created (an attached namespace's /etc/netns is its owner's). No resolv.conf is
    written beside it: processes keep the host's resolver address, and the DNS redirect takes their
    queries to the node's DNS proxy whatever that address is (bpf/lib/dns.h)."""
    if not (rec.netns_owned and rec.netns.startswith("/run/netns/")):
        return None
    return f"/etc/netns/{rec.netns.rsplit('/', 1)[1]}/hosts"


def endpoint_ref(rec: EndpointRecord, labels: Mapping[str, str]) -> EndpointRef:
    """``labels``: its security labels (`DesiredState.security_labels`)."""
    return EndpointRef(name=rec.name, namespace=rec.namespace, labels=dict(labels), identity=rec.identity)


def flow_context(desired: DesiredState, computed: Computed, boot_offset_ns: int) -> FlowContext:
    """What flow decoding needs to name both sides and the deciding rule, as of this round."""
    labels: dict[int, Mapping[str, str]] = {i: dict(lbls) for i, lbls in desired.identities.items()}
    for prefix, cid in computed.cidr_identities.items():
        labels[cid] = {f"cidr:{prefix}": ""}
        # An address toFQDNs allowed: labelled as Cilium labels it, by the selectors that chose it
        labels[cid].update({f"fqdn:{sel}": "" for sel in computed.fqdn_prefixes.get(prefix, ())})
    namespaces = desired.namespaces
    refs = {(r.node, r.name): endpoint_ref(r, desired.security_labels(r, namespaces)) for r in desired.endpoints}
    return FlowContext(
        node_name=desired.node.name,
        endpoints_by_ip={r.ip: refs[(r.node, r.name)] for r in desired.endpoints},
        identity_labels=labels, rules=dict(computed.rules), boot_offset_ns=boot_offset_ns,
        endpoints_by_id={r.ep_id: refs[(r.node, r.name)] for r in desired.local_endpoints
                         if r.name in desired.node.ifindex},
    )


# ---- sync: the one engine that writes --------------------------------------------------------------


class Table(Protocol):
    """One table the engine keeps equal to computed contents."""

    name: str
    kernel: bool  # a BPF map (counted in meshagent_bpf_map_ops_total)
    volatile: bool  # others write it too (the shared store): read it again before every diff

    def read(self) -> dict: ...

    def write(self, key: Any, value: Any, old: Any) -> None: ...  # old: None for an addition

    def delete(self, key: Any, old: Any) -> None: ...


@dataclass
class SyncStats:
    added: int = 0
    updated: int = 0
    deleted: int = 0
    tables: set[str] = field(default_factory=set)  # names of the tables that changed

    @property
    def changed(self) -> bool:
        return bool(self.added or self.updated or self.deleted)


class Sync:
    """Keeps every table equal to computed contents, writing only differences (see the module doc)."""

    def __init__(self, tables: Sequence[Table], bump_revision: Callable[[], None] | None = None):
        unknown = [t.name for t in tables if t.name not in TABLE_ORDER]
        if unknown:
            raise ValueError(f"tables {unknown} have no place in TABLE_ORDER")
        self.tables = {t.name: t for t in sorted(tables, key=lambda t: TABLE_ORDER.index(t.name))}
        self._bump = bump_revision
        self.lock = threading.Lock()
        self.ops_total = 0  # meshagent_bpf_map_ops_total
        self.current: dict[str, dict] = {name: t.read() for name, t in self.tables.items()}

    def apply(self, want: Mapping[str, Mapping]) -> SyncStats:
        """Write ``want`` (table name -> contents; tables not named are left alone)."""
        with self.lock:
            stats = SyncStats()
            names = [n for n in self.tables if n in want]
            for name in names:
                if self.tables[name].volatile:
                    self.current[name] = self.tables[name].read()
            for name in names:
                check = getattr(self.tables[name], "check", None)
                if check is not None:
                    check(want[name], self.current[name])  # refuse before anything is written
            kernel_ops = 0
            for name in names:
                table, cur = self.tables[name], self.current[name]
                for key, value in want[name].items():
                    old = cur.get(key)
                    if old != value:
                        table.write(key, value, old)
                        stats.added += old is None
                        stats.updated += old is not None
                        stats.tables.add(name)
                        kernel_ops += table.kernel
            for name in reversed(names):
                table, cur = self.tables[name], self.current[name]
                for key in [k for k in cur if k not in want[name]]:
                    table.delete(key, cur[key])
                    stats.deleted += 1
                    stats.tables.add(name)
                    kernel_ops += table.kernel
                self.current[name] = dict(want[name])
            self.ops_total += kernel_ops
            if stats.tables & POLICY_TABLES and self._bump is not None:
                self._bump()
                self.ops_total += 1
            return stats

    def read(self, name: str) -> dict:
        """What table ``name`` holds right now, read from its source (`policy trace`, `bpf ... list`)."""
        return self.tables[name].read()


# ---- the tables ----------------------------------------------------------------------------------


class _Table:
    kernel = True
    volatile = False


class IpcacheTable(_Table):
    """An LPM trie of prefix -> identity: the ipcache, or ipblock_cidrs (same key and value)."""

    def __init__(self, tc, name: str = "ipcache"):
        self.name = name
        self.map = tc.table(name)

    def read(self) -> dict:
        return {maps.ipcache_key_from_c(k): v.identity for k, v in self.map.items()}

    def write(self, key, value, old) -> None:
        self.map[maps.ipcache_key_to_c(key)] = maps.IpcacheEntryC(identity=value)

    def delete(self, key, old) -> None:
        _delete(self.map, maps.ipcache_key_to_c(key))


class PolicyTable(_Table):
    name = "policy"

    def __init__(self, tc):
        self.map = tc.table("policy_map")

    def read(self) -> dict:
        return {maps.policy_key_from_c(k): maps.policy_entry_from_c(v) for k, v in self.map.items()}

    def write(self, key, value, old) -> None:
        self.map[maps.policy_key_to_c(key)] = maps.policy_entry_to_c(key, value)

    def delete(self, key, old) -> None:
        _delete(self.map, maps.policy_key_to_c(key))


class EndpointTable(_Table):
    """By host-side ifindex: an array below ENDPOINT_ARRAY_SIZE, a hash above (tc datapath does which)."""

    name = "endpoints"

    def __init__(self, tc):
        self.tc = tc

    def read(self) -> dict:
        return self.tc.read_endpoints()

    def write(self, key, value, old) -> None:
        self.tc.write_endpoint(key, maps.EndpointInfoC.from_buffer_copy(value))

    def delete(self, key, old) -> None:
        self.tc.delete_endpoint(key)


class EndpointByIdTable(_Table):
    name = "endpoints_by_id"

    def __init__(self, tc):
        self.tc = tc

    def read(self) -> dict:
        return self.tc.read_endpoints_by_id()

    def write(self, key, value, old) -> None:
        self.tc.write_endpoint_by_id(key, maps.EndpointInfoC.from_buffer_copy(value))

    def delete(self, key, old) -> None:
        self.tc.delete_endpoint_by_id(key)


class ProxyTable(_Table):
    """The L7 processor's address in one of the two datapaths' config maps (set_proxy/proxy)."""

    def __init__(self, name: str, datapath):
        self.name, self.dp = name, datapath

    def read(self) -> dict:
        proxy = self.dp.proxy()
        return {PROXY: proxy} if proxy else {}

    def write(self, key, value, old) -> None:
        self.dp.set_proxy(*value)

    def delete(self, key, old) -> None:
        self.dp.set_proxy(None)


class DnsRedirectTable(_Table):
    """The DNS proxy's port in the global config: while it is set, the socket hooks send every DNS
    query of an endpoint to the proxy and TC lets it through (bpf/lib/dns.h)."""

    name = "dns_redirect"

    def __init__(self, tc):
        self.tc = tc

    def read(self) -> dict:
        port = self.tc.dns_port()
        return {DNS: port} if port else {}

    def write(self, key, value, old) -> None:
        self.tc.set_dns_port(value)

    def delete(self, key, old) -> None:
        self.tc.set_dns_port(0)


class RoutesTable(_Table):
    """Routes to the other nodes' pod CIDRs via their node IPs (direct routing); only the routes
    marked with meshagent's protocol number are read, written and removed (agent/node.py)."""

    name = "routes"
    kernel = False

    def read(self) -> dict:
        return pod_routes()

    def write(self, key, value, old) -> None:
        set_pod_route(key, value)

    def delete(self, key, old) -> None:
        delete_pod_route(key)


class EndpointNetnsTable(_Table):
    """Which network namespaces are endpoints', for the socket hooks (bpf/lib/netns.h)."""

    name = "endpoint_netns"

    def __init__(self, sockets):
        self.sockets = sockets

    def read(self) -> dict:
        return self.sockets.endpoint_netns()

    def write(self, key, value, old) -> None:
        self.sockets.set_endpoint_netns(key, *value)

    def delete(self, key, old) -> None:
        self.sockets.remove_endpoint_netns(key)


class ServiceTable(_Table):
    """lb_services and lb_backends as one table: (VIP, port, proto) -> (backends, flags).

    bpf/lib/lb.h's update protocol: a service's backends live in slots 0..count-1 under its
    service_id. A changed service has its slots rewritten in place, new slots written before its
    backend_count grows and stale slots deleted after it shrinks, so a connect never picks an empty
    slot. A new service takes the lowest service_id no service holds (those about to be removed
    still hold theirs: removals come last). An empty backend list keeps the VIP and refuses
    connections. A backend listed k times gets k shares.
    """

    name = "lb_services"

    def __init__(self, sockets):
        self.sockets = sockets
        self.ids: dict[tuple, int] = {}

    def read(self) -> dict:
        state = self.sockets.services()
        self.ids = {k: s.service_id for k, s in state.items()}
        return {k: (s.backends, s.flags) for k, s in state.items()}

    def check(self, want: Mapping, current: Mapping) -> None:
        """Refuse, before writing anything, a table the preallocated maps cannot hold even while a
        changed service holds its old and new slots at once."""
        sizes = self.sockets.map_sizes
        peak = sum(max(len(bes), len(current[k][0]) if k in current else 0) for k, (bes, _) in want.items())
        if peak > sizes["LB_BACKEND_MAP_SIZE"]:
            raise ValueError(f"{peak} backend slots needed, the lb_backends map holds "
                             f"{sizes['LB_BACKEND_MAP_SIZE']} (LB_BACKEND_MAP_SIZE)")
        if len(want) > sizes["LB_SERVICE_MAP_SIZE"]:
            raise ValueError(f"{len(want)} services, the lb_services map holds {sizes['LB_SERVICE_MAP_SIZE']} "
                             "(LB_SERVICE_MAP_SIZE)")

    def write(self, key, value, old) -> None:
        backends, flags = value
        old_backends = old[0] if old is not None else ()
        service_id = self.ids.get(key)
        if service_id is None:
            used = set(self.ids.values())
            service_id = next(i for i in range(1, len(used) + 2) if i not in used)
            self.ids[key] = service_id
        slots = self.sockets.table("lb_backends")
        for slot, backend in enumerate(backends):
            if slot >= len(old_backends) or old_backends[slot] != backend:
                slots[Lb4BackendKeyC(service_id=service_id, slot=slot)] = backend_to_c(backend)
        self.sockets.table("lb_services")[service_key_to_c(key)] = Lb4ServiceC(
            service_id=service_id, backend_count=len(backends), flags=flags)
        for slot in range(len(backends), len(old_backends)):  # includes missing slots
            _delete(slots, Lb4BackendKeyC(service_id=service_id, slot=slot))

    def delete(self, key, old) -> None:
        service_id = self.ids.pop(key)
        _delete(self.sockets.table("lb_services"), service_key_to_c(key))
        slots = self.sockets.table("lb_backends")
        for slot in range(len(old[0])):
            _delete(slots, Lb4BackendKeyC(service_id=service_id, slot=slot))


class FastpathConfigTable(_Table):
    name = "fastpath_config"

    def __init__(self, sockets):
        self.sockets = sockets

    def read(self) -> dict:
        return {FASTPATH: self.sockets.fastpath_config()}

    def write(self, key, value, old) -> None:
        self.sockets.set_fastpath(*value)

    def delete(self, key, old) -> None:
        self.sockets.set_fastpath(False)


class VipRecords:
    """VIP allocations in the store (services/vips/OWNER): shared by every node on the store."""

    name = "vips"
    kernel = False
    volatile = True

    def __init__(self, store):
        self.store = store

    def read(self) -> dict:
        from agent.state import read_vips

        return read_vips(self.store)

    def write(self, key, value, old) -> None:
        self.store.put(f"services/vips/{key}", {"vip": value})

    def delete(self, key, old) -> None:
        self.store.delete(f"services/vips/{key}")


class Files:
    """Files by path -> text, replaced atomically when their text differs, or overwritten in place
    (``in_place``) when they are bind-mounted elsewhere (agent/files.py). Files are not deleted
    here: an endpoint's /etc/netns/NAME goes with its namespace, the node's files with teardown.
    The node's files are root's alone; hosts files are read by every process of an endpoint."""

    kernel = False
    volatile = False

    def __init__(self, name: str, public: bool = False, in_place: bool = False):
        self.name = name
        self.modes = (PUBLIC_FILE_MODE, PUBLIC_DIR_MODE) if public else (FILE_MODE, DIR_MODE)
        self.in_place = in_place

    def read(self) -> dict:
        return {}  # nothing assumed: the first round compares with the files on disk

    def write(self, key, value, old) -> None:
        write_text_if_changed(key, value, *self.modes, in_place=self.in_place)

    def delete(self, key, old) -> None:
        pass


def node_tables(tc, sockets, store) -> list[Table]:
    """Every table of the module doc, bound to the node's two datapaths and its store."""
    return [
        VipRecords(store), Files("node_files"), Files("l7_snapshot"),
        IpcacheTable(tc), IpcacheTable(tc, "ipblock_cidrs"), PolicyTable(tc), EndpointTable(tc),
        EndpointByIdTable(tc), RoutesTable(),
        ProxyTable("datapath_config", tc), DnsRedirectTable(tc), EndpointNetnsTable(sockets), ServiceTable(sockets),
        ProxyTable("lb_config", sockets), FastpathConfigTable(sockets),
        Files("hosts_files", public=True, in_place=True),  # `ip netns exec` bind-mounts them
    ]


def _delete(table, key) -> None:
    try:
        del table[key]
    except KeyError:
        pass
