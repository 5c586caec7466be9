"""What every part of `make bench` shares: paths, running and cleaning up processes, the rr load
generator, the BENCH_* environment and the per-round statistics.

bench/run.py (L4), bench/fastpath.py and bench/l7.py import this module; it imports none of them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from agent.datapath.build import cgroup2_root

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / "bench"
RR_SOURCE = BENCH_DIR / "rr.c"
RR_BIN = BENCH_DIR / "bin" / "rr"
RESULTS_DIR = BENCH_DIR / "results"
BPFFS_DIR = Path("/sys/fs/bpf/meshagent-bench")
CGROUP_DIR = Path(cgroup2_root()) / "meshagent-bench"


class BenchError(RuntimeError):
    """A configuration cannot be set up or measured; the message says why."""


# ---- settings ------------------------------------------------------------------------------------


def env_float(name: str, default: float) -> float:
    """One reader of the BENCH_* settings for every part."""
    value = os.environ.get(name)
    return float(value) if value else default


def traffic_cpu() -> int | None:
    """BENCH_CPU: the CPU that carries the measured traffic (client and server); default the last
    one; None ("none", or a single CPU): no pinning."""
    cpus = sorted(os.sched_getaffinity(0))
    cpu_env = os.environ.get("BENCH_CPU", "")
    if cpu_env == "none":
        return None
    if cpu_env:
        return int(cpu_env)
    return cpus[-1] if len(cpus) > 1 else None  # with a single CPU there is nothing to keep apart


def seed() -> int:
    """BENCH_SEED: the shuffle order, recorded in the results."""
    return int(os.environ.get("BENCH_SEED") or time.time_ns() % 1_000_000)


# ---- processes and cleanup -----------------------------------------------------------------------

T0 = time.monotonic()


def log(message: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {message}", flush=True)


def run(cmd: list[str], check: bool = True, timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise BenchError(f"{' '.join(cmd[:8])}{' ...' if len(cmd) > 8 else ''} exited {proc.returncode}: "
                         f"{(proc.stderr or proc.stdout).strip()[-400:]}")
    return proc


def in_netns(ns: str, cmd: list[str]) -> list[str]:
    """Switch only the network namespace: `ip netns exec` would also hide bpffs and cgroups."""
    return ["nsenter", f"--net=/run/netns/{ns}", "--", *cmd]


class Janitor:
    """Undo actions, run last-in first-out; one failing undo does not stop the others."""

    def __init__(self) -> None:
        self._undo: list[tuple[str, Callable[[], None]]] = []

    def push(self, what: str, undo: Callable[[], None]) -> None:
        self._undo.append((what, undo))

    def run_all(self) -> None:
        while self._undo:
            what, undo = self._undo.pop()
            try:
                undo()
            except Exception as e:  # keep cleaning: report what is left behind
                print(f"cleanup: {what}: {e}", file=sys.stderr, flush=True)


def stop_process(proc: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM, then SIGKILL, by PID (our children only)."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def spawn(janitor: Janitor, what: str, cmd: list[str], **kw: Any) -> subprocess.Popen:
    kw.setdefault("stdout", subprocess.DEVNULL)
    kw.setdefault("stderr", subprocess.DEVNULL)
    proc = subprocess.Popen(cmd, start_new_session=True, **kw)
    janitor.push(f"stop {what} (pid {proc.pid})", lambda: stop_process(proc))
    return proc


def remove_cgroup_tree(path: Path) -> None:
    if not path.is_dir():
        return
    for child in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            child.rmdir()
    with contextlib.suppress(OSError):
        path.rmdir()


@contextlib.contextmanager
def sysctl(name: str, value: str) -> Iterator[None]:
    path = Path("/proc/sys") / name.replace(".", "/")
    old = path.read_text().strip()
    path.write_text(value)
    try:
        yield
    finally:
        path.write_text(old)


# ---- the load generator --------------------------------------------------------------------------


def build_c(source: Path, binary: Path, *flags: str, headers: tuple[Path, ...] = ()) -> Path:
    """Compile ``source`` into ``binary`` when it is missing or older than the source or ``headers``."""
    newest = max(p.stat().st_mtime for p in (source, *headers))
    if binary.exists() and binary.stat().st_mtime >= newest:
        return binary
    binary.parent.mkdir(parents=True, exist_ok=True)
    run(["gcc", "-O2", "-Wall", *flags, "-o", str(binary), str(source)])
    log(f"compiled {binary.relative_to(REPO)}")
    return binary


def build_rr() -> Path:
    """bench/rr.c as bench/bin/rr."""
    return build_c(RR_SOURCE, RR_BIN, "-pthread")


# The load generators' shared latency histogram (bench/loadgen.c, bench/dnsload.c).
LATENCY_HIST_H = BENCH_DIR / "latency_hist.h"


# A connection attempt, run with python3 inside a namespace: prints open, refused (nothing listens,
# nothing drops) or timeout (dropped).
PROBE = """
import socket, sys
s = socket.socket()
s.settimeout(1.0)
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    print("open")
except ConnectionRefusedError:
    print("refused")
except OSError:
    print("timeout")
"""


# ---- per-round statistics ------------------------------------------------------------------------


def spread(values: list[float]) -> dict[str, float] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def paired(samples: dict[str, list[dict | None]], num: str, den: str, metric: str,
           op: Callable[[float, float], float] = lambda x, y: x / y) -> dict[str, float] | None:
    """op(num, den) per round where both were measured; median and spread over rounds."""
    values = []
    for x, y in zip(samples.get(num, []), samples.get(den, []), strict=False):
        if x and y and x.get(metric) is not None and y.get(metric) is not None and y[metric]:
            values.append(op(x[metric], y[metric]))
    return spread(values)


def target(ratios: dict[str, dict], name: str, key: str, ok: Callable[[float], bool], goal: str) -> dict:
    """One goal of the bench, judged on the median of ``ratios[key]`` (met: None when not measured)."""
    got = ratios.get(key)
    return {"target": name, "measure": key, "goal": goal, "median": got and got["median"],
            "met": None if got is None else ok(got["median"])}


def fmt(stat: dict | None, digits: int = 0, scale: float = 1.0) -> str:
    """A spread as a table cell: ``median (min–max)``."""
    if not stat:
        return "-"
    med, lo, hi = (stat[k] * scale for k in ("median", "min", "max"))
    return f"{med:,.{digits}f} ({lo:,.{digits}f}–{hi:,.{digits}f})"
