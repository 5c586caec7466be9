"""Processes by PID: the lab's record of what it started, and finding what is left.

A PID alone can be reused once its process is gone, so the lab records each process as a `Proc`
(PID and start time, /proc/PID/stat field 22) and signals it only while both still match. Never by
name: other people's agents and etcds may run on the same machine.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[19])  # fields after the command name start at 3


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2]


@dataclass(frozen=True)
class Proc:
    """A process the lab started: its PID and start time."""

    pid: int
    start: int | None

    @classmethod
    def of(cls, pid: int) -> Proc:
        return cls(pid, start_time(pid))

    @classmethod
    def from_dict(cls, d: dict | None) -> Proc | None:
        return cls(d["pid"], d.get("start")) if d else None

    def to_dict(self) -> dict:
        return asdict(self)

    def alive(self) -> bool:
        """Still running (not a zombie) and still the process we started."""
        state = _state(self.pid)
        return state is not None and state != "Z" and start_time(self.pid) == self.start

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0, popen: subprocess.Popen | None = None) -> bool:
        """Send ``sig``, wait up to ``timeout`` s, then SIGKILL. Returns whether it was running."""
        was_running = self.alive()
        if was_running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)
            if not _wait_gone(self, timeout) and self.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                _wait_gone(self, 10.0)
        reap(self.pid, popen)
        return was_running


def _wait_gone(proc: Proc, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reap(proc.pid)  # a child of ours stays a zombie until reaped
        if not proc.alive():
            return True
        time.sleep(0.05)
    return False


def reap(pid: int, popen: subprocess.Popen | None = None) -> None:
    """Collect the exit status if the process is our child and has exited (no zombie left)."""
    if popen is not None:
        popen.poll()
        return
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def pids_in_netns(path: str) -> list[int]:
    """Processes whose network namespace is the one bound at ``path`` (/run/netns/NAME)."""
    try:
        target = os.stat(path)
    except OSError:
        return []
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            st = os.stat(f"/proc/{entry}/ns/net")
            if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
                found.append(int(entry))
    return found


def pids_mentioning(text: str) -> list[int]:
    """Processes whose command line contains ``text`` (the lab's own directory: a crashed `up` may
    have started an agent or etcd without recording it)."""
    needle, found = text.encode(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        with contextlib.suppress(OSError), open(f"/proc/{entry}/cmdline", "rb") as f:
            if needle in f.read():
                found.append(int(entry))
    return found


def kill(pids: list[int], timeout: float = 10.0) -> None:
    """SIGKILL each process (found as the lab's by the two functions above) and wait for it to go."""
    procs = [Proc.of(pid) for pid in pids]
    for proc in procs:
        if proc.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
    for proc in procs:
        _wait_gone(proc, timeout)
