"""Namespace labels and relabelling without a kernel: the desired state's security labels, which of
this node's endpoints need a new identity, EndpointManager.reidentify/label against a directory
store, and compute() following a Namespace's labels."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from agent.endpoint import EndpointRecord
from agent.endpoint_manager import EndpointManager
from agent.errors import UserError
from agent.identity import IdentityAllocator
from agent.labels import security_labels
from agent.policy.lookup import lookup
from agent.policy.trace import enforcement_of
from agent.policy.types import INGRESS
from agent.reconcile import compute
from agent.state import DesiredState, NodeFacts, read_desired, read_namespace_labels
from agent.store.dir import DirStore


def record(name: str, identity: int, node: str = "n1", namespace: str = "x", ep_id: int = 1, **labels: str
           ) -> EndpointRecord:
    return EndpointRecord(name=name, node=node, namespace=namespace, serviceaccount="default",
                          labels=labels or {"pod": name}, ip=f"10.200.0.{ep_id + 10}", ep_id=ep_id,
                          identity=identity, netns=f"/run/netns/{name}", netns_owned=True, ifname=f"lxc{name}",
                          peer_ifname="eth0", cgroup="")


def facts(name: str = "n1", **kw) -> NodeFacts:
    return NodeFacts(name=name, pod_cidr="10.200.0.0/24", service_cidr="10.96.0.0/16", cluster_domain="cluster.local",
                     policy_mode="default", router_ip="10.200.0.1", l7_port=15001, **kw)


def namespace(name: str, **labels: str) -> dict:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def state(endpoints, identities, namespaces=(), resources=None, **kw) -> DesiredState:
    return DesiredState(node=facts(**kw), endpoints=tuple(endpoints), identities=identities,
                        resources={"Namespace": tuple(namespaces), **(resources or {})}, vips={})


# ---- the desired state (pure) --------------------------------------------------------------------


def test_security_labels_come_from_the_namespace_resource():
    a = record("a", 300)
    d = state([a], {}, [namespace("x", team="a")])
    assert d.namespaces == {"x": {"team": "a"}}
    assert d.security_labels(a) == security_labels({"pod": "a"}, "x", "default", {"team": "a"})
    assert d.security_labels(a)["io.cilium.k8s.namespace.labels.team"] == "a"
    # No Namespace resource: the implicit name label only.
    assert state([a], {}).security_labels(a) == security_labels({"pod": "a"}, "x", "default")


def test_stale_identities_are_this_nodes_endpoints_whose_labels_moved():
    a, b = record("a", 300), record("b", 301, ep_id=2)
    far = record("far", 302, node="n2")
    identities = {300: security_labels({"pod": "a"}, "x", "default"),
                  301: security_labels({"pod": "b"}, "x", "default"),
                  302: security_labels({"pod": "far"}, "x", "default")}
    assert state([a, b, far], identities).stale_identities() == []
    relabelled = state([a, b, far], identities, [namespace("x", team="a")])
    stale = relabelled.stale_identities()
    assert [rec.name for rec, _ in stale] == ["a", "b"], "another node's endpoint is its own agent's"
    assert stale[0][1] == security_labels({"pod": "a"}, "x", "default", {"team": "a"})
    # An identity that is gone from the store (or from before namespace labels) is stale too.
    assert [r.name for r, _ in state([a], {}).stale_identities()] == ["a"]


def test_compute_follows_the_namespace_labels():
    """An NP in x admits pods of namespaces labelled team=a: y's pod once y is labelled so (and its
    endpoint re-identified), not before, not with team=b."""
    web = record("web", 300, labels={"app": "web"})
    np = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
          "metadata": {"name": "from-team-a", "namespace": "x"},
          "spec": {"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "a"}}}]}]}}

    def verdict(y_labels: dict | None, identity: int) -> str:
        client = record("client", identity, node="n2", namespace="y", ep_id=2)
        identities = {300: security_labels(web.labels, "x", "default"),
                      identity: security_labels(client.labels, "y", "default", y_labels)}
        nss = [namespace("y", **y_labels)] if y_labels is not None else []
        tables = compute(state([web, client], identities, nss, resources={"NetworkPolicy": (np,)},
                               ifindex={"web": 17})).tables
        return lookup(tables["policy"], enforcement_of(web, tables["endpoints"][17]), web.ep_id, INGRESS,
                      identity, 6, 80).verdict

    assert verdict(None, 301) == "DENIED"
    assert verdict({"team": "a"}, 305) == "ALLOWED"
    assert verdict({"team": "b"}, 306) == "DENIED"


# ---- EndpointManager against a directory store -----------------------------------------------------


class Manager:
    def __init__(self, tmp_path, node: str = "n1", store=None):
        self.store = store or DirStore(str(tmp_path / "store"))
        self.identities = IdentityAllocator(self.store)
        self.reconciled = 0
        self.node = node
        self.em = EndpointManager(SimpleNamespace(node_name=node), self.store, self.identities,
                                  reconcile=self._reconcile, attach=lambda idx: None)

    def _reconcile(self) -> None:
        self.reconciled += 1

    def add(self, name: str, namespace: str = "x", node: str = "n1", ep_id: int = 1, **labels) -> EndpointRecord:
        """Store an endpoint as EndpointManager.add would (without plumbing it)."""
        sec = security_labels(labels, namespace, "default", read_namespace_labels(self.store, namespace))
        rec = record(name, self.identities.allocate(sec), node=node, namespace=namespace, ep_id=ep_id, **labels)
        self.store.put(f"endpoints/{node}/{name}", rec.to_dict())
        return rec

    def desired(self) -> DesiredState:
        return read_desired(self.store, facts(self.node), self.identities.all())

    def rec(self, name: str, node: str = "n1") -> EndpointRecord:
        return EndpointRecord.from_dict(self.store.get(f"endpoints/{node}/{name}"))


def test_a_namespace_relabel_reidentifies_and_releases_the_old_identity(tmp_path):
    m = Manager(tmp_path)
    a = m.add("a", pod="a")
    assert not m.em.reidentify(m.desired()), "nothing moved"
    m.store.put("resources/Namespace/x", namespace("x", team="a"))
    assert m.em.reidentify(m.desired())
    moved = m.rec("a")
    assert moved.identity != a.identity and moved.labels == {"pod": "a"}
    assert m.identities.all()[moved.identity]["io.cilium.k8s.namespace.labels.team"] == "a"
    assert a.identity not in m.identities.all(), "the old identity is released: no endpoint has it"
    assert not m.em.reidentify(m.desired())
    # Deleting the Namespace returns to the implicit label set, and its number (derived from it).
    m.store.delete("resources/Namespace/x")
    assert m.em.reidentify(m.desired())
    assert m.rec("a").identity == a.identity
    assert m.identities.all()[a.identity] == security_labels({"pod": "a"}, "x", "default")


def test_an_identity_another_node_still_has_is_released_once_it_moves(tmp_path):
    n1 = Manager(tmp_path)
    n2 = Manager(tmp_path, node="n2", store=n1.store)
    a = n1.add("a", pod="a")
    far = n2.add("far", node="n2", pod="a")  # same label set, same identity
    assert far.identity == a.identity
    n1.store.put("resources/Namespace/x", namespace("x", team="a"))
    assert n1.em.reidentify(n1.desired())
    assert a.identity in n1.identities.all(), "n2's endpoint still has it"
    assert n2.em.reidentify(n2.desired())
    assert n2.rec("far", "n2").identity == n1.rec("a").identity != a.identity
    assert a.identity not in n1.identities.all()
    # Had n2 moved first, n1 keeps the old number in mind and releases it on its next round.
    n1.store.put("resources/Namespace/x", namespace("x", team="b"))
    old = n1.rec("a").identity
    assert n2.em.reidentify(n2.desired()) and old in n1.identities.all()
    n1.em._retired.add(old)  # as if n1 had moved while n2's endpoint still had it
    assert n1.em.reidentify(n1.desired())
    assert old not in n1.identities.all()


def test_endpoint_label_sets_and_removes_like_kubectl(tmp_path):
    m = Manager(tmp_path)
    a = m.add("a", pod="a", tier="web")
    view = m.em.label("a", {"pod": "b", "canary": "yes"}, ["tier", "absent"])
    assert view["labels"] == {"pod": "b", "canary": "yes"} and m.reconciled == 1
    moved = m.rec("a")
    assert moved.identity == view["identity"] != a.identity
    assert m.identities.all()[moved.identity] == security_labels({"pod": "b", "canary": "yes"}, "x", "default")
    assert a.identity not in m.identities.all()
    assert not m.em.reidentify(m.desired()), "the label write carried the identity"
    # Nothing changes: no write, no reconcile.
    m.em.label("a", {"pod": "b"}, [])
    assert m.reconciled == 1


@pytest.mark.parametrize(("name", "labels", "remove", "expected"), [
    ("nope", {"pod": "b"}, [], "unknown endpoint 'nope' on node n1 (known: a)"),
    ("a", {"bad key": "x"}, [], "invalid label key 'bad key'"),
    ("a", {"pod": "bad value"}, [], "invalid label value 'bad value'"),
    ("a", {}, ["bad key"], "invalid label key 'bad key'"),
    ("a", {"io.kubernetes.pod.namespace": "y"}, [], "label 'io.kubernetes.pod.namespace' is set by the agent"),
    ("a", {"io.cilium.k8s.policy.serviceaccount": "admin"}, [], "is set by the agent"),
    ("a", {"io.cilium.k8s.namespace.labels.team": "a"}, [], "is set by the agent"),
    ("a", {"pod": "b"}, ["pod"], "label 'pod' is both set and removed"),
])
def test_bad_relabels_are_one_line_and_change_nothing(tmp_path, name, labels, remove, expected):
    m = Manager(tmp_path)
    a = m.add("a", pod="a")
    before = (m.rec("a"), m.identities.all())
    with pytest.raises(UserError) as info:
        m.em.label(name, labels, remove)
    assert "\n" not in str(info.value) and expected in str(info.value), str(info.value)
    assert (m.rec("a"), m.identities.all()) == before and m.reconciled == 0
    assert m.rec("a").identity == a.identity


def test_an_endpoint_added_into_a_labelled_namespace_gets_its_labels(tmp_path):
    m = Manager(tmp_path)
    m.store.put("resources/Namespace/x", namespace("x", team="a"))
    assert read_namespace_labels(m.store, "x") == {"team": "a"}
    assert read_namespace_labels(m.store, "y") is None
    m.add("a", pod="a")
    assert not m.em.reidentify(m.desired()), "already the identity of its namespace's labels"


@pytest.mark.parametrize("key", ["io.kubernetes.pod.namespace", "io.cilium.k8s.policy.serviceaccount",
                                 "io.cilium.k8s.namespace.labels.team"])
def test_endpoint_add_refuses_the_agents_own_labels_before_anything_is_made(tmp_path, key):
    m = Manager(tmp_path)
    with pytest.raises(UserError, match="is set by the agent"):
        m.em.add("a", {key: "x"}, namespace="x")
    assert m.store.list("endpoints") == {} and m.identities.all() == {}
