"""Endpoint lifecycle on one node: add, delete, adopt after a restart, list.

An endpoint's record lives in the store (`endpoints/<node>/<name>`); its plumbing (namespace, veth,
cgroup) is agent/endpoint.py's; its map entries are the reconcile path's. This module orders the
three and keeps what the agent learns while plumbing (the host-side ifindex, the namespace's
cookie), which the desired state needs and the store does not hold.

States of an endpoint, as `endpoint list` shows them:

    (none) --add--> ready            record stored, plumbed, map entries written, programs attached
    ready  --agent stops--> ready     the pinned datapath keeps enforcing
    (restart) adopt: plumbing found -> ready; namespace gone -> forgotten (record, veth, cgroup go)
    ready  --delete--> (none)
    ready  --label / its Namespace relabelled--> ready   record updated with the identity of its new
                                                         security labels; the maps follow

A failed add is rolled back completely (record, plumbing, identity) and the maps recomputed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import logging
import os
from collections.abc import Callable

from agent import endpoint as ep
from agent.datapath.sockets import netns_cookie
from agent.errors import UserError
from agent.identity import IdentityAllocator
from agent.labels import LabelError, check_key, check_value, reserved_key, security_labels
from agent.named_ports import check_ports
from agent.node_config import NodeConfig
from agent.state import DesiredState, read_namespace_labels
from agent.store import StoreError

log = logging.getLogger("meshagent.endpoints")

NAME_RULE = "1-63 characters of [a-zA-Z0-9-.], starting alphanumeric"


def valid_name(name: object) -> bool:
    return isinstance(name, str) and 0 < len(name) <= 63 and all(c.isalnum() or c in "-." for c in name) and \
        name[0].isalnum()


def netns_name(node: str, name: str) -> str:
    """The network namespace made for endpoint ``name`` of ``node``: named after both, so two nodes
    on one machine can each have an endpoint `web` (`meshagent exec` finds it from the record)."""
    return f"{node}-{name}"


def check_name(what: str, name: object) -> None:
    if not valid_name(name):
        raise UserError(f"invalid {what} {name!r}: {NAME_RULE}")


def check_labels(labels: dict) -> None:
    """User labels of an endpoint: valid Kubernetes labels, none the agent sets itself."""
    try:
        for k, v in labels.items():
            check_key(k)
            check_value(v)
    except LabelError as e:
        raise UserError(str(e)) from None
    for k in labels:
        if reserved_key(k):
            raise UserError(f"label {k!r} is set by the agent (from --namespace, --serviceaccount and the "
                            "Namespace resource's labels); use those instead")


class EndpointManager:
    """This node's endpoints. Callers hold the agent's lock; ``reconcile`` recomputes the maps and
    ``attach`` puts the TC programs on a host-side veth."""

    def __init__(self, cfg: NodeConfig, store, identities: IdentityAllocator, reconcile: Callable[[], None],
                 attach: Callable[[int], None]):
        self.cfg = cfg
        self.store = store
        self.identities = identities
        self._reconcile = reconcile
        self._attach = attach
        self.ifindex: dict[str, int] = {}  # endpoint name -> host-side ifindex, once plumbed and attached
        self.netns_cookies: dict[str, int] = {}  # endpoint name -> its network namespace's cookie
        # Identities this node's endpoints left while another endpoint (maybe another node's, not yet
        # re-identified) still had them: released once no endpoint has them (`reidentify`).
        self._retired: set[int] = set()

    # ---- reading -------------------------------------------------------------------------------

    def _key(self, name: str) -> str:
        return f"endpoints/{self.cfg.node_name}/{name}"

    def records(self) -> list[ep.EndpointRecord]:
        """This node's endpoints, as stored."""
        return [ep.EndpointRecord.from_dict(v) for v in self.store.list(f"endpoints/{self.cfg.node_name}").values()]

    def all_records(self) -> list[ep.EndpointRecord]:
        """Every node's endpoints."""
        return [ep.EndpointRecord.from_dict(v) for v in self.store.list("endpoints").values()]

    def find(self, name: str) -> ep.EndpointRecord:
        d = self.store.get(self._key(name)) if valid_name(name) else None
        if d is None:
            known = ", ".join(r.name for r in self.records()) or "none"
            raise UserError(f"unknown endpoint {name!r} on node {self.cfg.node_name} (known: {known})")
        return ep.EndpointRecord.from_dict(d)

    def view(self, rec: ep.EndpointRecord) -> dict:
        d = rec.to_dict()
        d["ifindex"] = self.ifindex.get(rec.name)
        d["state"] = "ready" if rec.name in self.ifindex else "not-ready"
        return d

    # ---- lifecycle -----------------------------------------------------------------------------

    def adopt(self) -> None:
        """After a restart: re-plumb what is missing and re-attach (in place) every stored endpoint of
        this node; forget those whose namespace is gone. The caller reconciles afterwards."""
        for rec in self.records():
            if not os.path.exists(rec.netns):
                log.warning("endpoint %s: namespace %s is gone; removing it", rec.name, rec.netns)
                self._unplumb(rec)
                continue
            idx = ep.host_ifindex(rec.ifname)
            if idx is None:
                idx = ep.plumb(rec)
            self._attach(idx)
            self.ifindex[rec.name] = idx
            self.netns_cookies[rec.name] = netns_cookie(rec.netns)

    def add(self, name: str, labels: dict, namespace: str = "default", serviceaccount: str = "default",
            netns: str | None = None, ip: str | None = None, ports: list | None = None) -> dict:
        check_name("endpoint name", name)
        check_name("namespace", namespace)
        check_name("serviceaccount", serviceaccount)
        check_labels(labels)
        named = [p.to_dict() for p in check_ports(ports or [])]  # PortSpecError: the request's, one line
        everyone = self.all_records()
        for rec in everyone:  # names are per node, as pod names are per namespace
            if rec.name == name and rec.node == self.cfg.node_name:
                raise UserError(f"endpoint {name} already exists on node {rec.node}; delete it first")
        ip = self._pick_ip(ip, {r.ip for r in everyone})
        used_ids = {r.ep_id for r in everyone if r.node == self.cfg.node_name}
        ep_id = next(i for i in range(1, 65535) if i not in used_ids)
        if netns is not None and not os.path.exists(netns):
            raise UserError(f"--netns {netns}: no such network namespace file")
        sec = security_labels(labels, namespace, serviceaccount, read_namespace_labels(self.store, namespace))
        identity = self.identities.allocate(sec)
        rec = ep.EndpointRecord(
            name=name, node=self.cfg.node_name, namespace=namespace, serviceaccount=serviceaccount,
            labels=dict(labels), ip=ip, ep_id=ep_id, identity=identity, ports=named,
            netns=netns or f"/run/netns/{netns_name(self.cfg.node_name, name)}", netns_owned=netns is None,
            ifname=ep.host_ifname(self.cfg.node_name, name),
            peer_ifname="eth0", cgroup=os.path.join(self.cfg.cgroup, f"ep-{name}"),
        )
        created_ns = False
        try:
            if netns is None:
                ep.create_netns(netns_name(self.cfg.node_name, name))
                created_ns = True
            ep.create_cgroup(rec.cgroup)
            idx = ep.plumb(rec)
            self.ifindex[name] = idx
            self.netns_cookies[name] = netns_cookie(rec.netns)
            self.store.put(self._key(name), rec.to_dict(), owned=True)  # gone with this node's lease
            # Maps first, programs second: the programs find the endpoint when they start.
            self._reconcile()
            self._attach(idx)
        except Exception:
            self.ifindex.pop(name, None)
            self.netns_cookies.pop(name, None)
            with contextlib.suppress(StoreError):  # the store may be why the add failed: unplumb anyway
                self.store.delete(self._key(name))
            ep.unplumb(rec)
            if created_ns:
                ep.delete_netns(rec.netns)
            ep.remove_cgroup(rec.cgroup)
            with contextlib.suppress(StoreError):
                self._release_identity(identity)
                self._reconcile()
            raise
        return self.view(rec)

    def label(self, name: str, set_labels: dict, remove: list) -> dict:
        """Relabel endpoint ``name`` as `kubectl label` does: ``set_labels`` set or overwrite,
        ``remove`` keys go (a key it does not have is no error). It gets the identity of its new
        security labels in the same write as its labels, and the maps follow."""
        rec = self.find(name)
        check_labels(set_labels)
        for k in remove:
            try:
                check_key(k)
            except LabelError as e:
                raise UserError(str(e)) from None
        both = sorted(set(set_labels) & set(remove))
        if both:
            raise UserError(f"label {both[0]!r} is both set and removed; give it once")
        labels = {k: v for k, v in rec.labels.items() if k not in remove} | dict(set_labels)
        if labels != rec.labels:
            sec = security_labels(labels, rec.namespace, rec.serviceaccount,
                                  read_namespace_labels(self.store, rec.namespace))
            self._reidentify(rec, sec, labels)
            self._reconcile()
        return self.view(self.find(name))

    def reidentify(self, desired: DesiredState) -> bool:
        """Give each of this node's endpoints whose security labels changed (its Namespace applied,
        relabelled or deleted) the identity of its new label set; release identities no endpoint
        has any more. Returns whether it wrote anything (the caller reads the store again).

        A store write on the reconcile path, before the pure compute: an identity is a number the
        cluster agrees on through the store (allocated there, by every node alike), and an endpoint's
        record is its node's to write (bound to its lease). So each node re-identifies its own
        endpoints, the store's watch carries the new numbers to the others, and compute only ever
        reads identities. A store that refuses is logged and retried on the next reconcile; the
        datapath meanwhile keeps what it has."""
        wrote = False
        try:
            for rec, sec in desired.stale_identities():
                self._reidentify(rec, sec, rec.labels)
                wrote = True
            # Another node's endpoints may have held an identity when this node's left it: release
            # it once the store shows none do (`_release_identity` asks the store itself).
            for number in sorted(self._retired - {r.identity for r in desired.endpoints}):
                wrote |= self._release_identity(number)
        except StoreError as e:
            log.warning("re-identifying endpoints failed, retrying at the next reconcile: %s", e)
        return wrote

    def _reidentify(self, rec: ep.EndpointRecord, sec: dict, labels: dict) -> None:
        """Store ``rec`` with ``labels`` and the identity of ``sec``; release its old identity if no
        endpoint has it any more."""
        old = rec.identity
        identity = self.identities.allocate(sec)
        rec = dataclasses.replace(rec, labels=dict(labels), identity=identity)
        self.store.put(self._key(rec.name), rec.to_dict(), owned=True)
        if identity != old:
            log.info("endpoint %s: identity %d -> %d", rec.name, old, identity)
            self._retired.add(old)
            self._release_identity(old)

    def delete(self, name: str) -> dict:
        rec = self.find(name)
        self._unplumb(rec)
        self._reconcile()
        return {"deleted": name}

    def _unplumb(self, rec: ep.EndpointRecord) -> None:
        """Forget ``rec``: its facts, plumbing, record and (if no endpoint keeps it) identity. Its map
        entries go with the next reconcile."""
        self.ifindex.pop(rec.name, None)
        self.netns_cookies.pop(rec.name, None)
        ep.unplumb(rec)
        if rec.netns_owned:
            ep.delete_netns(rec.netns)
        ep.remove_cgroup(rec.cgroup)
        self.store.delete(self._key(rec.name))
        self._release_identity(rec.identity)

    def _release_identity(self, number: int) -> bool:
        """Release identity ``number`` if no endpoint of any node has it; whether it did."""
        if any(r.identity == number for r in self.all_records()):
            return False
        labels = self.identities.labels_of(number)
        if labels is not None:
            self.identities.release(labels)
        self._retired.discard(number)
        return labels is not None

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
        for addr in list(net.hosts())[1:]:  # the first address is kept for the node
            if str(addr) not in used:
                return str(addr)
        raise UserError(f"pod_cidr {net} has no free addresses left")
