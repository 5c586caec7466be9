"""The DNS proxy's snapshot from the agent's desired state (pure): built on every reconcile, in one
place (`Agent.reconcile`), and handed to the proxy whole; the proxy never reads the store."""

from __future__ import annotations

from collections.abc import Iterable

from agent.dns.proxy import DnsClient, DnsSnapshot
from agent.dns.zone import MeshZone, ZoneEndpoint, zone_services
from agent.state import DesiredState


def dns_snapshot(desired: DesiredState, services: Iterable) -> DnsSnapshot:
    """``services``: the node's ServiceViews as computed (agent.reconcile.Computed.services).
    Clients are this node's endpoints; the zone names every node's."""
    node = desired.node
    zone = MeshZone.build(
        node.cluster_domain, zone_services(services),
        [ZoneEndpoint(ip=rec.ip, namespace=rec.namespace) for rec in desired.endpoints],
        reverse_cidrs=(node.service_cidr, node.pod_cidr, *(peer.pod_cidr for peer in desired.remote_nodes)),
    )
    clients = {rec.ip: DnsClient(name=rec.name, namespace=rec.namespace, ip=rec.ip, ep_id=rec.ep_id,
                                 identity=rec.identity) for rec in desired.local_endpoints}
    return DnsSnapshot(zone=zone, clients=clients)
