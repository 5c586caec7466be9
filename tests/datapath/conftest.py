"""Fixtures for tests on the real kernel: a node is a network namespace with its own agent.

Everything a node creates (namespace, pins, cgroup, endpoints, the agent process) is removed in
the fixture's teardown, also when the test fails; processes are ended by PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

from agent.l7_supervisor import processor_pid_path, stop_processor

REPO = Path(__file__).resolve().parents[2]
MESHAGENT = [sys.executable, "-m", "cli.main"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    """One node: a network namespace, a config, and an agent running in it."""

    def __init__(self, tag: str, subnet: int, policy_enforcement: str = "default", extra: dict | None = None):
        self.tag = tag
        self.name = f"n-{tag}"
        self.netns = f"mtn-{tag}"
        self.tmp = Path(tempfile.mkdtemp(prefix=f"meshagent-{tag}-"))
        self.pod_cidr = f"10.{subnet}.0.0/24"
        self.config = {
            "node_name": self.name,
            "pod_cidr": self.pod_cidr,
            "store": f"dir://{self.tmp}/store",
            "state_dir": str(self.tmp / "state"),
            "bpffs_dir": f"/sys/fs/bpf/meshagent-test/{tag}",
            "cgroup": f"/sys/fs/cgroup/unified/meshagent-test-{tag}",
            "api_socket": str(self.tmp / "api.sock"),
            "metrics_addr": f"127.0.0.1:{_free_port()}",
            "policy_enforcement": policy_enforcement,
            **(extra or {}),
        }
        self.config_path = self.tmp / "agent.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.agent: subprocess.Popen | None = None
        self.log_path = self.tmp / "agent.log"
        self.processes: list[subprocess.Popen] = []
        subprocess.run(["ip", "netns", "add", self.netns], check=True)
        self.ns(["ip", "link", "set", "lo", "up"])

    # ---- running things --------------------------------------------------------------------------

    def ns(self, cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        """Run a command in the node's network namespace only (mounts and cgroups stay shared)."""
        return subprocess.run(["nsenter", f"--net=/run/netns/{self.netns}", *cmd], check=check,
                              capture_output=True, text=True, **kw)

    def cli(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        proc = subprocess.run([*MESHAGENT, "--socket", self.config["api_socket"], *args], cwd=REPO,
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"meshagent {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
        return proc

    def cli_json(self, *args: str):
        return json.loads(self.cli(*args, "-o", "json").stdout)

    def start_agent(self, wait: bool = True) -> None:
        log = open(self.log_path, "a")
        self.agent = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self.netns}", *MESHAGENT, "agent", "--config", str(self.config_path)],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.agent.poll() is not None:
                raise AssertionError(f"agent exited {self.agent.returncode}:\n{self.log_path.read_text()}")
            if self.cli("status", check=False).returncode == 0:
                return
            time.sleep(0.2)
        raise AssertionError(f"agent not ready after {timeout}s:\n{self.log_path.read_text()}")

    def stop_agent(self, sig: int = signal.SIGTERM) -> None:
        if self.agent and self.agent.poll() is None:
            os.kill(self.agent.pid, sig)
            try:
                self.agent.wait(20)
            except subprocess.TimeoutExpired:
                os.kill(self.agent.pid, signal.SIGKILL)
                self.agent.wait(10)
        self.agent = None

    def add_endpoint(self, name: str, labels: str, *extra: str) -> dict:
        return json.loads(self.cli("endpoint", "add", f"{self.tag}-{name}", "--labels", labels, *extra,
                                   "-o", "json").stdout)

    def netns_of(self, ep: dict | str) -> str:
        """The endpoint's namespace name: from its record, else as the agent names it (node-name)."""
        if isinstance(ep, dict) and ep.get("netns"):
            return Path(ep["netns"]).name
        return f"{self.name}-{ep['name'] if isinstance(ep, dict) else ep}"

    def in_ep(self, ep: dict | str) -> list[str]:
        return ["ip", "netns", "exec", self.netns_of(ep)]

    def spawn(self, cmd: list[str], stdin: int | None = None) -> subprocess.Popen:
        proc = subprocess.Popen(cmd, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        self.processes.append(proc)
        return proc

    def flows(self, *args: str) -> list[dict]:
        out = self.cli("flows", "-o", "json", *args).stdout
        return [json.loads(line)["flow"] if "flow" in json.loads(line) else json.loads(line)
                for line in out.splitlines() if line.strip()]

    def apply(self, text: str, check: bool = True) -> subprocess.CompletedProcess:
        path = self.tmp / f"apply-{uuid.uuid4().hex[:8]}.yaml"
        path.write_text(text)
        return self.cli("apply", "-f", str(path), check=check)

    def delete(self, text: str) -> None:
        path = self.tmp / f"delete-{uuid.uuid4().hex[:8]}.yaml"
        path.write_text(text)
        self.cli("delete", "-f", str(path))

    # ---- cleanup ---------------------------------------------------------------------------------

    def cleanup(self) -> None:
        for proc in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                proc.wait(5)
        self.stop_agent()
        # The product's own teardown removes endpoints, pins, cgroups; then belt and braces.
        self.ns([*MESHAGENT, "teardown", "--config", str(self.config_path), "--endpoints"], check=False, cwd=REPO)
        # The L7 processor outlives agents by design; teardown stops it, and this makes sure (by PID).
        stop_processor(processor_pid_path(self.config["state_dir"], self.name))
        store = self.tmp / "store" / "endpoints" / self.name
        if store.is_dir():
            for f in store.glob("*.json"):
                subprocess.run(["ip", "netns", "del", self.netns_of(f.stem)], capture_output=True)
        for path in [*Path("/run/netns").glob(f"{self.tag}-*"), *Path("/run/netns").glob(f"{self.name}-*")]:
            subprocess.run(["ip", "netns", "del", path.name], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)
        shutil.rmtree(self.config["bpffs_dir"], ignore_errors=True)
        with contextlib.suppress(OSError):
            os.rmdir("/sys/fs/bpf/meshagent-test")
        cg = Path(self.config["cgroup"])
        if cg.is_dir():
            for child in sorted(cg.glob("**/"), reverse=True):
                with contextlib.suppress(OSError):
                    child.rmdir()
        shutil.rmtree(self.tmp, ignore_errors=True)


_subnets = iter(range(210, 250))


@pytest.fixture(scope="module")
def node_factory():
    """Make nodes for a test module; all are cleaned up at its end."""
    made: list[Node] = []

    def make(policy_enforcement: str = "default", start: bool = True, extra: dict | None = None) -> Node:
        tag = uuid.uuid4().hex[:6]
        node = Node(tag, next(_subnets), policy_enforcement, extra)
        made.append(node)
        if start:
            node.start_agent()
        return node

    yield make
    for node in made:
        node.cleanup()


@pytest.fixture(scope="module")
def node(node_factory) -> Node:
    return node_factory()


@pytest.fixture
def tc_datapath():
    """The TC policy programs (agent.datapath.tc.TcDatapath) loaded for BPF_PROG_TEST_RUN, with no
    namespaces and nothing attached: the flow events they emit are collected in ``.events``, and the
    pins live in a bpffs directory of their own, removed at the end (also when the test fails)."""
    from agent.datapath import maps
    from agent.datapath.tc import TcDatapath

    datapath = TcDatapath(f"/sys/fs/bpf/meshagent-test/prog-{uuid.uuid4().hex[:6]}",
                        {"CT_MAP_SIZE": 1024, "POLICY_MAP_SIZE": 1024, "IPCACHE_MAP_SIZE": 1024})
    try:
        datapath.load()
        events: list[maps.FlowEventC] = []
        datapath.open_events(lambda ev: events.append(maps.FlowEventC.from_buffer_copy(bytes(ev))))
        datapath.events = events
        yield datapath
    finally:
        shutil.rmtree(datapath.bpffs_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.rmdir("/sys/fs/bpf/meshagent-test")


# Multi-node tests: `lab` (three nodes) and `lab_factory`, from the node lab (lab/).
from tests.datapath.lab_fixtures import lab, lab_factory  # noqa: E402, F401

# The outside world (a DNS server, echo servers; a namespace outside the mesh): `outside`, `outside_factory`.
from tests.datapath.outside import outside, outside_factory  # noqa: E402, F401
