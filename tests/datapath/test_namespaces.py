"""Namespace resources and relabelling on the real kernel: a namespace's labels are part of its
endpoints' identities, so namespaceSelector follows `apply`/`delete` of a Namespace and `endpoint
label` follows a pod's labels, for new connections and for established ones (re-checked)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

NETTOOL = str(Path(__file__).with_name("nettool.py"))
PY = sys.executable
DEADLINE_S = 1.0  # SPEC §5: a policy change applies to new and established flows within 1 s

NP_FROM_TEAM_A = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: from-team-a, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {team: a}}}]
    ports: [{port: 80}]
"""


def namespace(name: str, **labels: str) -> str:
    body = ", ".join(f"{k}: {v}" for k, v in labels.items())
    return f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {{{body}}}}}\n"


@pytest.fixture(scope="module")
def world(node):
    """x-a serves TCP 80 in namespace x; y-a and y-b are clients in namespace y."""
    eps = {
        "x-a": node.add_endpoint("x-a", "pod=a", "--namespace", "x"),
        "y-a": node.add_endpoint("y-a", "pod=a", "--namespace", "y"),
        "y-b": node.add_endpoint("y-b", "pod=b", "--namespace", "y"),
    }
    srv = node.spawn([*node.in_ep(eps["x-a"]), PY, NETTOOL, "serve-tcp", "80"])
    assert srv.stdout.readline().strip() == "ready"
    return eps


@pytest.fixture
def clean(node):
    yield
    for kind in ("NetworkPolicy", "CiliumNetworkPolicy", "Namespace"):
        for item in node.cli_json("get", kind)["items"]:
            meta = item["metadata"]
            node.cli("delete", kind, meta["name"], *(["-n", meta["namespace"]] if "namespace" in meta else []))


def tcp_ok(node, src, dst, port=80, timeout=0.5) -> bool:
    return subprocess.run([*node.in_ep(src), PY, NETTOOL, "tcp", dst["ip"], str(port), str(timeout)]).returncode == 0


def eventually(check, deadline_s: float = DEADLINE_S) -> bool:
    """Whether ``check()`` holds by the deadline, asked at least twice (poll, no fixed sleep)."""
    end = time.monotonic() + deadline_s
    while True:
        if check():
            return True
        if time.monotonic() >= end:
            return check()


def identity(node, name: str) -> int:
    (ep,) = [e for e in node.cli_json("endpoint", "list") if e["name"] == f"{node.tag}-{name}"]
    return ep["identity"]


def identity_labels(node, number: int) -> dict:
    (item,) = [i for i in node.cli_json("identity", "list") if i["id"] == number]
    return item["labels"]


def test_namespace_selector_admits_once_the_namespace_is_labelled(node, world, clean):
    before = identity(node, "y-a")
    assert identity_labels(node, before)["io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name"] == "y"
    node.apply(NP_FROM_TEAM_A)
    assert not tcp_ok(node, world["y-a"], world["x-a"]), "y has no Namespace resource: no team label"
    node.apply(namespace("y", team="a"))
    assert eventually(lambda: tcp_ok(node, world["y-a"], world["x-a"]))
    assert eventually(lambda: tcp_ok(node, world["y-b"], world["x-a"]))
    after = identity(node, "y-a")
    assert after != before
    assert identity_labels(node, after)["io.cilium.k8s.namespace.labels.team"] == "a"
    assert before not in {i["id"] for i in node.cli_json("identity", "list")}, "the old identity is released"
    # get shows the Namespace with its labels.
    table = node.cli("get", "namespace").stdout.splitlines()
    assert table[0].split() == ["NAME", "LABELS"] and table[1].split() == ["y", "team=a"]
    trace = node.cli_json("policy", "trace", "--from-label", "pod=a", "--from-namespace", "y",
                          "--to-label", "pod=a", "--to-namespace", "x", "--dport", "80/tcp")
    assert trace["verdict"] == "ALLOWED"


def test_relabelling_the_namespace_cuts_established_connections(node, world, clean):
    node.apply(NP_FROM_TEAM_A)
    node.apply(namespace("y", team="a"))
    assert eventually(lambda: tcp_ok(node, world["y-a"], world["x-a"]))
    hold = subprocess.Popen([*node.in_ep(world["y-a"]), PY, NETTOOL, "hold", world["x-a"]["ip"], "80"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
    node.processes.append(hold)
    assert hold.stdout.readline().strip() == "connected"
    hold.stdin.write("one 2\n")
    hold.stdin.flush()
    assert hold.stdout.readline().strip() == "one"

    changed = time.monotonic()
    node.apply(namespace("y", team="b"))
    assert eventually(lambda: not tcp_ok(node, world["y-a"], world["x-a"], timeout=0.3))
    # The established connection's next packet is re-checked against the new identity: dropped.
    hold.stdin.write("two 1\n")
    hold.stdin.flush()
    assert hold.stdout.readline().strip() == "TIMEOUT"
    assert time.monotonic() - changed < 10
    revoked = node.flows("--verdict", "DROPPED", "--from-ip", world["y-a"]["ip"])
    assert any(f["drop_reason_desc"] == "POLICY_REVOKED" for f in revoked), revoked[-3:]
    assert identity_labels(node, identity(node, "y-a"))["io.cilium.k8s.namespace.labels.team"] == "b"


def test_deleting_the_namespace_returns_to_the_implicit_label(node, world, clean):
    implicit = identity(node, "y-a")
    node.apply(namespace("y", team="a"))
    assert identity(node, "y-a") != implicit
    node.apply(NP_FROM_TEAM_A.replace("{matchLabels: {team: a}}", "{matchLabels: {kubernetes.io/metadata.name: y}}"))
    assert eventually(lambda: tcp_ok(node, world["y-a"], world["x-a"]))
    node.cli("delete", "namespace", "y")
    assert node.cli_json("get", "Namespace")["items"] == []
    assert identity(node, "y-a") == implicit, "the identity of the implicit label set, as before"
    # kubernetes.io/metadata.name holds without a Namespace resource.
    assert eventually(lambda: tcp_ok(node, world["y-a"], world["x-a"]))
    node.apply(NP_FROM_TEAM_A)
    assert eventually(lambda: not tcp_ok(node, world["y-a"], world["x-a"], timeout=0.3))


def test_cnp_selects_peers_by_namespace_labels(node, world, clean):
    node.apply("""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: from-payments, namespace: x}
spec:
  endpointSelector: {matchLabels: {pod: a}}
  ingress:
  - fromEndpoints: [{matchLabels: {io.cilium.k8s.namespace.labels.team: payments}}]
""")
    assert not tcp_ok(node, world["y-a"], world["x-a"])
    node.apply(namespace("y", team="payments"))
    assert eventually(lambda: tcp_ok(node, world["y-a"], world["x-a"]))


def test_endpoint_label_reidentifies_and_policy_follows(node, world, clean):
    node.apply("""
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: from-clients, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from: [{namespaceSelector: {}, podSelector: {matchLabels: {role: client}}}]
""")
    before = identity(node, "y-b")
    assert not tcp_ok(node, world["y-b"], world["x-a"])
    out = node.cli_json("endpoint", "label", f"{node.tag}-y-b", "role=client")
    assert out["labels"] == {"pod": "b", "role": "client"} and out["identity"] != before
    assert identity(node, "y-b") == out["identity"], "endpoint list shows the new identity"
    assert eventually(lambda: tcp_ok(node, world["y-b"], world["x-a"]))
    table = node.cli("endpoint", "list").stdout
    assert "pod=b,role=client" in table
    node.cli("endpoint", "label", f"{node.tag}-y-b", "role-")
    assert identity(node, "y-b") == before
    assert eventually(lambda: not tcp_ok(node, world["y-b"], world["x-a"], timeout=0.3))


def one_line(proc, code: int = 1) -> str:
    assert proc.returncode == code, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.mark.parametrize(("args", "code", "needle"), [
    (["no-such-endpoint", "a=b"], 1, "unknown endpoint 'no-such-endpoint'"),
    (["{y-b}", "io.kubernetes.pod.namespace=x"], 1, "is set by the agent"),
    (["{y-b}", "io.cilium.k8s.namespace.labels.team=a"], 1, "is set by the agent"),
    (["{y-b}", "bad key=1"], 2, "invalid label key"),
    (["{y-b}", "pod=bad value"], 2, "invalid label value"),
    (["{y-b}", "pod"], 2, "expected KEY=VALUE"),
    (["{y-b}"], 2, "Missing argument"),
])
def test_bad_endpoint_label_changes_nothing(node, world, args, code, needle):
    before = (node.cli_json("endpoint", "list"), node.cli_json("identity", "list"))
    argv = [a.replace("{y-b}", f"{node.tag}-y-b") for a in args]
    proc = node.cli("endpoint", "label", *argv, check=False)
    assert proc.returncode == code, proc.stderr
    assert needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    if code == 1:
        one_line(proc)
    assert (node.cli_json("endpoint", "list"), node.cli_json("identity", "list")) == before


@pytest.mark.parametrize(("text", "needle"), [
    ("apiVersion: v1\nkind: Namespace\nmetadata: {name: y, namespace: x}\n", "cluster-scoped"),
    ("apiVersion: v1\nkind: Namespace\nmetadata: {name: y}\nspec: {finalizers: [kubernetes]}\n", "spec"),
    ("apiVersion: v1\nkind: Namespace\nmetadata: {name: y, labels: {kubernetes.io/metadata.name: z}}\n",
     "Kubernetes sets this label"),
    ("apiVersion: v1\nkind: Namespace\nmetadata: {name: y, labels: {team: 'a b'}}\n", "invalid label value"),
])
def test_bad_namespace_changes_nothing(node, world, clean, text, needle):
    before = (node.cli_json("get", "all"), node.cli_json("endpoint", "list"))
    assert needle in one_line(node.apply(text, check=False))
    assert (node.cli_json("get", "all"), node.cli_json("endpoint", "list")) == before
