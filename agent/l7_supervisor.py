"""Supervising the shared L7 processor (userspace_l7/) and taking in the flows it reports.

The processor outlives its agent, like the pinned BPF datapath; a restarted agent adopts it through
its PID file (checked against the process's start time and command line, so a recycled PID is never
taken for it). Only `meshagent teardown` stops it (`stop_processor`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from agent.files import open_private, write_atomic

log = logging.getLogger("meshagent.l7")

RESTART_BACKOFF_S = (0.5, 1, 2, 5)


def processor_pid_path(state_dir: str, node_name: str) -> str:
    return os.path.join(state_dir, f"l7-{node_name}.pid")


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks (/proc/PID/stat field 22): with the PID, it names one
    process for the machine's uptime, so a recycled PID is never mistaken for our processor."""
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[19])


def running_processor(pid_path: str, listen: str | None = None, workers: int | None = None,
                      args: list[str] | None = None) -> int | None:
    """The PID of the processor recorded in ``pid_path`` if it still runs (same start time, our
    command line, and listening on ``listen`` with ``workers`` workers when given, and started with
    exactly ``args`` after ``-m userspace_l7`` when given); None otherwise."""
    try:
        pid, started = (int(x) for x in open(pid_path).read().split())
        cmdline = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
    except (OSError, ValueError):
        return None
    if _start_time(pid) != started or b"userspace_l7" not in cmdline:
        return None
    if listen is not None and listen.encode() not in cmdline:
        return None
    if workers is not None and _workers_of(cmdline) != workers:
        return None
    if args is not None:
        given = cmdline[cmdline.index(b"userspace_l7") + 1:]
        if given and not given[-1]:
            given = given[:-1]  # /proc/PID/cmdline ends with a NUL
        if given != [a.encode() for a in args]:
            return None
    return pid


def _workers_of(cmdline: list[bytes]) -> int:
    try:
        return int(cmdline[cmdline.index(b"--workers") + 1])
    except (ValueError, IndexError):
        return 1


def stop_processor(pid_path: str, timeout: float = 5) -> int | None:
    """Stop the processor recorded in ``pid_path`` (SIGTERM, then SIGKILL) and remove the file.
    Returns its PID, or None if none was running. For teardown: agents leave it running."""
    pid = running_processor(pid_path)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            if not _wait_gone(pid, timeout):
                os.kill(pid, signal.SIGKILL)
                _wait_gone(pid, timeout)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(pid_path)
    return pid


def _wait_gone(pid: int, timeout: float) -> bool:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


class L7Supervisor:
    """Runs the processor, restarts it when it dies, and reads the flows it reports.

    The processor outlives its agent, like the pinned BPF datapath: an agent that stops or crashes
    leaves it serving, with its open connections, and the next agent adopts it through the PID
    file (and its start time, so a recycled PID is not taken for it). The agent's config snapshot
    and flows socket are the only ties, and the processor picks both up again by itself. Only
    `meshagent teardown` stops it (stop_processor).
    """

    def __init__(self, config_path: str, listen: str, flows_path: str, metrics_addr: str, node_name: str,
                 on_flow: Callable[[dict], None], bpffs_dir: str | None = None, pid_path: str | None = None,
                 log_path: str | None = None, workers: int = 1, max_connections_per_endpoint: int = 0,
                 request_headers_timeout: float = 10.0, request_timeout: float = 30.0):
        self.config_path = config_path
        self.workers = workers  # worker i serves metrics on metrics_addr's port + i
        # node_config's l7_max_connections_per_endpoint, l7_request_headers_timeout, l7_request_timeout
        self.max_connections_per_endpoint = max_connections_per_endpoint
        self.request_headers_timeout = request_headers_timeout
        self.request_timeout = request_timeout
        self.listen = listen
        self.flows_path = flows_path
        self.metrics_addr = metrics_addr
        self.node_name = node_name
        self.on_flow = on_flow
        self.bpffs_dir = bpffs_dir
        self.pid_path = pid_path or os.path.join(os.path.dirname(config_path), f"l7-{node_name}.pid")
        self.log_path = log_path or os.path.join(os.path.dirname(config_path), f"l7-{node_name}.log")
        self._pid: int | None = None
        self.adopted = False
        self.restarts = 0
        self._stop = threading.Event()
        self._server: socket.socket | None = None

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.flows_path)
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(self.flows_path)
        os.chmod(self.flows_path, 0o600)
        self._server.listen(4)
        threading.Thread(target=self._accept_flows, name="l7-flows", daemon=True).start()
        stale = running_processor(self.pid_path)
        if stale is not None and running_processor(self.pid_path, args=self._args()) is None:
            log.warning("L7 processor %d runs with other settings than %s; replacing it", stale,
                        " ".join(self._args()))
            stop_processor(self.pid_path)
        self._pid = running_processor(self.pid_path, args=self._args())
        self.adopted = self._pid is not None
        if self.adopted:
            log.info("adopted the running L7 processor, pid %d", self._pid)
        threading.Thread(target=self._supervise, name="l7-supervisor", daemon=True).start()

    def _args(self) -> list[str]:
        """The processor's arguments (after ``-m userspace_l7``): a running one is adopted only if it was
        started with these, so a changed node setting takes effect at the agent's next start."""
        args = ["--config", self.config_path, "--listen", self.listen, "--flows", self.flows_path,
                "--metrics", self.metrics_addr, "--node-name", self.node_name, "--workers", str(self.workers),
                "--max-connections-per-endpoint", str(self.max_connections_per_endpoint),
                "--header-timeout", f"{self.request_headers_timeout:g}",
                "--request-timeout", f"{self.request_timeout:g}"]
        if self.bpffs_dir:
            args += ["--bpffs", self.bpffs_dir]
        return args

    def _spawn(self) -> int:
        cmd = [sys.executable, "-m", "userspace_l7", *self._args()]
        with os.fdopen(open_private(self.log_path), "ab") as out:  # not the agent's stdout: it outlives it
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
        # Reap it when it exits so it does not linger as a zombie under a live agent.
        threading.Thread(target=proc.wait, name="l7-reaper", daemon=True).start()
        write_atomic(self.pid_path, f"{proc.pid} {_start_time(proc.pid)}\n")
        return proc.pid

    def _supervise(self) -> None:
        backoff = 0
        while not self._stop.is_set():
            started = time.monotonic()
            if self._pid is None:
                self._pid = self._spawn()
            if not self._wait_exit(self._pid):
                return  # stopping: the processor keeps running
            self._pid = None
            self.restarts += 1
            if time.monotonic() - started > 30:
                backoff = 0
            delay = RESTART_BACKOFF_S[min(backoff, len(RESTART_BACKOFF_S) - 1)]
            backoff += 1
            log.warning("L7 processor exited; restarting in %.1fs", delay)
            self._stop.wait(delay)

    def _wait_exit(self, pid: int) -> bool:
        """Block until ``pid`` exits (True) or stop() is called (False). pidfd: works for a process
        this agent did not start."""
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return True
        try:
            while not self._stop.is_set():
                if select.select([fd], [], [], 0.5)[0]:
                    return True
            return False
        finally:
            os.close(fd)

    def _accept_flows(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._read_flows, args=(conn,), daemon=True).start()

    def _read_flows(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as lines:
            for line in lines:
                try:
                    self.on_flow(json.loads(line))
                except (ValueError, KeyError, TypeError):
                    log.warning("ignoring a malformed L7 flow record")

    def reload(self) -> None:
        """Have the processor (all its workers) re-read the config now: SIGHUP. Without it each worker
        still picks a change up at its next poll, within a second, but not all at the same moment."""
        pid = self.pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)

    def metrics_addrs(self) -> list[str]:
        """Where the workers serve their istio_* metrics: metrics_addr's port + i for worker i."""
        host, _, port = self.metrics_addr.rpartition(":")
        return [f"{host}:{int(port) + i}" for i in range(self.workers)]

    def pid(self) -> int | None:
        return self._pid if self._pid is not None and running_processor(self.pid_path) == self._pid else None

    def stop(self) -> None:
        """Stop supervising and taking flows; the processor keeps serving (see the class doc)."""
        self._stop.set()
        if self._server:
            self._server.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.flows_path)
