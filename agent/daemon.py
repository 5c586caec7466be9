"""`meshagent agent`: the node agent process.

Threads: the main thread waits for signals and runs periodic work (store changes, conntrack GC);
one thread drains the BPF ring buffer into the flow buffer; the API server answers on the Unix
socket with a thread per connection; prometheus-client serves /metrics. Every state change takes
`Agent.lock` and ends in `Agent.reconcile()`, the one path that writes the maps.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
import os
import signal
import sys
import threading
import time

from agent import __version__
from agent import endpoint as ep
from agent import identity as ids
from agent.config import ConfigError, NodeConfig, load
from agent.datapath import clock, maps
from agent.datapath.loader import PROGRAMS, Datapath, DatapathError
from agent.datapath.redirect import (
    CGROUP_ROOT,
    LB_F_L7,
    RedirectDatapath,
    current_netns_cookie,
    fastpath_supported,
    netns_cookie,
)
from agent.flows import EndpointRef, FlowBuffer, FlowContext, FlowCounters, decode_event, enrich_l7_flow
from agent.identity import IdentityAllocator
from agent.l7 import L7Supervisor, l7_config, l7_services, write_if_changed
from agent.labels import LabelError, check_key, check_value, security_labels
from agent.node import (
    NodeError,
    NodeLock,
    enable_forwarding,
    fence_service_cidr,
    local_ipv4_addresses,
    router_ip,
    set_router_ip,
)
from agent.policy.compiler import PolicyCompileError, PolicyInput
from agent.reconcile import POLICY_KINDS, DesiredState, MapSync, compute
from agent.services import (
    DnsResolver,
    ServiceError,
    ServiceView,
    allocate_vip,
    backends_for,
    check_entries,
    entry_address,
    entry_view,
    entry_vip,
    entry_vip_owner,
    hosts_file,
    service_ports,
)
from agent.store import StoreError, open_store

log = logging.getLogger("meshagent")

CT_GC_INTERVAL_S = 10.0
EVENT_DRAIN_INTERVAL_S = 0.05
CT_TIMEOUT_CLOSED_S = 10.0
CT_TIMEOUT_NON_TCP_S = 60.0
CT_TIMEOUT_TCP_S = 6 * 3600.0


class UserError(RuntimeError):
    """A request the user must fix; its message goes back as is."""


class Agent:
    def __init__(self, cfg: NodeConfig):
        self.cfg = cfg
        self.store = open_store(cfg.store)
        self.identities = IdentityAllocator(self.store)
        self.lock = threading.RLock()
        self.datapath = Datapath(cfg.bpffs_dir)
        self.redirect = RedirectDatapath(cfg.bpffs_dir)
        self.sync: MapSync | None = None
        self.services: list[ServiceView] = []
        self.dns = DnsResolver()  # ServiceEntry names with resolution DNS
        self.router_ip = router_ip(cfg.pod_cidr)
        self.l7: L7Supervisor | None = None
        self._l7_config_path = os.path.join(cfg.state_dir, f"l7-{cfg.node_name}.json")
        self.netns_cookies: dict[str, int] = {}  # endpoint name -> its network namespace's cookie
        self.flows = FlowBuffer()
        self.counters = FlowCounters()
        self.flow_ctx = FlowContext(
            node_name=cfg.node_name, endpoints_by_ip={}, identity_labels={}, rules={},
            boot_offset_ns=time.time_ns() - time.monotonic_ns(),
        )
        self.rules: dict = {}
        self.ifindex: dict[str, int] = {}  # endpoint name -> host-side ifindex
        self.ready = False
        self.stopping = threading.Event()
        self._store_generation = -1
        self._cidr_path = os.path.join(cfg.state_dir, f"cidr-identities-{cfg.node_name}.json")

    # ---- bring-up --------------------------------------------------------------------------------

    def start(self) -> None:
        enable_forwarding()
        fence_service_cidr(self.cfg.service_cidr)
        set_router_ip(self.cfg.pod_cidr)
        ep.create_cgroup(self.cfg.cgroup)
        self.datapath.load()
        self.sync = MapSync(self.datapath)  # adopts whatever the pinned maps hold
        self.redirect.load()  # adopts the pinned service maps
        self.redirect.attach(CGROUP_ROOT)
        # Services with L7 configuration are redirected to the processor at ROUTER_IP:outbound.
        self.datapath.set_proxy(self.router_ip, self.cfg.l7_ports.outbound)
        self.redirect.set_proxy(self.router_ip, self.cfg.l7_ports.outbound)
        # The agent runs in the node's namespace, where the L7 processor listens too.
        fastpath = self.cfg.socket_fastpath and fastpath_supported()
        if self.cfg.socket_fastpath and not fastpath:
            log.warning("socket fast path off: this kernel's BTF has no sk_psock.msg_tot_len, "
                        "which bounds a receiver's queue")
        self.redirect.set_fastpath(fastpath, node_netns=current_netns_cookie(), pod_cidr=self.cfg.pod_cidr)
        with self.lock:
            self._adopt_endpoints()
            self.reconcile()
        self.datapath.open_events(self._on_event)

    def _adopt_endpoints(self) -> None:
        """Re-attach this node's endpoints (replacing the programs in place) after a restart."""
        for rec in self._local_records():
            if not os.path.exists(rec.netns):
                log.warning("endpoint %s: namespace %s is gone; removing it", rec.name, rec.netns)
                self._forget_endpoint(rec)
                continue
            idx = ep.host_ifindex(rec.ifname)
            if idx is None:
                idx = ep.plumb(rec)
            self.datapath.attach(idx)
            self.ifindex[rec.name] = idx
            self._register_netns(rec)

    # ---- store views -----------------------------------------------------------------------------

    def _local_records(self) -> list[ep.EndpointRecord]:
        return [ep.EndpointRecord.from_dict(v) for v in self.store.list(f"endpoints/{self.cfg.node_name}").values()]

    def _all_records(self) -> list[ep.EndpointRecord]:
        return [ep.EndpointRecord.from_dict(v) for v in self.store.list("endpoints").values()]

    def _resources(self, kind: str | None = None) -> list[dict]:
        prefix = f"resources/{kind}" if kind else "resources"
        return list(self.store.list(prefix).values())

    def _remote_node_ips(self) -> list[str]:
        return [
            n["node_ip"] for name, n in ((k.split("/")[-1], v) for k, v in self.store.list("nodes").items())
            if name != self.cfg.node_name and n.get("node_ip")
        ]

    def _load_cidr_identities(self) -> dict[str, int]:
        try:
            with open(self._cidr_path) as f:
                return {k: int(v) for k, v in json.load(f).items()}
        except (FileNotFoundError, ValueError):
            return {}

    # ---- the reconcile path ----------------------------------------------------------------------

    def reconcile(self) -> None:
        """Store -> desired map contents -> incremental map updates. Caller holds self.lock."""
        self._store_generation = self.store.generation()
        local = [(rec, self.ifindex[rec.name]) for rec in self._local_records() if rec.name in self.ifindex]
        all_eps = self._all_records()
        policies = []
        for kind in POLICY_KINDS:
            for body in self._resources(kind):
                meta = body.get("metadata", {})
                audit = (meta.get("annotations") or {}).get("meshagent.io/audit") == "true"
                policies.append(
                    PolicyInput(kind=kind, namespace=meta.get("namespace", "default"), name=meta["name"],
                                body=body, audit=audit)
                )
        desired = DesiredState(
            local_endpoints=local, all_endpoints=all_eps, identities=self.identities.all(),
            policies=policies, local_node_ips=[*local_ipv4_addresses(self.cfg.pod_cidr), self.router_ip],
            remote_node_ips=self._remote_node_ips(), mode=self.cfg.policy_enforcement,
            cidr_identities=self._load_cidr_identities(),
        )
        contents, compiled = compute(desired)
        self.sync.sync(contents)
        self._reconcile_services(all_eps, [rec for rec, _ in local])
        self.rules = compiled.rules
        _write_json(self._cidr_path, compiled.cidr_identities)
        labels = {i: dict(lbls) for i, lbls in desired.identities.items()}
        for prefix, cid in compiled.cidr_identities.items():
            labels[cid] = {f"cidr:{prefix}": ""}
        self.flow_ctx = FlowContext(
            node_name=self.cfg.node_name,
            endpoints_by_ip={
                r.ip: EndpointRef(name=r.name, namespace=r.namespace,
                                  labels=security_labels(r.labels, r.namespace, r.serviceaccount),
                                  identity=r.identity)
                for r in all_eps
            },
            identity_labels=labels, rules=dict(compiled.rules), boot_offset_ns=self.flow_ctx.boot_offset_ns,
            endpoints_by_id={
                rec.ep_id: EndpointRef(name=rec.name, namespace=rec.namespace,
                                       labels=security_labels(rec.labels, rec.namespace, rec.serviceaccount),
                                       identity=rec.identity)
                for rec, _ in local
            },
        )

    def _register_netns(self, rec: ep.EndpointRecord) -> None:
        """Tell the socket programs this namespace is an endpoint's, so its connects are balanced."""
        cookie = netns_cookie(rec.netns)
        self.netns_cookies[rec.name] = cookie
        self.redirect.set_endpoint_netns(cookie, rec.ep_id, rec.identity)

    def _reconcile_services(self, all_eps: list[ep.EndpointRecord], local: list[ep.EndpointRecord]) -> None:
        """Services -> VIPs (recorded in the store) -> the kernel's service maps and hosts files."""
        vips = {v["vip"]: k.split("/", 2)[2] for k, v in self.store.list("services/vips").items()}
        owners = {owner: vip for vip, owner in vips.items()}
        entries = self._accepted_entries(vips)
        for body in entries:  # explicit ServiceEntry addresses are taken before any VIP is allocated
            if entry_address(body):
                vips.setdefault(entry_address(body), entry_vip_owner(body, body["spec"]["hosts"][0]))
        views = []
        bodies = sorted(self._resources("Service"), key=lambda b: (b["metadata"].get("namespace", "default"),
                                                                   b["metadata"]["name"]))
        for body in bodies:
            ns, name = body["metadata"].get("namespace", "default"), body["metadata"]["name"]
            vip = body.get("spec", {}).get("clusterIP") or allocate_vip(ns, name, self.cfg.service_cidr, vips)
            if vip == "None":
                continue  # headless: names only, nothing to balance
            if owners.get(f"{ns}/{name}") != vip:
                self.store.put(f"services/vips/{ns}/{name}", {"vip": vip})
                vips[vip] = f"{ns}/{name}"
            views.append(ServiceView(name, ns, vip, service_ports(body), backends_for(body, all_eps)))
        live = {f"{v.namespace}/{v.name}" for v in views}
        vs_bodies, dr_bodies = self._resources("VirtualService"), self._resources("DestinationRule")
        with_l7 = l7_services(vs_bodies, dr_bodies, self.cfg.trust_domain)
        views = [dataclasses.replace(v, l7=(v.namespace, v.name) in with_l7) for v in views]
        self.dns.new_round()
        for body in entries:  # each host of a MESH_EXTERNAL ServiceEntry is a service of its own
            for host in body["spec"]["hosts"]:
                owner = entry_vip_owner(body, host)
                vip = entry_vip(body, host, self.cfg.service_cidr, vips)
                if owners.get(owner) != vip:
                    self.store.put(f"services/vips/{owner}", {"vip": vip})
                    vips[vip] = owner
                live.add(owner)
                views.append(entry_view(body, host, vip, self.dns))
        for key in self.store.list("services/vips"):
            if key.split("/", 2)[2] not in live:
                self.store.delete(key)
        self.redirect.sync_services(
            {(v.vip, p.port, p.protocol): [(b.ip, b.port_for(p)) for b in v.backends]
             for v in views for p in v.ports if p.protocol in ("tcp", "udp")},
            flags={(v.vip, p.port, p.protocol): LB_F_L7 for v in views for p in v.redirected_ports()},
        )
        self.services = views
        labels_by_ip = {e.ip: dict(e.labels) for e in all_eps}
        if write_if_changed(self._l7_config_path,
                            l7_config(views, vs_bodies, dr_bodies, labels_by_ip, self.cfg.trust_domain, local)) \
                and self.l7 is not None:
            self.l7.reload()  # every worker at once, rather than each at its next poll of the file
        for rec in local:
            self._write_hosts(rec, views)

    def _write_hosts(self, rec: ep.EndpointRecord, views: list[ServiceView]) -> None:
        """/etc/netns/NAME/hosts, which `ip netns exec` (and `meshagent exec`) mount over /etc/hosts."""
        if not (rec.netns_owned and rec.netns.startswith("/run/netns/")):
            return  # an attached namespace's /etc/netns is its owner's, not ours
        path = os.path.join("/etc/netns", os.path.basename(rec.netns), "hosts")
        text = hosts_file(views, rec.namespace, self.cfg.trust_domain)
        try:
            with open(path) as f:
                if f.read() == text:
                    return
        except FileNotFoundError:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)

    def _accepted_entries(self, vips: dict[str, str]) -> list[dict]:
        """The stored ServiceEntries that can be realised, in a stable order. Apply refuses bad ones;
        one that became bad anyway (a store written by another version) is skipped with a warning.
        ``vips`` are the recorded VIPs (VIP -> owner): a Service's ("ns/name") stays the Service's."""
        accepted: list[dict] = []
        others = [v for v in self.services if not v.entry]
        others += [ServiceView(owner.split("/")[1], owner.split("/")[0], vip, (), ())
                   for vip, owner in vips.items() if owner.count("/") == 1]
        for body in sorted(self._resources("ServiceEntry"),
                           key=lambda b: (b["metadata"].get("namespace", "default"), b["metadata"]["name"])):
            try:
                check_entries([*accepted, body], others, self.cfg.pod_cidr, self.cfg.service_cidr,
                              self.cfg.trust_domain)
            except ServiceError as e:
                log.warning("not realising a stored ServiceEntry: %s", e)
                continue
            accepted.append(body)
        return accepted

    def check_services(self, bodies: list[dict]) -> None:
        """Refuse Services whose clusterIP is outside service_cidr or held by another service, and
        ServiceEntries meshagent cannot realise or that conflict with a service (agent.services)."""
        net = ipaddress.IPv4Network(self.cfg.service_cidr)
        holders = {v.vip: v.owner for v in self.services}
        services = {(v.namespace, v.name): v for v in self.services if not v.entry}
        entries = []
        for body in bodies:
            if body.get("kind") == "ServiceEntry":
                entries.append(body)
                continue
            ns, name = body["metadata"].get("namespace", "default"), body["metadata"]["name"]
            ref = f"Service {ns}/{name}"
            vip = body.get("spec", {}).get("clusterIP")
            old = services.get((ns, name))
            services[(ns, name)] = ServiceView(name, ns, vip if vip and vip != "None" else (old.vip if old else ""),
                                               (), ())
            if not vip or vip == "None":
                continue
            if ipaddress.IPv4Address(vip) not in net:
                raise UserError(f"{ref}: clusterIP {vip} is outside the node's service_cidr {net}")
            if holders.get(vip, ref) != ref:
                raise UserError(f"{ref}: clusterIP {vip} is already used by {holders[vip]}")
            holders[vip] = ref
        if not entries and not any(v.entry for v in self.services):
            return
        # The candidate set: every stored entry, with this apply's replacing or adding to them.
        candidate = {(b["metadata"].get("namespace", "default"), b["metadata"]["name"]): b
                     for b in self._resources("ServiceEntry")}
        candidate.update({(b["metadata"].get("namespace", "default"), b["metadata"]["name"]): b for b in entries})
        try:
            check_entries(list(candidate.values()), [*services.values(), *(v for v in self.services if v.entry)],
                          self.cfg.pod_cidr, self.cfg.service_cidr, self.cfg.trust_domain)
        except ServiceError as e:
            raise UserError(str(e)) from None

    def check_policies(self, policies: list[PolicyInput]) -> None:
        """Compile a candidate policy set without touching the maps (apply's semantic check)."""
        from agent.policy.compiler import compile_policies

        compile_policies(policies, [], [], mode=self.cfg.policy_enforcement,
                         cidr_identities=self._load_cidr_identities())

    # ---- the L7 processor --------------------------------------------------------------------------

    def start_l7(self) -> None:
        host, port = self.cfg.metrics_host_port
        self.l7 = L7Supervisor(
            config_path=self._l7_config_path, listen=f"{self.router_ip}:{self.cfg.l7_ports.outbound}",
            flows_path=os.path.join(self.cfg.state_dir, f"l7-flows-{self.cfg.node_name}.sock"),
            metrics_addr=f"{host}:{port + 1}", node_name=self.cfg.node_name, on_flow=self._on_l7_flow,
            bpffs_dir=self.cfg.bpffs_dir, workers=self.cfg.l7_workers,
        )
        self.l7.start()

    def _on_l7_flow(self, record: dict) -> None:
        flow = enrich_l7_flow(record, self.flow_ctx)
        self.flows.add(flow)
        self.counters.observe(flow)

    # ---- events ----------------------------------------------------------------------------------

    def _on_event(self, ev: maps.FlowEventC) -> None:
        flow = decode_event(ev, self.flow_ctx)
        self.flows.add(flow)
        self.counters.observe(flow)

    def _poll_events(self) -> None:
        # The datapath writes events without waking us (BPF_RB_NO_WAKEUP): drain on a timer.
        while not self.stopping.wait(EVENT_DRAIN_INTERVAL_S):
            self.datapath.drain_events()

    # ---- periodic work ---------------------------------------------------------------------------

    def periodic(self) -> None:
        next_gc = time.monotonic() + CT_GC_INTERVAL_S
        while not self.stopping.wait(0.5):
            try:
                # DNS answers of ServiceEntry names age out: re-resolve without waiting for a change.
                if self.store.generation() != self._store_generation or self.dns.due():
                    with self.lock:
                        self.reconcile()
                if time.monotonic() >= next_gc:
                    self.ct_gc()
                    next_gc = time.monotonic() + CT_GC_INTERVAL_S
            except Exception:  # keep enforcing; report and retry on the next tick
                log.exception("periodic reconcile failed")

    def ct_gc(self) -> None:
        """Remove closed and idle conntrack entries (the LRU alone would keep them until full)."""
        now = clock.jiffies()
        table = self.datapath.table("ct_map")
        stale = []
        for key, entry in table.items():
            idle = clock.seconds_since(entry.last_seen, now)
            closed = entry.flags & 0x7  # FIN either way or RST
            tcp = key.proto == 6
            if (closed and idle > CT_TIMEOUT_CLOSED_S) or (not tcp and idle > CT_TIMEOUT_NON_TCP_S) or (
                tcp and idle > CT_TIMEOUT_TCP_S
            ):
                stale.append(key)
        for key in stale:
            try:
                del table[key]
            except KeyError:
                pass

    # ---- endpoints -------------------------------------------------------------------------------

    def endpoint_add(self, name: str, labels: dict, namespace: str = "default", serviceaccount: str = "default",
                     netns: str | None = None, ip: str | None = None) -> dict:
        _check_name("endpoint name", name)
        _check_name("namespace", namespace)
        _check_name("serviceaccount", serviceaccount)
        try:
            for k, v in labels.items():
                check_key(k)
                check_value(v)
        except LabelError as e:
            raise UserError(str(e)) from None
        with self.lock:
            for rec in self._all_records():
                if rec.name == name:
                    raise UserError(f"endpoint {name} already exists (node {rec.node}); delete it first")
            used = {r.ip for r in self._all_records()}
            ip = self._pick_ip(ip, used)
            used_ids = {r.ep_id for r in self._local_records()}
            ep_id = next(i for i in range(1, 65535) if i not in used_ids)
            if netns is not None and not os.path.exists(netns):
                raise UserError(f"--netns {netns}: no such network namespace file")
            sec = security_labels(labels, namespace, serviceaccount)
            identity = self.identities.allocate(sec)
            rec = ep.EndpointRecord(
                name=name, node=self.cfg.node_name, namespace=namespace, serviceaccount=serviceaccount,
                labels=dict(labels), ip=ip, ep_id=ep_id, identity=identity,
                netns=netns or f"/run/netns/{name}", netns_owned=netns is None,
                ifname=ep.host_ifname(self.cfg.node_name, name),
                peer_ifname="eth0", cgroup=os.path.join(self.cfg.cgroup, f"ep-{name}"),
            )
            created_ns = False
            try:
                if netns is None:
                    ep.create_netns(name)
                    created_ns = True
                ep.create_cgroup(rec.cgroup)
                idx = ep.plumb(rec)
                self.ifindex[name] = idx
                self._register_netns(rec)
                self.store.put(f"endpoints/{self.cfg.node_name}/{name}", rec.to_dict())
                # Maps first, programs second: the programs find the endpoint when they start.
                self.reconcile()
                self.datapath.attach(idx)
            except Exception:
                self.ifindex.pop(name, None)
                self._unregister_netns(name)
                self.store.delete(f"endpoints/{self.cfg.node_name}/{name}")
                ep.unplumb(rec)
                if created_ns:
                    ep.delete_netns(rec.netns)
                ep.remove_cgroup(rec.cgroup)
                self._release_identity(sec)
                self.reconcile()
                raise
            return self._endpoint_view(rec)

    def _pick_ip(self, ip: str | None, used: set[str]) -> str:
        net = self.cfg.pod_network
        if ip is not None:
            try:
                addr = ipaddress.IPv4Address(ip)
            except ValueError:
                raise UserError(f"--ip {ip!r} is not an IPv4 address") from None
            if addr not in net or addr in (net.network_address, net.broadcast_address):
                raise UserError(f"--ip {ip} is not a usable address of the node's pod_cidr {net}")
            if ip in used:
                raise UserError(f"--ip {ip} is already used by another endpoint")
            return ip
        hosts = list(net.hosts())[1:]  # the first address is kept for the node
        for addr in hosts:
            if str(addr) not in used:
                return str(addr)
        raise UserError(f"pod_cidr {net} has no free addresses left")

    def endpoint_delete(self, name: str) -> dict:
        with self.lock:
            rec = self._find_local(name)
            self._forget_endpoint(rec)
            return {"deleted": name}

    def _unregister_netns(self, name: str) -> None:
        cookie = self.netns_cookies.pop(name, None)
        if cookie is not None:
            self.redirect.remove_endpoint_netns(cookie)

    def _forget_endpoint(self, rec: ep.EndpointRecord) -> None:
        self._unregister_netns(rec.name)
        ep.unplumb(rec)
        if rec.netns_owned:
            ep.delete_netns(rec.netns)
        ep.remove_cgroup(rec.cgroup)
        self.store.delete(f"endpoints/{self.cfg.node_name}/{rec.name}")
        self.ifindex.pop(rec.name, None)
        self._release_identity(security_labels(rec.labels, rec.namespace, rec.serviceaccount))
        self.reconcile()

    def _release_identity(self, sec: dict) -> None:
        if not any(security_labels(r.labels, r.namespace, r.serviceaccount) == sec for r in self._all_records()):
            self.identities.release(sec)

    def _find_local(self, name: str) -> ep.EndpointRecord:
        d = self.store.get(f"endpoints/{self.cfg.node_name}/{name}") if _valid_name(name) else None
        if d is None:
            known = ", ".join(r.name for r in self._local_records()) or "none"
            raise UserError(f"unknown endpoint {name!r} on node {self.cfg.node_name} (known: {known})")
        return ep.EndpointRecord.from_dict(d)

    def _endpoint_view(self, rec: ep.EndpointRecord) -> dict:
        d = rec.to_dict()
        d["ifindex"] = self.ifindex.get(rec.name)
        d["state"] = "ready" if rec.name in self.ifindex else "not-ready"
        return d

    # ---- status ----------------------------------------------------------------------------------

    def status(self) -> dict:
        eps = self._local_records()
        return {
            "node": self.cfg.node_name,
            "ready": self.ready,
            "version": __version__,
            "programs": [{"name": n, "attached": len(self.ifindex)} for n in PROGRAMS],
            "endpoints": len(eps),
            "policies": sum(len(self._resources(k)) for k in POLICY_KINDS),
            "policy_revision": self.sync.revision() if self.sync else 0,
            "lost_events": self.datapath.lost_events() if self.sync else 0,
            "bpffs_dir": self.cfg.bpffs_dir,
            "store": self.cfg.store,
            "api_socket": self.cfg.api_socket,
            "policy_enforcement": self.cfg.policy_enforcement,
            "l7_processor": {"pid": self.l7.pid() if self.l7 else None,
                             "restarts": self.l7.restarts if self.l7 else 0,
                             "workers": self.cfg.l7_workers,
                             "listen": f"{self.router_ip}:{self.cfg.l7_ports.outbound}"},
            "socket_fastpath": self.redirect.fastpath_summary() if self.sync else None,
        }


def _valid_name(name: str) -> bool:
    return isinstance(name, str) and 0 < len(name) <= 63 and all(c.isalnum() or c in "-." for c in name) and \
        name[0].isalnum()


def _check_name(what: str, name: str) -> None:
    if not _valid_name(name):
        raise UserError(f"invalid {what} {name!r}: 1-63 characters of [a-zA-Z0-9-.], starting alphanumeric")


def _write_json(path: str, value) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, sort_keys=True)
    os.replace(tmp, path)


def run_agent(config_path: str | None) -> int:
    """Run the agent in the foreground until SIGTERM/SIGINT. Returns the process exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        cfg = load(config_path)
    except ConfigError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    lock = NodeLock(cfg)
    try:
        lock.acquire()
    except NodeError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    from agent.api import ApiServer
    from agent.metrics import start_metrics

    agent = Agent(cfg)
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
        threading.Thread(target=agent._poll_events, name="events", daemon=True).start()
        agent.ready = True
        log.info("agent ready: node %s, %d endpoints, API %s", cfg.node_name, len(agent.ifindex), cfg.api_socket)
        agent.periodic()
        log.info("stopping; the datapath stays attached and enforcing")
        return 0
    except (DatapathError, StoreError, NodeError, ep.EndpointError, PolicyCompileError, ServiceError, OSError) as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    finally:
        stop.set()
        if agent.l7:
            agent.l7.stop()
        if api:
            api.stop()
        lock.release()


# Re-exported for the API module.
__all__ = ["Agent", "UserError", "run_agent", "ids"]
