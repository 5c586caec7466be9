"""The node lab: N meshagent nodes on one machine, each node a network namespace on a bridged underlay.

    netns <lab>-ul   bridge br0 192.168.77.1/24, etcd on 192.168.77.1:2379 (data in the lab's directory)
      |-- port n1 ==veth== eth0 192.168.77.11/24   netns <lab>-n1: agent n1, pods 10.101.0.0/24
      |-- port n2 ==veth== eth0 192.168.77.12/24   netns <lab>-n2: agent n2, pods 10.102.0.0/24
      `-- port n3 ==veth== eth0 192.168.77.13/24   netns <lab>-n3: agent n3, pods 10.103.0.0/24

Node i is `node_config.node_ip(i)` and `node_config.pod_cidr(i)`, the numbering the Vagrant VMs use
too. Each node's agent runs as `nsenter --net=/run/netns/<lab>-n<i> python -m cli.main agent --config
...` from this checkout: only the network namespace is the node's; bpffs and cgroups stay shared
(KERNEL-NOTES), so each node has its own pin directory, cgroup, state directory and API socket:

    /tmp/meshagent-lab-<lab>/           the lab's directory (0700): store/ (the dir store), etcd/ (etcd's
                                        data), etcd.log, pki/ (with TLS), n<i>/ (agent.yaml, agent.log, state/)
    /run/meshagent/<node>.sock          node's API socket: `meshagent --node <node> ...` finds it
    /sys/fs/bpf/meshagent-lab/<lab>/<node>, /sys/fs/cgroup/unified/meshagent-lab-<lab>-<node>
    /run/meshagent-lab/<lab>.json       what `up` made (written before it makes anything), read by `down`

The lab gives the nodes an underlay and nothing else: routes to other nodes' pod CIDRs are the
agents' to install. `down()` removes everything `up()` made, also after a crashed `up` (it reads the
state file, finds endpoints through the nodes' veths and leftover processes by the lab's directory).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from agent.datapath.build import cgroup2_root
from lab import etcd, net, node_config, procs
from lab.errors import LabError
from lab.pki import CertFiles, Pki
from lab.procs import Proc

REPO = Path(__file__).resolve().parents[1]
MESHAGENT = [sys.executable, "-m", "cli.main"]  # this checkout's CLI, run from REPO
STATE_ROOT = "/run/meshagent-lab"
PIN_ROOT = "/sys/fs/bpf/meshagent-lab"
CGROUP_ROOT = cgroup2_root()  # as the agent finds it (agent.datapath.build)
SOCKET_DIR = "/run/meshagent"  # the CLI's --node NAME looks for NAME.sock here
BRIDGE, NODE_IF = "br0", "eth0"
AGENT_READY_TIMEOUT = 180.0  # several agents compiling their programs at once on 2 cores
_NAME = re.compile(r"^[a-z][a-z0-9-]{0,15}$")


@dataclass(frozen=True)
class LabSpec:
    """What to build. ``store``: "dir" (one directory shared by the nodes), "etcd" (the lab's etcd),
    or a store URL. ``etcd``: run etcd (also with a dir store, for tests of the store itself).
    ``extra_config``: more node-config keys for every node (e.g. policy_enforcement)."""

    name: str = "mlab"
    nodes: int = 3
    store: str = "dir"
    tls: bool = False
    etcd: bool = True
    agents: bool = True
    underlay: str = "192.168.77.0/24"
    pod_base: int = node_config.POD_BASE
    node_prefix: str = ""
    store_lease_ttl: int | None = None
    extra_config: dict = field(default_factory=dict)

    def __post_init__(self):
        if not _NAME.match(self.name):
            raise LabError(f"lab name {self.name!r}: 1-16 of a-z, 0-9 and '-', starting with a letter")
        if self.node_prefix and not _NAME.match(self.node_prefix.rstrip("-") or "-"):
            raise LabError(f"node prefix {self.node_prefix!r}: a-z, 0-9 and '-', starting with a letter")
        if not 1 <= self.nodes <= 50:
            raise LabError(f"{self.nodes} nodes: the lab makes 1 to 50")
        try:
            net_ = ipaddress.IPv4Network(self.underlay)
            node_config.node_ip(self.nodes, self.underlay), node_config.pod_cidr(self.nodes, self.pod_base)
        except ValueError as e:
            raise LabError(f"underlay {self.underlay}, pod base {self.pod_base}: {e}") from None
        if net_.prefixlen > 28:
            raise LabError(f"underlay {self.underlay} is too small for a bridge, etcd and nodes")
        if self.store not in ("dir", "etcd") and not self.store.startswith(("dir://", "etcd://")):
            raise LabError(f"store {self.store!r}: use dir, etcd, dir:///PATH or etcd://HOST:PORT")
        if self.store == "etcd" and not self.etcd:
            raise LabError("store etcd needs the lab's etcd (etcd=True)")

    @property
    def etcd_ip(self) -> str:
        """etcd's address: the bridge's, the underlay's first host."""
        return str(ipaddress.IPv4Network(self.underlay).network_address + 1)


class LabNode:
    """One node of the lab: its namespace, addresses, files, and its agent process."""

    def __init__(self, lab: Lab, index: int):
        self.lab, self.index = lab, index
        self.name = node_config.node_name(index, lab.spec.node_prefix)
        self.netns = f"{lab.name}-n{index}"
        self.ip = node_config.node_ip(index, lab.spec.underlay)
        self.pod_cidr = node_config.pod_cidr(index, lab.spec.pod_base)
        self.bridge_port = f"n{index}"  # its veth's end in the underlay namespace
        self.dir = os.path.join(lab.workdir, f"n{index}")
        self.config_path = os.path.join(self.dir, "agent.yaml")
        self.log_path = os.path.join(self.dir, "agent.log")
        self.state_dir = os.path.join(self.dir, "state")
        self.api_socket = os.path.join(SOCKET_DIR, f"{self.name}.sock")
        self.bpffs_dir = os.path.join(PIN_ROOT, lab.name, self.name)
        self.cgroup = os.path.join(CGROUP_ROOT, f"meshagent-lab-{lab.name}-{self.name}")
        self.store_tls: CertFiles | None = None
        self.agent: Proc | None = None

    def __repr__(self) -> str:
        return f"LabNode({self.name}, {self.ip}, pods {self.pod_cidr})"

    # ---- config ------------------------------------------------------------------------------------

    def settings(self) -> dict:
        """The node's config, as `lab.node_config` writes it (the VMs' writer)."""
        spec, tls = self.lab.spec, self.store_tls if self.lab.store_url.startswith("etcd://") else None
        return node_config.node_settings(
            self.name, self.ip, self.pod_cidr, self.lab.store_url,
            store_ca=tls and tls.ca, store_cert=tls and tls.cert, store_key=tls and tls.key,
            store_lease_ttl=spec.store_lease_ttl, state_dir=self.state_dir, bpffs_dir=self.bpffs_dir,
            cgroup=self.cgroup, api_socket=self.api_socket, metrics_addr="127.0.0.1:9962", **spec.extra_config)

    def config(self) -> dict:
        return yaml.safe_load(Path(self.config_path).read_text())

    # ---- running things in the node ----------------------------------------------------------------

    def ns(self, cmd: list[str], check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        """Run ``cmd`` in the node's network namespace (mounts and cgroups stay shared)."""
        proc = subprocess.run(net.in_netns(self.netns, cmd), capture_output=True, text=True, timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise LabError(f"{self.name}: {' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def cli(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """`meshagent --socket <the node's socket> ARGS` (the same as `meshagent --node NAME ARGS`)."""
        proc = subprocess.run([*MESHAGENT, "--socket", self.api_socket, *args], cwd=REPO, capture_output=True,
                              text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise LabError(f"{self.name}: meshagent {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def cli_json(self, *args: str):
        return json.loads(self.cli(*args, "-o", "json").stdout)

    def apply(self, text: str, check: bool = True) -> subprocess.CompletedProcess:
        path = os.path.join(self.dir, f"apply-{uuid.uuid4().hex[:8]}.yaml")
        Path(path).write_text(text)
        try:
            return self.cli("apply", "-f", path, check=check)
        finally:
            os.unlink(path)

    def add_endpoint(self, name: str, labels: str, *extra: str) -> dict:
        """`meshagent endpoint add NAME --labels LABELS ...` on this node: the endpoint as JSON."""
        return json.loads(self.cli("endpoint", "add", name, "--labels", labels, *extra, "-o", "json").stdout)

    def flows(self, *args: str) -> list[dict]:
        lines = [json.loads(line) for line in self.cli("flows", "-o", "json", *args).stdout.splitlines() if line]
        return [d.get("flow", d) for d in lines]

    # ---- the agent ---------------------------------------------------------------------------------

    def agent_running(self) -> bool:
        return self.agent is not None and self.agent.alive()

    def ready(self) -> bool:
        """`meshagent status` exits 0: programs attached, API up."""
        return self.agent_running() and self.cli("status", check=False, timeout=20).returncode == 0

    def start_agent(self, wait: bool = True) -> None:
        if self.agent_running():
            raise LabError(f"{self.name}: the agent already runs (pid {self.agent.pid})")
        with open(self.log_path, "a") as log:
            popen = subprocess.Popen(
                net.in_netns(self.netns, [*MESHAGENT, "agent", "--config", self.config_path]),
                cwd=REPO, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.agent = self.lab._started(popen)
        self.lab.save()
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = AGENT_READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.agent_running():
                raise LabError(f"node {self.name}: the agent exited: {self.last_log_line()} (log {self.log_path})")
            if self.ready():
                return
            time.sleep(0.3)
        raise LabError(f"node {self.name}: the agent is not ready after {timeout:g} s (log {self.log_path})")

    def stop_agent(self, sig: int = signal.SIGTERM) -> bool:
        """Stop the agent (SIGTERM leaves its datapath pinned and enforcing; SIGKILL is a crash).
        Returns whether it was running."""
        if self.agent is None:
            return False
        was_running = self.agent.stop(sig, popen=self.lab._popens.pop(self.agent.pid, None))
        self.agent = None
        self.lab.save()
        return was_running

    def kill_agent(self) -> bool:
        return self.stop_agent(signal.SIGKILL)

    def restart_agent(self, wait: bool = True) -> None:
        self.stop_agent()
        self.start_agent(wait)

    def last_log_line(self) -> str:
        with contextlib.suppress(OSError):
            lines = [line.strip() for line in Path(self.log_path).read_text().splitlines() if line.strip()]
            if lines:
                return lines[-1]
        return "(no output)"

    def to_dict(self) -> dict:
        return {"name": self.name, "netns": self.netns, "node_ip": self.ip, "pod_cidr": self.pod_cidr,
                "config": self.config_path, "log": self.log_path, "api_socket": self.api_socket,
                "state_dir": self.state_dir, "bpffs_dir": self.bpffs_dir, "cgroup": self.cgroup,
                "store_tls": asdict(self.store_tls) if self.store_tls else None,
                "agent": self.agent.to_dict() if self.agent else None}


class Lab:
    """N nodes on one machine. ``with Lab(nodes=3, store="etcd") as lab:`` brings it up and always
    takes it down; ``Lab.attach(name)`` finds a lab that another process (`python -m lab up`) made."""

    def __init__(self, spec: LabSpec | None = None, workdir: str | None = None, **kw):
        self.spec = spec or LabSpec(**kw)
        self.name = self.spec.name
        self.workdir = workdir or default_workdir(self.name)
        self.state_path = os.path.join(STATE_ROOT, f"{self.name}.json")
        self.underlay_ns = f"{self.name}-ul"
        self.etcd_ip = self.spec.etcd_ip
        self.nodes = [LabNode(self, i) for i in range(1, self.spec.nodes + 1)]
        self.etcd: Proc | None = None
        self.etcd_server_tls: CertFiles | None = None
        self.etcd_client_tls: CertFiles | None = None  # the lab's own client (health checks, etcdctl)
        self.spawned: list[Proc] = []
        self.phase = "planned"
        self._popens: dict[int, subprocess.Popen] = {}
        self._old_sigterm = None

    # ---- names and addresses -----------------------------------------------------------------------

    @property
    def store_url(self) -> str:
        store = self.spec.store
        if store == "dir":
            return f"dir://{self.workdir}/store"
        if store == "etcd":
            return node_config.etcd_store(self.etcd_ip)
        return store

    @property
    def etcd_url(self) -> str:
        return etcd.client_url(self.etcd_ip, self.spec.tls)

    def node(self, key: int | str) -> LabNode:
        """A node by number (from 1) or name."""
        for n in self.nodes:
            if key in (n.index, n.name, str(n.index)):
                return n
        raise LabError(f"lab {self.name} has no node {key!r}; nodes: {', '.join(n.name for n in self.nodes)}")

    __getitem__ = node

    # ---- the state file ----------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {"spec": asdict(self.spec), "phase": self.phase, "workdir": self.workdir, "store": self.store_url,
                "underlay": {"netns": self.underlay_ns, "bridge": BRIDGE, "address": self.etcd_ip},
                "etcd": {"url": self.etcd_url, "proc": self.etcd.to_dict() if self.etcd else None,
                         "server_tls": asdict(self.etcd_server_tls) if self.etcd_server_tls else None,
                         "client_tls": asdict(self.etcd_client_tls) if self.etcd_client_tls else None},
                "spawned": [p.to_dict() for p in self.spawned], "nodes": [n.to_dict() for n in self.nodes]}

    def save(self) -> None:
        if not os.path.exists(self.state_path):
            return  # never claimed (or taken down): nothing to record
        tmp = f"{self.state_path}.{os.getpid()}.tmp"
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            json.dump(self.to_dict(), f, indent=1)
        os.replace(tmp, self.state_path)

    @classmethod
    def attach(cls, name: str) -> Lab:
        """The lab ``name`` as its state file describes it."""
        path = os.path.join(STATE_ROOT, f"{name}.json")
        try:
            state = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise LabError(f"lab {name} is not up (no {path})") from None
        except (OSError, ValueError) as e:
            raise LabError(f"{path}: cannot read the lab's state: {e}") from None
        lab = cls(LabSpec(**state["spec"]), workdir=state["workdir"])
        lab.phase = state.get("phase", "planned")
        lab.etcd = Proc.from_dict(state["etcd"].get("proc"))
        lab.etcd_server_tls = _certs(state["etcd"].get("server_tls"))
        lab.etcd_client_tls = _certs(state["etcd"].get("client_tls"))
        lab.spawned = [Proc.from_dict(p) for p in state.get("spawned", [])]
        for node, saved in zip(lab.nodes, state["nodes"], strict=False):
            node.agent = Proc.from_dict(saved.get("agent"))
            node.store_tls = _certs(saved.get("store_tls"))
        return lab

    def _started(self, popen: subprocess.Popen) -> Proc:
        """Record a process just started (the caller keeps it in its field and saves the state)."""
        self._popens[popen.pid] = popen
        return Proc.of(popen.pid)

    def _phase(self, phase: str) -> None:
        self.phase = phase
        self.save()

    # ---- up ----------------------------------------------------------------------------------------

    def __enter__(self) -> Lab:
        if threading.current_thread() is threading.main_thread():  # SIGTERM runs down() too
            self._old_sigterm = signal.signal(signal.SIGTERM, _exit_on_signal)
        try:
            self.up()
        except BaseException:
            self._restore_sigterm()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.down()
        finally:
            self._restore_sigterm()

    def _restore_sigterm(self) -> None:
        if self._old_sigterm is not None:
            signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None

    def up(self) -> Lab:
        """Build the lab; on any failure (or Ctrl-C) remove what was made, then raise."""
        self._claim()
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        return self

    def _claim(self) -> None:
        """Refuse (one line) if this lab, or anything of its names, exists; else create the state
        file exclusively, so that two `up`s of one lab cannot both go on."""
        hint = f"`python -m lab down --name {self.name}` removes it"
        if os.path.exists(self.state_path):
            raise LabError(f"lab {self.name} is already up (state {self.state_path}); {hint}")
        for ns in (self.underlay_ns, *(n.netns for n in self.nodes)):
            if net.exists(ns):
                raise LabError(f"network namespace {ns} exists already; a crashed lab {self.name}? {hint}")
        if os.path.exists(self.workdir):
            raise LabError(f"{self.workdir} exists already; a crashed lab {self.name}? {hint}")
        for node in self.nodes:
            if os.path.exists(node.api_socket) and _answers(node.api_socket):
                raise LabError(f"node {node.name}'s socket {node.api_socket} is in use by a running agent; "
                               "give this lab other node names (node_prefix)")
        os.makedirs(STATE_ROOT, mode=0o700, exist_ok=True)
        try:
            fd = os.open(self.state_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise LabError(f"lab {self.name} is already up (state {self.state_path}); {hint}") from None
        os.close(fd)
        self.save()

    def _build(self) -> None:
        os.mkdir(self.workdir, 0o700)
        self._phase("underlay")
        prefixlen = ipaddress.IPv4Network(self.spec.underlay).prefixlen
        net.add_netns(self.underlay_ns)
        net.add_bridge(self.underlay_ns, BRIDGE, f"{self.etcd_ip}/{prefixlen}")
        for node in self.nodes:
            net.add_netns(node.netns, "net.ipv4.ip_forward=1")
            net.plug(self.underlay_ns, BRIDGE, node.bridge_port, node.netns, NODE_IF, f"{node.ip}/{prefixlen}")
            os.makedirs(node.state_dir, mode=0o700)
        if self.spec.tls:
            self._phase("pki")
            pki = Pki(os.path.join(self.workdir, "pki"), f"meshagent-lab-{self.name}")
            # Client auth too: etcd's gRPC gateway (the HTTP/JSON API the agents use) dials etcd's own
            # gRPC port with this certificate, and --client-cert-auth refuses it without (etcd #9785).
            self.etcd_server_tls = pki.issue("etcd", server_ips=(self.etcd_ip,), client=True)
            self.etcd_client_tls = pki.issue("lab-admin")
            for node in self.nodes:
                node.store_tls = pki.issue(node.name)
        if self.spec.etcd:
            self._phase("etcd")
            self.start_etcd()
        self._phase("configs")
        for node in self.nodes:
            node_config.write(node.config_path, node.settings(), origin=f"the node lab ({self.name})")
        if self.spec.agents:
            self._phase("agents")
            for node in self.nodes:
                node.start_agent(wait=False)
            for node in self.nodes:
                node.wait_ready()
        self._phase("up")

    # ---- etcd --------------------------------------------------------------------------------------

    def etcd_settings(self) -> dict[str, str]:
        return etcd.settings(f"{self.name}-etcd", self.etcd_ip, os.path.join(self.workdir, "etcd"),
                             self.etcd_server_tls)

    def start_etcd(self, wait: bool = True) -> None:
        """Start etcd in the underlay namespace (again, after stop_etcd: same data)."""
        if self.etcd is not None and self.etcd.alive():
            return
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}  # flags only
        with open(os.path.join(self.workdir, "etcd.log"), "a") as log:
            popen = subprocess.Popen(net.in_netns(self.underlay_ns, ["etcd", *etcd.as_args(self.etcd_settings())]),
                                     cwd=self.workdir, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.etcd = self._started(popen)
        self.save()
        if wait:
            self.wait_etcd()

    def stop_etcd(self, sig: int = signal.SIGTERM) -> bool:
        """Stop etcd (SIGKILL: a crash). Its data stays for start_etcd(). Returns whether it ran."""
        if self.etcd is None:
            return False
        was_running = self.etcd.stop(sig, popen=self._popens.pop(self.etcd.pid, None))
        self.etcd = None
        self.save()
        return was_running

    def etcdctl(self, *args: str, node: LabNode | None = None, check: bool = True) -> subprocess.CompletedProcess:
        """etcdctl ARGS against the lab's etcd, from ``node``'s namespace (default: the underlay's),
        with the node's client certificate (the lab's own without a node) when etcd wants TLS."""
        tls = (node.store_tls if node else self.etcd_client_tls) if self.spec.tls else None
        cmd = net.in_netns(node.netns if node else self.underlay_ns, [*etcd.etcdctl(self.etcd_url, tls), *args])
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        if check and proc.returncode != 0:
            raise LabError(f"etcdctl {' '.join(args)}: {proc.stderr.strip()}")
        return proc

    def etcd_healthy(self, node: LabNode | None = None) -> bool:
        return self.etcdctl("endpoint", "health", node=node, check=False).returncode == 0

    def wait_etcd(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.etcd is None or not self.etcd.alive():
                raise LabError(f"etcd exited: {_last_line(os.path.join(self.workdir, 'etcd.log'))}")
            if self.etcd_healthy():
                return
            time.sleep(0.2)
        raise LabError(f"etcd is not healthy after {timeout:g} s (log {self.workdir}/etcd.log)")

    # ---- other processes ---------------------------------------------------------------------------

    def spawn(self, cmd: list[str], node: LabNode | None = None, **kw) -> subprocess.Popen:
        """Start ``cmd`` (in ``node``'s namespace if given) in its own session; down() kills it."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        popen = subprocess.Popen(net.in_netns(node.netns, cmd) if node else cmd, start_new_session=True, **kw)
        self.spawned.append(self._started(popen))
        self.save()
        return popen

    # ---- status ------------------------------------------------------------------------------------

    def status(self) -> dict:
        out = self.to_dict()
        out["etcd"]["running"] = bool(self.etcd and self.etcd.alive())
        out["etcd"]["healthy"] = out["etcd"]["running"] and self.etcd_healthy()
        for node, d in zip(self.nodes, out["nodes"], strict=True):
            d["agent_state"] = "ready" if node.ready() else "running" if node.agent_running() else "stopped"
        return out

    # ---- down --------------------------------------------------------------------------------------

    def down(self) -> list[str]:
        """Remove everything the lab made: processes (by PID), endpoints, programs, pins, cgroups,
        namespaces (and so every link), files. Never stops half-way; returns what it could not remove."""
        problems: list[str] = []

        def step(what: str, fn, *args) -> None:
            try:
                fn(*args)
            except Exception as e:  # keep going: the rest must go too
                problems.append(f"{what}: {e}")

        for proc in self.spawned:
            step(f"process {proc.pid}", proc.stop, signal.SIGKILL, 5.0, self._popens.pop(proc.pid, None))
        self.spawned = []
        for node in self.nodes:
            step(f"{node.name}'s agent", node.stop_agent)
        for node in self.nodes:  # an agent a crashed `up` started but did not record: by its config path
            for pid in procs.pids_mentioning(node.config_path):
                step(f"{node.name}'s unrecorded agent {pid}", Proc.of(pid).stop)
        if self.store_url.startswith("etcd://") and self.spec.etcd and net.exists(self.underlay_ns) \
                and os.path.isdir(os.path.join(self.workdir, "etcd")) and not (self.etcd and self.etcd.alive()):
            step("etcd (started again for teardown)", self.start_etcd)  # endpoints are recorded there
        for node in self.nodes:
            step(f"{node.name}'s teardown", self._teardown_node, node)
        step("etcd", self.stop_etcd)
        for ns in (*(n.netns for n in self.nodes), self.underlay_ns):
            step(f"namespace {ns}", net.delete_netns, ns)
        step("leftover processes", lambda: procs.kill(procs.pids_mentioning(self.workdir + os.sep)))
        for node in self.nodes:
            if os.path.exists(node.api_socket) and not _answers(node.api_socket):
                step(node.api_socket, os.unlink, node.api_socket)
        step(self.workdir, shutil.rmtree, self.workdir, True)
        for directory in (os.path.join(PIN_ROOT, self.name), PIN_ROOT):
            with contextlib.suppress(OSError):
                os.rmdir(directory)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.state_path)
        with contextlib.suppress(OSError):
            os.rmdir(STATE_ROOT)
        self.phase = "down"
        return problems

    def _teardown_node(self, node: LabNode) -> None:
        """The product's own teardown, then whatever it could not remove (it needs the store)."""
        if os.path.exists(node.config_path) and net.exists(node.netns):
            with contextlib.suppress(subprocess.TimeoutExpired):  # a store that does not answer
                node.ns([*MESHAGENT, "teardown", "--config", node.config_path, "--endpoints"], check=False, cwd=REPO)
        # Belt and braces, none of it through the store.
        from agent.l7_supervisor import processor_pid_path, stop_processor

        stop_processor(processor_pid_path(node.state_dir, node.name))
        for ep_ns in net.veth_peer_namespaces(node.netns, skip=(NODE_IF,)):
            net.delete_netns(ep_ns)
        if os.path.isdir(node.bpffs_dir):
            from agent.datapath.sockets import SocketDatapath
            with contextlib.suppress(Exception):
                SocketDatapath(node.bpffs_dir).detach()  # the socket programs at the cgroup root
            shutil.rmtree(node.bpffs_dir, ignore_errors=True)
        _remove_cgroup(node.cgroup)


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def default_workdir(name: str) -> str:
    return os.path.join(tempfile.gettempdir(), f"meshagent-lab-{name}")


def _certs(d: dict | None) -> CertFiles | None:
    return CertFiles(**d) if d else None


def _answers(path: str) -> bool:
    """Something accepts connections on the Unix socket at ``path``."""
    import socket

    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(1)
        try:
            s.connect(path)
        except OSError:
            return False
    return True


def _remove_cgroup(path: str) -> None:
    """Kill what runs in the cgroup tree (the lab's endpoints' processes), then remove it."""
    if not os.path.isdir(path):
        return
    for child in (e.path for e in os.scandir(path) if e.is_dir()):
        _remove_cgroup(child)
    with contextlib.suppress(OSError):
        Path(path, "cgroup.kill").write_text("1")
    deadline = time.monotonic() + 5
    while True:
        try:
            os.rmdir(path)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _last_line(path: str) -> str:
    with contextlib.suppress(OSError):
        lines = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
        if lines:
            return lines[-1]
    return "(no output)"


def _exit_on_signal(signum, frame):
    raise SystemExit(f"terminated by signal {signum}")


def down_by_name(name: str) -> list[str] | None:
    """Take lab ``name`` down from its state file; None if there is no such lab.

    `up` writes the state file before it makes anything, so only a state file removed by hand leaves
    a lab without one: then whatever carries the lab's name goes (its directory and the processes
    using it, namespaces <name>-ul and <name>-n<i> with their endpoints, pins, cgroups)."""
    try:
        return Lab.attach(name).down()
    except LabError:
        pass
    state_path = os.path.join(STATE_ROOT, f"{name}.json")
    if os.path.exists(state_path):  # unreadable: `up` crashed between creating and writing it
        os.unlink(state_path)
    workdir = default_workdir(name)
    node_ns = re.compile(rf"^{re.escape(name)}-(ul|n\d+)$")
    namespaces = sorted(n for n in _listdir(net.NETNS_DIR) if node_ns.match(n))
    pins = os.path.join(PIN_ROOT, name)
    cgroups = [os.path.join(CGROUP_ROOT, n) for n in _listdir(CGROUP_ROOT) if n.startswith(f"meshagent-lab-{name}-")]
    if not (os.path.exists(workdir) or namespaces or os.path.isdir(pins) or cgroups):
        return None
    problems = []
    sockets = []
    for config in Path(workdir).glob("n*/agent.yaml"):
        with contextlib.suppress(OSError, yaml.YAMLError, AttributeError):
            sockets.append(yaml.safe_load(config.read_text()).get("api_socket"))
    for pid in procs.pids_mentioning(workdir + os.sep):  # agents, their L7 processors, etcd
        Proc.of(pid).stop(timeout=10)
    for sock in sockets:
        if sock and os.path.exists(sock) and not _answers(sock):
            os.unlink(sock)
    for ns in namespaces:
        for ep_ns in net.veth_peer_namespaces(ns, skip=(NODE_IF,)) if ns.endswith(tuple("0123456789")) else []:
            net.delete_netns(ep_ns)
        net.delete_netns(ns)
    if os.path.isdir(pins):
        from agent.datapath.sockets import SocketDatapath
        for node_pins in os.scandir(pins):
            with contextlib.suppress(Exception):
                SocketDatapath(node_pins.path).detach()
        shutil.rmtree(pins, ignore_errors=True)
    for cg in cgroups:
        try:
            _remove_cgroup(cg)
        except OSError as e:
            problems.append(f"{cg}: {e}")
    shutil.rmtree(workdir, ignore_errors=True)
    return problems
