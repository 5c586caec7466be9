"""`meshagent agent`: the node agent process. `Agent` coordinates; the work is done by its parts.

    EndpointManager   endpoint lifecycle and plumbing facts      agent/endpoint_manager.py
    TcDatapath        the TC programs and their maps             agent/datapath/tc.py
    SocketDatapath    the socket programs and their maps       agent/datapath/sockets.py
    reconcile         desired state -> tables -> writes          agent/reconcile.py (+ agent/state.py)
    L7Supervisor      the shared L7 processor's process          agent/l7_supervisor.py
    FlowBuffer        decoded flows for `meshagent flows`        agent/flows.py
    DnsProxy          the node's DNS server for its endpoints    agent/dns/proxy.py

Threads: the main thread waits for signals and runs periodic work (store changes, DNS
re-resolution, conntrack GC); one thread drains the BPF ring buffer into the flow buffer; the API
answers on the Unix socket with a thread per connection (agent/api.py); prometheus-client serves
/metrics; the DNS proxy runs its own asyncio loop in a thread (agent/dns/proxy.py says why).
Every state change takes `Agent.lock` and ends in `Agent.reconcile()`, the one path that writes
the datapath (agent/reconcile.py lists the exceptions: conntrack GC here, and the L7 processor's
own l7_origdst cleanup).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence

from agent import __version__, bpf_listing
from agent import endpoint as ep
from agent import identity as ids
from agent.datapath import clock, maps
from agent.datapath.sockets import CGROUP_ROOT, SocketDatapath, current_netns_cookie, fastpath_supported
from agent.datapath.tc import PROGRAMS, TcDatapath
from agent.dns.explain import fqdn_cache_rows, fqdn_trace
from agent.dns.fqdn import FqdnCache, state_path
from agent.dns.hook import FqdnPolicyHook, FqdnView
from agent.dns.proxy import DnsPolicyHook, DnsProxy
from agent.dns.rules import check_match_name
from agent.dns.snapshot import dns_snapshot
from agent.dns.upstream import Upstreams, parse_upstream_address, resolv_conf_upstreams
from agent.endpoint_manager import EndpointManager, valid_name
from agent.errors import MeshError, UserError
from agent.flows import (
    FlowBuffer,
    FlowContext,
    FlowCounters,
    FlowFilter,
    LazyFlow,
    decode_event,
    dns_flow_of,
    enrich_l7_flow,
)
from agent.identity import IdentityAllocator
from agent.l7_supervisor import L7Supervisor
from agent.named_ports import ports_of
from agent.node import (
    NodeError,
    NodeLock,
    enable_forwarding,
    fence_service_cidr,
    local_ipv4_addresses,
    router_ip,
    set_router_ip,
)
from agent.node_config import NodeConfig, NodeConfigError, load
from agent.node_registry import NodeClaimError, NodeRegistry, detect_node_ip
from agent.policy.compiler import compile_policies
from agent.policy.trace import Decider, Side, enforcement_of, parse_protocol, resolve_address, resolve_side, trace
from agent.policy.types import EGRESS, EndpointInfo, IdentityInfo
from agent.reconcile import (
    POLICY_KINDS,
    Computed,
    Sync,
    compute,
    flow_context,
    named_port_endpoints,
    node_tables,
    policy_inputs,
)
from agent.resources import (
    KINDS,
    Limits,
    check_apply_size,
    cluster_scoped,
    namespace_warning,
    parse_store_key,
    store_key,
    validate,
)
from agent.services import check_services
from agent.state import (
    DesiredState,
    DnsResolver,
    NodeFacts,
    load_cidr_identities,
    read_desired,
    read_resources,
    read_vips,
)
from agent.store import StoreError, open_store
from agent.store.base import hhmmss, store_name

log = logging.getLogger("meshagent")

CT_GC_INTERVAL_S = 10.0
EVENT_DRAIN_INTERVAL_S = 0.05
CT_TIMEOUT_CLOSED_S = 10.0
CT_TIMEOUT_NON_TCP_S = 60.0
CT_TIMEOUT_TCP_S = 6 * 3600.0
CT_F_CLOSED = 0x7  # bpf/lib/conntrack.h: FIN either way, or RST
FQDN_GC_INTERVAL_S = 1.0  # how late an FQDN allow may outlive its expiry


class Agent:
    def __init__(self, cfg: NodeConfig):
        self.cfg = cfg
        self.store = open_store(cfg.store, cfg)
        self.identities = IdentityAllocator(self.store)
        self.lock = threading.RLock()
        self.datapath = TcDatapath(cfg.bpffs_dir)
        self.sockets = SocketDatapath(cfg.bpffs_dir)
        self.endpoints = EndpointManager(cfg, self.store, self.identities, reconcile=self.reconcile,
                                         attach=self.datapath.attach)
        self.resolver = DnsResolver()  # ServiceEntry names with resolution DNS
        self.nodes = NodeRegistry(cfg, self.store, cfg.node_ip or detect_node_ip(cfg))
        self.last_reconcile = 0.0  # when the datapath last took the store's state (status: age of the sync)
        self._registered = False
        self.router_ip = router_ip(cfg.pod_cidr)
        self.sync: Sync | None = None
        self.computed: Computed | None = None
        self.l7: L7Supervisor | None = None
        self.dns: DnsProxy | None = None
        # toFQDNs and DNS rules: what the proxy answered each endpoint (agent/dns/fqdn.py) and the hook
        # that checks its queries and records its answers (agent/dns/hook.py)
        self.fqdn = FqdnCache(cfg.tofqdns_min_ttl)
        self.fqdn_hook = FqdnPolicyHook(self.fqdn, reconcile=self.reconcile_fqdn)
        self.dns_hook: DnsPolicyHook | None = self.fqdn_hook
        self._dns_snapshot = None
        self._host_ips: frozenset[str] = frozenset()
        self.flows = FlowBuffer()
        self.counters = FlowCounters()
        self.flow_ctx = FlowContext(node_name=cfg.node_name, endpoints_by_ip={}, identity_labels={}, rules={},
                                    boot_offset_ns=time.time_ns() - time.monotonic_ns())
        self.ready = False
        self.stopping = threading.Event()
        self._store_generation = -1
        self._node_netns = 0
        self._fastpath = False

    # ---- bring-up --------------------------------------------------------------------------------

    def start(self) -> None:
        self.register_node()
        enable_forwarding()
        fence_service_cidr(self.cfg.service_cidr)
        set_router_ip(self.cfg.pod_cidr)
        ep.create_cgroup(self.cfg.cgroup)
        self.datapath.load()
        self.sockets.load()
        self.sockets.attach(CGROUP_ROOT)
        self._fastpath = self.cfg.socket_fastpath and fastpath_supported()
        if self.cfg.socket_fastpath and not self._fastpath:
            log.warning("socket fast path off: this kernel's BTF has no sk_psock.msg_tot_len, "
                        "which bounds a receiver's queue")
        self._node_netns = current_netns_cookie()  # the agent runs in the node's namespace, as the processor
        self.sync = Sync(node_tables(self.datapath, self.sockets, self.store),
                         bump_revision=self.datapath.bump_policy_revision)  # adopts what the maps hold
        self.fqdn.load(self.fqdn_path)  # the previous agent's answers: its toFQDNs allows stand on
        with self.lock:
            self.endpoints.adopt()
            self.reconcile()
        self.datapath.open_events(self._on_event)

    def register_node(self) -> bool:
        """Write this node's record; another node's claim on its name or pod CIDR stops the agent.
        A store that cannot be reached now is retried from the periodic loop (the datapath keeps
        enforcing what it holds meanwhile)."""
        try:
            self.nodes.register()
        except NodeClaimError as e:
            raise NodeError(str(e)) from None
        except StoreError as e:
            log.warning("not registered in the store yet, retrying: %s", e)
            self._registered = False
            return False
        self._registered = True
        return True

    # ---- the reconcile path ----------------------------------------------------------------------

    def facts(self) -> NodeFacts:
        cfg = self.cfg
        return NodeFacts(
            name=cfg.node_name, pod_cidr=cfg.pod_cidr, service_cidr=cfg.service_cidr,
            cluster_domain=cfg.cluster_domain, policy_mode=cfg.policy_enforcement, router_ip=self.router_ip,
            l7_port=cfg.l7_ports.outbound, local_ips=tuple(local_ipv4_addresses(cfg.pod_cidr)),
            ifindex=dict(self.endpoints.ifindex), netns_cookies=dict(self.endpoints.netns_cookies),
            node_netns=self._node_netns, fastpath=self._fastpath, l7_config_path=self.l7_config_path,
            cidr_identities_path=os.path.join(cfg.state_dir, f"cidr-identities-{cfg.node_name}.json"),
            dns_port=cfg.dns_proxy_port if cfg.dns_proxy else 0,  # where endpoints' DNS goes (bpf/lib/dns.h)
        )

    @property
    def l7_config_path(self) -> str:
        return os.path.join(self.cfg.state_dir, f"l7-{self.cfg.node_name}.json")

    @property
    def fqdn_path(self) -> str:
        return state_path(self.cfg.state_dir, self.cfg.node_name)

    def desired(self) -> DesiredState:
        return read_desired(self.store, self.facts(), self.identities.all(), self.resolver, self.fqdn.snapshot())

    def reconcile(self) -> None:
        """Store -> desired state -> computed tables -> incremental writes. Caller holds self.lock.
        Endpoints whose security labels changed get their new identities first (a store write:
        EndpointManager.reidentify says why), and the state is read again."""
        self._store_generation = self.store.generation()
        desired = self.desired()
        if self.endpoints.reidentify(desired):
            self._store_generation = self.store.generation()
            desired = self.desired()
        computed = compute(desired)
        stats = self.sync.apply(computed.tables)
        self.computed = computed
        self.last_reconcile = time.time()
        self.flow_ctx = flow_context(desired, computed, self.flow_ctx.boot_offset_ns)
        self.fqdn_hook.update(FqdnView(computed.dns, computed.fqdn_selectors, computed.fqdn_allowed,
                                       computed.fqdn_generation))
        self._host_ips = frozenset((*desired.node.local_ips, desired.node.router_ip))
        self._dns_snapshot = dns_snapshot(desired, computed.services)
        if self.dns is not None:
            self.dns.update(self._dns_snapshot)
        if "l7_snapshot" in stats.tables and self.l7 is not None:
            self.l7.reload()  # every worker at once, rather than each at its next poll of the file

    def reconcile_fqdn(self, generation: int, timeout: float) -> None:
        """Have the datapath hold FQDN cache ``generation`` or later (the DNS policy hook asks, before
        the proxy releases an answer whose addresses a toFQDNs policy allows). Waits at most
        ``timeout`` for the lock; a reconcile already done by someone else is not repeated."""
        if not self.lock.acquire(timeout=max(timeout, 0.0)):
            return
        try:
            if self.fqdn_hook.view.generation < generation:
                self.reconcile()
        finally:
            self.lock.release()

    def fqdn_gc(self) -> None:
        """Drop the FQDN cache's expired addresses (kept while a connection uses them) and those of
        deleted endpoints; reconcile if any went, so their allows go too; save the cache."""
        gone = self.fqdn.retain(list(self.endpoints.ifindex))
        gone = self.fqdn.gc(self._fqdn_live_peers) or gone
        if gone:
            with self.lock:
                self.reconcile()
        self.fqdn.save(self.fqdn_path)

    def _fqdn_live_peers(self) -> set[tuple[str, str]]:
        """(endpoint name, peer address) of every connection this node's endpoints opened that
        conntrack holds open (not closed by FIN or RST)."""
        names = {ep_id: ref.name for ep_id, ref in self.flow_ctx.endpoints_by_id.items()}
        out = set()
        for key, entry in self.datapath.table("ct_map").items():
            if key.dir == EGRESS and not entry.flags & CT_F_CLOSED and key.ep_id in names:
                out.add((names[key.ep_id], maps.be32_to_ip(key.daddr)))
        return out

    # ---- resources -------------------------------------------------------------------------------

    def apply(self, documents: Sequence[tuple[object, str]]) -> dict:
        """Validate every (body, where) document, check the store as it would be after the apply,
        then write it all and reconcile; or refuse with nothing changed. Each document, and all of
        them together, is held to the apply limits first (the agent's environment can raise them).
        ``warnings``: one line per deprecated field read, and per resource whose namespace has no
        endpoint on this node yet."""
        limits = Limits.from_env()
        resources, seen = [], set()
        for body, where in documents:
            res = validate(body, where, limits)
            if res.key in seen:
                raise UserError(f"{where}: {res.kind} {res.namespace}/{res.name} appears twice")
            seen.add(res.key)
            resources.append(res)
        if not resources:
            raise UserError("nothing to apply: no documents given")
        check_apply_size(resources, limits)
        self.require_store("the apply")
        with self.lock:
            candidate = {kind: {("" if cluster_scoped(kind) else b["metadata"].get("namespace", "default"),
                                 b["metadata"]["name"]): b for b in bodies}
                         for kind, bodies in read_resources(self.store, tuple(KINDS)).items()}
            for res in resources:
                candidate.setdefault(res.kind, {})[(res.namespace, res.name)] = res.body
            bodies = {kind: tuple(v.values()) for kind, v in candidate.items()}
            check_services([r.body for r in resources if r.kind == "Service"], bodies.get("Service", ()),
                           bodies.get("ServiceEntry", ()), read_vips(self.store),
                           pod_cidr=self.cfg.pod_cidr, service_cidr=self.cfg.service_cidr,
                           cluster_domain=self.cfg.cluster_domain)
            compile_policies(policy_inputs(bodies), [], [], mode=self.cfg.policy_enforcement,
                             cidr_identities=load_cidr_identities(self.facts().cidr_identities_path))
            results, writes = [], {}
            for res in resources:
                key = res.store_key
                old = self.store.get(key)
                action = "created" if old is None else ("unchanged" if old == res.body else "configured")
                if action != "unchanged":
                    writes[key] = res.body
                results.append({"kind": res.kind, "namespace": res.namespace, "name": res.name, "action": action})
            if writes:
                self.store.put_all(writes)  # all or none: a store that fails mid-apply changes nothing
            in_use = {rec.namespace for rec in self.endpoints.records()}
            warnings = [line for res in resources
                        for line in (*res.warnings, namespace_warning(res, in_use, self.cfg.node_name)) if line]
            self.reconcile()
        return {"results": results, "warnings": warnings}

    def require_store(self, what: str) -> None:
        """Refuse a change before its first write when the store is known to be away, so that a change
        of several keys is not half made (each write would fail anyway, one line naming the store)."""
        st = self.store.status()
        if not st.get("connected", True):
            since = hhmmss(st["since"]) if st.get("since") else "?"
            store = store_name(st.get("backend", "dir"), st.get("url", self.cfg.store))
            raise StoreError(f"{store}: unreachable since {since}"
                             + (f" ({st['error']})" if st.get("error") else "")
                             + f"; {what} was not made: retry once the store is back")

    def delete(self, targets: Sequence[tuple[str, str, str]]) -> dict:
        """Delete (kind, namespace, name) resources; a missing one is reported, not an error."""
        results = []
        self.require_store("the deletion")
        with self.lock:
            for kind, ns, name in targets:
                if kind not in KINDS:
                    raise UserError(f"unknown kind {kind!r}; supported: {', '.join(sorted(KINDS))}")
                if cluster_scoped(kind):
                    ns = ""  # as kubectl, a namespace given with a cluster-scoped kind is ignored
                if not ((valid_name(ns) or cluster_scoped(kind)) and valid_name(name)):
                    results.append({"kind": kind, "namespace": ns, "name": name, "action": "not found"})
                    continue
                gone = self.store.delete(store_key(kind, ns, name))
                results.append({"kind": kind, "namespace": ns, "name": name,
                                "action": "deleted" if gone else "not found"})
            self.reconcile()
        return {"results": results}

    def delete_documents(self, documents: Sequence[tuple[object, str]]) -> dict:
        return self.delete([validate(body, where).key for body, where in documents])

    def get(self, kind: str | None) -> dict:
        if kind not in (None, "all") and kind not in KINDS:
            raise UserError(f"unknown kind {kind!r}; supported: {', '.join(sorted(KINDS))}")
        prefix = "resources" if kind in (None, "all") else f"resources/{kind}"
        items = []
        for key, body in self.store.list(prefix).items():
            k, ns, name = parse_store_key(key)
            items.append({"kind": k, "apiVersion": body.get("apiVersion"), "namespace": ns, "name": name,
                          "body": body})
        return {"items": items}

    def service_list(self) -> dict:
        return {"items": [v.to_dict() for v in (self.computed.services if self.computed else ())]}

    # ---- endpoints and identities ----------------------------------------------------------------

    def endpoint_add(self, name: str, labels: dict, namespace: str = "default", serviceaccount: str = "default",
                     netns: str | None = None, ip: str | None = None, ports: list | None = None) -> dict:
        self.require_store("the endpoint")
        with self.lock:
            return self.endpoints.add(name, labels, namespace, serviceaccount, netns, ip, ports)

    def endpoint_label(self, name: str, labels: dict, remove: list) -> dict:
        self.require_store("the relabelling")
        with self.lock:
            return self.endpoints.label(name, labels, remove)

    def endpoint_delete(self, name: str) -> dict:
        self.require_store("the deletion")
        with self.lock:
            return self.endpoints.delete(name)

    def endpoint_list(self) -> dict:
        return {"items": [self.endpoints.view(r) for r in self.endpoints.records()]}

    def endpoint_get(self, name: str) -> dict:
        return self.endpoints.view(self.endpoints.find(name))

    def identity_list(self) -> dict:
        items = [{"id": i, "labels": {lbl: ""}, "reserved": True} for i, lbl in sorted(ids.RESERVED.items())]
        items += [{"id": i, "labels": lbls, "reserved": False} for i, lbls in sorted(self.identities.all().items())]
        return {"items": items}

    # ---- flows -----------------------------------------------------------------------------------

    def stream_flows(self, flt: FlowFilter, last: int | None, follow: bool, send: Callable[[dict], None],
                     alive: Callable[[], bool] = lambda: True) -> dict:
        """Send the matching buffered flows (the ``last`` ones), then with ``follow`` every new one until
        the agent stops, ``send`` fails or ``alive()`` says the client has gone (checked every half
        second, so a quiet stream does not keep its API slot). Returns the ring buffer's loss count."""
        # Subscribe before replaying history so nothing falls between the two; the flows that
        # arrived in between come first on the subscription and are skipped once.
        sub = self.flows.subscribe() if follow else None
        try:
            replayed = self.flows.query(flt, last)
            for flow in replayed:
                send({"flow": flow})
            already = {id(f) for f in replayed}
            while sub is not None and not self.stopping.is_set() and alive():
                item = sub.get(0.5)
                if item is None:
                    continue
                if id(item) in already:
                    continue
                already = set()  # past the overlap: everything from here on is new
                if "lost" in item:
                    send(item)
                elif flt.matches(item):
                    send({"flow": item})
        finally:
            if sub is not None:
                sub.unsubscribe()
        return {"lost_events": self.datapath.lost_events()}

    # ---- policy trace and the raw maps -----------------------------------------------------------

    def policy_trace(self, from_labels: dict, to_labels: dict, from_namespace: str | None,
                     to_namespace: str | None, protocol: str | None, dport: object,
                     from_ip: str | None = None, to_ip: str | None = None, to_fqdn: str | None = None) -> dict:
        """Each side's own policy decides its direction: this node's endpoints from the kernel's maps as
        they are now, another node's from the store, compiled for it as its agent compiles it. A side
        given by address is the endpoint that has it, else what this node's ipcache says of it.
        ``to_fqdn``: the destination is a DNS name: whether the source (an endpoint of this node) may
        look it up, and the verdict for each address the FQDN cache holds for it (`_trace_fqdn`)."""
        proto, port = parse_protocol(protocol, dport)
        name = None
        if to_fqdn is not None:
            if to_labels or to_namespace or to_ip:
                raise UserError("--to-fqdn names the destination alone: give it without --to-label, --to-namespace "
                                "or --to-ip")
            try:
                name = check_match_name(to_fqdn)
            except ValueError as e:
                raise UserError(f"--to-fqdn: {e}") from None
        desired = self.desired()
        local = list(desired.local_endpoints)
        everyone = local + [r for r in desired.endpoints if r.node != self.cfg.node_name]
        namespaces = desired.namespaces
        sides = []
        for labels, namespace, ip, flag in ((from_labels, from_namespace, from_ip, "--from"),
                                            (to_labels, to_namespace, to_ip, "--to")):
            if flag == "--to" and name is not None:
                break
            if ip and (labels or namespace):
                raise UserError(f"{flag}-ip names the side alone: give it without {flag}-label or {flag}-namespace")
            if ip:
                sides.append(resolve_address(ip, everyone, self.sync.read("ipcache"), f"{flag}-ip"))
            else:
                sides.append(resolve_side(labels, namespace, everyone, desired.identities, f"{flag}-label",
                                           namespaces))
        if name is not None:
            return self._trace_fqdn(sides[0], name, proto, port, desired, everyone)
        src, dst = sides
        return trace(src, dst, proto, port, self._deciders((src, dst), desired))

    def _trace_fqdn(self, src: Side, name: str, proto: int, port: int, desired: DesiredState,
                    everyone: Sequence[ep.EndpointRecord]) -> dict:
        """`policy trace --to-fqdn`: the source's DNS rules on ``name``, the toFQDNs selectors matching
        it, and an L4 trace to each address the FQDN cache holds for (source, name)."""
        rec = src.endpoint
        if rec is None or rec.node != self.cfg.node_name or rec.name not in self.endpoints.ifindex:
            raise UserError(f"--to-fqdn: the source must be an endpoint of node {self.cfg.node_name} (DNS rules and "
                            "the FQDN cache are kept where the endpoint runs): give its labels with --from-label")
        entries = [e for e in self.fqdn.entries(rec.name) if e.name == name]
        ipcache = self.sync.read("ipcache")
        l4 = {}
        for entry in entries:
            dst = resolve_address(entry.ip, everyone, ipcache, "--to-fqdn")
            l4[entry.ip] = trace(src, dst, proto, port, self._deciders((src, dst), desired))
        return fqdn_trace(rec.name, rec.ep_id, name, self.fqdn_hook.view, self.flow_ctx.rules, entries, l4,
                          time.time())

    def _deciders(self, sides: Sequence[Side], desired: DesiredState) -> dict[tuple[str, str], Decider]:
        """What decides each endpoint side's direction (see `policy_trace`)."""
        namespaces = desired.namespaces
        deciders = {}
        kernel_policy, kernel_ipblocks = None, {}
        for side in sides:
            rec = side.endpoint
            if rec is None or (rec.node, rec.name) in deciders:
                continue
            if rec.node == self.cfg.node_name:
                idx = self.endpoints.ifindex.get(rec.name)
                blob = self.datapath.read_endpoint(idx) if idx is not None else None
                if blob is None:
                    continue
                if kernel_policy is None:
                    kernel_policy = self.sync.read("policy")
                    kernel_ipblocks = self.sync.read("ipblock_cidrs")
                deciders[(rec.node, rec.name)] = Decider(kernel_policy, enforcement_of(rec, blob), self.flow_ctx.rules,
                                                         f"kernel of node {rec.node}", kernel_ipblocks)
            else:
                compiled = compile_policies(
                    policy_inputs(desired.resources),
                    [IdentityInfo(id=i, labels=dict(lbls)) for i, lbls in sorted(desired.identities.items())],
                    [EndpointInfo(ep_id=rec.ep_id, name=rec.name, namespace=rec.namespace, ip=rec.ip,
                                  identity=rec.identity,
                                  labels=desired.security_labels(rec, namespaces),
                                  ports=ports_of(rec.ports))],
                    mode=self.cfg.policy_enforcement, cidr_identities=desired.cidr_identities,
                    cluster_endpoints=named_port_endpoints(desired.endpoints))
                deciders[(rec.node, rec.name)] = Decider(
                    compiled.entries, compiled.enforcement, compiled.rules,
                    f"computed from the store (node {rec.node} enforces it)", compiled.ipblock_cidrs)
        return deciders

    def fqdn_cache_list(self, endpoint: str | None = None) -> dict:
        """`meshagent fqdn cache list`: what the DNS proxy answered each endpoint of this node, until
        when it stays allowed, and which toFQDNs rules allow it."""
        if endpoint is not None:
            self.endpoints.find(endpoint)  # an unknown name is a one-line error naming the known ones
        ep_ids = {ref.name: ep_id for ep_id, ref in self.flow_ctx.endpoints_by_id.items()}
        return {"items": fqdn_cache_rows(self.fqdn.entries(endpoint), ep_ids, self.fqdn_hook.view,
                                         self.flow_ctx.rules, time.time())}

    def bpf_ct_list(self) -> dict:
        return {"items": bpf_listing.ct_entries(self.datapath.table("ct_map"))}

    def bpf_ipcache_list(self) -> dict:
        return {"items": [{"prefix": p, "identity": i} for p, i in sorted(self.sync.read("ipcache").items())]}

    def bpf_policy_list(self) -> dict:
        names = {r.ep_id: r.name for r in self.endpoints.records()}
        return {"items": bpf_listing.policy_entries(self.sync.read("policy"), names, self.flow_ctx.rules,
                                                    self.sync.read("ipblock_cidrs"))}

    def bpf_ipblock_list(self) -> dict:
        return {"items": bpf_listing.ipblock_entries(self.sync.read("ipblock_cidrs"))}

    def bpf_fastpath_list(self) -> dict:
        return {"items": bpf_listing.fastpath_sockets(self.sockets)}

    # ---- status ----------------------------------------------------------------------------------

    def status(self) -> dict:
        return {
            "node": self.cfg.node_name,
            "ready": self.ready,
            "version": __version__,
            "programs": [{"name": n, "attached": len(self.endpoints.ifindex)} for n in PROGRAMS],
            "endpoints": len(self.endpoints.records()),
            "policies": sum(len(self.store.list(f"resources/{k}")) for k in POLICY_KINDS),
            "policy_revision": self.datapath.policy_revision() if self.sync else 0,
            "lost_events": self.datapath.lost_events() if self.sync else 0,
            "bpffs_dir": self.cfg.bpffs_dir,
            "store": self.cfg.store,
            "api_socket": self.cfg.api_socket,
            "policy_enforcement": self.cfg.policy_enforcement,
            "l7_processor": {"pid": self.l7.pid() if self.l7 else None,
                             "restarts": self.l7.restarts if self.l7 else 0,
                             "workers": self.cfg.l7_workers,
                             "listen": f"{self.router_ip}:{self.cfg.l7_ports.outbound}"},
            "socket_fastpath": self.sockets.fastpath_summary() if self.sync else None,
            "dns_proxy": {"listen": f"{self.dns.host}:{self.dns.port}",
                          "upstreams": [str(u) for u in self.dns.upstreams.servers]} if self.dns else None,
            "node_ip": self.nodes.record.node_ip,
            "pod_cidr": self.cfg.pod_cidr,
            "store_status": self.store_status(),
            "last_sync_age_s": round(time.time() - self.last_reconcile, 1) if self.last_reconcile else None,
            "peers": [n for n in self.nodes.list() if not n["self"]],
        }

    def store_status(self) -> dict:
        return self.store.status()

    def node_list(self) -> dict:
        return {"items": self.nodes.list()}

    # ---- the L7 processor --------------------------------------------------------------------------

    def start_l7(self) -> None:
        self.l7 = L7Supervisor(
            config_path=self.l7_config_path, listen=f"{self.router_ip}:{self.cfg.l7_ports.outbound}",
            flows_path=os.path.join(self.cfg.state_dir, f"l7-flows-{self.cfg.node_name}.sock"),
            metrics_addr=self.cfg.l7_metrics_addr, node_name=self.cfg.node_name, on_flow=self._on_l7_flow,
            bpffs_dir=self.cfg.bpffs_dir, workers=self.cfg.l7_workers,
            max_connections_per_endpoint=self.cfg.l7_max_connections_per_endpoint,
            request_headers_timeout=self.cfg.l7_request_headers_timeout, request_timeout=self.cfg.l7_request_timeout,
        )
        self.l7.start()

    # ---- the DNS proxy ----------------------------------------------------------------------------

    def start_dns(self) -> None:
        """Serve DNS to the endpoints on the node's pod_cidr address (where the kernel sends their port
        53 traffic), when the node config has dns_proxy on."""
        if not self.cfg.dns_proxy:
            return
        servers = [parse_upstream_address(u) for u in self.cfg.dns_upstreams] or resolv_conf_upstreams()
        proxy = DnsProxy(self.router_ip, self.cfg.dns_proxy_port, Upstreams(servers), self._dns_snapshot,
                         hook=self.dns_hook, on_events=self._on_dns_events)
        proxy.start()
        with self.lock:  # from here on every reconcile hands the proxy its snapshot
            self.dns = proxy
            proxy.update(self._dns_snapshot)
        log.info("DNS proxy on %s:%d (UDP, TCP), forwarding to %s", proxy.host, proxy.port,
                 ", ".join(map(str, servers)))

    def _on_dns_events(self, events: list[tuple]) -> None:
        """The DNS proxy's answers as flows (its thread; a batch every 50 ms at most). ``events``:
        tuples of agent.dns.proxy.DnsEvent's fields. An answer's flow is made when first read (most
        never are); a refusal's now, as it is a policy verdict to count."""
        ctx, host_ips = self.flow_ctx, self._host_ips
        flows, answered = [], 0
        for ev in events:
            if ev[7].allowed:  # the verdict
                flows.append((LazyFlow(dns_flow_of, (ev, ctx, host_ips)), ev[0]))
                answered += 1
            else:
                flow = dns_flow_of((ev, ctx, host_ips))
                self.counters.observe(flow)
                flows.append((flow, ev[0]))
        self.flows.add_many(flows)
        if answered:
            self.counters.count("FORWARDED", "L7", answered)  # an answer's flow carries no policy verdict

    def _on_l7_flow(self, record: dict) -> None:
        flow = enrich_l7_flow(record, self.flow_ctx)
        self.flows.add(flow)
        self.counters.observe(flow)

    # ---- events ----------------------------------------------------------------------------------

    def _on_event(self, ev: maps.FlowEventC) -> None:
        flow = decode_event(ev, self.flow_ctx)
        self.flows.add(flow)
        self.counters.observe(flow)

    def poll_events(self) -> None:
        # The datapath writes events without waking us (BPF_RB_NO_WAKEUP): drain on a timer.
        while not self.stopping.wait(EVENT_DRAIN_INTERVAL_S):
            self.datapath.drain_events()

    # ---- periodic work ---------------------------------------------------------------------------

    def periodic(self) -> None:
        next_gc = time.monotonic() + CT_GC_INTERVAL_S
        next_fqdn_gc = time.monotonic() + FQDN_GC_INTERVAL_S
        changed = self.store.changed
        while not self.stopping.is_set():
            # Wake on the store's news (a watch event), else every half second to poll and tick.
            changed.wait(0.5)
            changed.clear()
            if self.stopping.is_set():
                break
            try:
                # DNS answers of ServiceEntry names age out: re-resolve without waiting for a change.
                if self.store.generation() != self._store_generation or self.resolver.due():
                    with self.lock:
                        self.reconcile()
                if not self._registered:
                    self.register_node()
                elif self.nodes.due():
                    with contextlib.suppress(StoreError):  # unreachable: `status` says so; retried
                        self.nodes.heartbeat()
                if time.monotonic() >= next_gc:
                    self.ct_gc()
                    next_gc = time.monotonic() + CT_GC_INTERVAL_S
                if time.monotonic() >= next_fqdn_gc:
                    self.fqdn_gc()
                    next_fqdn_gc = time.monotonic() + FQDN_GC_INTERVAL_S
            except Exception:  # keep enforcing; report and retry on the next tick
                log.exception("periodic reconcile failed")

    def ct_gc(self) -> None:
        """Remove closed and idle conntrack entries (the LRU alone would keep them until full). A
        writer outside the reconcile path on purpose: which flows exist is the kernel's, not desired
        state."""
        now = clock.jiffies()
        table = self.datapath.table("ct_map")
        stale = []
        for key, entry in table.items():
            idle = clock.seconds_since(entry.last_seen, now)
            tcp = key.proto == 6
            if (entry.flags & CT_F_CLOSED and idle > CT_TIMEOUT_CLOSED_S) or (not tcp and idle > CT_TIMEOUT_NON_TCP_S) \
                    or (tcp and idle > CT_TIMEOUT_TCP_S):
                stale.append(key)
        for key in stale:
            try:
                del table[key]
            except KeyError:
                pass


def run_agent(config_path: str | None) -> int:
    """Run the agent in the foreground until SIGTERM/SIGINT. Returns the process exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        cfg = load(config_path)
    except NodeConfigError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    lock = NodeLock(cfg)
    try:
        lock.acquire()
    except MeshError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    from agent.api import ApiServer
    from agent.metrics import start_metrics

    try:
        agent = Agent(cfg)  # opens the store: an unreachable etcd with no cached state is one line
    except MeshError as e:
        print(f"Error: {e}", file=sys.stderr)
        lock.release()
        return 1
    stop = agent.stopping
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    api = None
    try:
        agent.start()
        api = ApiServer(agent)
        api.start()
        start_metrics(agent)
        agent.start_l7()
        agent.start_dns()
        threading.Thread(target=agent.poll_events, name="events", daemon=True).start()
        agent.ready = True
        log.info("agent ready: node %s, %d endpoints, API %s", cfg.node_name, len(agent.endpoints.ifindex),
                 cfg.api_socket)
        agent.periodic()
        log.info("stopping; the datapath stays attached and enforcing")
        return 0
    except (MeshError, OSError) as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    finally:
        stop.set()
        if agent.l7:
            agent.l7.stop()
        if agent.dns:
            agent.dns.stop()
        with contextlib.suppress(OSError):  # the last answers, for the next agent's toFQDNs allows
            agent.fqdn.save(agent.fqdn_path)
        if api:
            api.stop()
        agent.store.close()  # the etcd store's lease outlives it by store_lease_ttl
        lock.release()
