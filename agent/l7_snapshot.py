"""The L7 processor's config snapshot, as the agent computes it (pure; agent.reconcile writes it).

Which Services have L7 configuration and so go through the processor (SPEC §5), and the JSON the
processor reads with `userspace_l7.snapshot.L7Config.from_dict`: every service with its VIP, HTTP
ports and backends, the VirtualService and DestinationRule documents as applied, and this node's
endpoints by the endpoint id the datapath names for each redirected connection.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from agent.resources.hosts import service_for_host
from agent.services import ServiceView

if TYPE_CHECKING:
    from agent.endpoint import EndpointRecord


def l7_services(vs_bodies: Iterable[dict], dr_bodies: Iterable[dict], cluster_domain: str) -> set[tuple[str, str]]:
    """Services that have L7 configuration and so go through the processor (SPEC §5)."""
    out = set()
    for body in vs_bodies:
        ns = body["metadata"].get("namespace", "default")
        for host in body.get("spec", {}).get("hosts") or []:
            ref = service_for_host(host, ns, cluster_domain)
            if ref:
                out.add(ref)
    for body in dr_bodies:
        ref = service_for_host(body.get("spec", {}).get("host", ""), body["metadata"].get("namespace", "default"),
                               cluster_domain)
        if ref:
            out.add(ref)
    return out


def _service_config(v: ServiceView, labels_by_ip: dict[str, dict]) -> dict:
    """One service of the snapshot. A ServiceEntry host is known by that host alone, and its endpoints
    carry their own labels (for DestinationRule subsets) and per-port-name ports."""
    out = {
        "name": v.name, "namespace": v.namespace, "vip": v.vip,
        "ports": [{"port": p.port, "target_port": p.target_port, "protocol": p.protocol.upper(), "name": p.name}
                  for p in v.http_ports()],
        "backends": [{"ip": b.ip, "workload": b.endpoint,
                      "labels": dict(b.labels) if v.entry else labels_by_ip.get(b.ip, {}),
                      **({"ports": dict(b.ports)} if b.ports else {})}
                     for b in v.backends],
    }
    if v.entry:
        out["hosts"] = [v.name]
        out["fqdn"] = v.name
    return out


def l7_config(views: Iterable[ServiceView], vs_bodies: list[dict], dr_bodies: list[dict],
              labels_by_ip: dict[str, dict], cluster_domain: str, clients: Iterable[EndpointRecord] = ()) -> dict:
    """The JSON snapshot userspace_l7.snapshot.L7Config.from_dict reads. ``clients``: this node's
    endpoints, by the endpoint id the datapath names for each redirected connection (the processor's
    sourceLabels matches and the source_workload of its flows and metrics; by address, the backends whose
    policy the processor checks before it connects: userspace_l7/policy_check.py)."""
    return {
        "cluster_domain": cluster_domain,
        "services": [_service_config(v, labels_by_ip) for v in views],
        "virtual_services": vs_bodies,
        "destination_rules": dr_bodies,
        "clients": {str(c.ep_id): {"workload": c.name, "namespace": c.namespace, "labels": dict(c.labels),
                                   "ip": c.ip} for c in clients},
    }
