"""The agent's side of the shared L7 processor (userspace_l7/): which services need it, the config
snapshot it reads, supervising its process, and taking in the L7 flows it reports.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable

from agent.services import ServiceView

log = logging.getLogger("meshagent.l7")

RESTART_BACKOFF_S = (0.5, 1, 2, 5)


def _service_ref(host: str, namespace: str, trust_domain: str) -> tuple[str, str] | None:
    """(namespace, name) a VirtualService/DestinationRule host names, by Istio's short-name rules."""
    host = host.lower()
    for suffix in (f".svc.{trust_domain}", ".svc"):
        if host.endswith(suffix):
            host = host[: -len(suffix)]
    parts = host.split(".")
    if "*" in host or len(parts) > 2:
        return None  # wildcards and external names: not a mesh service
    return (parts[1], parts[0]) if len(parts) == 2 else (namespace, parts[0])


def l7_services(vs_bodies: Iterable[dict], dr_bodies: Iterable[dict], trust_domain: str) -> set[tuple[str, str]]:
    """Services that have L7 configuration and so go through the processor (SPEC §5)."""
    out = set()
    for body in vs_bodies:
        ns = body["metadata"].get("namespace", "default")
        for host in body.get("spec", {}).get("hosts") or []:
            ref = _service_ref(host, ns, trust_domain)
            if ref:
                out.add(ref)
    for body in dr_bodies:
        ref = _service_ref(body.get("spec", {}).get("host", ""), body["metadata"].get("namespace", "default"),
                           trust_domain)
        if ref:
            out.add(ref)
    return out


def _service_config(v: ServiceView, labels_by_ip: dict[str, dict]) -> dict:
    """One service of the snapshot. A ServiceEntry host is known by that host alone, and its endpoints
    carry their own labels (for DestinationRule subsets) and per-port-name ports."""
    out = {
        "name": v.name, "namespace": v.namespace, "vip": v.vip,
        "ports": [{"port": p.port, "target_port": p.target_port, "protocol": p.protocol.upper(), "name": p.name}
                  for p in v.http_ports()],
        "backends": [{"ip": b.ip, "workload": b.endpoint,
                      "labels": dict(b.labels) if v.entry else labels_by_ip.get(b.ip, {}),
                      **({"ports": dict(b.ports)} if b.ports else {})}
                     for b in v.backends],
    }
    if v.entry:
        out["hosts"] = [v.name]
        out["fqdn"] = v.name
    return out


def l7_config(views: Iterable[ServiceView], vs_bodies: list[dict], dr_bodies: list[dict],
              labels_by_ip: dict[str, dict], trust_domain: str) -> dict:
    """The JSON snapshot userspace_l7.config.L7Config.from_dict reads."""
    return {
        "cluster_domain": trust_domain,
        "services": [_service_config(v, labels_by_ip) for v in views],
        "virtual_services": vs_bodies,
        "destination_rules": dr_bodies,
    }


def write_if_changed(path: str, value: dict) -> bool:
    text = json.dumps(value, sort_keys=True, indent=1)
    with contextlib.suppress(FileNotFoundError), open(path) as f:
        if f.read() == text:
            return False
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)  # the processor never reads half a file
    return True


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the agent dies, even by SIGKILL, so no processor
    outlives its agent holding the listening port (the next agent starts its own)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the agent died before prctl took effect
        os._exit(1)


class L7Supervisor:
    """Runs the processor, restarts it when it dies, and reads the flows it reports."""

    def __init__(self, config_path: str, listen: str, flows_path: str, metrics_addr: str, node_name: str,
                 on_flow: Callable[[dict], None], bpffs_dir: str | None = None):
        self.config_path = config_path
        self.listen = listen
        self.flows_path = flows_path
        self.metrics_addr = metrics_addr
        self.node_name = node_name
        self.on_flow = on_flow
        self.bpffs_dir = bpffs_dir
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self._stop = threading.Event()
        self._server: socket.socket | None = None

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.flows_path)
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(self.flows_path)
        self._server.listen(4)
        threading.Thread(target=self._accept_flows, name="l7-flows", daemon=True).start()
        threading.Thread(target=self._supervise, name="l7-supervisor", daemon=True).start()

    def _spawn(self) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "userspace_l7", "--config", self.config_path, "--listen", self.listen,
               "--flows", self.flows_path, "--metrics", self.metrics_addr, "--node-name", self.node_name]
        if self.bpffs_dir:
            cmd += ["--bpffs", self.bpffs_dir]
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=_die_with_parent)

    def _supervise(self) -> None:
        backoff = 0
        while not self._stop.is_set():
            started = time.monotonic()
            self.proc = self._spawn()
            code = self.proc.wait()
            if self._stop.is_set():
                return
            self.restarts += 1
            if time.monotonic() - started > 30:
                backoff = 0
            delay = RESTART_BACKOFF_S[min(backoff, len(RESTART_BACKOFF_S) - 1)]
            backoff += 1
            log.warning("L7 processor exited with %s; restarting in %.1fs", code, delay)
            self._stop.wait(delay)

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

    def pid(self) -> int | None:
        return self.proc.pid if self.proc and self.proc.poll() is None else None

    def stop(self) -> None:
        self._stop.set()
        if self._server:
            self._server.close()
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.flows_path)
