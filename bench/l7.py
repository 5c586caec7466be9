"""`make bench`, L7 part: the L7 processor vs haproxy vs no proxy on the same HTTP load (SPEC §9).

Three configurations share one backend and are measured back to back in a shuffled order each round:

    direct     the load generators talk to the backend itself (no proxy: the floor)
    haproxy    haproxy as the equivalent reverse proxy: 1 thread, keep-alive to the backend
    processor  `python -m userspace_l7`, 1 worker, with a Service for the backend and a VirtualService
               (two routes: a /v2/ prefix that never matches, then the catch-all), flows to a unix
               socket (read and discarded by this harness) and Prometheus metrics on

The backend is a second haproxy answering every request itself with `http-request return` (a
6-byte body, Content-Length, keep-alive): compiled, single-threaded, no file I/O, already a
dependency of `make install` (nginx is not).

Per configuration and round:

- **peak**: `wrk -t1 -cC -dS` (keep-alive, Debian's wrk): requests/s, and the CPU time of the
  proxy process (utime + stime from /proc/PID/stat, children included) per request.
- **fixed rate**: bench/loadgen.c (open-loop, constant rate, latency from the scheduled send time,
  so no coordinated omission) at one rate for every configuration and round: p50/p90/p99/p99.9, and
  the proxy's CPU per request at that rate. The rate is half of haproxy's peak, measured once before
  the rounds (or BENCH_L7_RATE).

CPUs: wrk/loadgen, the backend and this harness on one CPU, the proxy under test alone on the
others (the last CPU of a 2-CPU machine); BENCH_L7_CPUS="LOAD:PROXY,..." or "none" to change it.

Fairness (with the processor; BENCH_L7_FAIRNESS=0 turns it off): a second processor that names client
endpoints by source address (the hidden --clients-by-source: 127.0.0.1 is the polite endpoint, wrk,
127.0.0.2 the neighbour), each round measured twice in shuffled order: wrk's requests/s alone, and
while the neighbour holds as many idle connections as its share allows (userspace_l7/admission.py:
the processor's own default, read from its meshagent_l7_connection_limit, or BENCH_L7_FAIR_CAP) and
one more, which is refused. The paired ratio, neighbour/alone, is the target (>= 0.9).

Environment: BENCH_ROUNDS (run.py; 5), BENCH_L7_SECONDS (wrk, 5), BENCH_L7_CONNECTIONS (32),
BENCH_L7_LAT_SECONDS (loadgen, 5, after 1 s of warm-up), BENCH_L7_RATE (requests/s for the latency
runs; default half of haproxy's peak), BENCH_L7_WORKERS (processor workers, 1), BENCH_L7_CONFIGS
(comma list), BENCH_L7_CPUS, BENCH_L7_FAIRNESS (1), BENCH_L7_FAIR_CAP (0: the processor's own share),
BENCH_SEED.

`python -m bench.l7` runs this part alone and prints its Markdown; `make bench` (bench/run.py)
runs it after the L4 part and writes both into bench/results/latest.{json,md}.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import harness

REPO = harness.REPO
LOADGEN_SOURCE = harness.BENCH_DIR / "loadgen.c"
LOADGEN_BIN = harness.BENCH_DIR / "bin" / "loadgen"
CONFIGS = ("direct", "haproxy", "processor")
HOST = "127.0.0.1"
AUTHORITY = "bench:80"  # the Host header of every request: the processor routes by it (no redirect here)
BODY = "hello\n"
CLK_TCK = os.sysconf("SC_CLK_TCK")
MAX_INTERFERENCE = 0.1  # CPUs of other processes' work during a run before it is run again (2 x rounds at most)

log = harness.log


# ---- settings ------------------------------------------------------------------------------------


_env_float = harness.env_float  # one reader of the BENCH_* settings for every part


@dataclass(frozen=True)
class Settings:
    rounds: int
    wrk_seconds: float
    connections: int
    lat_seconds: float
    warmup_seconds: float
    rate: float | None  # None: half of haproxy's peak, measured before the rounds
    low_rate: float | None  # None: half of the slower proxy's peak; 0: no second latency run
    low_seconds: float
    workers: int
    configs: tuple[str, ...]
    load_cpu: int | None  # wrk/loadgen, backend, harness; None: no pinning
    proxy_cpus: tuple[int, ...]  # the proxy under test
    seed: int
    fairness: bool = True  # the polite endpoint beside a neighbour at its connection share
    fair_cap: int = 0  # the neighbour's share; 0: the processor's default (admission.py)

    @classmethod
    def from_env(cls, rounds: int) -> Settings:
        wanted = os.environ.get("BENCH_L7_CONFIGS") or ",".join(CONFIGS)
        configs = tuple(c.strip() for c in wanted.split(",") if c.strip())
        unknown = [c for c in configs if c not in CONFIGS]
        if unknown:
            raise SystemExit(f"BENCH_L7_CONFIGS: unknown {', '.join(unknown)}; known: {', '.join(CONFIGS)}")
        cpus = sorted(os.sched_getaffinity(0))
        spec = os.environ.get("BENCH_L7_CPUS", "")
        load_cpu: int | None
        if spec == "none" or (not spec and len(cpus) < 2):
            load_cpu, proxy_cpus = None, ()
        elif spec:
            load, _, proxy = spec.partition(":")
            load_cpu, proxy_cpus = int(load), tuple(int(c) for c in proxy.split(",") if c)
        else:  # the first CPU for the load side, the rest (the last, on 2 CPUs) for the proxy
            load_cpu, proxy_cpus = cpus[0], tuple(cpus[1:])
        rate = os.environ.get("BENCH_L7_RATE")
        low_rate = os.environ.get("BENCH_L7_LOW_RATE")
        return cls(
            rounds=max(1, rounds),
            wrk_seconds=_env_float("BENCH_L7_SECONDS", 5),
            connections=int(_env_float("BENCH_L7_CONNECTIONS", 32)),
            lat_seconds=_env_float("BENCH_L7_LAT_SECONDS", 5),
            warmup_seconds=1.0,
            rate=float(rate) if rate else None,
            low_rate=float(low_rate) if low_rate else None,
            low_seconds=_env_float("BENCH_L7_LOW_SECONDS", 2),
            workers=int(_env_float("BENCH_L7_WORKERS", 1)),
            configs=configs,
            load_cpu=load_cpu,
            proxy_cpus=proxy_cpus,
            seed=int(os.environ.get("BENCH_SEED") or time.time_ns() % 1_000_000),
            fairness=os.environ.get("BENCH_L7_FAIRNESS", "1") != "0" and "processor" in configs,
            fair_cap=int(_env_float("BENCH_L7_FAIR_CAP", 0)),
        )

    def on_load(self, cmd: list[str]) -> list[str]:
        return cmd if self.load_cpu is None else ["taskset", "-c", str(self.load_cpu), *cmd]

    def on_proxy(self, cmd: list[str]) -> list[str]:
        return cmd if not self.proxy_cpus else ["taskset", "-c", ",".join(map(str, self.proxy_cpus)), *cmd]


# ---- configurations ------------------------------------------------------------------------------

HAPROXY_GLOBAL = """\
global
    nbthread 1
    maxconn 4096
defaults
    mode http
    option http-keep-alive
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
"""


def backend_cfg(port: int) -> str:
    return HAPROXY_GLOBAL + f"""\
frontend backend
    bind {HOST}:{port}
    http-request return status 200 content-type text/plain string "{BODY.strip()}\\n"
"""


def haproxy_cfg(port: int, backend_port: int) -> str:
    """The processor's routing, in haproxy terms: a /v2/ prefix rule that never matches, then the
    default; keep-alive on both sides (haproxy's default `http-reuse safe`). No logging, as the
    processor logs nothing per request either."""
    return HAPROXY_GLOBAL + f"""\
frontend proxy
    bind {HOST}:{port}
    acl v2 path_beg /v2/
    use_backend bench_v2 if v2
    default_backend bench
backend bench
    server b1 {HOST}:{backend_port}
backend bench_v2
    server b1 {HOST}:{backend_port}
"""


def processor_cfg(backend_port: int) -> dict:
    """A Service `bench` whose one backend is the haproxy backend, and a VirtualService on it."""
    vs = {
        "apiVersion": "networking.istio.io/v1beta1",
        "kind": "VirtualService",
        "metadata": {"name": "bench", "namespace": "default"},
        "spec": {
            "hosts": ["bench"],
            "http": [
                {"name": "v2", "match": [{"uri": {"prefix": "/v2/"}}],
                 "route": [{"destination": {"host": "bench"}}]},
                {"name": "default", "route": [{"destination": {"host": "bench"}}]},
            ],
        },
    }
    return {
        "services": [{
            "name": "bench", "namespace": "default",
            "ports": [{"port": 80, "target_port": backend_port, "protocol": "TCP", "name": "http"}],
            "backends": [{"ip": HOST, "workload": "bench-backend", "labels": {"app": "bench"}}],
        }],
        "virtual_services": [vs],
    }


POLITE, NEIGHBOUR = "127.0.0.1", "127.0.0.2"  # the fairness run's two client endpoints, by source address
FAIR_CLIENTS = {"1": {"workload": "polite", "namespace": "default", "labels": {"app": "polite"}},
                "2": {"workload": "neighbour", "namespace": "default", "labels": {"app": "neighbour"}}}


class FlowReader:
    """The flow collector the agent would run: a unix socket whose bytes are counted and dropped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.bytes = 0
        self.lines = 0
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(16)
        self.sock.settimeout(0.5)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._accept, name="l7-flows", daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=self._drain, args=(conn,), daemon=True).start()

    def _drain(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(0.5)
            while not self._stop.is_set():
                try:
                    data = conn.recv(1 << 20)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                self.bytes += len(data)
                self.lines += data.count(b"\n")

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        self.thread.join(2)
        with contextlib.suppress(OSError):
            self.path.unlink()


# ---- processes -----------------------------------------------------------------------------------


def build_loadgen() -> Path:
    """bench/loadgen.c as bench/bin/loadgen."""
    return harness.build_c(LOADGEN_SOURCE, LOADGEN_BIN, headers=(harness.LATENCY_HIST_H,))
    LOADGEN_BIN.parent.mkdir(parents=True, exist_ok=True)
    harness.run(["gcc", "-O2", "-Wall", "-o", str(LOADGEN_BIN), str(LOADGEN_SOURCE)])
    log(f"compiled {LOADGEN_BIN.relative_to(REPO)}")
    return LOADGEN_BIN


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def proc_tree(pid: int) -> list[int]:
    """pid and its live descendants (the processor's workers when --workers > 1)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                with contextlib.suppress(OSError), open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
    return out


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes (all their threads), in seconds."""
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
            ticks += int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)
    return ticks / CLK_TCK


def cpus_time(cpus: set[int] | None) -> float:
    """user+nice+system+steal seconds of these CPUs (None: all), from /proc/stat. irq and softirq time
    is left out: it is mostly this bench's own loopback traffic."""
    total = 0
    with open("/proc/stat") as f:
        for line in f:
            name, *values = line.split()
            if name.startswith("cpu") and name[3:].isdigit() and (cpus is None or int(name[3:]) in cpus):
                v = [int(x) for x in values]
                total += v[0] + v[1] + v[2] + v[7]
    return total / CLK_TCK


def own_cpu() -> float:
    """CPU seconds of this harness (all threads) and of its waited-for children (the load generators)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def get(port: int, timeout: float = 2.0) -> tuple[int, bytes]:
    c = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        c.request("GET", "/", headers={"Host": AUTHORITY})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def wait_http(name: str, port: int, proc: subprocess.Popen, log_path: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise harness.BenchError(f"{name} exited ({proc.returncode}): {_tail(log_path)}")
        try:
            status, body = get(port)
            if status == 200 and body == BODY.encode():
                return
            last = f"answered {status} {body[:80]!r}"
        except OSError as e:
            last = str(e)
        time.sleep(0.2)
    raise harness.BenchError(f"{name} not answering on {HOST}:{port} after {timeout:.0f}s ({last}): {_tail(log_path)}")


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:]) or "(empty log)"
    except OSError:
        return "(no log)"


@dataclass
class Target:
    config: str
    port: int
    proxy: subprocess.Popen | None  # None for direct


class Bench:
    def __init__(self, s: Settings, janitor: harness.Janitor, tmp: Path, keep: Path | None) -> None:
        self.s = s
        self.janitor = janitor
        self.tmp = tmp
        self.keep = keep  # where the configs used are copied for the record
        self.backend: subprocess.Popen | None = None
        self.targets: dict[str, Target] = {}
        self.flows: FlowReader | None = None
        self.metrics_port = 0
        self.notes: dict[str, Any] = {}
        self.retries_left = 2 * s.rounds  # keeps a run on a busy machine within its time budget
        self.fair: Target | None = None  # the fairness run's processor
        self.fair_metrics_port = 0
        self.fair_cap = 0

    def _start(self, name: str, cmd: list[str]) -> tuple[subprocess.Popen, Path]:
        log_path = self.tmp / f"{name}.log"
        log_file = open(log_path, "ab")  # noqa: SIM115 - closed by the janitor
        self.janitor.push(f"close {log_path.name}", log_file.close)
        proc = harness.spawn(self.janitor, name, cmd, stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO)
        return proc, log_path

    def _write(self, name: str, text: str) -> Path:
        path = self.tmp / name
        path.write_text(text)
        if self.keep is not None:
            self.keep.mkdir(parents=True, exist_ok=True)
            (self.keep / name).write_text(text)
        return path

    def start(self) -> None:
        backend_port = _free_port()
        cfg = self._write("backend.cfg", backend_cfg(backend_port))
        harness.run(["haproxy", "-c", "-q", "-f", str(cfg)])
        self.backend, log_path = self._start("backend", self.s.on_load(["haproxy", "-db", "-f", str(cfg)]))
        wait_http("backend (haproxy http-request return)", backend_port, self.backend, log_path)
        self.notes["haproxy"] = harness.run(["haproxy", "-v"]).stdout.splitlines()[0]
        for config in self.s.configs:
            if config == "direct":
                self.targets[config] = Target(config, backend_port, None)
            elif config == "haproxy":
                port = _free_port()
                cfg = self._write("haproxy.cfg", haproxy_cfg(port, backend_port))
                harness.run(["haproxy", "-c", "-q", "-f", str(cfg)])
                proc, log_path = self._start("haproxy", self.s.on_proxy(["haproxy", "-db", "-f", str(cfg)]))
                wait_http("haproxy", port, proc, log_path)
                self.targets[config] = Target(config, port, proc)
            else:
                port, self.metrics_port = _free_port(), _free_port()
                cfg = self._write("l7.json", json.dumps(processor_cfg(backend_port), indent=2) + "\n")
                flows_path = self.tmp / "flows.sock"
                self.flows = FlowReader(flows_path)
                self.janitor.push("close the flow reader", self.flows.close)
                cmd = [sys.executable, "-m", "userspace_l7", "--config", str(cfg), "--listen", f"{HOST}:{port}",
                       "--workers", str(self.s.workers), "--flows", str(flows_path),
                       "--metrics", f"{HOST}:{self.metrics_port}", "--node-name", "bench"]
                proc, log_path = self._start("processor", self.s.on_proxy(cmd))
                wait_http("processor", port, proc, log_path)
                self.targets[config] = Target(config, port, proc)
                if self.s.fairness:
                    self._start_fair(backend_port, flows_path)

    def _start_fair(self, backend_port: int, flows_path: Path) -> None:
        """The fairness run's processor: the same config with two client endpoints named by source address."""
        port, self.fair_metrics_port = _free_port(), _free_port()
        cfg = self._write("l7-fair.json", json.dumps({**processor_cfg(backend_port), "clients": FAIR_CLIENTS},
                                                     indent=2) + "\n")
        cmd = [sys.executable, "-m", "userspace_l7", "--config", str(cfg), "--listen", f"{HOST}:{port}",
               "--workers", "1", "--flows", str(flows_path), "--metrics", f"{HOST}:{self.fair_metrics_port}",
               "--node-name", "bench", "--clients-by-source", f"{POLITE}=1,{NEIGHBOUR}=2"]
        if self.s.fair_cap:
            cmd += ["--max-connections-per-endpoint", str(self.s.fair_cap)]
        proc, log_path = self._start("processor-fair", self.s.on_proxy(cmd))
        wait_http("processor (fairness run)", port, proc, log_path)
        self.fair = Target("processor", port, proc)
        self.fair_cap = int(self._fair_metric('meshagent_l7_connection_limit{scope="endpoint"}'))

    # -- measuring --

    def proxy_pids(self, t: Target) -> list[int]:
        return proc_tree(t.proxy.pid) if t.proxy is not None else []

    def _timed(self, t: Target, cmd: list[str], timeout: float) -> tuple[str, float, float, float, float]:
        """Run a load generator; returns its stdout, wall seconds, proxy and backend CPU seconds, and
        the interference: CPUs' worth of user/system/steal time on the CPUs this run uses that none of
        our processes used (other processes on the machine)."""
        if t.proxy is not None and t.proxy.poll() is not None:
            raise harness.BenchError(f"{t.config} exited ({t.proxy.returncode})")
        pids, backend = self.proxy_pids(t), [self.backend.pid]
        # The CPUs this run uses: the load CPU, and the proxy's unless it is `direct` (None: all).
        cpus = None if self.s.load_cpu is None else {self.s.load_cpu, *(self.s.proxy_cpus if pids else ())}
        m0, o0 = cpus_time(cpus), own_cpu() + cpu_seconds(self.other_pids(with_proxies=bool(pids)))
        p0, b0, w0 = cpu_seconds(pids), cpu_seconds(backend), time.monotonic()
        out = harness.run(self.s.on_load(cmd), timeout=timeout).stdout
        wall = time.monotonic() - w0
        p1, b1 = cpu_seconds(pids), cpu_seconds(backend)
        m1, o1 = cpus_time(cpus), own_cpu() + cpu_seconds(self.other_pids(with_proxies=bool(pids)))
        interference = (m1 - m0 - (o1 - o0)) / wall
        return out, wall, p1 - p0, b1 - b0, max(0.0, interference)

    def other_pids(self, with_proxies: bool) -> list[int]:
        """Our servers: the backend and (when the proxies' CPUs are counted) every proxy."""
        pids = [self.backend.pid]
        for t in [*self.targets.values(), *([self.fair] if self.fair else [])] if with_proxies else ():
            pids += self.proxy_pids(t)
        return pids

    def wrk(self, t: Target, seconds: float) -> dict[str, float]:
        cmd = ["wrk", "-t1", f"-c{self.s.connections}", f"-d{seconds:g}s", "-H", f"Host: {AUTHORITY}",
               f"http://{HOST}:{t.port}/"]
        out, wall, proxy_cpu, backend_cpu, others = self._timed(t, cmd, seconds + 30)
        m = re.search(r"(\d+) requests in ([\d.]+)(m?s)", out)
        rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
        if not m or not rate:
            raise harness.BenchError(f"wrk output not understood: {out.strip()[-300:]}")
        bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
        if bad or (errs and any(int(x) for x in errs.groups())):
            raise harness.BenchError(f"wrk saw errors: {(bad and bad.group(0)) or ''} {(errs and errs.group(0)) or ''}")
        requests = int(m.group(1))
        sample = {"rps": float(rate.group(1)), "backend_busy": backend_cpu / wall, "interference": others}
        if t.proxy is not None:
            sample.update(cpu_us_per_req=proxy_cpu / requests * 1e6,
                          req_per_cpu_s=requests / proxy_cpu if proxy_cpu else None,
                          proxy_busy=proxy_cpu / wall)
        return sample

    def loadgen(self, t: Target, rate: float, seconds: float) -> dict[str, float]:
        s = self.s
        cmd = [str(LOADGEN_BIN), "-w", f"{s.warmup_seconds:g}", "-d", "2", "-H", AUTHORITY, HOST, str(t.port),
               f"{rate:g}", f"{seconds:g}", str(s.connections)]
        out, wall, proxy_cpu, _, others = self._timed(t, cmd, s.warmup_seconds + seconds + 30)
        r = json.loads(out)
        if r["errors"] or r["non_2xx"]:
            raise harness.BenchError(f"loadgen saw {r['errors']} errors and {r['non_2xx']} non-2xx responses")
        sample = {"fixed_achieved": r["achieved_rate"], "fixed_unfinished": r["unfinished"],
                  "p50_ms": r["p50_us"] / 1e3, "p90_ms": r["p90_us"] / 1e3, "p99_ms": r["p99_us"] / 1e3,
                  "p999_ms": r["p999_us"] / 1e3, "send_lag_p99_ms": r["send_lag_p99_us"] / 1e3,
                  "interference": others}
        if t.proxy is not None and r["total_completed"]:
            sample.update(fixed_cpu_us_per_req=proxy_cpu / r["total_completed"] * 1e6,
                          fixed_proxy_busy=proxy_cpu / wall)
        return sample

    def measure(self, t: Target, rate: float, low_rate: float) -> dict[str, float]:
        """One round of a configuration. A run during which other processes on the machine used more
        than MAX_INTERFERENCE CPUs is run once more (other sessions' tests share these VMs)."""

        def again(what: str, fn: Callable[[], dict[str, float]]) -> dict[str, float]:
            sample = fn()
            if sample["interference"] > MAX_INTERFERENCE and self.retries_left > 0:
                self.retries_left -= 1
                log(f"l7 {t.config} {what}: {sample['interference']:.2f} CPUs of other work meanwhile, again")
                sample = fn()
                sample["retried"] = 1
            return sample

        peak = again("wrk", lambda: self.wrk(t, self.s.wrk_seconds))
        fixed = again("loadgen", lambda: self.loadgen(t, rate, self.s.lat_seconds))
        sample = {**peak, **{k: v for k, v in fixed.items() if k not in ("interference", "retried")},
                  "lat_interference": fixed["interference"],
                  "retried": peak.get("retried", 0) + fixed.get("retried", 0)}
        if low_rate:
            low = again("loadgen (low rate)", lambda: self.loadgen(t, low_rate, self.s.low_seconds))
            sample.update({f"low_{k}": low[k] for k in ("p50_ms", "p99_ms", "fixed_unfinished", "interference")})
            sample["retried"] += low.get("retried", 0)
        return sample

    # -- fairness --

    def _fair_metric(self, prefix: str) -> float:
        """The value of the fairness processor's sample whose line starts with ``prefix`` (0 if none)."""
        c = http.client.HTTPConnection(HOST, self.fair_metrics_port, timeout=5)
        try:
            c.request("GET", "/metrics")
            text = c.getresponse().read().decode()
        finally:
            c.close()
        return sum(float(line.rpartition(" ")[2]) for line in text.splitlines() if line.startswith(prefix))

    def _await_held(self, n: int, what: str) -> None:
        deadline = time.monotonic() + 30
        while self._fair_metric("meshagent_l7_client_connections") != n:
            if time.monotonic() > deadline:
                raise harness.BenchError(f"the fairness processor never held {n} connections ({what})")
            time.sleep(0.05)

    def neighbour(self) -> list[socket.socket]:
        """The neighbour's connections: its whole share, idle, and one more that the processor refuses."""
        refused = self._fair_metric('meshagent_l7_connections_refused_total{reason="endpoint_limit",'
                                    'source_workload="neighbour"')
        socks = []
        try:
            for _ in range(self.fair_cap + 1):
                s = socket.socket()
                socks.append(s)
                s.bind((NEIGHBOUR, 0))
                s.connect((HOST, self.fair.port))
        except OSError:
            for s in socks:
                s.close()
            raise
        self._await_held(self.fair_cap, "the neighbour's share")
        deadline = time.monotonic() + 30
        while self._fair_metric('meshagent_l7_connections_refused_total{reason="endpoint_limit",'
                                'source_workload="neighbour"') <= refused:
            if time.monotonic() > deadline:
                raise harness.BenchError("the neighbour's connection over its share was not refused")
            time.sleep(0.05)
        return socks

    def fair_round(self) -> dict[str, dict[str, float]]:
        """wrk from the polite endpoint alone and beside the neighbour at its share, in shuffled order."""
        out: dict[str, dict[str, float]] = {}
        order = ["alone", "neighbour"]
        random.Random(self.s.seed + len(self.notes.get("fair_orders", []))).shuffle(order)
        self.notes.setdefault("fair_orders", []).append(order)
        for which in order:
            socks = self.neighbour() if which == "neighbour" else []
            try:
                sample = self.wrk(self.fair, self.s.wrk_seconds)
                if sample["interference"] > MAX_INTERFERENCE and self.retries_left > 0:
                    self.retries_left -= 1
                    log(f"l7 fairness {which}: {sample['interference']:.2f} CPUs of other work meanwhile, again")
                    sample = {**self.wrk(self.fair, self.s.wrk_seconds), "retried": 1}
            finally:
                for s in socks:
                    s.close()
            if socks:
                self._await_held(0, "after the neighbour left")
            out[which] = sample
        return out

    def processor_counts(self) -> dict[str, Any]:
        """Flows received and istio_requests_total: both must grow with the requests served."""
        out: dict[str, Any] = {}
        if self.flows is not None:
            out.update(flow_lines=self.flows.lines, flow_bytes=self.flows.bytes)
        if self.metrics_port:
            total = 0.0
            for i in range(self.s.workers):
                with contextlib.suppress(OSError, http.client.HTTPException):
                    c = http.client.HTTPConnection(HOST, self.metrics_port + i, timeout=5)
                    c.request("GET", "/metrics")
                    text = c.getresponse().read().decode()
                    c.close()
                    total += sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
                                 if line.startswith("istio_requests_total{"))
            out["istio_requests_total"] = total
        return out


# ---- summarising ---------------------------------------------------------------------------------

METRICS = ("rps", "cpu_us_per_req", "req_per_cpu_s", "proxy_busy", "interference", "backend_busy", "p50_ms",
           "p90_ms", "p99_ms", "p999_ms", "fixed_achieved", "fixed_unfinished", "fixed_cpu_us_per_req",
           "fixed_proxy_busy", "send_lag_p99_ms", "lat_interference", "low_p50_ms", "low_p99_ms",
           "low_fixed_unfinished", "low_interference", "retried")


def summarise(samples: dict[str, list[dict | None]]) -> tuple[dict, dict, list[dict]]:
    summary = {
        config: {m: harness.spread([r.get(m) if r else None for r in rounds]) for m in METRICS}
        for config, rounds in samples.items()
    }
    summary = {c: {m: v for m, v in ms.items() if v} for c, ms in summary.items()}
    ratio: Callable[[float, float], float] = lambda x, y: x / y  # noqa: E731
    diff: Callable[[float, float], float] = lambda x, y: x - y  # noqa: E731
    comparisons = [
        ("processor/haproxy req_per_cpu_s", "processor", "haproxy", "req_per_cpu_s", ratio),
        ("processor/haproxy fixed_cpu_us_per_req", "processor", "haproxy", "fixed_cpu_us_per_req", ratio),
        ("processor/haproxy rps", "processor", "haproxy", "rps", ratio),
        ("haproxy/direct rps", "haproxy", "direct", "rps", ratio),
        ("processor/direct rps", "processor", "direct", "rps", ratio),
        ("processor - haproxy p50_ms", "processor", "haproxy", "p50_ms", diff),
        ("processor - haproxy p99_ms", "processor", "haproxy", "p99_ms", diff),
        ("haproxy - direct p99_ms", "haproxy", "direct", "p99_ms", diff),
        ("processor - direct p99_ms", "processor", "direct", "p99_ms", diff),
        ("processor - haproxy low_p50_ms", "processor", "haproxy", "low_p50_ms", diff),
        ("processor - haproxy low_p99_ms", "processor", "haproxy", "low_p99_ms", diff),
        ("processor beside a neighbour at its share/alone rps", "fair_neighbour", "fair_alone", "rps", ratio),
    ]
    ratios = {}
    for key, num, den, metric, op in comparisons:
        got = harness.paired(samples, num, den, metric, op)
        if got:
            ratios[key] = got

    def target(name: str, key: str, ok: Callable[[float], bool], goal: str) -> dict:
        return harness.target(ratios, name, key, ok, goal)

    targets = [
        target("requests per CPU-second vs haproxy", "processor/haproxy req_per_cpu_s", lambda v: v >= 1.0,
               ">= 1.0x"),
        target("p99 vs haproxy at the same rate", "processor - haproxy p99_ms", lambda v: v <= 0.5, "<= 0.5 ms"),
        target("requests/s beside an endpoint holding its connection share", "processor beside a neighbour at "
               "its share/alone rps", lambda v: v >= 0.9, ">= 0.9x"),
    ]
    return summary, ratios, targets


# ---- report --------------------------------------------------------------------------------------

_fmt = harness.fmt


def markdown(result: dict) -> str:
    s = result["settings"]
    pin = (f"load generators, backend and harness on CPU {s['load_cpu']}, proxy on CPU "
           f"{','.join(map(str, s['proxy_cpus']))}" if s["load_cpu"] is not None else "no CPU pinning")
    lines = [
        "# meshagent bench: L7 processor vs haproxy",
        "",
        f"{result['started']} · {result['machine']['cpus']} CPUs · {result['notes'].get('haproxy', '')} · "
        f"{s['rounds']} rounds, configurations interleaved in shuffled order (seed {s['seed']}) · "
        f"peak: `wrk -t1 -c{s['connections']} -d{s['wrk_seconds']:g}s` · fixed rate: bench/loadgen "
        f"{result['rate']:,.0f} req/s ({result['rate_source']}), {s['connections']} connections, "
        f"{s['lat_seconds']:g} s after {s['warmup_seconds']:g} s warm-up"
        + (f", and {result['low_rate']:,.0f} req/s (half of the slower proxy's peak) for {s['low_seconds']:g} s"
           if result.get("low_rate") else "") + f" · processor workers {s['workers']} · {pin}",
        "",
        "Each cell: median (min–max) over rounds. Proxy CPU: utime+stime of the proxy process(es) from "
        "/proc/PID/stat; busy: proxy CPU-seconds per second. Interference: CPUs' worth of user+system+steal "
        "time on the CPUs the run uses that no process of this bench used (other work on the machine); a run "
        f"with more than {MAX_INTERFERENCE} is run once more (at most 2 × rounds runs are repeated). "
        "`direct` has no proxy.",
        "",
        f"Peak (`wrk`, closed loop) and CPU per request at peak and at {result['rate']:,.0f} req/s:",
        "",
        "| configuration | peak req/s | proxy CPU µs/req | req per proxy CPU-s | proxy busy | interference "
        f"| backend busy | proxy CPU µs/req at {result['rate']:,.0f}/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for config in s["configs"]:
        if config in result["skipped"]:
            lines.append(f"| {config} | skipped: {result['skipped'][config]} |||||||")
            continue
        m = result["summary"].get(config, {})
        lines.append(
            f"| {config} | {_fmt(m.get('rps'))} | {_fmt(m.get('cpu_us_per_req'), 1)} "
            f"| {_fmt(m.get('req_per_cpu_s'))} | {_fmt(m.get('proxy_busy'), 2)} "
            f"| {_fmt(m.get('interference'), 2)} | {_fmt(m.get('backend_busy'), 2)} "
            f"| {_fmt(m.get('fixed_cpu_us_per_req'), 1)} |"
        )
    low = result.get("low_rate") or 0
    lines += ["", "Latency, open loop (bench/loadgen, from the scheduled send time), ms:", "",
              f"| configuration | p50 @{result['rate']:,.0f}/s | p90 | p99 | p99.9 | completed req/s | interference "
              + (f"| p50 @{low:,.0f}/s | p99 @{low:,.0f}/s |" if low else "|"),
              "|---|---|---|---|---|---|---|" + ("---|---|" if low else "")]
    for config in s["configs"]:
        if config in result["skipped"]:
            continue
        m = result["summary"].get(config, {})
        lines.append(
            f"| {config} | {_fmt(m.get('p50_ms'), 3)} | {_fmt(m.get('p90_ms'), 3)} | {_fmt(m.get('p99_ms'), 3)} "
            f"| {_fmt(m.get('p999_ms'), 3)} | {_fmt(m.get('fixed_achieved'))} | {_fmt(m.get('lat_interference'), 2)} |"
            + (f" {_fmt(m.get('low_p50_ms'), 3)} | {_fmt(m.get('low_p99_ms'), 3)} |" if low else "")
        )
    fair = result["summary"].get("fair_alone"), result["summary"].get("fair_neighbour")
    if any(fair):
        lines += ["", f"Fairness (a second processor naming endpoints by source address): wrk from one endpoint "
                  f"alone, and beside another endpoint that holds its whole share of idle connections "
                  f"({result['notes'].get('fair_cap', '?')}, and one more refused):", "",
                  "| polite endpoint | peak req/s | proxy CPU µs/req | interference |", "|---|---|---|---|"]
        for name, m in zip(("alone", "beside the neighbour"), fair, strict=True):
            m = m or {}
            lines.append(f"| {name} | {_fmt(m.get('rps'))} | {_fmt(m.get('cpu_us_per_req'), 1)} "
                         f"| {_fmt(m.get('interference'), 2)} |")
    lines += ["", "Paired per round (x/y: ratio; x - y: difference):", "",
              "| comparison | median (min–max) |", "|---|---|"]
    for key, stat in result["ratios"].items():
        lines.append(f"| {key} | {_fmt(stat, 3)} |")
    lines += ["", "Targets:", "", "| target | measure | goal | median | met |", "|---|---|---|---|---|"]
    for t in result["targets"]:
        med = "-" if t["median"] is None else (f"{t['median']:,.3f}x" if t["goal"].endswith("x")
                                               else f"{t['median']:,.3f} ms")
        met = "not measured" if t["median"] is None else {True: "yes", False: "**no**"}[t["met"]]
        lines.append(f"| {t['target']} | {t['measure']} | {t['goal']} | {med} | {met} |")
    for key, rate in (("fixed_unfinished", result["rate"]), ("low_fixed_unfinished", low)):
        # Over capacity: its peak (wrk, same round) was below the rate, or requests were left unanswered.
        overloaded = [c for c, m in result["summary"].items() if c in s["configs"] and rate and (
            (m.get(key) and m[key]["max"] > 0) or (m.get("rps") and m["rps"]["median"] < rate))]
        if overloaded:
            lines += ["", f"Over capacity at {rate:,.0f} req/s (median peak below that rate, or requests unanswered "
                      f"2 s after the run): {', '.join(overloaded)}. Its open-loop latency there is queueing "
                      "that grows over the run, not per-request cost."]
    if result["notes"].get("calibration_peaks"):
        lines += ["", "Peaks measured before the rounds (rates are derived from them): " + ", ".join(
            f"{c} {v:,.0f} req/s" for c, v in result["notes"]["calibration_peaks"].items())]
    counts = result["notes"].get("processor_counts")
    if counts:
        lines += ["", "Processor bookkeeping over the whole run: " + ", ".join(f"{k} {v:,.0f}" for k, v in
                                                                            counts.items())]
    if result["skipped"]:
        lines += ["", "Skipped: " + "; ".join(f"{c}: {why}" for c, why in result["skipped"].items())]
    return "\n".join(lines) + "\n"


# ---- the run -------------------------------------------------------------------------------------


def preflight() -> None:
    missing = [t for t in ("gcc", "wrk", "haproxy", "taskset") if shutil.which(t) is None]
    if missing:
        raise SystemExit(f"missing tools: {', '.join(missing)} (`make install` installs them)")


def run(rounds: int, out: Path | None) -> dict:
    """Measure the L7 part; returns its section of the results. `out` (the results directory, or
    None) gets the configs used, under out/l7/, so a run can be reproduced by hand."""
    preflight()
    s = Settings.from_env(rounds)
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    janitor = harness.Janitor()
    tmp = Path(tempfile.mkdtemp(prefix="meshagent-bench-l7-"))
    janitor.push(f"remove {tmp}", lambda: shutil.rmtree(tmp, ignore_errors=True))
    old_affinity = os.sched_getaffinity(0)
    skipped: dict[str, str] = {}
    samples: dict[str, list[dict | None]] = {}
    rate, rate_source, low_rate = s.rate or 0.0, "BENCH_L7_RATE", 0.0
    bench = Bench(s, janitor, tmp, out / "l7" if out is not None else None)
    try:
        if s.load_cpu is not None:  # this harness and the flow reader stay off the proxy's CPU
            os.sched_setaffinity(0, {s.load_cpu})
        build_loadgen()
        bench.start()
        log(f"l7: backend, {', '.join(bench.targets)} ready; warming up")
        for config, t in list(bench.targets.items()):
            try:
                bench.wrk(t, 1)
            except Exception as e:
                skipped[config] = str(e)
                log(f"l7 {config}: SKIPPED: {e}")
                del bench.targets[config]
        peaks = {c: max(bench.wrk(bench.targets[c], min(3.0, s.wrk_seconds))["rps"] for _ in range(2))
                 for c in ("haproxy", "processor") if c in bench.targets and (c != "haproxy" or not rate)
                 and (c != "processor" or s.low_rate is None)}
        bench.notes["calibration_peaks"] = peaks
        if not rate:
            if "haproxy" not in peaks:
                raise harness.BenchError("BENCH_L7_RATE is needed when haproxy is not measured")
            rate = round(peaks["haproxy"] / 2, -2)
            rate_source = f"half of haproxy's peak {peaks['haproxy']:,.0f} req/s before the rounds"
        low_rate = s.low_rate
        if low_rate is None:  # a rate both proxies sustain, unless that is the main rate already
            low = round(min(peaks.values(), default=0) / 2, -2)
            low_rate = low if 0 < low < rate * 0.9 else 0.0
        log(f"l7: latency runs at {rate:,.0f} req/s ({rate_source})"
            + (f" and at {low_rate:,.0f} req/s (half of the slower proxy's peak)" if low_rate else ""))
        rng = random.Random(s.seed)
        samples = {c: [] for c in bench.targets}
        for round_no in range(1, s.rounds + 1):
            order = list(bench.targets)
            rng.shuffle(order)
            for config in order:
                try:
                    sample = bench.measure(bench.targets[config], rate, low_rate)
                except Exception as e:  # one bad sample does not end the run
                    log(f"l7 round {round_no}/{s.rounds} {config}: FAILED: {e}")
                    samples[config].append(None)
                    continue
                samples[config].append(sample)
                cpu = (f" {sample['cpu_us_per_req']:6.1f} CPU-µs/req (busy {sample['proxy_busy']:.2f})"
                       if "cpu_us_per_req" in sample else "")
                low = (f"  @{low_rate:,.0f}/s: p50 {sample['low_p50_ms']:.3f} ms p99 {sample['low_p99_ms']:.3f} ms"
                       if low_rate else "")
                log(f"l7 round {round_no}/{s.rounds} {config:9} {sample['rps']:8,.0f} req/s{cpu}  "
                    f"@{rate:,.0f}/s: p50 {sample['p50_ms']:.3f} ms p99 {sample['p99_ms']:.3f} ms{low}")
            if bench.fair is not None:
                try:
                    pair = bench.fair_round()
                except Exception as e:  # one bad sample does not end the run
                    log(f"l7 round {round_no}/{s.rounds} fairness: FAILED: {e}")
                    pair = {}
                samples.setdefault("fair_alone", []).append(pair.get("alone"))
                samples.setdefault("fair_neighbour", []).append(pair.get("neighbour"))
                if pair:
                    log(f"l7 round {round_no}/{s.rounds} fairness: {pair['alone']['rps']:8,.0f} req/s alone, "
                        f"{pair['neighbour']['rps']:8,.0f} beside {bench.fair_cap} idle connections of another "
                        f"endpoint ({pair['neighbour']['rps'] / pair['alone']['rps']:.3f}x)")
        if bench.fair is not None:
            bench.notes["fair_cap"] = bench.fair_cap
        if "processor" in bench.targets:
            bench.notes["processor_counts"] = bench.processor_counts()
    except harness.BenchError as e:
        log(f"l7: FAILED: {e}")
        skipped.update({c: str(e) for c in s.configs if c not in samples})
    finally:
        log("l7: cleaning up")
        janitor.run_all()
        os.sched_setaffinity(0, old_affinity)
    summary, ratios, targets = summarise(samples)
    return {
        "started": started,
        "machine": {"cpus": os.cpu_count()},
        "settings": {**s.__dict__, "configs": list(s.configs), "proxy_cpus": list(s.proxy_cpus)},
        "rate": rate,
        "rate_source": rate_source,
        "low_rate": low_rate,
        "skipped": skipped,
        "notes": bench.notes,
        "summary": summary,
        "ratios": ratios,
        "targets": targets,
        "samples": samples,
    }


def main() -> int:
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind through the cleanup
    result = run(int(_env_float("BENCH_ROUNDS", 5)), None)
    print()
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
