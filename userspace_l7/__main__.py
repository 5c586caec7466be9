"""Run the L7 processor.

usage: python -m userspace_l7 --config FILE --listen HOST:PORT [--workers N] [--flows PATH]
                              [--metrics HOST:PORT] [--header-timeout SECONDS] [--request-timeout SECONDS]
                              [--max-connections-per-endpoint N] [--node-name NAME] [--bpffs DIR]

examples:
    python -m userspace_l7 --config /run/meshagent/l7.json --listen 127.0.0.1:15001
    python -m userspace_l7 --config l7.json --listen 0.0.0.0:15001 --workers 4 \\
        --flows /run/meshagent/l7-flows.sock --metrics 127.0.0.1:15020

With --workers N > 1 the parent starts N worker processes that share the listening port through
SO_REUSEPORT; worker i serves metrics on the metrics port + i. A worker that dies after serving a
while is started again; one that dies at once (a bad config, a taken port) is not, and the parent
exits when none is left (the agent supervises the parent). Workers die with the parent. SIGTERM
stops every worker; SIGHUP re-reads the config at once (it is also polled every second). Every
process raises its RLIMIT_NOFILE soft limit to the hard limit, and each worker shares its
descriptors out per client endpoint (userspace_l7/admission.py).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time

from .admission import raise_nofile
from .server import Options, serve
from .snapshot import SnapshotError


def _addr(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: write HOST:PORT, e.g. 127.0.0.1:15001")
    return host.strip("[]") or "0.0.0.0", int(port)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m userspace_l7", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the JSON config the agent writes (userspace_l7.snapshot)")
    p.add_argument("--listen", required=True, type=_addr, help="HOST:PORT to accept connections on")
    p.add_argument("--workers", type=int, default=1, help="worker processes on SO_REUSEPORT (default 1)")
    p.add_argument("--flows", help="file or unix socket to write L7 flows to (JSON lines)")
    p.add_argument("--metrics", type=_addr, help="HOST:PORT for Prometheus /metrics")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a request's head may take from its first byte (408 after; default 10)")
    p.add_argument("--request-timeout", type=float, default=30.0,
                   help="seconds a whole request, head and body, may take from its first byte (408 after; default 30)")
    p.add_argument("--idle-timeout", type=float, default=60.0, help="seconds an idle client connection is kept")
    p.add_argument("--max-connections-per-endpoint", type=int, default=0,
                   help="client connections one endpoint may hold in each worker (default 0: a share of the "
                   "worker's file descriptors, see userspace_l7/admission.py)")
    p.add_argument("--node-name", default="", help="node_name in flows")
    p.add_argument("--bpffs", help="the node's bpffs directory: learn each connection's original "
                   "destination and client identity from the datapath (connections it did not "
                   "redirect are closed)")
    p.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    # Tests and the bench on loopback: name client endpoints by source address (origdst.SourceAddressResolver).
    p.add_argument("--clients-by-source", help=argparse.SUPPRESS)
    return p


WORKER_SETTLED_S = 5.0  # a worker that ran this long is restarted when it dies


def _die_with_parent() -> None:
    """In a worker, before exec: SIGTERM when the parent goes, even by SIGKILL, so no worker is left
    holding the port (prctl PR_SET_PDEATHSIG)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)


def _supervise(args: argparse.Namespace, argv: list[str]) -> int:
    base = list(argv)
    i = base.index("--workers") if "--workers" in base else -1
    if i >= 0:
        del base[i:i + 2]

    def spawn(n: int) -> tuple[subprocess.Popen, float]:
        cmd = [sys.executable, "-m", "userspace_l7", *base, "--reuse-port"]
        if args.metrics:
            j = cmd.index("--metrics")
            cmd[j + 1] = f"{args.metrics[0]}:{args.metrics[1] + n}"
        return subprocess.Popen(cmd, preexec_fn=_die_with_parent), time.monotonic()

    workers = {n: spawn(n) for n in range(args.workers)}
    stopping = False

    def forward(signum, frame):
        nonlocal stopping
        stopping = stopping or signum != signal.SIGHUP
        for proc, _ in workers.values():
            if proc.poll() is None:
                proc.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    code = 0
    while workers:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        n = next((k for k, (proc, _) in workers.items() if proc.pid == pid), None)
        if n is None:
            continue
        proc, started = workers.pop(n)
        proc.returncode = os.waitstatus_to_exitcode(status)
        code = max(code, proc.returncode)
        if not stopping and time.monotonic() - started >= WORKER_SETTLED_S:
            print(f"l7: worker {n} (pid {pid}) exited with {proc.returncode}; starting it again",
                  file=sys.stderr, flush=True)
            workers[n] = spawn(n)
    return code


def main(argv: list[str] | None = None) -> int:
    # A reload request (SIGHUP) that comes before the handler is in place must not end the process:
    # the config is read at start anyway. Workers inherit this until they install their own.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    if args.workers < 1:
        print("error: --workers must be at least 1", file=sys.stderr)
        return 2
    if min(args.header_timeout, args.request_timeout, args.idle_timeout) <= 0 or args.max_connections_per_endpoint < 0:
        print("error: timeouts must be positive and --max-connections-per-endpoint at least 0", file=sys.stderr)
        return 2
    raise_nofile()  # workers inherit it
    if args.workers > 1:
        return _supervise(args, argv)
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency; asyncio still works
        runner = asyncio.run
    options = Options(header_timeout=args.header_timeout, request_timeout=args.request_timeout,
                      idle_timeout=args.idle_timeout, node_name=args.node_name,
                      max_connections_per_endpoint=args.max_connections_per_endpoint)
    try:
        resolver, policy = None, None
        if args.bpffs:
            from .origdst import KernelOriginalDstResolver
            from .policy_check import KernelPolicy

            resolver, policy = KernelOriginalDstResolver(args.bpffs), KernelPolicy(args.bpffs)
        elif args.clients_by_source:
            from .origdst import SourceAddressResolver

            resolver = SourceAddressResolver.parse(args.clients_by_source)
        runner(serve(args.config, *args.listen, flows_path=args.flows, metrics_addr=args.metrics,
                     reuse_port=args.reuse_port, resolver=resolver, options=options, policy=policy))
    except SnapshotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: cannot listen on {args.listen[0]}:{args.listen[1]}: {e.strerror}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
