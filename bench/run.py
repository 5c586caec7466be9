"""`make bench`: L4 policy overhead, meshagent vs no agent vs iptables (SPEC §9, first comparison),
then the socket fast path vs plain loopback (bench/fastpath.py), then the L7 processor vs haproxy
(bench/l7.py), then the multi-node part on the node lab (bench/multinode.py: endpoint and policy
propagation, agent memory with 10,000 remote endpoints, cross-node RR/CRR), then the node's DNS
proxy vs dnsmasq (bench/dns.py). BENCH_ONLY=l4, fastpath, l7, multinode or dns runs one part; the
other parts' sections of bench/results/latest.json are then kept from the previous run.

Every configuration is its own "node": a network namespace with two endpoints (a: client, b:
server) plumbed by agent/endpoint.py itself (bench/topology.py: a veth per endpoint, /32 routes,
169.254.1.1 gateway with permanent neighbours, same addresses everywhere). Only the enforcement
differs:

    none           no programs, no firewall
    noop           a no-op TC program on both hooks of both host-side veths (baseline program cost)
    agent-10/1k/10k  the real agent (socket_fastpath off: this part measures TC); a
                   CiliumNetworkPolicy on b with N non-matching CIDR+port rules (N ipcache
                   prefixes) and, last, the rule that allows a
    iptables-1k/10k  no agent; FORWARD holds ESTABLISHED accept, the same N rules, the allow, a DROP
    iptables-1k/10k-ctlast  the same, ESTABLISHED accept after the allow: every packet walks them

All nodes exist at once, so a round measures every configuration back to back in a shuffled
order and the comparison is paired per round (these 2-core VMs drift by tens of percent between
minutes). Per configuration and round: TCP_RR and TCP_CRR with bench/rr.c, iperf3 throughput,
and for configurations with programs a short extra RR/CRR run with kernel.bpf_stats_enabled=1 to
read each program's run_time_ns / run_cnt (kept separate so the statistics' own cost does not
touch the rates).

Environment: BENCH_ROUNDS (5), BENCH_RR_SECONDS (3), BENCH_CRR_SECONDS (2), BENCH_IPERF_SECONDS
(2), BENCH_COST_SECONDS (1), BENCH_CONFIGS (comma list, default all), BENCH_CPU (CPU for the
traffic; default the last one), BENCH_SEED (shuffle seed).

Results: bench/results/latest.json and bench/results/latest.md (printed too). See bench/README.md.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from agent.files import write_atomic
from bench.harness import (
    BPFFS_DIR,
    CGROUP_DIR,
    PROBE,
    REPO,
    RESULTS_DIR,
    RR_BIN,
    BenchError,
    Janitor,
    build_rr,
    env_float,
    fmt,
    in_netns,
    log,
    paired,
    remove_cgroup_tree,
    run,
    seed,
    spawn,
    spread,
    stop_process,
    sysctl,
    traffic_cpu,
)
from bench.harness import (
    target as bench_target,
)
from bench.topology import IP_A, IP_B, NS_PREFIX, POD_CIDR, Endpoint, Node, add_netns, delete_netns, plain_node

MESHAGENT = [sys.executable, "-m", "cli.main"]  # the CLI of this checkout, whichever venv runs us

RR_PORT, IPERF_PORT = 7000, 5201
CLOSED_PORT = 7001  # nothing allows it: the probe that shows a configuration enforces
# The N non-matching rules: distinct /24s of 100.64.0.0/10 (16,384 of them), distinct ports.
RULE_NET = ipaddress.IPv4Network("100.64.0.0/10")
RULE_PORT_BASE = 10000

# The -ctlast variants put iptables' conntrack rule after the N rules, so that every packet, not
# only a connection's first, walks them.
CONFIGS = ("none", "noop", "agent-10", "agent-1k", "agent-10k", "iptables-1k", "iptables-10k",
           "iptables-1k-ctlast", "iptables-10k-ctlast")
RULES = {"agent-10": 10, "agent-1k": 1000, "agent-10k": 10000, "iptables-1k": 1000, "iptables-10k": 10000,
         "iptables-1k-ctlast": 1000, "iptables-10k-ctlast": 10000}
# Namespace tags: short, because endpoint names become interface hashes and netns names.
TAGS = {"none": "none", "noop": "noop", "agent-10": "ag10", "agent-1k": "ag1k", "agent-10k": "ag10k",
        "iptables-1k": "ipt1k", "iptables-10k": "ipt10k", "iptables-1k-ctlast": "ipt1kct",
        "iptables-10k-ctlast": "ipt10kct"}


# ---- settings ------------------------------------------------------------------------------------


PARTS = ("l4", "fastpath", "l7", "multinode", "dns")  # BENCH_ONLY


@dataclass(frozen=True)
class Settings:
    rounds: int
    rr_seconds: float
    crr_seconds: float
    iperf_seconds: float
    cost_seconds: float
    configs: tuple[str, ...]
    traffic_cpu: int | None  # rr/iperf3 client and server share it; None: no pinning
    seed: int

    @classmethod
    def from_env(cls) -> Settings:
        wanted = os.environ.get("BENCH_CONFIGS") or ",".join(CONFIGS)
        configs = tuple(c.strip() for c in wanted.split(",") if c.strip())
        unknown = [c for c in configs if c not in CONFIGS]
        if unknown:
            raise SystemExit(f"BENCH_CONFIGS: unknown {', '.join(unknown)}; known: {', '.join(CONFIGS)}")
        return cls(
            rounds=max(1, int(env_float("BENCH_ROUNDS", 5))),
            rr_seconds=env_float("BENCH_RR_SECONDS", 3),
            crr_seconds=env_float("BENCH_CRR_SECONDS", 2),
            iperf_seconds=env_float("BENCH_IPERF_SECONDS", 2),
            cost_seconds=env_float("BENCH_COST_SECONDS", 1),
            configs=configs,
            traffic_cpu=traffic_cpu(),
            seed=seed(),
        )


# ---- cleanup -------------------------------------------------------------------------------------


def remove_leftovers() -> None:
    """Remove what an earlier, killed bench run left: only our exact namespace names and dirs."""
    names = [f"{NS_PREFIX}{tag}{suffix}" for tag in TAGS.values() for suffix in ("-a", "-b", "")]
    for name in names:
        if os.path.exists(f"/run/netns/{name}"):
            log(f"removing netns {name} left by an earlier run")
            delete_netns(name)
    if BPFFS_DIR.exists():
        log(f"removing {BPFFS_DIR} left by an earlier run")
        shutil.rmtree(BPFFS_DIR, ignore_errors=True)
    remove_cgroup_tree(CGROUP_DIR)


# ---- the rule sets -------------------------------------------------------------------------------


def rule_prefixes(n: int) -> list[tuple[str, int]]:
    """N distinct (/24 prefix, port) pairs; none of them covers endpoint a."""
    subnets = RULE_NET.subnets(new_prefix=24)
    return [(str(next(subnets)), RULE_PORT_BASE + i) for i in range(n)]


def cnp_document(n: int) -> dict:
    """A CiliumNetworkPolicy on b: N non-matching CIDR+port rules, then the one that allows a."""
    rules: list[dict] = [
        {"fromCIDR": [prefix], "toPorts": [{"ports": [{"port": str(port), "protocol": "TCP"}]}]}
        for prefix, port in rule_prefixes(n)
    ]
    rules.append({
        "fromEndpoints": [{"matchLabels": {"app": "bench-a"}}],
        "toPorts": [{"ports": [{"port": str(RR_PORT), "protocol": "TCP"},
                               {"port": str(IPERF_PORT), "protocol": "TCP"}]}],
    })
    return {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": f"bench-{n}", "namespace": "default"},
        "spec": {"endpointSelector": {"matchLabels": {"app": "bench-b"}}, "ingress": rules},
    }


def iptables_ruleset(n: int, conntrack_first: bool = True) -> str:
    """The same policy for iptables-restore: N non-matching rules, the allow, a DROP for the rest
    to b, and an ESTABLISHED accept. First (like the agent's CT: the rules decide only a flow's
    first packet) or, for the -ctlast variants, after the allow (every packet walks the rules)."""
    established = "-A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"
    lines = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
    lines += [established] if conntrack_first else []
    lines += [f"-A FORWARD -s {prefix} -d {IP_B}/32 -p tcp -m tcp --dport {port} -j ACCEPT"
              for prefix, port in rule_prefixes(n)]
    lines += [f"-A FORWARD -s {IP_A}/32 -d {IP_B}/32 -p tcp -m multiport --dports {RR_PORT},{IPERF_PORT} "
              "-j ACCEPT"]
    lines += [] if conntrack_first else [established]
    lines += [f"-A FORWARD -d {IP_B}/32 -j DROP", "COMMIT", ""]
    return "\n".join(lines)


def iptables_node(config: str, janitor: Janitor) -> Node:
    node = plain_node(config, NS_PREFIX + TAGS[config], janitor)
    n = RULES[config]
    started = time.monotonic()
    ruleset = iptables_ruleset(n, conntrack_first=not config.endswith("-ctlast"))
    run(in_netns(node.netns, ["iptables-restore"]), input=ruleset)

    def remove() -> None:
        # iptables-nft leaves `table ip filter` hooked in after -F/-X (KERNEL-NOTES.md).
        run(in_netns(node.netns, ["iptables", "-F"]), check=False)
        run(in_netns(node.netns, ["iptables", "-X"]), check=False)
        run(in_netns(node.netns, ["nft", "delete", "table", "ip", "filter"]), check=False)

    janitor.push(f"remove iptables rules of {node.netns}", remove)
    count = run(in_netns(node.netns, ["iptables", "-S", "FORWARD"])).stdout.count("\n-A FORWARD")
    node.notes.update(rules=n, forward_rules=count, load_seconds=round(time.monotonic() - started, 2),
                      conntrack="last" if config.endswith("-ctlast") else "first")
    node.expect_enforcing = True
    return node


# ---- the no-op program ---------------------------------------------------------------------------

NOOP_C = "int noop(struct __sk_buff *skb) { return 0; /* TC_ACT_OK */ }"


def noop_node(janitor: Janitor) -> Node:
    """Both host-side veths get a no-op program on the hooks the agent uses (clsact ingress and
    egress): its bpf_stats cost is the floor any TC program pays, measurement included."""
    node = plain_node("noop", NS_PREFIX + TAGS["noop"], janitor)
    from bcc import BPF  # Debian's python3-bpfcc, seen through --system-site-packages

    prog = BPF(text=NOOP_C).load_func("noop", BPF.SCHED_CLS)
    BPFFS_DIR.mkdir(parents=True, exist_ok=True)
    pin = BPFFS_DIR / "noop"
    from bcc import libbcc

    if libbcc.lib.bpf_obj_pin(prog.fd, str(pin).encode()) != 0:
        raise BenchError(f"cannot pin the no-op program at {pin}")
    janitor.push(f"unpin {pin}", lambda: pin.unlink(missing_ok=True))
    def tc(*args: str, check: bool = True) -> None:
        run(in_netns(node.netns, ["tc", *args]), check=check)

    for ep in (node.a, node.b):
        tc("qdisc", "add", "dev", ep.ifname, "clsact")
        janitor.push(f"delete clsact of {ep.ifname}",
                     lambda ep=ep: tc("qdisc", "del", "dev", ep.ifname, "clsact", check=False))
        for hook in ("ingress", "egress"):
            tc("filter", "add", "dev", ep.ifname, hook, "prio", "1", "handle", "1",
               "bpf", "object-pinned", str(pin), "direct-action")
    node.programs = True
    return node


# ---- the agent -----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AgentNode:
    """A node run by the real agent: endpoints through its API, the policy through `apply`."""

    def __init__(self, config: str, janitor: Janitor, tmp: Path):
        self.config = config
        self.janitor = janitor
        self.tag = TAGS[config]
        self.netns = NS_PREFIX + self.tag
        self.dir = tmp / self.tag
        self.dir.mkdir(parents=True)
        self.node_config = {
            "node_name": self.netns,
            "pod_cidr": POD_CIDR,
            "store": f"dir://{self.dir}/store",
            "state_dir": str(self.dir / "state"),
            "bpffs_dir": str(BPFFS_DIR / self.tag),
            "cgroup": str(CGROUP_DIR / self.tag),
            "api_socket": str(self.dir / "api.sock"),
            "metrics_addr": f"127.0.0.1:{_free_port()}",
            # This part measures the TC policy datapath. With the socket fast path, a same-node
            # connection's data skips TC altogether; bench/fastpath.py measures that.
            "socket_fastpath": False,
        }
        self.config_path = self.dir / "agent.yaml"
        self.config_path.write_text(yaml.safe_dump(self.node_config))
        self.log_path = self.dir / "agent.log"
        self.proc: subprocess.Popen | None = None

    def cli(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
        return run([*MESHAGENT, "--socket", self.node_config["api_socket"], *args], cwd=REPO, timeout=timeout)

    def start(self, housekeeping: set[int]) -> None:
        add_netns(self.janitor, self.netns)
        run(["ip", "-n", self.netns, "link", "set", "lo", "up"])
        self.janitor.push(f"tear down agent node {self.netns}", self.teardown)
        log_file = open(self.log_path, "a")
        self.janitor.push("close agent log", log_file.close)
        # The agent is control plane: keep it off the CPU that carries the measured traffic.
        pin = ["taskset", "-c", ",".join(map(str, sorted(housekeeping)))] if housekeeping else []
        self.proc = subprocess.Popen(
            [*pin, *in_netns(self.netns, [*MESHAGENT, "agent", "--config", str(self.config_path)])],
            cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        sock = self.node_config["api_socket"]
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise BenchError(f"agent exited ({self.proc and self.proc.returncode}): {self.log_tail()}")
            status = run([*MESHAGENT, "--socket", sock, "status"], cwd=REPO, check=False, timeout=30)
            if status.returncode == 0:
                return
            time.sleep(0.3)
        raise BenchError(f"agent not ready after {timeout:.0f}s: {self.log_tail()}")

    def log_tail(self, lines: int = 6) -> str:
        try:
            return " | ".join(self.log_path.read_text().strip().splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def build(self, n_rules: int) -> Node:
        self.wait_ready()
        a = json.loads(self.cli("endpoint", "add", f"{self.netns}-a", "--labels", "app=bench-a",
                                "--ip", IP_A, "-o", "json").stdout)
        b = json.loads(self.cli("endpoint", "add", f"{self.netns}-b", "--labels", "app=bench-b",
                                "--ip", IP_B, "-o", "json").stdout)
        policy = self.dir / "policy.yaml"
        policy.write_text(yaml.safe_dump(cnp_document(n_rules), sort_keys=False))
        started = time.monotonic()
        self.apply(policy)
        apply_seconds = time.monotonic() - started
        ipcache = json.loads(self.cli("bpf", "ipcache", "list", "-o", "json").stdout)
        node = Node(
            config=self.config, netns=self.netns, expect_enforcing=True, programs=True,
            a=Endpoint(netns=Path(a["netns"]).name, ip=a["ip"], ifname=a["ifname"]),
            b=Endpoint(netns=Path(b["netns"]).name, ip=b["ip"], ifname=b["ifname"]),
        )
        node.notes.update(rules=n_rules + 1, ipcache_entries=len(ipcache),
                          apply_seconds=round(apply_seconds, 1))
        return node

    def apply(self, path: Path) -> None:
        """`meshagent apply -f`, through the same client the CLI uses but without its 60 s reply
        timeout: the agent answers only after compiling and writing the maps, which takes longer
        than that for 10,000 CIDR rules (reported as apply_seconds)."""
        if str(REPO) not in sys.path:
            sys.path.insert(0, str(REPO))
        from agent.client import AgentClient
        from agent.resources import load_paths

        documents = [{"where": getattr(r, "where", str(path)), "body": r.body}
                     for r in load_paths([str(path)])]
        AgentClient(self.node_config["api_socket"], timeout=900).call("apply", documents=documents)

    def teardown(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, grace=20)
        run(in_netns(self.netns, [*MESHAGENT, "teardown", "--config", str(self.config_path), "--endpoints"]),
            cwd=REPO, check=False)
        for suffix in ("-a", "-b"):  # if the agent's teardown could not remove them
            delete_netns(f"{self.netns}{suffix}")
        shutil.rmtree(self.node_config["bpffs_dir"], ignore_errors=True)
        remove_cgroup_tree(Path(self.node_config["cgroup"]))


# ---- measuring -----------------------------------------------------------------------------------



class Meter:
    """Runs the load generators of one node; client and server share settings.traffic_cpu."""

    def __init__(self, settings: Settings, janitor: Janitor):
        self.s = settings
        self.janitor = janitor

    def pinned(self, cmd: list[str]) -> list[str]:
        return ["taskset", "-c", str(self.s.traffic_cpu), *cmd] if self.s.traffic_cpu is not None else cmd

    def start_servers(self, node: Node) -> None:
        b = node.b.netns
        spawn(self.janitor, f"rr server in {b}",
              in_netns(b, self.pinned([str(RR_BIN), "server", str(RR_PORT)])))
        spawn(self.janitor, f"iperf3 server in {b}",
              in_netns(b, self.pinned(["iperf3", "-s", "-p", str(IPERF_PORT)])))
        deadline = time.monotonic() + 10
        while self.probe(node, RR_PORT) != "open" or self.probe(node, IPERF_PORT) != "open":
            if time.monotonic() > deadline:
                raise BenchError(f"{node.config}: a cannot reach the servers in b "
                                 f"({IP_B}:{RR_PORT}, :{IPERF_PORT})")
            time.sleep(0.2)

    def probe(self, node: Node, port: int) -> str:
        return run(in_netns(node.a.netns, [sys.executable, "-c", PROBE, node.b.ip, str(port)]),
                   check=False, timeout=10).stdout.strip()

    def check_enforcement(self, node: Node) -> None:
        """A port no rule allows must be dropped where a policy is expected, refused elsewhere."""
        got = self.probe(node, CLOSED_PORT)
        want = "timeout" if node.expect_enforcing else "refused"
        if got != want:
            raise BenchError(f"{node.config}: a connection to b:{CLOSED_PORT} was {got}, expected {want} "
                             f"({'not enforcing' if node.expect_enforcing else 'something drops traffic'})")

    def rr(self, node: Node, mode: str, seconds: float) -> dict:
        args = [str(RR_BIN), mode, node.b.ip, str(RR_PORT), f"{seconds:g}"]
        cmd = in_netns(node.a.netns, self.pinned(args))
        return json.loads(run(cmd, timeout=seconds + 30).stdout)

    def iperf(self, node: Node, seconds: float) -> float:
        """Gbit/s received, one TCP stream."""
        cmd = in_netns(node.a.netns, self.pinned(["iperf3", "-c", node.b.ip, "-p", str(IPERF_PORT),
                                                  "-t", f"{seconds:g}", "-J"]))
        out = json.loads(run(cmd, timeout=seconds + 30).stdout)
        if "error" in out:
            raise BenchError(f"iperf3: {out['error']}")
        return out["end"]["sum_received"]["bits_per_second"] / 1e9

    def measure(self, node: Node) -> dict[str, float]:
        rr = self.rr(node, "client", self.s.rr_seconds)
        crr = self.rr(node, "crr", self.s.crr_seconds)
        sample = {
            "rr_rate": rr["rate"], "rr_p50_us": rr["p50_us"], "rr_p99_us": rr["p99_us"],
            "crr_rate": crr["rate"], "crr_p50_us": crr["p50_us"], "crr_p99_us": crr["p99_us"],
            "iperf_gbps": self.iperf(node, self.s.iperf_seconds),
        }
        if node.programs:
            sample.update(self.program_cost(node))
        return sample

    def program_cost(self, node: Node) -> dict[str, float]:
        """Over an RR and a CRR run with bpf_stats on (only for these runs): ns per program run,
        and program runs and ns per transaction, which is what a transaction's latency pays."""
        ids = node.prog_ids()
        if not ids:
            raise BenchError(f"{node.config}: no TC programs attached to {node.a.ifname}/{node.b.ifname}")
        out: dict[str, float] = {}
        with sysctl("kernel.bpf_stats_enabled", "1"):
            for mode, test in (("client", "rr"), ("crr", "crr")):
                before = prog_stats(ids)
                transactions = self.rr(node, mode, self.s.cost_seconds)["transactions"]
                after = prog_stats(ids)
                ns = sum(after[i][0] - before[i][0] for i in ids)
                runs = sum(after[i][1] - before[i][1] for i in ids)
                if runs and transactions:
                    out[f"bpf_ns_{test}"] = ns / runs
                    out[f"bpf_runs_per_{test}"] = runs / transactions
                    out[f"bpf_ns_per_{test}"] = ns / transactions
        return out


def prog_stats(ids: dict[int, str]) -> dict[int, tuple[int, int]]:
    """(run_time_ns, run_cnt) per program id."""
    stats = {}
    for prog in json.loads(run(["bpftool", "-j", "prog", "show"]).stdout):
        if prog.get("id") in ids:
            stats[prog["id"]] = (int(prog.get("run_time_ns", 0)), int(prog.get("run_cnt", 0)))
    missing = set(ids) - set(stats)
    if missing:
        raise BenchError(f"programs {sorted(missing)} are gone")
    return stats


# ---- summarising ---------------------------------------------------------------------------------

METRICS = ("rr_rate", "rr_p50_us", "rr_p99_us", "crr_rate", "crr_p50_us", "crr_p99_us", "iperf_gbps",
           "bpf_ns_rr", "bpf_ns_crr", "bpf_runs_per_rr", "bpf_runs_per_crr", "bpf_ns_per_rr", "bpf_ns_per_crr")


def summarise(samples: dict[str, list[dict | None]]) -> tuple[dict, dict, list[dict]]:
    summary = {
        config: {m: spread([r.get(m) if r else None for r in rounds]) for m in METRICS}
        for config, rounds in samples.items()
    }
    summary = {c: {m: v for m, v in ms.items() if v} for c, ms in summary.items()}
    ratios: dict[str, Any] = {}
    for agent in ("agent-10", "agent-1k", "agent-10k"):
        for metric in ("rr_rate", "crr_rate", "iperf_gbps"):
            ratios[f"{agent}/none {metric}"] = paired(samples, agent, "none", metric)
        for metric in ("bpf_ns_rr", "bpf_ns_crr"):
            ratios[f"{agent} - noop {metric}"] = paired(samples, agent, "noop", metric, lambda x, y: x - y)
    for n in ("1k", "10k"):
        for ipt in (f"iptables-{n}", f"iptables-{n}-ctlast"):
            for metric in ("rr_rate", "crr_rate", "iperf_gbps"):
                ratios[f"agent-{n}/{ipt} {metric}"] = paired(samples, f"agent-{n}", ipt, metric)
    for metric in ("bpf_ns_rr", "bpf_ns_crr"):
        ratios[f"agent-10k - agent-10 {metric}"] = paired(samples, "agent-10k", "agent-10", metric,
                                                       lambda x, y: x - y)
    ratios = {k: v for k, v in ratios.items() if v}

    def target(name: str, key: str, ok: Callable[[float], bool], goal: str) -> dict:
        return bench_target(ratios, name, key, ok, goal)

    targets = []
    for agent in ("agent-10", "agent-1k", "agent-10k"):
        for metric in ("bpf_ns_rr", "bpf_ns_crr"):
            targets.append(target("program cost above no-op", f"{agent} - noop {metric}", lambda v: v <= 300,
                                  "<= 300 ns"))
    for agent in ("agent-10", "agent-1k", "agent-10k"):
        targets.append(target("RR rate vs no agent", f"{agent}/none rr_rate", lambda v: v >= 0.97,
                              ">= 0.97x"))
    for n, goal in (("1k", 3), ("10k", 20)):
        for ipt in (f"iptables-{n}", f"iptables-{n}-ctlast"):
            for metric in ("rr_rate", "crr_rate"):
                targets.append(target(f"rate vs iptables-nft, {n} rules", f"agent-{n}/{ipt} {metric}",
                                      lambda v, goal=goal: v >= goal, f">= {goal}x"))
    for metric in ("bpf_ns_rr", "bpf_ns_crr"):  # SPEC gives no threshold for "flat"
        targets.append(target("program cost flat in rules", f"agent-10k - agent-10 {metric}",
                              lambda v: None, "~0 ns"))
    return summary, ratios, targets


# ---- report --------------------------------------------------------------------------------------


def markdown(result: dict) -> str:
    """Every section present: L4 (the top-level keys), fast path, L7, multi-node, DNS (their own keys)."""
    parts = [markdown_l4(result)] if "summary" in result else []
    if "fastpath" in result:
        from bench import fastpath

        parts.append(fastpath.markdown(result["fastpath"]))
    if "l7" in result:
        from bench import l7

        parts.append(l7.markdown(result["l7"]))
    if "multinode" in result:
        from bench import multinode

        parts.append(multinode.markdown(result["multinode"]))
    if "dns" in result:
        from bench import dns

        parts.append(dns.markdown(result["dns"]))
    return "\n".join(parts)


def markdown_l4(result: dict) -> str:
    s = result["settings"]
    lines = [
        "# meshagent bench: L4 policy overhead",
        "",
        f"{result['started']} · kernel {result['machine']['kernel']} · {result['machine']['cpus']} CPUs · "
        f"{s['rounds']} rounds, configurations interleaved in shuffled order (seed {s['seed']}) · "
        f"RR {s['rr_seconds']:g} s, CRR {s['crr_seconds']:g} s, iperf3 {s['iperf_seconds']:g} s per round · "
        f"traffic on CPU {s['traffic_cpu']}",
        "",
        "Each cell: median (min–max) over rounds.",
        "",
        "| configuration | RR trans/s | RR p50 µs | RR p99 µs | CRR conn/s | CRR p50 µs | iperf3 Gbit/s "
        "| BPF ns/run (RR) | BPF ns/run (CRR) | BPF ns per RR trans. | BPF ns per CRR trans. |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for config in result["settings"]["configs"]:
        if config in result["skipped"]:
            lines.append(f"| {config} | skipped: {result['skipped'][config]} |||||||||| ")
            continue
        m = result["summary"].get(config, {})
        lines.append(
            f"| {config} | {fmt(m.get('rr_rate'))} | {fmt(m.get('rr_p50_us'), 1)} "
            f"| {fmt(m.get('rr_p99_us'), 1)} "
            f"| {fmt(m.get('crr_rate'))} | {fmt(m.get('crr_p50_us'), 1)} | {fmt(m.get('iperf_gbps'), 2)} "
            f"| {fmt(m.get('bpf_ns_rr'))} | {fmt(m.get('bpf_ns_crr'))} "
            f"| {fmt(m.get('bpf_ns_per_rr'))} | {fmt(m.get('bpf_ns_per_crr'))} |"
        )
    lines += ["", "Paired per round (x/y: ratio; x - y: difference in ns per program run):", "",
              "| comparison | median (min–max) |", "|---|---|"]
    for key, stat in result["ratios"].items():
        unit = " ns" if "bpf_ns" in key else ""
        lines.append(f"| {key}{unit} | {fmt(stat, 0 if unit else 3)} |")
    lines += ["", "Targets:", "", "| target | measure | goal | median | met |", "|---|---|---|---|---|"]
    for t in result["targets"]:
        if t["median"] is None:
            med = "-"
        else:
            med = f"{t['median']:,.3f}x" if t["goal"].endswith("x") else f"{t['median']:,.0f} ns"
        if t["median"] is None:
            met = "not measured"
        else:
            met = {True: "yes", False: "**no**", None: "(no threshold)"}[t["met"]]
        lines.append(f"| {t['target']} | {t['measure']} | {t['goal']} | {med} | {met} |")
    notes = {c: n for c, n in result["notes"].items() if n}
    if notes:
        lines += ["", "Set-up: " + "; ".join(
            f"{c}: " + ", ".join(f"{k} {v}" for k, v in n.items()) for c, n in notes.items())]
    if result["skipped"]:
        lines += ["", "Skipped: " + "; ".join(f"{c}: {why}" for c, why in result["skipped"].items())]
    return "\n".join(lines) + "\n"


def write_results(result: dict) -> str:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    text = markdown(result)
    for name, content in (("latest.json", json.dumps(result, indent=2) + "\n"), ("latest.md", text)):
        write_atomic(str(RESULTS_DIR / name), content, mode=0o644, dir_mode=0o755)
    return text


# ---- the run -------------------------------------------------------------------------------------


def preflight() -> None:
    if os.geteuid() != 0:
        raise SystemExit("make bench needs root (network namespaces, BPF, iptables)")
    tools = ("gcc", "iperf3", "bpftool", "tc", "ip", "nsenter", "taskset", "iptables-restore", "nft")
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise SystemExit(f"missing tools: {', '.join(missing)} (`make install` installs them)")


def setup(settings: Settings, janitor: Janitor, tmp: Path, housekeeping: set[int],
          skipped: dict[str, str]) -> dict[str, Node]:
    nodes: dict[str, Node] = {}
    # Agents first and all at once: their BCC compiles overlap with building the other nodes.
    agents = {c: AgentNode(c, janitor, tmp) for c in settings.configs if c.startswith("agent-")}
    for config, agent in agents.items():
        try:
            agent.start(housekeeping)
            log(f"{config}: agent starting in {agent.netns} (log {agent.log_path})")
        except Exception as e:
            skipped[config] = f"agent did not start: {e}"
    for config in settings.configs:
        if config.startswith("agent-"):
            continue
        try:
            if config == "none":
                nodes[config] = plain_node(config, NS_PREFIX + TAGS[config], janitor)
            elif config == "noop":
                nodes[config] = noop_node(janitor)
            else:
                nodes[config] = iptables_node(config, janitor)
            log(f"{config}: ready in {nodes[config].netns} {nodes[config].notes or ''}")
        except Exception as e:
            skipped[config] = str(e)
            log(f"{config}: SKIPPED: {e}")
    for config, agent in agents.items():
        if config in skipped:
            continue
        try:
            log(f"{config}: waiting for the agent, then endpoints and a policy with {RULES[config]:,} rules")
            nodes[config] = agent.build(RULES[config])
            log(f"{config}: ready {nodes[config].notes}")
        except Exception as e:
            skipped[config] = f"agent not working: {e}"
            log(f"{config}: SKIPPED: {skipped[config]}")
    return nodes


def main() -> int:
    only = os.environ.get("BENCH_ONLY", "")
    if only not in ("", *PARTS):
        raise SystemExit(f"BENCH_ONLY: one of {', '.join(PARTS)} (default: all)")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind through the cleanups
    result: dict[str, Any] = {}
    if only:  # keep the sections of the parts not run from the previous results
        with contextlib.suppress(OSError, ValueError):
            previous = json.loads((RESULTS_DIR / "latest.json").read_text())
            own = {"l7": ("l7",), "fastpath": ("fastpath",), "multinode": ("multinode",), "dns": ("dns",)}.get(only)
            result = {k: v for k, v in previous.items()
                      if (k not in own if own else k in ("l7", "fastpath", "multinode", "dns"))}
    rounds = int(env_float("BENCH_ROUNDS", 5))
    if only in ("", "l4"):
        result.update(run_l4())
    if only in ("", "fastpath"):
        from bench import fastpath

        result["fastpath"] = fastpath.run(rounds)
    if only in ("", "l7"):
        from bench import l7

        result["l7"] = l7.run(rounds, RESULTS_DIR)
    if only in ("", "multinode"):
        from bench import multinode

        result["multinode"] = multinode.run(rounds)
    if only in ("", "dns"):
        from bench import dns

        result["dns"] = dns.run(rounds)
    print()
    print(write_results(result))
    log(f"wrote {RESULTS_DIR.relative_to(REPO)}/latest.json and latest.md")
    return 0


def run_l4() -> dict[str, Any]:
    preflight()
    settings = Settings.from_env()
    cpus = set(os.sched_getaffinity(0))
    housekeeping = cpus - {settings.traffic_cpu} if settings.traffic_cpu is not None else cpus
    os.sched_setaffinity(0, housekeeping)  # this script and the agents stay off the traffic CPU
    janitor = Janitor()
    tmp = Path(tempfile.mkdtemp(prefix="meshagent-bench-"))
    janitor.push(f"remove {tmp}", lambda: shutil.rmtree(tmp, ignore_errors=True))
    janitor.push(f"remove {BPFFS_DIR} and {CGROUP_DIR}",
                 lambda: (shutil.rmtree(BPFFS_DIR, ignore_errors=True), remove_cgroup_tree(CGROUP_DIR)))
    skipped: dict[str, str] = {}
    nodes: dict[str, Node] = {}
    samples: dict[str, list[dict | None]] = {}
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    try:
        remove_leftovers()
        build_rr()
        nodes = setup(settings, janitor, tmp, housekeeping, skipped)
        meter = Meter(settings, janitor)
        for config, node in list(nodes.items()):
            try:
                meter.start_servers(node)
                meter.check_enforcement(node)
                meter.rr(node, "client", 0.5)  # warm-up: caches, neighbours, first CT entries
            except Exception as e:
                skipped[config] = str(e)
                log(f"{config}: SKIPPED: {e}")
                del nodes[config]
        rng = random.Random(settings.seed)
        samples = {c: [] for c in nodes}
        for round_no in range(1, settings.rounds + 1):
            order = list(nodes)
            rng.shuffle(order)
            for config in order:
                try:
                    sample = meter.measure(nodes[config])
                except Exception as e:  # one bad sample does not end the run
                    log(f"round {round_no}/{settings.rounds} {config}: FAILED: {e}")
                    samples[config].append(None)
                    continue
                samples[config].append(sample)
                cost = "".join(f" bpf {sample[k]:.0f} ns" if k in sample else "" for k in ("bpf_ns_rr",))
                log(f"round {round_no}/{settings.rounds} {config:13} RR {sample['rr_rate']:8,.0f}/s "
                    f"(p50 {sample['rr_p50_us']:.1f} µs)  CRR {sample['crr_rate']:6,.0f}/s  "
                    f"iperf3 {sample['iperf_gbps']:5.2f} Gbit/s{cost}")
    finally:
        log("cleaning up")
        janitor.run_all()
        os.sched_setaffinity(0, cpus)
    summary, ratios, targets = summarise(samples)
    result = {
        "started": started,
        "machine": {"kernel": platform.release(), "cpus": os.cpu_count(),
                    "iptables": run(["iptables", "-V"], check=False).stdout.strip()},
        "settings": {**settings.__dict__, "configs": list(settings.configs)},
        "skipped": skipped,
        "notes": {c: n.notes for c, n in nodes.items()},
        "summary": summary,
        "ratios": ratios,
        "targets": targets,
        "samples": samples,
    }
    return result


if __name__ == "__main__":
    sys.exit(main())
