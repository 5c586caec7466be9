"""Multi-node fixtures: a node lab (lab/) for a test module, imported by conftest.py.

    def test_across_nodes(lab):                    # 3 nodes, agents ready, the store of LAB_STORE
        n1, n2 = lab.node(1), lab.node(2)          # LabNode: .name .ip .pod_cidr .netns .api_socket
        client = n1.add_endpoint("c", "app=client") # (endpoint names are machine-wide today: make them unique)
        n2.cli("get", "CiliumNetworkPolicy")       # `meshagent --node <n2> get ...`
        n1.ns(["ip", "route"])                     # a command in node n1's namespace
        lab.stop_etcd(); lab.start_etcd()          # faults: also n1.kill_agent(), n1.start_agent()

    def test_etcd_tls(lab_factory):
        lab = lab_factory(nodes=2, store="etcd", tls=True)

Each lab has names of its own (lab `lt<hex>`, nodes `lt<hex>-n1`, ..., sockets
/run/meshagent/lt<hex>-n<i>.sock), so labs of runs in parallel and a demo lab never meet; pods are
10.(150 + i).0.0/24. Every lab is taken down at the module's end, also when a test fails, and on
SIGTERM (Ctrl-C is pytest's KeyboardInterrupt: the finalizers run).

LAB_STORE (env MESHAGENT_TEST_STORE, default dir) is the store of the `lab` fixture: `etcd` runs the
same tests on the lab's etcd.

For tests that share one lab, `Workloads` (fixture `workloads(lab)` in a test module, see
tests/datapath/test_multinode.py) makes endpoints, resources and servers and removes them at the
test's end, also when it fails; `eventually` polls with a deadline; `connects` tries one TCP
connection from an endpoint; `reconfigured(node, key=value)` runs a node's agent on another config
for a while, and `refused_start(node)` starts one that must refuse (its output).
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from lab import Lab, LabError, LabNode, LabSpec, node_config

LAB_STORE = os.environ.get("MESHAGENT_TEST_STORE", "dir")
TEST_POD_BASE = 150
NETTOOL = str(Path(__file__).with_name("nettool.py"))
PY = sys.executable


def make_spec(nodes: int = 3, store: str = LAB_STORE, **kw) -> LabSpec:
    """A LabSpec with a name of its own (see the module's docstring)."""
    name = kw.pop("name", None) or f"lt{uuid.uuid4().hex[:6]}"
    kw.setdefault("pod_base", TEST_POD_BASE)
    kw.setdefault("node_prefix", f"{name}-")
    return LabSpec(name=name, nodes=nodes, store=store, **kw)


@pytest.fixture(scope="module")
def lab_factory():
    """``make(nodes=3, store=LAB_STORE, **LabSpec fields) -> Lab``, up; all go down at the module's end."""
    with contextlib.ExitStack() as stack:

        def make(nodes: int = 3, store: str = LAB_STORE, **kw) -> Lab:
            return stack.enter_context(Lab(make_spec(nodes, store, **kw)))

        yield make


@pytest.fixture(scope="module")
def lab(lab_factory) -> Lab:
    """Three nodes with their agents ready, on LAB_STORE."""
    return lab_factory()


# ---- helpers for tests on a lab ----------------------------------------------------------------------


def eventually(check, what: str, timeout: float = 30.0, interval: float = 0.2):
    """Poll ``check()`` until it returns something true, and return that; fail naming ``what`` after
    ``timeout`` seconds (a hang guard, never a speed requirement)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(interval)


def in_endpoint(ep: dict, cmd: list[str]) -> list[str]:
    """``cmd`` in endpoint ``ep``'s network namespace (as `meshagent endpoint add -o json` gave it)."""
    return ["nsenter", f"--net={ep['netns']}", *cmd]


def connects(ep: dict, ip: str, port: int, timeout: float = 3.0) -> bool:
    """One TCP connection from ``ep`` to ip:port that gets its bytes echoed (nettool tcp)."""
    proc = subprocess.run(in_endpoint(ep, [PY, NETTOOL, "tcp", ip, str(port), str(timeout)]), capture_output=True,
                          timeout=timeout + 30)
    return proc.returncode == 0


def ipcache(node: LabNode) -> dict[str, int]:
    """`meshagent --node NODE bpf ipcache list`: prefix -> identity, as the node's kernel holds it."""
    return {row["prefix"]: int(row["identity"]) for row in node.cli_json("bpf", "ipcache", "list")}


def read_line(popen: subprocess.Popen, timeout: float) -> str:
    """The next line of ``popen``'s stdout (a text pipe), or "" if none comes within ``timeout``."""
    ready, _, _ = select.select([popen.stdout], [], [], timeout)
    return popen.stdout.readline().strip() if ready else ""


class Workloads:
    """What a test makes on a shared lab: endpoints, resources (applied YAML) and processes.
    `cleanup()` removes them all (processes first, then resources, then endpoints) and raises
    afterwards if something could not be removed."""

    def __init__(self, lab: Lab):
        self.lab = lab
        self.endpoints: list[tuple[LabNode, str]] = []
        self.resources: list[tuple[LabNode, str]] = []
        self.procs: list[subprocess.Popen] = []

    def endpoint(self, node: LabNode, name: str, labels: str, *extra: str) -> dict:
        self.endpoints.append((node, name))  # before: a half-made add is removed too
        return node.add_endpoint(name, labels, *extra)

    def apply(self, node: LabNode, text: str) -> subprocess.CompletedProcess:
        self.resources.append((node, text))
        return node.apply(text)

    def spawn(self, cmd: list[str], node: LabNode | None = None, **kw) -> subprocess.Popen:
        popen = self.lab.spawn(cmd, node, **kw)
        self.procs.append(popen)
        return popen

    def serve(self, ep: dict, port: int) -> subprocess.Popen:
        """A TCP echo server in ``ep`` (nettool serve-tcp), listening when this returns."""
        popen = self.spawn(in_endpoint(ep, [PY, NETTOOL, "serve-tcp", str(port)]), stdout=subprocess.PIPE,
                           text=True)
        assert read_line(popen, 30) == "ready", f"the server in {ep['name']} did not start"
        return popen

    def cleanup(self) -> None:
        problems = []
        for popen in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError):
                popen.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(10)
            if popen.stdout:
                popen.stdout.close()
        for node, text in reversed(self.resources):
            path = os.path.join(node.dir, f"delete-{uuid.uuid4().hex[:8]}.yaml")
            Path(path).write_text(text)
            try:
                out = node.cli("delete", "-f", path, check=False)
                if out.returncode != 0:
                    problems.append(f"{node.name}: delete: {out.stderr.strip()}")
            finally:
                os.unlink(path)
        for node, name in reversed(self.endpoints):
            out = node.cli("endpoint", "delete", name, check=False)
            if out.returncode != 0 and "unknown endpoint" not in out.stderr:
                problems.append(f"{node.name}: endpoint delete {name}: {out.stderr.strip()}")
        self.procs, self.resources, self.endpoints = [], [], []
        if problems:
            raise LabError("; ".join(problems))



def write_config(node: LabNode, **overrides) -> None:
    """The node's config as the lab writes it, with ``overrides`` (a None value removes the key)."""
    settings = {k: v for k, v in {**node.settings(), **overrides}.items() if v is not None}
    node_config.write(node.config_path, settings, origin=f"the node lab ({node.lab.name})")


@contextlib.contextmanager
def reconfigured(node: LabNode, **overrides):
    """Stop the node's agent and write its config with ``overrides``; at the end (also on failure)
    stop whatever agent runs, write the lab's config again and start the agent on it."""
    node.stop_agent()
    write_config(node, **overrides)
    try:
        yield node
    finally:
        node.stop_agent()
        write_config(node)
        node.start_agent()


def refused_start(node: LabNode) -> str:
    """Start the node's agent, which must exit instead of becoming ready: what it wrote (its log
    from this start on)."""
    start = os.path.getsize(node.log_path) if os.path.exists(node.log_path) else 0
    with pytest.raises(LabError, match="the agent exited"):
        node.start_agent()
    with open(node.log_path) as f:
        f.seek(start)
        return f.read()


def one_error_line(output: str) -> str:
    """The one `Error: ...` line of an agent's output, which must be its last line, with no
    traceback anywhere."""
    lines = [line for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error: ")]
    assert "Traceback" not in output and len(errors) == 1 and lines[-1] == errors[0], output
    return errors[0]
