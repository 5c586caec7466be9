"""Every bad input gets one clear line, exit code 1 (2 for usage), and changes nothing."""

from __future__ import annotations

import subprocess

import pytest

from tests.datapath.conftest import MESHAGENT, REPO

GOOD = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: good, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: x}}
  ingress: [{fromEndpoints: [{matchLabels: {app: y}}]}]
"""


def state(node):
    return (node.cli_json("get", "all"), node.cli_json("endpoint", "list"), node.cli_json("bpf", "policy", "list"))


def one_line_error(proc, code=1):
    assert proc.returncode == code, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def baseline(node):
    node.add_endpoint("base", "app=x")
    node.apply(GOOD)
    return state(node)


@pytest.mark.parametrize("text,needle", [
    ("kind: [unclosed\n", "malformed YAML"),
    ("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n", "Pod"),
    (GOOD.replace("fromEndpoints", "fromEndpoint"), "spec.ingress[0].fromEndpoint"),
    (GOOD.replace("ingress: [{fromEndpoints: [{matchLabels: {app: y}}]}]",
                  "ingress: [{fromCIDR: [10.0.0.1/8]}]"), "10.0.0.1/8"),
    (GOOD.replace("ingress: [{fromEndpoints: [{matchLabels: {app: y}}]}]",
                  "ingress: [{fromCIDR: [300.1.1.0/24]}]"), "300.1.1.0/24"),
    (GOOD + "---\n" + GOOD.replace("good", "second").replace("app: y", "app: 'bad value!'"), "bad value!"),
])
def test_bad_resources_change_nothing(node, baseline, text, needle):
    proc = node.apply(text, check=False)
    line = one_line_error(proc)
    assert needle in line
    assert state(node) == baseline


def test_unknown_endpoint(node, baseline):
    line = one_line_error(node.cli("endpoint", "delete", "no-such-endpoint", check=False))
    assert "no-such-endpoint" in line
    assert state(node) == baseline


@pytest.mark.parametrize("args,needle", [
    (["--labels", "app=x,=y"], "label"),
    (["--labels", "app=x", "--ip", "192.0.2.1"], "pod_cidr"),
    (["--labels", "app=x", "--netns", "/run/netns/does-not-exist"], "does-not-exist"),
])
def test_bad_endpoint_add(node, baseline, args, needle):
    proc = node.cli("endpoint", "add", f"{node.tag}-bad", *args, check=False)
    assert proc.returncode in (1, 2)
    assert needle in proc.stderr and "Traceback" not in proc.stderr
    assert state(node) == baseline


def test_duplicate_endpoint(node, baseline):
    line = one_line_error(node.cli("endpoint", "add", f"{node.tag}-base", "--labels", "app=x", check=False))
    assert "already exists" in line
    assert state(node) == baseline


def test_second_agent_is_refused(node, baseline):
    proc = node.ns([*MESHAGENT, "agent", "--config", str(node.config_path)], check=False, cwd=REPO, timeout=60)
    line = one_line_error(proc)
    assert "already running" in line
    assert node.cli("status", check=False).returncode == 0
    assert state(node) == baseline


def test_bad_config_key(node, tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("node_name: x\npod_cidrr: 10.0.0.0/24\n")
    proc = subprocess.run([*MESHAGENT, "agent", "--config", str(cfg)], cwd=REPO, capture_output=True, text=True)
    assert "pod_cidrr" in one_line_error(proc)


def test_no_agent(tmp_path):
    proc = subprocess.run([*MESHAGENT, "--socket", str(tmp_path / "none.sock"), "status"], cwd=REPO,
                          capture_output=True, text=True)
    assert "no agent answers" in one_line_error(proc)
