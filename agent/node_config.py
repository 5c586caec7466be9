"""Node configuration (`/etc/meshagent/agent.yaml`, SPEC §6a): every key optional, unknown keys are errors."""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from agent.datapath.build import cgroup2_root
from agent.dns.upstream import parse_upstream_address
from agent.errors import MeshError

DEFAULT_CONFIG_PATH = "/etc/meshagent/agent.yaml"
POLICY_MODES = ("default", "always", "never")


class NodeConfigError(MeshError, ValueError):
    """The node config is wrong; the message names the file and the key."""

    culprit = "node"


@dataclass(frozen=True)
class L7Ports:
    outbound: int = 15001
    inbound: int = 15006
    mtls: int = 15008


@dataclass(frozen=True)
class NodeConfig:
    node_name: str
    node_ip: str | None
    pod_cidr: str
    service_cidr: str
    trust_domain: str  # SPIFFE trust domain of workload identities
    cluster_domain: str  # DNS suffix of Service names (NAME.NAMESPACE.svc.<cluster_domain>), as in Istio
    store: str
    state_dir: str
    bpffs_dir: str
    cgroup: str
    api_socket: str
    metrics_addr: str
    l7_metrics_addr: str = "127.0.0.1:15020"  # the L7 processor's istio_* metrics; worker i on port + i
    l7_ports: L7Ports = field(default_factory=L7Ports)
    policy_enforcement: str = "default"
    socket_fastpath: bool = True  # sk_msg redirect between same-node sockets (bpf/lib/sockmap.h)
    l7_workers: int = 1  # L7 processor worker processes (SO_REUSEPORT): one CPU's worth each
    # Client connections one endpoint may hold in each L7 worker; 0: a share of the worker's file
    # descriptors, (RLIMIT_NOFILE - 64) / 2 / 8 (userspace_l7/admission.py)
    l7_max_connections_per_endpoint: int = 0
    # Seconds a request's head (Envoy's request_headers_timeout) and the whole request, head and body
    # (Envoy's request_timeout), may take from its first byte before the processor answers 408
    # (userspace_l7/server.py Options says why 10 and 30)
    l7_request_headers_timeout: float = 10.0
    l7_request_timeout: float = 30.0
    # The etcd store's TLS (https to its gateway): the CA that signed etcd's certificate, and this
    # node's client certificate and key (etcd's --client-cert-auth). Paths; None: plain HTTP.
    store_ca: str | None = None
    store_cert: str | None = None
    store_key: str | None = None
    # Seconds the node's etcd lease outlives its last keepalive: the node's owned keys vanish that
    # long after it dies (agent/store/etcd.py); as Cilium's --kvstore-lease-ttl
    store_lease_ttl: int = 30
    # The node's DNS proxy (agent/dns/): every DNS query of an endpoint goes to it, on the node's
    # address in pod_cidr (as the L7 processor) and dns_proxy_port (ztunnel's), UDP and TCP. It
    # forwards what the mesh does not answer to dns_upstreams (IP[:PORT]); empty: the nameservers
    # of the node's /etc/resolv.conf. tofqdns_min_ttl: the least seconds an address a toFQDNs
    # policy allowed stays allowed after the answer that gave it (Cilium's --tofqdns-min-ttl).
    dns_proxy: bool = True
    dns_proxy_port: int = 15053
    dns_upstreams: tuple[str, ...] = ()
    tofqdns_min_ttl: int = 3600
    source: str = "<defaults>"

    @property
    def pod_network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.pod_cidr)

    @property
    def metrics_host_port(self) -> tuple[str, int]:
        host, _, port = self.metrics_addr.rpartition(":")
        return host, int(port)

    @property
    def l7_metrics_host_port(self) -> tuple[str, int]:
        host, _, port = self.l7_metrics_addr.rpartition(":")
        return host, int(port)


_KEYS = (
    "node_name", "node_ip", "pod_cidr", "service_cidr", "trust_domain", "cluster_domain", "store", "state_dir",
    "bpffs_dir", "cgroup", "api_socket", "metrics_addr", "l7_metrics_addr", "l7_ports", "policy_enforcement",
    "socket_fastpath", "l7_workers", "l7_max_connections_per_endpoint", "l7_request_headers_timeout",
    "l7_request_timeout", "store_ca", "store_cert", "store_key", "store_lease_ttl", "dns_proxy", "dns_proxy_port",
    "dns_upstreams", "tofqdns_min_ttl",
)
MAX_L7_WORKERS = 64
MAX_L7_TIMEOUT_S = 3600.0
# etcd raises a shorter TTL to its own minimum (1.5 election timeouts, 2 s by default); keepalives go
# every third of it. A day at most, as Cilium's lease TTL.
STORE_LEASE_TTL_RANGE = (3, 86400)
MAX_TOFQDNS_MIN_TTL = 86400  # a day: Cilium's own example values stay well below it
MAX_DNS_UPSTREAMS = 8


def default_node_name() -> str:
    return os.environ.get("MESHAGENT_NODE") or socket.gethostname()


def default_api_socket(node_name: str) -> str:
    return f"/run/meshagent/{node_name}.sock"


def load(path: str | None = None) -> NodeConfig:
    """Load the config at ``path`` (or the default file if it exists, else the defaults)."""
    raw: dict = {}
    source = "<defaults>"
    if path is None and os.path.exists(DEFAULT_CONFIG_PATH):
        path = DEFAULT_CONFIG_PATH
    if path is not None:
        source = path
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise NodeConfigError(f"{path}: cannot read node config: {e.strerror}") from None
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise NodeConfigError(f"{path}: malformed YAML{where}: {getattr(e, 'problem', e)}") from None
        if not isinstance(raw, dict):
            raise NodeConfigError(f"{path}: node config must be a mapping of keys to values")
    return from_dict(raw, source)


def from_dict(raw: dict, source: str = "<defaults>") -> NodeConfig:
    unknown = sorted(set(raw) - set(_KEYS))
    if unknown:
        raise NodeConfigError(f"{source}: unknown key {unknown[0]!r}; supported: {', '.join(_KEYS)}")

    def get(key: str, default):
        value = raw.get(key, default)
        if value is None:
            return default
        if default is not None and not isinstance(value, type(default)):
            raise NodeConfigError(f"{source}: {key} must be a {type(default).__name__}, not {value!r}")
        return value

    name = get("node_name", default_node_name())
    if not name or "/" in name or len(name) > 63:
        raise NodeConfigError(f"{source}: node_name {name!r} must be 1-63 characters without '/'")
    cfg = dict(
        node_name=name,
        node_ip=get("node_ip", "") or None,
        pod_cidr=get("pod_cidr", "10.200.0.0/24"),
        service_cidr=get("service_cidr", "10.96.0.0/16"),
        trust_domain=get("trust_domain", "cluster.local"),
        cluster_domain=get("cluster_domain", "cluster.local"),
        store=get("store", "dir:///var/lib/meshagent/store"),
        state_dir=get("state_dir", "/var/lib/meshagent"),
        bpffs_dir=get("bpffs_dir", f"/sys/fs/bpf/meshagent/{name}"),
        cgroup=get("cgroup", f"{cgroup2_root()}/meshagent-{name}"),
        api_socket=get("api_socket", default_api_socket(name)),
        metrics_addr=get("metrics_addr", "127.0.0.1:9962"),
        l7_metrics_addr=get("l7_metrics_addr", "127.0.0.1:15020"),
        policy_enforcement=get("policy_enforcement", "default"),
        socket_fastpath=get("socket_fastpath", True),
        l7_workers=get("l7_workers", 1),
        l7_max_connections_per_endpoint=get("l7_max_connections_per_endpoint", 0),
        l7_request_headers_timeout=10.0 if raw.get("l7_request_headers_timeout") is None
        else raw["l7_request_headers_timeout"],
        l7_request_timeout=30.0 if raw.get("l7_request_timeout") is None else raw["l7_request_timeout"],
        store_ca=raw.get("store_ca"),
        store_cert=raw.get("store_cert"),
        store_key=raw.get("store_key"),
        store_lease_ttl=30 if raw.get("store_lease_ttl") is None else raw["store_lease_ttl"],
        dns_proxy=get("dns_proxy", True),
        dns_proxy_port=15053 if raw.get("dns_proxy_port") is None else raw["dns_proxy_port"],
        dns_upstreams=raw.get("dns_upstreams") or (),
        tofqdns_min_ttl=3600 if raw.get("tofqdns_min_ttl") is None else raw["tofqdns_min_ttl"],
    )
    if isinstance(cfg["l7_max_connections_per_endpoint"], bool) or cfg["l7_max_connections_per_endpoint"] < 0:
        raise NodeConfigError(f"{source}: l7_max_connections_per_endpoint {cfg['l7_max_connections_per_endpoint']!r} "
                              "must be a whole number, 0 for a share of the L7 processor's file descriptors")
    for key in ("l7_request_headers_timeout", "l7_request_timeout"):
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= MAX_L7_TIMEOUT_S:
            raise NodeConfigError(f"{source}: {key} {value!r} must be a number of seconds above 0 and at most "
                                  f"{MAX_L7_TIMEOUT_S:.0f}")
        cfg[key] = float(value)
    if cfg["l7_request_headers_timeout"] > cfg["l7_request_timeout"]:
        raise NodeConfigError(f"{source}: l7_request_headers_timeout {cfg['l7_request_headers_timeout']:g} is longer "
                              f"than l7_request_timeout {cfg['l7_request_timeout']:g}, which bounds the head too")
    if isinstance(cfg["l7_workers"], bool) or not 1 <= cfg["l7_workers"] <= MAX_L7_WORKERS:
        raise NodeConfigError(f"{source}: l7_workers {cfg['l7_workers']!r} must be a whole number from 1 to "
                          f"{MAX_L7_WORKERS} (worker processes of the L7 processor, about one per CPU it may use)")
    for key in ("pod_cidr", "service_cidr"):
        try:
            net = ipaddress.IPv4Network(cfg[key], strict=True)
        except ValueError as e:
            raise NodeConfigError(f"{source}: {key} {cfg[key]!r} is not an IPv4 CIDR: {e}") from None
        if net.prefixlen > 30:
            raise NodeConfigError(f"{source}: {key} {cfg[key]} is too small; use a /30 or larger")
    if cfg["node_ip"] is not None:
        try:
            ipaddress.IPv4Address(cfg["node_ip"])
        except ValueError:
            raise NodeConfigError(f"{source}: node_ip {cfg['node_ip']!r} is not an IPv4 address") from None
    if cfg["policy_enforcement"] not in POLICY_MODES:
        raise NodeConfigError(
            f"{source}: policy_enforcement {cfg['policy_enforcement']!r}; supported: {', '.join(POLICY_MODES)}"
        )
    if not (cfg["store"].startswith("dir://") or cfg["store"].startswith("etcd://")):
        raise NodeConfigError(f"{source}: store {cfg['store']!r}: use dir:///PATH or etcd://HOST:PORT[,HOST:PORT]")
    _check_store_keys(cfg, source)
    _check_dns_keys(cfg, raw.get("l7_ports") or {}, source)
    for key, ports in (("metrics_addr", 1), ("l7_metrics_addr", cfg["l7_workers"])):
        host, sep, port = cfg[key].rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65536 - ports:
            raise NodeConfigError(f"{source}: {key} {cfg[key]!r} must be HOST:PORT"
                                  + (f" with room for {ports} ports (one per L7 worker)" if ports > 1 else ""))
    for key in ("state_dir", "bpffs_dir", "cgroup", "api_socket"):
        if not os.path.isabs(cfg[key]):
            raise NodeConfigError(f"{source}: {key} {cfg[key]!r} must be an absolute path")
    l7 = raw.get("l7_ports") or {}
    if not isinstance(l7, dict) or set(l7) - {f.name for f in fields(L7Ports)}:
        raise NodeConfigError(f"{source}: l7_ports takes outbound, inbound and mtls port numbers")
    for key, value in l7.items():
        if not isinstance(value, int) or not 0 < value < 65536:
            raise NodeConfigError(f"{source}: l7_ports.{key} {value!r} is not a port number")
    return NodeConfig(**cfg, l7_ports=L7Ports(**l7), source=source)


def _check_store_keys(cfg: dict, source: str) -> None:
    """store_ca/store_cert/store_key (absolute paths, for an etcd store; cert and key together) and
    store_lease_ttl (whole seconds in STORE_LEASE_TTL_RANGE)."""
    tls = [key for key in ("store_ca", "store_cert", "store_key") if cfg[key] is not None]
    for key in tls:
        if not isinstance(cfg[key], str) or not os.path.isabs(cfg[key]):
            raise NodeConfigError(f"{source}: {key} {cfg[key]!r} must be an absolute path to a PEM file")
    if tls and not cfg["store"].startswith("etcd://"):
        raise NodeConfigError(f"{source}: {tls[0]} is set but store {cfg['store']!r} is not etcd://; TLS applies to "
                              "the etcd store only")
    if (cfg["store_cert"] is None) != (cfg["store_key"] is None):
        raise NodeConfigError(f"{source}: store_cert and store_key go together (the node's client certificate and "
                              "its key); set both or neither")
    low, high = STORE_LEASE_TTL_RANGE
    ttl = cfg["store_lease_ttl"]
    if isinstance(ttl, bool) or not isinstance(ttl, int) or not low <= ttl <= high:
        raise NodeConfigError(f"{source}: store_lease_ttl {ttl!r} must be a whole number of seconds from {low} to "
                              f"{high} (how long the node's keys outlive it in etcd)")


def _check_dns_keys(cfg: dict, l7_ports: object, source: str) -> None:
    """dns_proxy_port (a port the L7 processor does not use on the same address), dns_upstreams
    (IP[:PORT] each) and tofqdns_min_ttl (whole seconds)."""
    port = cfg["dns_proxy_port"]
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise NodeConfigError(f"{source}: dns_proxy_port {port!r} is not a port number (1-65535)")
    l7 = {**{f.name: f.default for f in fields(L7Ports)}, **(l7_ports if isinstance(l7_ports, dict) else {})}
    for key, value in l7.items():
        if value == port:
            raise NodeConfigError(f"{source}: dns_proxy_port {port} is also l7_ports.{key}; both listen on the "
                                  "node's pod_cidr address: pick another port")
    upstreams = cfg["dns_upstreams"]
    if isinstance(upstreams, str):
        upstreams = [upstreams]  # one resolver given without a list
    if not isinstance(upstreams, list | tuple) or len(upstreams) > MAX_DNS_UPSTREAMS:
        raise NodeConfigError(f"{source}: dns_upstreams must be a list of at most {MAX_DNS_UPSTREAMS} resolver "
                              "addresses (IP or IP:PORT)")
    for value in upstreams:
        try:
            parse_upstream_address(value)
        except ValueError as e:
            raise NodeConfigError(f"{source}: dns_upstreams: {e}") from None
    cfg["dns_upstreams"] = tuple(str(v).strip() for v in upstreams)
    ttl = cfg["tofqdns_min_ttl"]
    if isinstance(ttl, bool) or not isinstance(ttl, int) or not 0 <= ttl <= MAX_TOFQDNS_MIN_TTL:
        raise NodeConfigError(f"{source}: tofqdns_min_ttl {ttl!r} must be a whole number of seconds from 0 to "
                              f"{MAX_TOFQDNS_MIN_TTL} (0: the TTLs of the answers as they are)")
