"""Every API operation the CLI sends exists in the agent's API (agent/api.py), found by reading
cli/main.py: a command cannot call an operation the agent does not have."""

from __future__ import annotations

import ast

from agent.api import OPS, STREAM_OPS
from tests.paths import REPO

CLI = REPO / "cli" / "main.py"


def _ops_sent() -> set[str]:
    sent = set()
    for node in ast.walk(ast.parse(CLI.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("call", "stream"):
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                sent.add(node.args[0].value)
        # `bpf ... list` commands are made by _map_command(group, name, op, what).
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "_map_command":
            sent.add(node.args[2].value)
    return sent


def test_cli_calls_only_operations_the_agent_has():
    sent = _ops_sent()
    assert sent, "the parser found no call: fix it"
    assert sent - set(OPS) - set(STREAM_OPS) == set()


def test_streaming_operations_are_streamed():
    streamed = {n.args[0].value for n in ast.walk(ast.parse(CLI.read_text()))
                if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "stream"
                and n.args and isinstance(n.args[0], ast.Constant)}
    assert streamed <= set(STREAM_OPS)
