"""A Namespace relabelled on one node re-identifies its endpoints on every node (each node its own),
and namespaceSelector policy follows across nodes (two nodes on the lab's etcd, the real kernel)."""

from __future__ import annotations

import uuid

import pytest

from lab import Lab
from tests.datapath.lab_fixtures import Workloads, connects, eventually


@pytest.fixture(scope="module")
def nlab(lab_factory) -> Lab:
    return lab_factory(nodes=2, store="etcd")


@pytest.fixture
def work(nlab):
    w = Workloads(nlab)
    try:
        yield w
    finally:
        w.cleanup()


def identity_of(node, name: str) -> int:
    return next(e["identity"] for e in node.cli_json("endpoint", "list") if e["name"] == name)


def test_a_namespace_relabel_reidentifies_endpoints_on_both_nodes(nlab, work):
    n1, n2 = nlab.nodes
    t = uuid.uuid4().hex[:5]
    x, y = f"x{t}", f"y{t}"
    server = work.endpoint(n1, f"srv-{t}", "pod=a", "--namespace", x)
    near = work.endpoint(n1, f"near-{t}", "pod=b", "--namespace", y)
    far = work.endpoint(n2, f"far-{t}", "pod=b", "--namespace", y)
    assert near["identity"] == far["identity"], "one label set, one identity on every node"
    implicit = near["identity"]
    work.serve(server, 8080)
    work.apply(n1, f"""
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: from-team-a, namespace: {x}}}
spec:
  podSelector: {{matchLabels: {{pod: a}}}}
  ingress:
  - from: [{{namespaceSelector: {{matchLabels: {{team: a}}}}}}]
    ports: [{{port: 8080}}]
""")
    for ep in (near, far):
        eventually(lambda ep=ep: not connects(ep, server["ip"], 8080, timeout=1), f"{ep['name']} denied before")

    # Applied on n2: n1 re-identifies its own endpoint from the store's watch, n2 its own.
    work.apply(n2, f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {y}, labels: {{team: a}}}}\n")
    labelled = eventually(lambda: {identity_of(n1, near["name"]), identity_of(n2, far["name"])} - {implicit},
                          "both y endpoints re-identified")
    assert len(labelled) == 1, "the same new label set, the same new number on both nodes"
    for ep in (near, far):
        eventually(lambda ep=ep: connects(ep, server["ip"], 8080, timeout=1), f"{ep['name']} admitted")
    eventually(lambda: implicit not in {i["id"] for i in n1.cli_json("identity", "list")},
               "the implicit identity released once neither endpoint has it")

    n2.apply(f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {y}, labels: {{team: b}}}}\n")  # deleted once
    for ep in (near, far):
        eventually(lambda ep=ep: not connects(ep, server["ip"], 8080, timeout=1), f"{ep['name']} denied again")
    assert identity_of(n1, near["name"]) == identity_of(n2, far["name"]) not in labelled | {implicit}
