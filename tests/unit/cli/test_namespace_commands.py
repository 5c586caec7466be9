"""`get`/`delete` of the cluster-scoped Namespace kind and `endpoint label`, against the fake agent of
test_main.py: what each sends, prints, and its exit codes."""

from __future__ import annotations

import pytest

from cli import output as out
from tests.unit.cli.test_main import ENDPOINT, agent, assert_one_line_error, no_node_env, run  # noqa: F401

NS_ITEMS = [
    {"kind": "Namespace", "apiVersion": "v1", "namespace": "", "name": "payments",
     "body": {"apiVersion": "v1", "kind": "Namespace",
              "metadata": {"name": "payments", "labels": {"team": "payments", "tier": "gold"}}}},
    {"kind": "Namespace", "apiVersion": "v1", "namespace": "", "name": "bare",
     "body": {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "bare"}}},
]


@pytest.mark.parametrize("alias", ["ns", "namespace", "namespaces", "Namespace"])
def test_get_namespace_shows_names_and_labels(agent, alias):  # noqa: F811
    agent.reply("get", {"items": NS_ITEMS})
    result = run(agent, "get", alias)
    assert result.exit_code == 0, result.output
    assert agent.args("get") == {"kind": "Namespace"}
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "LABELS"]
    assert lines[1].split() == ["payments", "team=payments,tier=gold"]
    assert lines[2].split() == ["bare", "-"]


def test_get_one_namespace_as_yaml(agent):  # noqa: F811
    agent.reply("get", {"items": NS_ITEMS})
    result = run(agent, "get", "ns", "payments", "-o", "yaml")
    assert result.exit_code == 0, result.output
    assert "team: payments" in result.stdout and "namespace:" not in result.stdout


def test_delete_namespace(agent):  # noqa: F811
    agent.reply("delete", {"results": [{"kind": "Namespace", "namespace": "", "name": "payments",
                                        "action": "deleted"}]})
    result = run(agent, "delete", "ns", "payments")
    assert result.exit_code == 0, result.output
    assert agent.args("delete")["kind"] == "Namespace"
    assert result.stdout.strip() == "namespace/payments deleted"
    agent.reply("delete", {"results": [{"kind": "Namespace", "namespace": "", "name": "gone",
                                        "action": "not found"}]})
    result = run(agent, "delete", "ns", "gone")
    assert_one_line_error(result)
    assert result.stderr.strip() == "Error: namespace/gone not found"


def test_resource_ref_of_a_namespace():
    assert out.resource_ref("Namespace", "x") == "namespace/x"
    assert out.canonical_kind("ns") == "Namespace"


def test_endpoint_label_sends_sets_and_removals(agent):  # noqa: F811
    agent.reply("endpoint_label", {**ENDPOINT, "labels": {"app": "web", "version": "v2"}})
    result = run(agent, "endpoint", "label", "web-1", "version=v2", "canary-", "empty=")
    assert result.exit_code == 0, result.output
    assert agent.args("endpoint_label") == {"name": "web-1", "labels": {"version": "v2", "empty": ""},
                                            "remove": ["canary"]}
    header, row = result.stdout.splitlines()
    assert "IDENTITY" in header.split() and "app=web,version=v2" in row


@pytest.mark.parametrize("argv", [
    [],  # no change given
    ["version"],  # neither KEY=VALUE nor KEY-
    ["bad key=1"], ["app=bad value"], ["bad key-"], ["-"],
    ["a=1", "a=2"], ["a=1", "a-"],  # one key twice
])
def test_endpoint_label_bad_input_is_usage_error(agent, argv):  # noqa: F811
    result = run(agent, "endpoint", "label", "web-1", *argv)
    assert result.exit_code == 2, result.output
    assert agent.requests == []


def test_endpoint_label_agent_refusal_is_one_line(agent):  # noqa: F811
    agent.reply("endpoint_label", error="unknown endpoint 'nope' on node n1 (known: web-1)")
    result = run(agent, "endpoint", "label", "nope", "a=b")
    assert_one_line_error(result)
