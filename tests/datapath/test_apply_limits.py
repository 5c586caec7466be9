"""`meshagent apply` against a real agent, bounded under abuse (issue 13): alias bombs, oversized
files and documents are refused in one line and change nothing, through the CLI and through the API
alone; a large legitimate policy still applies; warnings (a namespace with no endpoints, Istio's
deprecated fields) are printed and leave the exit code 0.

The subprocess timeouts are hang guards, generous on a shared machine; nothing here asserts speed.
"""

from __future__ import annotations

import pytest

from agent.client import AgentClient, AgentError

HEAD = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: bomb, namespace: default}\n" \
       "spec:\n  endpointSelector: {matchLabels: {app: x}}\n"

# 10^12 rules if expanded, from 1.5 KB: every alias where the schema takes a list of rules.
EXPONENTIAL = HEAD + "  ingress: &l0 [{fromEntities: [world]}, {fromEntities: [host]}]\n" + "".join(
    f"  egress{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]\n" for i in range(1, 12))
# One rule of 1,000 CIDRs aliased 50,000 times: 110 KB of YAML for 50 million nodes.
WIDE = HEAD + "  ingress:\n  - &rule {fromCIDR: [" + ", ".join(
    f"10.{i // 256}.{i % 256}.0/24" for i in range(1000)) + "]}\n" + "  - *rule\n" * 50_000


def big_annotations(name: str = "fat", aliases: int = 400) -> str:
    """Under the alias ratio and valid, but about 4 MB as JSON."""
    return (f"apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  annotations:\n    a0: &d {'x' * 10_000}\n"
            + "".join(f"    a{i}: *d\n" for i in range(1, aliases))
            + "spec: {selector: {app: fat}, ports: [{port: 80}]}\n")


def state(node):
    return node.cli_json("get", "all"), node.cli_json("bpf", "policy", "list")


def refused(node, *args: str, timeout: float = 120) -> str:
    proc = node.cli("apply", *args, check=False, timeout=timeout)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def write(node, name: str, text: str) -> str:
    path = node.tmp / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("name,text", [("exponential", EXPONENTIAL), ("wide", WIDE)])
def test_alias_bombs_are_refused_and_change_nothing(node, name, text):
    before = state(node)
    line = refused(node, "-f", write(node, f"{name}.yaml", text))
    assert f"{name}.yaml: document 1: excessive aliasing at line" in line
    assert "Kubernetes' YAML decoder (go-yaml)" in line
    assert state(node) == before


def test_an_oversized_file_is_refused_having_read_no_more_than_the_limit(node):
    before = state(node)
    path = write(node, "oversized.yaml", "# padding\n" * ((9 << 20) // 10))  # 9 MiB
    line = refused(node, "-f", path)
    assert line.endswith("oversized.yaml: the file is larger than 8 MiB, the most one apply may carry; to raise the "
                         "limit, use --max-bytes or MESHAGENT_APPLY_MAX_BYTES")
    assert "larger than 1 KiB" in refused(node, "-f", "/dev/zero", "--max-bytes", "1KiB")  # endless: read 1 KiB + 1
    assert state(node) == before


def test_a_huge_document_is_refused_by_the_cli_and_by_the_agent(node):
    before = state(node)
    rule = "  - {fromEntities: [world], toPorts: [{ports: [{port: '80', protocol: TCP}]}]}\n"
    huge = write(node, "huge.yaml", HEAD.replace("bomb", "huge") + "  ingress:\n" + rule * 60_000)  # 4.7 MB
    line = refused(node, "-f", huge)
    assert "huge.yaml: document 1: the document is larger than 3 MiB as JSON with its aliases expanded (by line" in line
    assert line.endswith("to raise the limit, use --max-document-bytes or MESHAGENT_APPLY_MAX_DOCUMENT_BYTES")
    # Raised on the CLI only, the agent still holds the line, with its own limit.
    fat = write(node, "fat.yaml", big_annotations())
    line = refused(node, "-f", fat, "--max-document-bytes", "8MiB")
    assert line.endswith("document 1 (Service default/fat): the document is larger than 3 MiB as JSON with its "
                         "aliases expanded, the most one document may be; to raise the limit, set "
                         "MESHAGENT_APPLY_MAX_DOCUMENT_BYTES in the agent's environment")
    assert state(node) == before


def test_the_api_checks_document_size_without_the_cli(node):
    before = state(node)
    body = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "fat", "annotations": {
        f"a{i}": "x" * 10_000 for i in range(400)}}, "spec": {"ports": [{"port": 80}]}}
    with pytest.raises(AgentError) as info:
        AgentClient(node.config["api_socket"]).call("apply", documents=[{"where": "api", "body": body}])
    assert str(info.value).startswith("api (Service default/fat): the document is larger than 3 MiB as JSON")
    many = [{"where": f"api {i}", "body": {**body, "metadata": {"name": f"fat{i}", "annotations": {
        f"a{j}": "x" * 10_000 for j in range(220)}}}} for i in range(4)]  # 2.2 MB each, 8.8 MB in all
    with pytest.raises(AgentError, match=r"^this apply's documents are, as JSON, larger than 8 MiB"):
        AgentClient(node.config["api_socket"]).call("apply", documents=many)
    assert state(node) == before


def test_a_large_legitimate_policy_applies(node):
    """10,000 rules, about 1.5 MB of YAML: inside every limit, applied as any other policy."""
    rules = "".join(f"  - fromEndpoints: [{{matchLabels: {{app: client-{i}, tier: t{i % 7}}}}}]\n"
                    f"    toPorts: [{{ports: [{{port: '{1024 + i % 60000}', protocol: TCP}}]}}]\n"
                    for i in range(10_000))
    text = HEAD.replace("name: bomb", "name: big") + "  ingress:\n" + rules
    assert 1_200_000 < len(text) < 1_800_000
    path = write(node, "big.yaml", text)
    proc = node.cli("apply", "-f", path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ciliumnetworkpolicy.cilium.io/big created"
    (item,) = [i for i in node.cli_json("get", "cnp")["items"] if i["metadata"]["name"] == "big"]
    assert len(item["spec"]["ingress"]) == 10_000
    node.cli("delete", "-f", path, timeout=300)


DENY_ALL = """\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all, namespace: prod}
spec:
  podSelector: {}
  policyTypes: [Ingress]
"""


def test_a_namespace_with_no_endpoints_is_applied_with_a_warning(node):
    path = write(node, "deny-all.yaml", DENY_ALL)
    proc = node.cli("apply", "-f", path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "networkpolicy.networking.k8s.io/deny-all created"
    assert proc.stderr.splitlines() == [
        f"Warning: NetworkPolicy prod/deny-all: namespace prod has no endpoints on node {node.name} yet; "
        "the policy applies to endpoints created there later"]
    node.add_endpoint("prod-web", "app=web", "--namespace", "prod")
    proc = node.cli("apply", "-f", path)
    assert (proc.stdout.strip(), proc.stderr) == ("networkpolicy.networking.k8s.io/deny-all unchanged", "")
    node.cli("delete", "-f", path)
    node.cli("endpoint", "delete", f"{node.tag}-prod-web")


# Istio's Request Timeouts task: reviews to v2, and a 2 s delay on every call to ratings, written
# with the integer percent Istio deprecated but still reads.
REQUEST_TIMEOUTS = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts:
    - reviews
  http:
  - route:
    - destination:
        host: reviews
        subset: v2
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: ratings
spec:
  hosts:
  - ratings
  http:
  - fault:
      delay:
        percent: 100
        fixedDelay: 2s
    route:
    - destination:
        host: ratings
        subset: v1
"""


def test_istio_request_timeouts_task_applies_with_a_deprecation_warning(node):
    path = write(node, "timeouts.yaml", REQUEST_TIMEOUTS)
    proc = node.cli("apply", "-f", path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["virtualservice.networking.istio.io/reviews created",
                                        "virtualservice.networking.istio.io/ratings created"]
    assert proc.stderr.splitlines() == [
        "Warning: VirtualService default/ratings: spec.http[0].fault.delay.percent: deprecated upstream; read as "
        "percentage: {value: 100}, as upstream reads it; write that instead"]
    (ratings,) = [i for i in node.cli_json("get", "vs")["items"] if i["metadata"]["name"] == "ratings"]
    assert ratings["spec"]["http"][0]["fault"]["delay"] == {"percent": 100, "fixedDelay": "2s"}  # stored as written
    node.cli("delete", "-f", path)
