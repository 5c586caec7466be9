"""Which Service a VirtualService or DestinationRule host names: the one reading of Istio's short
names, for the agent (which services go through the L7 processor) and the processor (which service a
rule applies to and a route sends to).

A host is read relative to the namespace of the resource that names it, as Kubernetes DNS reads a
name inside a pod of that namespace (case-insensitively):

    reviews                          -> Service reviews in the resource's namespace
    reviews.prod                     -> Service reviews in prod (DNS: reviews.prod.svc.<domain>)
    reviews.prod.svc                 -> Service reviews in prod
    reviews.prod.svc.<domain>        -> Service reviews in prod
    *, *.example.com, an IP address,
    any other name of 3+ labels      -> no Service; the host is looked up as written (lowercased)
                                        among ServiceEntry hosts

Istio itself takes any host with a dot as fully qualified, so `reviews.prod` names no Service there;
we keep Kubernetes DNS's reading because that is the name a client in the mesh connects to. A
two-label host that names no Service (`httpbin.org`) is still looked up among ServiceEntry hosts:
in a pod, too, `httpbin.org` is the Service httpbin in namespace org if there is one, and the
outside name otherwise.
"""

from __future__ import annotations

ServiceKey = tuple[str, str]  # (namespace, name)


def service_for_host(host: str, namespace: str, domain: str) -> ServiceKey | None:
    """(namespace, name) of the Service ``host`` names in a resource of ``namespace``, with cluster
    domain ``domain``; None when it can name no Service (see the module doc)."""
    labels = host.lower().split(".")
    if "*" in host or ":" in host or not all(labels):
        return None
    if labels[2:] in (["svc"], ["svc", *domain.lower().split(".")]):
        labels = labels[:2]
    if len(labels) == 1:
        return (namespace, labels[0])
    if len(labels) == 2:
        return (labels[1], labels[0])
    return None


def entry_host(host: str) -> str:
    """``host`` as a ServiceEntry host is looked up: DNS names do not differ by case."""
    return host.lower()
