"""Every CLI command, run against a real agent: no command may exist without a real answer.

`COMMANDS` names each command of the click tree with the arguments it runs with here and the exit
code it must give; a test fails when a command is added to the CLI but not here, so a new command
cannot ship without being run against an agent. (`meshagent certs` once shipped calling an API
operation that did not exist, tested only against a fake.)
"""

from __future__ import annotations

import json

import click
import pytest

from cli.main import cli

POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: cli-allow, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: cli-b}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: cli-a}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
---
apiVersion: v1
kind: Service
metadata: {name: cli-b, namespace: default}
spec:
  selector: {app: cli-b}
  ports: [{port: 80}]
"""

# command path -> (arguments, expected exit code); "{a}", "{b}", "{file}", "{config}" are filled in.
# Commands are run in this order.
COMMANDS: dict[tuple[str, ...], tuple[list[str], int]] = {
    ("version",): ([], 0),
    ("status",): (["-o", "json"], 0),
    ("endpoint", "add"): (["{c}", "--labels", "app=cli-c", "--port", "http=80"], 0),
    ("endpoint", "list"): (["-o", "json"], 0),
    ("endpoint", "label"): (["{c}", "tier=cli"], 0),
    ("apply",): (["-f", "{file}"], 0),
    ("get",): (["CiliumNetworkPolicy", "-o", "json"], 0),
    # A connection attempt from a to b, so that `flows` has something to show.
    ("exec",): (["{a}", "--", "bash", "-c", "echo inside; exec 3<>/dev/tcp/{b_ip}/80 || true"], 0),
    ("identity", "list"): (["-o", "json"], 0),
    ("node", "list"): (["-o", "json"], 0),
    ("service", "list"): (["-o", "json"], 0),
    ("flows",): (["--last", "5"], 0),
    ("policy", "trace"): (["--from-label", "app=cli-a", "--to-label", "app=cli-b", "--dport", "80/tcp"], 0),
    ("fqdn", "cache", "list"): (["-o", "json"], 0),
    ("bpf", "ct", "list"): (["-o", "json"], 0),
    ("bpf", "ipcache", "list"): (["-o", "json"], 0),
    ("bpf", "ipblock", "list"): (["-o", "json"], 0),
    ("bpf", "policy", "list"): (["-o", "json"], 0),
    ("bpf", "fastpath", "list"): (["-o", "json"], 0),
    ("bpf", "dump"): ([], 0),
    ("delete",): (["-f", "{file}"], 0),
    ("endpoint", "delete"): (["{c}"], 0),
    # Refused while the agent runs, with a one-line error naming it: that is its answer here. The
    # fixture's cleanup runs it for real with the agent stopped.
    ("teardown",): (["--config", "{config}"], 1),
}
# The agent itself: every other test here runs it (the node fixture).
NOT_RUN = {("agent",): "it is the process the node fixture starts"}


def _leaves(group: click.Group, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    out = set()
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            out |= _leaves(cmd, (*prefix, name))
        else:
            out.add((*prefix, name))
    return out


def test_the_table_names_every_command():
    assert _leaves(cli) == set(COMMANDS) | set(NOT_RUN)


def test_every_command_answers_from_a_real_agent(node):
    a = node.add_endpoint("cli-a", "app=cli-a")
    b = node.add_endpoint("cli-b", "app=cli-b")
    path = node.tmp / "cli-policy.yaml"
    path.write_text(POLICY)
    values = {"a": a["name"], "b": b["name"], "b_ip": b["ip"], "c": f"{node.tag}-cli-c", "file": str(path),
              "config": str(node.config_path)}
    for command, (args, code) in COMMANDS.items():
        argv = [*command, *(arg.format(**values) for arg in args)]
        proc = node.cli(*argv, check=False)
        assert proc.returncode == code, f"meshagent {' '.join(argv)}: exit {proc.returncode}\n{proc.stderr}"
        if code == 0 and "json" in args:
            json.loads(proc.stdout)  # an empty list is an answer too; it must be the agent's
        elif code == 0:
            assert proc.stdout.strip(), f"meshagent {' '.join(argv)} printed nothing"
        else:
            assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "DENIED" not in node.cli("policy", "trace", "--from-label", "app=cli-a", "--to-label", "app=cli-b",
                                    "--dport", "80/tcp").stdout


@pytest.mark.parametrize("command", sorted(NOT_RUN))
def test_commands_not_run_here_say_why(command):
    assert NOT_RUN[command]
