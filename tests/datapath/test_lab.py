"""The node lab itself (lab/), on real namespaces: the underlay, etcd, the configs, the agents, and
that `down` leaves nothing behind, also after a crashed `up`.

The lab's nodes use the dir store here: an agent refuses the etcd store until its backend lands.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent import node_config
from lab import Lab, LabError, net
from lab import lab as lab_module
from tests.datapath.lab_fixtures import make_spec
from tests.paths import REPO

LAB = [sys.executable, "-m", "lab"]
MESHAGENT = [sys.executable, "-m", "cli.main"]


def lab_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([*LAB, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


# ---- what a lab made, and that none of it is left -------------------------------------------------


def inventory(lab: Lab) -> dict:
    """Everything a lab made that `down` must remove, read while it is up."""
    pids, progs, ep_namespaces, ep_links = [], [], [], []
    if lab.etcd:
        pids.append(lab.etcd.pid)
    pids += [p.pid for p in lab.spawned]
    for node in lab.nodes:
        if node.agent:
            pids.append(node.agent.pid)
        pid_file = Path(node.state_dir, f"l7-{node.name}.pid")
        if pid_file.exists():
            pids.append(int(pid_file.read_text().split()[0]))  # the L7 processor
        if os.path.isdir(node.bpffs_dir):
            for pin in Path(node.bpffs_dir).glob("prog_*"):
                out = subprocess.run(["bpftool", "-j", "prog", "show", "pinned", str(pin)], capture_output=True,
                                     text=True)
                if out.returncode == 0:
                    progs.append(json.loads(out.stdout)["id"])
        for procs_file in Path(node.cgroup).glob("**/cgroup.procs"):  # the endpoints' workloads
            pids += [int(pid) for pid in procs_file.read_text().split()]
        if net.exists(node.netns):
            ep_namespaces += net.veth_peer_namespaces(node.netns, skip=("eth0",))
            links = json.loads(node.ns(["ip", "-j", "link", "show", "type", "veth"]).stdout or "[]")
            ep_links += [link["ifname"] for link in links if link["ifname"] != "eth0"]
    return {
        "namespaces": [lab.underlay_ns, *(n.netns for n in lab.nodes), *ep_namespaces],
        "pids": pids, "progs": progs, "links": ep_links,
        "paths": [lab.workdir, lab.state_path, os.path.join(lab_module.PIN_ROOT, lab.name),
                  *(p for n in lab.nodes for p in (n.api_socket, n.bpffs_dir, n.cgroup)),
                  *(f"/etc/netns/{ns}" for ns in ep_namespaces)],
    }


def assert_nothing_left(made: dict) -> None:
    assert not [ns for ns in made["namespaces"] if net.exists(ns)], "namespaces left"
    alive = [pid for pid in made["pids"] if Path(f"/proc/{pid}").exists()
             and Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"]
    assert not alive, f"processes left: {alive}"
    assert not [p for p in made["paths"] if os.path.lexists(p)], "files, pins or cgroups left"
    progs = [i for i in made["progs"]
             if subprocess.run(["bpftool", "prog", "show", "id", str(i)], capture_output=True).returncode == 0]
    assert not progs, f"BPF programs left: {progs}"
    root_links = {link["ifname"] for link in json.loads(net.run("ip", "-j", "link", "show"))}
    assert not root_links & set(made["links"]), "links left in the root namespace"
    assert not lab_module.procs.pids_mentioning(made["paths"][0] + os.sep), "processes using the lab's directory"


# ---- one lab of three nodes for the module ---------------------------------------------------------


def test_nodes_reach_each_other_and_etcd_over_the_bridge(lab):
    assert lab.etcd_ip == "192.168.77.1"
    for node in lab.nodes:
        for other in lab.nodes:
            if other is not node:
                node.ns(["ping", "-c", "1", "-W", "2", other.ip])
        node.ns(["nc", "-z", "-w", "2", lab.etcd_ip, "2379"])
        assert lab.etcd_healthy(node)
    assert [n.ip for n in lab.nodes] == ["192.168.77.11", "192.168.77.12", "192.168.77.13"]
    assert node.ns(["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip() == "1"


def test_each_node_config_loads_in_the_agent(lab):
    for i, node in enumerate(lab.nodes, start=1):
        cfg = node_config.load(node.config_path)
        assert (cfg.node_name, cfg.node_ip, cfg.pod_cidr) == (node.name, f"192.168.77.{10 + i}", f"10.{150 + i}.0.0/24")
        assert cfg.store == lab.store_url == f"dir://{lab.workdir}/store"
        assert cfg.api_socket == f"/run/meshagent/{node.name}.sock"
        assert cfg.state_dir.startswith(lab.workdir) and cfg.bpffs_dir == node.bpffs_dir and cfg.cgroup == node.cgroup


def test_agents_answer_status_on_their_sockets(lab):
    for node in lab.nodes:
        out = subprocess.run([*MESHAGENT, "--node", node.name, "status"], cwd=REPO, capture_output=True, text=True,
                             timeout=30)
        assert out.returncode == 0, out.stderr
        assert f"Node:                 {node.name}" in out.stdout
    status = lab_cli("status", "--name", lab.name, "-o", "json")
    assert status.returncode == 0, status.stderr
    assert [n["agent_state"] for n in json.loads(status.stdout)["nodes"]] == ["ready"] * 3


def test_the_underlay_carries_pod_traffic_given_routes_between_nodes(lab):
    """What the agents' cross-node routing will give: here the test adds the routes itself."""
    n1, n2 = lab.node(1), lab.node(2)
    client = n1.add_endpoint(f"{lab.name}-c", "app=lab-client")
    server = n2.add_endpoint(f"{lab.name}-s", "app=lab-server")
    n1.ns(["ip", "route", "replace", n2.pod_cidr, "via", n2.ip])
    n2.ns(["ip", "route", "replace", n1.pod_cidr, "via", n1.ip])
    tool = str(REPO / "tests/datapath/nettool.py")
    srv = lab.spawn(["nsenter", f"--net={server['netns']}", sys.executable, tool, "serve-tcp", "8080"],
                    stdout=subprocess.PIPE, text=True)
    assert srv.stdout.readline().strip() == "ready"
    ok = subprocess.run(["nsenter", f"--net={client['netns']}", sys.executable, tool, "tcp", server["ip"], "8080", "3"],
                        capture_output=True, timeout=20)
    assert ok.returncode == 0
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # n2 knows the client's identity from the shared store
        flows = [f for f in n2.flows("--from-ip", client["ip"]) if f.get("verdict") == "FORWARDED"]
        if flows:
            break
        time.sleep(0.2)
    assert flows and flows[0]["source"]["identity"] == client["identity"]


def test_a_policy_applied_on_one_node_is_in_the_store_of_every_node(lab):
    lab.node(1).apply("""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: lab-shared, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: lab-nobody}}
  ingress: [{fromEndpoints: [{matchLabels: {app: lab-client}}]}]
""")
    for node in lab.nodes:
        assert "lab-shared" in node.cli("get", "CiliumNetworkPolicy").stdout


def test_one_agent_is_stopped_killed_and_restarted(lab):
    n3 = lab.node(3)
    assert n3.kill_agent()
    assert subprocess.run([*MESHAGENT, "--node", n3.name, "status"], cwd=REPO, capture_output=True).returncode != 0
    n3.start_agent()
    assert n3.ready()
    n3.restart_agent()
    assert n3.ready() and lab.node(1).ready()


def test_etcd_is_stopped_and_started_again_with_its_data(lab):
    lab.etcdctl("put", "lab-test-key", "kept")
    assert lab.stop_etcd()
    assert not lab.etcd_healthy(lab.node(1))
    lab.start_etcd()
    assert lab.etcd_healthy(lab.node(1))
    assert lab.etcdctl("get", "--print-value-only", "lab-test-key").stdout.strip() == "kept"


def test_a_second_up_of_a_running_lab_is_refused_in_one_line(lab):
    out = lab_cli("up", "--name", lab.name, "--nodes", "3", "--node-prefix", f"{lab.name}-")
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and "already up" in out.stderr, out.stderr
    with pytest.raises(LabError, match="already up"):
        Lab(lab.spec).up()
    assert all(node.ready() for node in lab.nodes)  # the running lab is untouched


# ---- labs of their own -----------------------------------------------------------------------------


def test_down_leaves_nothing_behind(lab_factory):
    lab = lab_factory(nodes=2, tls=True)
    for node in lab.nodes:
        ep = node.add_endpoint(f"{node.name}-ep", "app=lab-down")
        node.cli("exec", ep["name"], "--", "sh", "-c", "sleep 600 >/dev/null 2>&1 & exit 0")  # a workload left running
    lab.spawn(["sleep", "600"], node=lab.node(1))
    made = inventory(lab)
    assert len(made["namespaces"]) == 5 and len(made["pids"]) >= 8 and made["progs"] and len(made["links"]) == 2
    assert lab.down() == []
    assert_nothing_left(made)
    assert lab.down() == []  # again: nothing to do, no error


def test_down_after_a_crashed_up_still_cleans_up():
    spec = make_spec(nodes=2)
    up = subprocess.Popen([*LAB, "up", "--name", spec.name, "--nodes", "2", "--node-prefix", spec.node_prefix,
                           "--pod-base", str(spec.pod_base)], cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until both agents are started, not yet ready
            with contextlib.suppress(OSError, ValueError):
                state = json.loads(Path(lab_module.STATE_ROOT, f"{spec.name}.json").read_text())
                if state["phase"] == "agents" and all(n["agent"] for n in state["nodes"]):
                    break
            time.sleep(0.05)
        else:
            pytest.fail("the lab's up never reached its agents")
        os.kill(up.pid, signal.SIGKILL)
        up.wait(10)
        crashed = Lab.attach(spec.name)
        made = inventory(crashed)
        assert made["pids"], "the agents were started"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(up.pid, signal.SIGKILL)
        down = lab_cli("down", "--name", spec.name)
    assert down.returncode == 0, down.stderr
    assert down.stdout.strip() == f"lab {spec.name} removed"
    assert_nothing_left(made)
    assert lab_cli("down", "--name", spec.name).stdout.strip() == f"lab {spec.name} is not up"


def test_down_without_the_state_file_removes_what_carries_the_lab_s_name():
    """The state file removed by hand: `down` still finds the lab by its names, and `up` works again."""
    spec = make_spec(nodes=1)
    lab = Lab(spec).up()
    lab.node(1).add_endpoint(f"{spec.name}-ep", "app=lab-lost")
    made = inventory(lab)
    os.unlink(lab.state_path)
    down = lab_cli("down", "--name", spec.name)
    assert down.returncode == 0 and down.stdout.strip() == f"lab {spec.name} removed", down.stderr
    assert_nothing_left(made)
    with Lab(spec) as again:
        assert again.node(1).ready()


def test_an_up_whose_agents_fail_removes_what_it_made():
    lab = Lab(make_spec(nodes=2, extra_config={"no_such_key": 1}))
    with pytest.raises(LabError, match="agent exited: .*no_such_key"):
        lab.up()
    assert_nothing_left(inventory(lab))


def test_etcd_with_tls_wants_each_node_s_certificate():
    """The etcd store's configs as the agents will read them (no agents: they refuse etcd today)."""
    with Lab(make_spec(nodes=2, store="etcd", tls=True, agents=False, store_lease_ttl=10)) as lab:
        n1 = lab.node(1)
        cfg = n1.config()
        assert cfg["store"] == "etcd://192.168.77.1:2379" and cfg["store_lease_ttl"] == 10
        assert (cfg["store_ca"], cfg["store_cert"], cfg["store_key"]) == (
            n1.store_tls.ca, n1.store_tls.cert, n1.store_tls.key)
        assert lab.etcd_url == "https://192.168.77.1:2379"
        lab.etcdctl("put", "k", "v", node=n1)
        assert lab.etcdctl("get", "--print-value-only", "k", node=lab.node(2)).stdout.strip() == "v"
        no_cert = n1.ns(["etcdctl", f"--endpoints={lab.etcd_url}", f"--cacert={n1.store_tls.ca}",
                         "--dial-timeout=1s", "--command-timeout=2s", "get", "k"], check=False)
        assert no_cert.returncode != 0
        made = inventory(lab)
    assert_nothing_left(made)


def test_the_vms_etcd_environment_file_runs_etcd(tmp_path):
    """/etc/default/etcd as vagrant/provision.sh writes it (`python -m lab.etcd env`), given to etcd
    the way Debian's etcd.service does (as its environment), in a namespace holding n1's address."""
    ns = f"lt{os.getpid() % 100000}-vm"
    data = tmp_path / "etcd"
    env_file = subprocess.run([sys.executable, "-m", "lab.etcd", "env", "--name", "n1", "--client-ip", "192.168.56.11",
                               "--data-dir", str(data)], cwd=REPO, capture_output=True, text=True, check=True).stdout
    env = dict(line.split("=", 1) for line in env_file.splitlines() if line and not line.startswith("#"))
    etcd_proc = None
    try:
        net.add_netns(ns)
        net.run("ip", "-n", ns, "link", "add", "eth1", "type", "veth", "peer", "name", "eth1-peer")  # no dummy driver
        net.run("ip", "-n", ns, "addr", "add", "192.168.56.11/24", "dev", "eth1")
        net.run("ip", "-n", ns, "link", "set", "eth1", "up")
        etcd_proc = subprocess.Popen(net.in_netns(ns, ["etcd"]), env={"PATH": os.environ["PATH"], **env},
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        health = ["etcdctl", "--endpoints=http://192.168.56.11:2379", "--dial-timeout=1s", "endpoint", "health"]
        deadline = time.monotonic() + 30
        while subprocess.run(net.in_netns(ns, health), capture_output=True).returncode != 0:
            assert etcd_proc.poll() is None, "etcd exited"
            assert time.monotonic() < deadline, "etcd not healthy after 30 s"
            time.sleep(0.2)
    finally:
        if etcd_proc:
            etcd_proc.kill()
            etcd_proc.wait(10)
        net.delete_netns(ns)
    assert not net.exists(ns)
