"""`make bench`, fast-path part: the sk_msg socket fast path (bpf/lib/sockmap.h) vs plain loopback.

One network namespace stands for an endpoint; its cookie is registered with a SocketDatapath
loaded into a bench-only bpffs directory, exactly as the agent registers an endpoint's. The same
client and server (bench/rr.c, iperf3) run on 127.0.0.1 inside it, pinned to one CPU, with the
fast path off and on, in a shuffled order each round. The switch is the fastpath_config flag: it
decides for connections established after it, and every measurement opens its own.

    rr 64 B      bench/rr.c TCP_RR, 64-byte request and response: p50/p99 latency and rate
    pod rr 64 B  the same between two endpoints of one node, laid out as the agent lays them out
                 (veths, /32 routes; bench/topology.py plain_node): the path a mesh connection takes
    rr 64 KiB    the same with 64 KiB messages
    iperf3       one-way bulk, client and server on one CPU: the reader runs only when the writer
                 yields, so the writer goes to TCP whenever 16 MiB sit unread at the reader
                 (FASTPATH_QUEUE_BUDGET, lib/sockmap.h) and comes back once it has caught up;
                 the table counts how often (queue-full fallbacks per run)

Targets (the issue): p50 with the fast path <= 0.7x plain loopback; never slower on bulk.

Environment: BENCH_ROUNDS (5), BENCH_FP_SECONDS (3), BENCH_CPU (bench/harness.py).
`python -m bench.fastpath` runs this part alone and prints its Markdown.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.datapath.sockets import SocketDatapath, netns_cookie  # noqa: E402
from bench import harness  # noqa: E402
from bench.topology import NS_PREFIX, POD_CIDR, Node, add_netns, plain_node  # noqa: E402

MODES = ("off", "on")
PORT_RR, PORT_IPERF = 7100, 7101


def _rmdir_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):  # another part's pins may still be in it
        path.rmdir()


def _stat(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


class FastpathBench:
    def __init__(self, janitor: harness.Janitor, cpu: int | None, seconds: float) -> None:
        self.janitor, self.cpu, self.seconds = janitor, cpu, seconds
        tag = uuid.uuid4().hex[:6]
        self.netns = f"mabfp-{tag}"
        self.node: Node | None = None
        self.pin_dir = str(harness.BPFFS_DIR / f"fp-{tag}")
        self.dp: SocketDatapath | None = None

    def pinned(self, cmd: list[str]) -> list[str]:
        return ["taskset", "-c", str(self.cpu), *cmd] if self.cpu is not None else cmd

    def start(self) -> None:
        add_netns(self.janitor, self.netns)
        harness.run(["ip", "-n", self.netns, "link", "set", "lo", "up"])
        self.dp = SocketDatapath(self.pin_dir, {"LB_BACKEND_MAP_SIZE": 64, "LB_REVNAT_MAP_SIZE": 64,
                                                  "LB_SERVICE_MAP_SIZE": 64, "ENDPOINT_NETNS_MAP_SIZE": 64})
        self.janitor.push(f"remove {harness.BPFFS_DIR} if empty", lambda: _rmdir_quietly(harness.BPFFS_DIR))
        self.janitor.push(f"remove {self.pin_dir}", lambda: shutil.rmtree(self.pin_dir, ignore_errors=True))
        self.dp.load()
        self.janitor.push("detach the fast-path bench's socket programs",
                          lambda: SocketDatapath(self.pin_dir).detach())
        self.dp.attach()
        self.dp.set_endpoint_netns(netns_cookie(f"/run/netns/{self.netns}"), ep_id=1, identity=1001)
        self.node = plain_node("none", NS_PREFIX + "none", self.janitor)  # the L4 part's "none" node, afresh
        for ep_id, ep in enumerate((self.node.a, self.node.b), start=2):
            self.dp.set_endpoint_netns(netns_cookie(f"/run/netns/{ep.netns}"), ep_id=ep_id, identity=1000 + ep_id)
        rr = harness.build_rr()
        harness.spawn(self.janitor, "rr server (fast path)",
                      harness.in_netns(self.netns, self.pinned([str(rr), "server", str(PORT_RR)])))
        harness.spawn(self.janitor, "rr server (fast path, endpoint b)",
                      harness.in_netns(self.node.b.netns, self.pinned([str(rr), "server", str(PORT_RR)])))
        harness.spawn(self.janitor, "iperf3 server (fast path, endpoint b)",
                      harness.in_netns(self.node.b.netns, self.pinned(["iperf3", "-s", "-p", str(PORT_IPERF)])))
        loopback_iperf3 = ["iperf3", "-s", "-B", "127.0.0.1", "-p", str(PORT_IPERF)]
        harness.spawn(self.janitor, "iperf3 server (fast path)",
                      harness.in_netns(self.netns, self.pinned(loopback_iperf3)))
        time.sleep(0.5)

    def set_mode(self, mode: str) -> None:
        self.dp.set_fastpath(mode == "on", pod_cidr=POD_CIDR)

    def rr(self, size: int, netns: str | None = None, host: str = "127.0.0.1") -> dict[str, float]:
        cmd = [str(harness.RR_BIN), "client", host, str(PORT_RR), str(self.seconds), str(size)]
        out = harness.run(harness.in_netns(netns or self.netns, self.pinned(cmd)), timeout=self.seconds + 30)
        return json.loads(out.stdout.strip().splitlines()[-1])

    def iperf(self, netns: str | None = None, host: str = "127.0.0.1") -> float:
        cmd = ["iperf3", "-c", host, "-p", str(PORT_IPERF), "-t", str(self.seconds), "-J"]
        out = harness.run(harness.in_netns(netns or self.netns, self.pinned(cmd)), timeout=self.seconds + 30)
        return json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"] / 1e9

    def measure(self, mode: str) -> dict[str, float]:
        self.set_mode(mode)
        before = self.dp.fastpath_summary()["counters"]
        small, large = self.rr(64), self.rr(65536)
        pod = self.rr(64, self.node.a.netns, self.node.b.ip)
        gbps = self.iperf()
        pod_gbps = self.iperf(self.node.a.netns, self.node.b.ip)
        after = self.dp.fastpath_summary()["counters"]
        redirected = after["redirected"]["bytes"] - before["redirected"]["bytes"]
        queue_full = after["pass_queue_full"]["messages"] - before["pass_queue_full"]["messages"]
        return {"rr64_p50_us": small["p50_us"], "rr64_p99_us": small["p99_us"], "rr64_rate": small["rate"],
                "rr64k_p50_us": large["p50_us"], "rr64k_rate": large["rate"], "iperf_gbps": gbps,
                "pod_rr64_p50_us": pod["p50_us"], "pod_rr64_rate": pod["rate"], "pod_iperf_gbps": pod_gbps,
                "redirected_mib": redirected / (1 << 20), "queue_full": queue_full}


def run(rounds: int) -> dict[str, Any]:
    cpu, seed = harness.traffic_cpu(), harness.seed()
    seconds = harness.env_float("BENCH_FP_SECONDS", 3)
    janitor = harness.Janitor()
    bench = FastpathBench(janitor, cpu, seconds)
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    samples: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    ratios: list[dict[str, float]] = []
    rng = random.Random(seed)
    try:
        bench.start()
        harness.log(f"fastpath: loopback in {bench.netns}, {rounds} rounds of off/on")
        for r in range(rounds):
            order = list(MODES)
            rng.shuffle(order)
            got = {m: bench.measure(m) for m in order}
            for m in MODES:
                samples[m].append(got[m])
            ratios.append({
                "rr64_p50": got["on"]["rr64_p50_us"] / got["off"]["rr64_p50_us"],
                "rr64_rate": got["on"]["rr64_rate"] / got["off"]["rr64_rate"],
                "rr64k_rate": got["on"]["rr64k_rate"] / got["off"]["rr64k_rate"],
                "iperf": got["on"]["iperf_gbps"] / got["off"]["iperf_gbps"],
                "pod_rr64_p50": got["on"]["pod_rr64_p50_us"] / got["off"]["pod_rr64_p50_us"],
                "pod_iperf": got["on"]["pod_iperf_gbps"] / got["off"]["pod_iperf_gbps"],
            })
            off, on = got["off"], got["on"]
            harness.log(f"fastpath round {r + 1}: p50 {off['rr64_p50_us']:.1f} -> {on['rr64_p50_us']:.1f} us,"
                        f" 64KiB rr {off['rr64k_rate']:,.0f} -> {on['rr64k_rate']:,.0f}/s,"
                        f" iperf3 {off['iperf_gbps']:.1f} -> {on['iperf_gbps']:.1f} Gbit/s")
    finally:
        janitor.run_all()
    summary = {m: {k: _stat([s[k] for s in samples[m]]) for k in samples[m][0]} for m in MODES if samples[m]}
    ratio = {k: _stat([r[k] for r in ratios]) for k in ratios[0]} if ratios else {}
    return {"started": started, "rounds": rounds, "seconds": seconds, "cpu": cpu,
            "samples": samples, "summary": summary, "ratios": ratio,
            "targets": {"rr64_p50": {"goal": "<= 0.70", "met": bool(ratio) and ratio["rr64_p50"]["median"] <= 0.70},
                        "bulk": {"goal": ">= 1.0 (64 KiB rr, iperf3 on loopback and pod to pod)",
                                 "met": bool(ratio) and min(ratio["rr64k_rate"]["median"], ratio["iperf"]["median"],
                                                            ratio["pod_iperf"]["median"]) >= 0.97}}}


def _fmt(stat: dict[str, float], digits: int = 2) -> str:
    return f"{stat['median']:,.{digits}f} ({stat['min']:,.{digits}f}–{stat['max']:,.{digits}f})"


def markdown(result: dict) -> str:
    s, r = result["summary"], result["ratios"]
    lines = [
        "# meshagent bench: socket fast path vs plain loopback",
        "",
        f"{result['started']} · {result['rounds']} rounds, off/on shuffled · {result['seconds']} s per run · "
        f"client and server on CPU {result['cpu']} · median (min–max)",
        "",
        "| measure | plain loopback | fast path | fast/plain |",
        "|---|---|---|---|",
        f"| rr 64 B p50 µs | {_fmt(s['off']['rr64_p50_us'])} | {_fmt(s['on']['rr64_p50_us'])} | "
        f"{_fmt(r['rr64_p50'])} |",
        f"| rr 64 B p99 µs | {_fmt(s['off']['rr64_p99_us'])} | {_fmt(s['on']['rr64_p99_us'])} | |",
        f"| rr 64 B transactions/s | {_fmt(s['off']['rr64_rate'], 0)} | {_fmt(s['on']['rr64_rate'], 0)} | "
        f"{_fmt(r['rr64_rate'])} |",
        f"| rr 64 KiB transactions/s | {_fmt(s['off']['rr64k_rate'], 0)} | {_fmt(s['on']['rr64k_rate'], 0)} | "
        f"{_fmt(r['rr64k_rate'])} |",
        f"| pod-to-pod rr 64 B p50 µs (veths) | {_fmt(s['off']['pod_rr64_p50_us'])} | "
        f"{_fmt(s['on']['pod_rr64_p50_us'])} | {_fmt(r['pod_rr64_p50'])} |",
        f"| pod-to-pod rr 64 B transactions/s | {_fmt(s['off']['pod_rr64_rate'], 0)} | "
        f"{_fmt(s['on']['pod_rr64_rate'], 0)} | |",
        f"| pod-to-pod iperf3 Gbit/s | {_fmt(s['off']['pod_iperf_gbps'])} | {_fmt(s['on']['pod_iperf_gbps'])} | "
        f"{_fmt(r['pod_iperf'])} |",
        f"| iperf3 Gbit/s | {_fmt(s['off']['iperf_gbps'])} | {_fmt(s['on']['iperf_gbps'])} | "
        f"{_fmt(r['iperf'])} |",
        f"| queue-full fallbacks per run | {_fmt(s['off']['queue_full'], 0)} | {_fmt(s['on']['queue_full'], 0)} | |",
        f"| MiB redirected per run | {_fmt(s['off']['redirected_mib'], 0)} | {_fmt(s['on']['redirected_mib'], 0)} | |",
        "",
        f"Targets: p50 ratio {result['targets']['rr64_p50']['goal']}: "
        f"{'met' if result['targets']['rr64_p50']['met'] else '**not met**'}; bulk "
        f"{result['targets']['bulk']['goal']} (0.97 allowed for noise): "
        f"{'met' if result['targets']['bulk']['met'] else '**not met**'}.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if os.geteuid() != 0:
        raise SystemExit("the fast-path bench needs root (network namespaces, BPF)")
    print(markdown(run(int(harness.env_float("BENCH_ROUNDS", 5)))))
