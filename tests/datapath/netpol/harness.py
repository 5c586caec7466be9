"""The Kubernetes NetworkPolicy e2e model on one meshagent node, after upstream's
test/e2e/network/netpol (kubernetes/kubernetes), written anew for meshagent.

The model: namespaces x, y, z (Namespace resources labelled ``ns: <name>``), pods a, b, c in
each (endpoints ``x-a`` ... ``z-c`` with ``--namespace x --labels pod=a``), nine in all. Every pod
serves TCP 80 and 81 and UDP 80, 81 and 53, with container port names as upstream gives them
(``serve-80-tcp``, ``serve-81-udp``, ...). A case applies its policies, says which pairs it
expects to connect in a `Reachability` (default: everyone reaches everyone; `expect`,
`expect_all_ingress`, `expect_all_egress`, `expect_peer` as upstream's Expect, ExpectAllIngress,
ExpectAllEgress, ExpectPeer), and `Cluster.validate` probes the 9x9 matrix until it matches.

How the traffic is made, without a process per probe or per server: a socket belongs to the
network namespace of the thread that made it, for its whole life. `netns_socket` switches the
calling thread into an endpoint's namespace (setns), makes the socket and switches back. So the
servers are sockets of the test process living in the endpoints' namespaces, served by one thread
(`Servers`), and a probe of the whole matrix is 72 non-blocking connects (or UDP datagrams) made
at once and awaited together for at most `PROBE_TIMEOUT` (`probe_matrix`). Loopback (a pod to
itself) is not probed: its treatment is undefined in Kubernetes, and upstream ignores it too.

A mismatch counts only if a second probe of that pair confirms it (as upstream probes twice), and
`validate` polls until the matrix matches or `VALIDATE_DEADLINE` passes (policy propagation is not
instant); on failure the message is upstream's truth tables: expected, observed, comparison.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import selectors
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from tests.datapath.conftest import Node

NAMESPACES = ("x", "y", "z")
POD_NAMES = ("a", "b", "c")
# What every pod serves, as (protocol, port). Upstream serves 80 and 81 on TCP, UDP and SCTP;
# this kernel has no SCTP (CONFIG_IP_SCTP unset). UDP 53 stands in for DNS in the egress cases.
SERVED = (("TCP", 80), ("TCP", 81), ("UDP", 80), ("UDP", 81), ("UDP", 53))
PROBE_TIMEOUT = 1.0  # a denied TCP SYN or UDP datagram gets no answer: wait this long (upstream: 1 s)
VALIDATE_DEADLINE = 8.0  # SPEC §5 asks for 1 s; apply is synchronous, this leaves room for a loaded machine

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def port_name(proto: str, port: int) -> str:
    """Upstream's container port name: serve-80-tcp."""
    return f"serve-{port}-{proto.lower()}"


# ---- sockets in other network namespaces ---------------------------------------------------------


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def netns_socket(netns: str, kind: int) -> socket.socket:
    """A new AF_INET socket in the network namespace at path ``netns`` (e.g. /run/netns/NAME).

    Only the calling thread switches, and it switches back before returning."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(netns, os.O_RDONLY)
    try:
        _setns(target)
        try:
            return socket.socket(socket.AF_INET, kind)
        finally:
            _setns(home)
    finally:
        os.close(target)
        os.close(home)


# ---- the model ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pod:
    namespace: str
    name: str
    ip: str = ""
    netns: str = ""  # path of the endpoint's network namespace

    @property
    def key(self) -> str:
        """Upstream's PodString: x/a."""
        return f"{self.namespace}/{self.name}"

    @property
    def endpoint(self) -> str:
        """The endpoint's name on the node (names are per node, not per namespace)."""
        return f"{self.namespace}-{self.name}"


@dataclass(frozen=True)
class Peer:
    """Pods by namespace and/or name; an empty field matches every pod (upstream's Peer)."""

    namespace: str = ""
    pod: str = ""

    def matches(self, key: str) -> bool:
        ns, name = key.split("/")
        return self.namespace in ("", ns) and self.pod in ("", name)


class Reachability:
    """The expected truth table of one probe: pod key -> pod key -> connects?"""

    def __init__(self, pods: Iterable[Pod | str], default: bool = True):
        self.keys = [p.key if isinstance(p, Pod) else p for p in pods]
        self.expected = {(f, t): default for f in self.keys for t in self.keys}

    def _check(self, *keys: str) -> None:
        for k in keys:
            if k not in self.keys:
                raise KeyError(f"no pod {k} in the model")

    def expect(self, frm: str, to: str, connected: bool) -> Reachability:
        self._check(frm, to)
        self.expected[(frm, to)] = connected
        return self

    def expect_all_ingress(self, to: str, connected: bool) -> Reachability:
        self._check(to)
        for f in self.keys:
            self.expected[(f, to)] = connected
        return self

    def expect_all_egress(self, frm: str, connected: bool) -> Reachability:
        self._check(frm)
        for t in self.keys:
            self.expected[(frm, t)] = connected
        return self

    def expect_peer(self, frm: Peer, to: Peer, connected: bool) -> Reachability:
        for f in self.keys:
            for t in self.keys:
                if frm.matches(f) and to.matches(t):
                    self.expected[(f, t)] = connected
        return self

    def pairs(self) -> list[tuple[str, str]]:
        """The pairs a probe covers: every ordered pair but loopback."""
        return [(f, t) for f in self.keys for t in self.keys if f != t]

    def wrong(self, observed: dict[tuple[str, str], bool]) -> list[tuple[str, str]]:
        return [p for p in self.pairs() if observed.get(p) != self.expected[p]]

    def report(self, observed: dict[tuple[str, str], bool], what: str) -> str:
        """Upstream's three truth tables, rows from, columns to."""
        wrong = self.wrong(observed)

        def table(title: str, cell) -> str:
            width = max(len(k) for k in self.keys) + 1
            lines = [title, " " * width + " ".join(k.rjust(width - 1) for k in self.keys)]
            for f in self.keys:
                cells = ["-" if f == t else cell(f, t) for t in self.keys]
                lines.append(f.ljust(width) + " ".join(c.rjust(width - 1) for c in cells))
            return "\n".join(lines)

        def mark(v: bool | None) -> str:
            return "?" if v is None else ("." if v else "X")

        return "\n\n".join([
            f"{what}: {len(wrong)} wrong of {len(self.pairs())} (loopback not probed)",
            table("expected (. connects, X blocked):", lambda f, t: mark(self.expected[(f, t)])),
            table("observed:", lambda f, t: mark(observed.get((f, t)))),
            table("comparison (. as expected, X wrong):",
                  lambda f, t: "." if observed.get((f, t)) == self.expected[(f, t)] else "X"),
            "wrong: " + ", ".join(f"{f} -> {t} (expected {'connects' if self.expected[(f, t)] else 'blocked'})"
                                  for f, t in wrong),
        ])


# ---- probing -----------------------------------------------------------------------------------------


def probe_matrix(pods: dict[str, Pod], pairs: Iterable[tuple[str, str]], proto: str, port: int,
                 timeout: float = PROBE_TIMEOUT) -> dict[tuple[str, str], bool]:
    """Probe every pair at once: TCP connects, or a UDP datagram that must come back echoed."""
    sel = selectors.DefaultSelector()
    result: dict[tuple[str, str], bool] = {}
    try:
        for pair in pairs:
            src, dst = pods[pair[0]], pods[pair[1]]
            s = netns_socket(src.netns, socket.SOCK_STREAM if proto == "TCP" else socket.SOCK_DGRAM)
            s.setblocking(False)
            try:
                if proto == "TCP":
                    err = s.connect_ex((dst.ip, port))
                    if err not in (0, errno.EINPROGRESS):
                        raise OSError(err, os.strerror(err))
                    sel.register(s, selectors.EVENT_WRITE, pair)
                else:
                    s.connect((dst.ip, port))
                    s.send(f"{pair[0]}>{pair[1]}".encode())
                    sel.register(s, selectors.EVENT_READ, pair)
            except OSError:
                s.close()
                result[pair] = False
        deadline = time.monotonic() + timeout
        while sel.get_map() and (left := deadline - time.monotonic()) > 0:
            for key, _ in sel.select(left):
                s, pair = key.fileobj, key.data
                if proto == "TCP":
                    ok = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
                else:
                    try:
                        ok = s.recv(256) == f"{pair[0]}>{pair[1]}".encode()
                    except OSError:  # ICMP port unreachable
                        ok = False
                result[pair] = ok
                sel.unregister(s)
                s.close()
    finally:
        for key in list(sel.get_map().values()):
            result.setdefault(key.data, False)  # no answer in time: blocked
            sel.unregister(key.fileobj)
            key.fileobj.close()
        sel.close()
    return result


class Servers:
    """Listening sockets in the endpoints' namespaces, served by one thread: TCP connections are
    accepted and closed (a probe only needs the handshake), UDP datagrams echoed."""

    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread: threading.Thread | None = None

    def listen(self, netns: str, proto: str, port: int) -> None:
        """Add a listener; call before start()."""
        s = netns_socket(netns, socket.SOCK_STREAM if proto == "TCP" else socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
        if proto == "TCP":
            s.listen(512)
        s.setblocking(False)
        self._sel.register(s, selectors.EVENT_READ, proto)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="netpol-servers", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            for key, _ in self._sel.select():
                if key.data is None:
                    return
                with contextlib.suppress(OSError):
                    if key.data == "TCP":
                        conn, _ = key.fileobj.accept()
                        conn.close()
                    else:
                        data, peer = key.fileobj.recvfrom(2048)
                        key.fileobj.sendto(data, peer)

    def close(self) -> None:
        if self._thread:
            self._wake_w.send(b"x")
            self._thread.join(5)
        for key in list(self._sel.get_map().values()):
            key.fileobj.close()
        self._sel.close()
        self._wake_w.close()


# ---- the cluster: one node, nine endpoints, the case's resources -------------------------------------


def namespace_yaml(name: str, labels: dict[str, str]) -> str:
    return json.dumps({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})


def first_line(proc) -> str:
    """The agent's (or click's) one-line error."""
    text = (proc.stderr or proc.stdout or "").strip().splitlines()
    return text[-1] if text else f"exit {proc.returncode}"


@dataclass
class Cluster:
    """The nine endpoints on one node (tests/datapath/conftest.py `Node`) and what a case changed.

    ``missing`` names the features of issue 14 the agent does not have yet, each with the agent's
    own error, so a case that needs one fails saying which (and the others still run)."""

    node: Node
    pods: dict[str, Pod] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    servers: Servers | None = None
    _applied: list[str] = field(default_factory=list)
    _relabelled_pods: dict[str, dict[str, str | None]] = field(default_factory=dict)
    _relabelled_namespaces: set[str] = field(default_factory=set)
    _checked: set[tuple[str, int]] = field(default_factory=set)

    # -- building

    @classmethod
    def build(cls, node: Node) -> Cluster:
        c = cls(node)
        try:
            c._build()
        except BaseException:
            c.close()
            raise
        return c

    def _build(self) -> None:
        for ns in NAMESPACES:  # first, so the endpoints get their namespace's labels at once
            proc = self.node.apply(namespace_yaml(ns, {"ns": ns}), check=False)
            if proc.returncode != 0 and "'Namespace' is not supported" in proc.stderr:
                self.missing["namespaces"] = first_line(proc)
                break
            if proc.returncode != 0:
                raise AssertionError(f"apply Namespace {ns}: {first_line(proc)}")
        ports = [a for proto, port in SERVED for a in ("--port", f"{port_name(proto, port)}={port}/{proto}")]
        for ns in NAMESPACES:
            for name in POD_NAMES:
                pod = Pod(ns, name)
                args = ["endpoint", "add", pod.endpoint, "--namespace", ns, "--labels", f"pod={name}", "-o", "json"]
                proc = self.node.cli(*args, *([] if "named_ports" in self.missing else ports), check=False)
                if proc.returncode == 2 and "--port" in proc.stderr:  # click: no such option (nothing made)
                    self.missing["named_ports"] = first_line(proc)
                    proc = self.node.cli(*args, check=False)
                if proc.returncode != 0:
                    raise AssertionError(f"endpoint add {pod.endpoint}: {proc.stderr}")
                ep = json.loads(proc.stdout)
                self.pods[pod.key] = Pod(ns, name, ep["ip"], ep["netns"])
        proc = self.node.cli("endpoint", "label", "--help", check=False)
        if proc.returncode == 2 and "No such command" in proc.stderr:
            self.missing["endpoint_label"] = first_line(proc)
        self.servers = Servers()
        for pod in self.pods.values():
            for proto, port in SERVED:
                self.servers.listen(pod.netns, proto, port)
        self.servers.start()
        self.validate(self.reachability(), "TCP", 80)  # the model works before any case runs

    def close(self) -> None:
        if self.servers:
            self.servers.close()
            self.servers = None

    # -- what a case uses

    def reachability(self) -> Reachability:
        return Reachability(self.pods.values())

    def ip(self, key: str) -> str:
        return self.pods[key].ip

    def need(self, feature: str, part: str) -> None:
        """Fail (not skip) a case whose set-up needs a feature the agent does not have yet."""
        if feature in self.missing:
            raise AssertionError(f"needs {part}; the agent said: {self.missing[feature]}")

    def apply(self, text: str) -> None:
        """Apply the case's resources (remembered, and deleted when the case ends)."""
        self._applied.append(text)
        proc = self.node.apply(text, check=False)
        if proc.returncode != 0:
            raise AssertionError(f"meshagent apply refused the case's resources: {first_line(proc)}")

    def delete(self, text: str) -> None:
        self.node.delete(text)

    def label_namespace(self, ns: str, labels: dict[str, str]) -> None:
        """Re-apply Namespace ``ns`` with these labels (plus its usual ``ns: <name>``)."""
        self._relabelled_namespaces.add(ns)
        proc = self.node.apply(namespace_yaml(ns, {"ns": ns, **labels}), check=False)
        if proc.returncode != 0:
            raise AssertionError(f"relabelling namespace {ns}: {first_line(proc)}")

    def label_pod(self, key: str, *changes: str) -> None:
        """``meshagent endpoint label`` in kubectl's form: KEY=VALUE sets, KEY- removes."""
        before = self._relabelled_pods.setdefault(key, {})
        current = {"pod": key.split("/")[1]}
        for ch in changes:
            k = ch[:-1] if ch.endswith("-") else ch.partition("=")[0]
            before.setdefault(k, current.get(k))
        proc = self.node.cli("endpoint", "label", self.pods[key].endpoint, *changes, check=False)
        if proc.returncode != 0:
            raise AssertionError(f"meshagent endpoint label {self.pods[key].endpoint}: {first_line(proc)}")

    def validate(self, reach: Reachability, proto: str, port: int, deadline: float = VALIDATE_DEADLINE) -> None:
        """Probe until the matrix is as expected; a mismatch is probed a second time before it counts."""
        self._checked.add((proto, port))
        end = time.monotonic() + deadline
        rounds = 0
        while True:
            rounds += 1
            observed = probe_matrix(self.pods, reach.pairs(), proto, port)
            wrong = reach.wrong(observed)
            if wrong:
                observed.update(probe_matrix(self.pods, wrong, proto, port))
                wrong = reach.wrong(observed)
            if not wrong:
                return
            if time.monotonic() >= end:
                raise AssertionError("reachability matrix does not match\n\n"
                                     + reach.report(observed, f"{proto}/{port} after {rounds} rounds of probes"))
            time.sleep(0.2)

    # -- between cases

    def reset(self) -> None:
        """Undo what the case did and wait until everyone reaches everyone again."""
        errors = []
        # By KIND NAME, not by file: delete -f validates the documents again (a refused one fails
        # it), and a case that updated a resource applied it twice.
        refs = {(d["kind"], d["metadata"]["name"], d["metadata"].get("namespace", "default"))
                for text in self._applied for d in yaml.safe_load_all(text) if d}
        for kind, name, ns in sorted(refs):
            proc = self.node.cli("delete", kind, name, "-n", ns, "--ignore-not-found", check=False)
            if proc.returncode != 0:
                errors.append(f"delete {kind} {ns}/{name}: {first_line(proc)}")
        self._applied.clear()
        for ns in sorted(self._relabelled_namespaces):
            proc = self.node.apply(namespace_yaml(ns, {"ns": ns}), check=False)
            if proc.returncode != 0 and "namespaces" not in self.missing:
                errors.append(f"namespace {ns}: {first_line(proc)}")
        self._relabelled_namespaces.clear()
        for key, before in self._relabelled_pods.items():
            changes = [f"{k}-" if v is None else f"{k}={v}" for k, v in before.items()]
            proc = self.node.cli("endpoint", "label", self.pods[key].endpoint, *changes, check=False)
            if proc.returncode != 0 and "endpoint_label" not in self.missing:
                errors.append(f"endpoint label {key}: {first_line(proc)}")
        self._relabelled_pods.clear()
        if errors:
            raise AssertionError("could not undo the case: " + "; ".join(errors))
        for proto, port in sorted(self._checked | {("TCP", 80)}):
            self.validate(self.reachability(), proto, port)
        self._checked.clear()


@contextlib.contextmanager
def cluster_on(node: Node) -> Iterator[Cluster]:
    c = Cluster.build(node)
    try:
        yield c
    finally:
        c.close()
