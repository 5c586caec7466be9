"""toFQDNs and DNS rules on the real kernel, end to end: a real agent (the Node fixture) with its DNS
proxy and the kernel's port 53 redirect, an "outside world" this module creates, and processes in an
endpoint that look names up with glibc's getaddrinfo and then connect.

    node netns     the agent; tofqdns_min_ttl MIN_TTL s; dns_upstreams: the outside DNS server
      |  veth      192.168.79.1 (node) -- 192.168.79.2 (outside); 192.0.2.0/24 routed to the outside
    outside netns  a dnslib server on 192.0.2.53:53 (tests/dnsserver.py, the TTLs below) and a TCP
                   echo server on port 443 of every address: api 192.0.2.10, evil 192.0.2.66,
                   a.cdn 192.0.2.21, cdn (the apex) 192.0.2.20, long.cdn 192.0.2.23, other.test 192.0.2.99
    client         app=client, under POLICY: may look up *.example.test only; toFQDNs allows port 443
                   to api.example.test and *.cdn.example.test
    free           app=free, under no policy: any name, any address

Everything is removed at the end, also on failure: processes by PID, the outside namespace (its veth
goes with it), the node by its fixture.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from tests.datapath.conftest import REPO

PY = sys.executable
NETTOOL = str(Path(__file__).with_name("nettool.py"))
MIN_TTL = 5  # tofqdns_min_ttl: the answers here have a TTL of 1 s, except long.cdn's and evil's
NODE_SIDE, OUTSIDE_SIDE = "192.168.79.1", "192.168.79.2"
DNS_SERVER = "192.0.2.53"
API, EVIL, CDN_A, CDN_APEX, CDN_LONG, OTHER = "192.0.2.10", "192.0.2.66", "192.0.2.21", "192.0.2.20", "192.0.2.23", \
    "192.0.2.99"
RECORDS = {
    "api.example.test": (API, 1), "evil.example.test": (EVIL, 300), "a.cdn.example.test": (CDN_A, 1),
    "cdn.example.test": (CDN_APEX, 1), "long.cdn.example.test": (CDN_LONG, 300), "other.test": (OTHER, 1),
}
SERVICE_PORT = 443

POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: fqdn, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEntities: [world]
    toPorts:
    - ports: [{port: "53", protocol: ANY}]
      rules:
        dns:
        - matchPattern: "*.example.test"
        - matchPattern: "*.cdn.example.test"
  - toFQDNs:
    - matchName: api.example.test
    - matchPattern: "*.cdn.example.test"
    toPorts: [{ports: [{port: "443", protocol: TCP}]}]
"""

# Looks NAME up with getaddrinfo, then connects to each address on PORT and checks the echo; with
# --hold keeps the first connection and echoes each stdin line through it ("ok" / "dead").
RESOLVE_CONNECT = r"""
import json, socket, sys
name, port, hold = sys.argv[1], int(sys.argv[2]), "--hold" in sys.argv
try:
    ips = sorted({i[4][0] for i in socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM)})
except OSError as e:
    print(json.dumps({"error": str(e)}), flush=True)
    sys.exit(0)
out, kept = {}, None
for ip in ips:
    try:
        s = socket.create_connection((ip, port), timeout=2)
        s.settimeout(2)
        s.sendall(b"ping")
        out[ip] = s.recv(16) == b"ping"
        if hold and kept is None:
            kept = s
        else:
            s.close()
    except OSError:
        out[ip] = False
print(json.dumps({"ips": ips, "connected": out}), flush=True)
if kept is not None:
    for line in sys.stdin:
        try:
            kept.sendall(line.strip().encode())
            print("ok" if kept.recv(64) == line.strip().encode() else "dead", flush=True)
        except OSError:
            print("dead", flush=True)
    kept.close()
"""


class Outside:
    """A network namespace outside the mesh, joined to the node by a veth; 192.0.2.0/24 lives there."""

    def __init__(self, node):
        self.netns = f"mtf-{node.tag}"
        self.host_if, self.peer_if = f"fq{node.tag}h", f"fq{node.tag}e"
        self.processes: list[subprocess.Popen] = []
        subprocess.run(["ip", "netns", "add", self.netns], check=True)
        try:
            node.ns(["ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.peer_if,
                     "netns", self.netns])
            node.ns(["ip", "addr", "add", f"{NODE_SIDE}/24", "dev", self.host_if])
            node.ns(["ip", "link", "set", self.host_if, "up"])
            node.ns(["ip", "route", "add", "192.0.2.0/24", "via", OUTSIDE_SIDE])
            cmds = [["link", "set", "lo", "up"], ["addr", "add", f"{OUTSIDE_SIDE}/24", "dev", self.peer_if],
                    ["link", "set", self.peer_if, "up"], ["route", "add", "default", "via", NODE_SIDE]]
            addresses = (DNS_SERVER, *(ip for ip, _ in RECORDS.values()))
            cmds += [["addr", "add", f"{ip}/32", "dev", "lo"] for ip in addresses]
            for cmd in cmds:
                subprocess.run(["ip", "-n", self.netns, *cmd], check=True, capture_output=True)
        except Exception:
            self.cleanup()
            raise

    def spawn(self, cmd: list[str]) -> subprocess.Popen:
        proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{self.netns}", *cmd], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True, cwd=REPO)
        self.processes.append(proc)
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read() if proc.poll() is not None else ""
        return proc

    def cleanup(self) -> None:
        for proc in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                proc.wait(5)
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)


class World:
    def __init__(self, node, eps: dict, tmp: str):
        self.node, self.eps, self.tmp = node, eps, tmp
        self.held: list[subprocess.Popen] = []

    def _nsenter(self, ep: str) -> list[str]:
        """A process entered with plain nsenter (no hosts file) whose resolv.conf names the outside
        server: the kernel's redirect takes its queries to the proxy all the same."""
        conf = os.path.join(self.tmp, f"resolv-{uuid.uuid4().hex[:6]}.conf")
        with open(conf, "w") as f:
            f.write(f"nameserver {DNS_SERVER}\noptions timeout:2 attempts:1\n")
        netns = f"/run/netns/{self.node.netns_of(self.eps[ep])}"
        return ["nsenter", f"--net={netns}", "unshare", "--mount", "--propagation", "private", "sh", "-c",
                f'mount --bind "{conf}" /etc/resolv.conf && exec "$@"', "sh"]

    def resolve_connect(self, ep: str, name: str) -> dict:
        proc = subprocess.run([*self._nsenter(ep), PY, "-c", RESOLVE_CONNECT, name, str(SERVICE_PORT)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def hold(self, ep: str, name: str) -> tuple[subprocess.Popen, dict]:
        proc = subprocess.Popen([*self._nsenter(ep), PY, "-c", RESOLVE_CONNECT, name, str(SERVICE_PORT), "--hold"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        self.node.processes.append(proc)  # killed by PID at the end, also on failure
        return proc, json.loads(proc.stdout.readline())

    def connects(self, ep: str, ip: str) -> bool:
        """A new TCP connection by address, no lookup."""
        proc = subprocess.run([*self.node.in_ep(self.eps[ep]), PY, NETTOOL, "tcp", ip, str(SERVICE_PORT), "1"],
                              capture_output=True, text=True, timeout=30)
        return proc.returncode == 0

    def query(self, ep: str, mode: str, name: str) -> dict:
        proc = subprocess.run([*self._nsenter(ep), PY, str(Path(__file__).with_name("dnstool.py")), "query", mode,
                               DNS_SERVER, "53", name, "A"], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def cache(self, *args: str) -> list[dict]:
        return self.node.cli_json("fqdn", "cache", "list", *args)

    def cached(self, ep: str, name: str) -> list[dict]:
        return [r for r in self.cache("--endpoint", self.eps[ep]["name"]) if r["name"] == name + "."]


def wait_until(check, timeout: float = 20.0, step: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step)


@pytest.fixture(scope="module")
def world(node_factory):
    node = node_factory(start=False, extra={"dns_upstreams": [f"{DNS_SERVER}:53"], "tofqdns_min_ttl": MIN_TTL})
    outside = Outside(node)
    tmp = tempfile.mkdtemp(prefix="meshagent-fqdn-")
    try:
        records = [f"--record={name}={ip}:{ttl}" for name, (ip, ttl) in RECORDS.items()]
        outside.spawn([PY, "-m", "tests.dnsserver", "--host", DNS_SERVER, "--port", "53", *records])
        outside.spawn([PY, NETTOOL, "serve-tcp", str(SERVICE_PORT)])
        node.start_agent()
        eps = {"client": node.add_endpoint("client", "app=client"), "free": node.add_endpoint("free", "app=free")}
        node.apply(POLICY)
        yield World(node, eps, tmp)
    finally:
        outside.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


def test_an_endpoint_under_no_policy_looks_up_and_reaches_anything(world):
    assert world.resolve_connect("free", "other.test") == {"ips": [OTHER], "connected": {OTHER: True}}


def test_tofqdns_allows_a_name_once_resolved_and_not_another(world):
    """api's entry is checked right after its lookup: it lives MIN_TTL seconds."""
    assert not world.connects("client", API), "before any lookup the address is world: denied"
    got = world.resolve_connect("client", "api.example.test")
    assert got == {"ips": [API], "connected": {API: True}}, "allowed at once: the answer waited for the datapath"
    (api,) = world.cached("client", "api.example.test")
    assert api["ips"] == [API] and api["source"] == "lookup" and 0 <= api["expires_in_s"] <= MIN_TTL
    assert [a["selector"] for a in api["allowed_by"]] == ["matchName: api.example.test."]
    assert "CiliumNetworkPolicy default/fqdn spec.egress[1]" in api["allowed_by"][0]["rule"]
    ipcache = {row["prefix"]: row["identity"] for row in world.node.cli_json("bpf", "ipcache", "list")}
    assert ipcache.get(f"{API}/32", 0) >= 1 << 24, "the address has a CIDR identity of its own"
    allowed = world.node.flows("--from-ip", world.eps["client"]["ip"], "--to-ip", API, "--verdict", "FORWARDED")
    assert allowed and "fqdn:api.example.test." in allowed[-1]["destination"]["labels"], allowed
    assert allowed[-1]["policy"]["path"] == "spec.egress[1]"
    # evil.example.test may be looked up (*.example.test) but no toFQDNs selector wants it
    assert world.query("client", "udp", "evil.example.test")["answers"] == [EVIL]
    (evil,) = world.cached("client", "evil.example.test")
    assert evil["ips"] == [EVIL] and evil["allowed_by"] == [], "cached, allowing nothing"
    assert not world.connects("client", EVIL)
    dropped = world.node.flows("--from-ip", world.eps["client"]["ip"], "--to-ip", EVIL, "--verdict", "DROPPED")
    assert dropped, "the connection to evil's address was dropped by policy"
    assert world.resolve_connect("client", "evil.example.test") == {"ips": [EVIL], "connected": {EVIL: False}}
    table = world.node.cli("fqdn", "cache", "list").stdout
    assert "evil.example.test." in table and "ALLOWED BY" in table


def test_the_allow_goes_away_after_the_ttl(world):
    assert world.resolve_connect("client", "api.example.test")["connected"] == {API: True}
    assert wait_until(lambda: not world.cached("client", "api.example.test")), "expired and dropped"
    assert wait_until(lambda: not world.connects("client", API)), "the allow went with it"
    assert world.resolve_connect("client", "api.example.test")["connected"] == {API: True}, "looked up again"


def test_a_wildcard_pattern(world):
    assert world.resolve_connect("client", "a.cdn.example.test")["connected"] == {CDN_A: True}
    # the apex: *.cdn.example.test needs a label before it (the lookup itself is allowed by *.example.test)
    assert world.resolve_connect("client", "cdn.example.test")["connected"] == {CDN_APEX: False}


@pytest.mark.parametrize("mode", ["udp", "tcp"])
def test_a_query_outside_the_dns_rules_is_refused_with_a_dropped_dns_flow(world, mode):
    out = world.query("client", mode, "other.test")
    assert out["error"] is None and out["rcode"] == 5 and out["answers"] == [], out  # REFUSED at once
    assert world.query("free", mode, "other.test")["answers"] == [OTHER], "other endpoints are not restricted"
    assert world.query("client", mode, "api.example.test")["answers"] == [API]

    def refused() -> list[dict]:
        return [f for f in world.node.flows("--protocol", "dns", "--verdict", "DROPPED")
                if f["l7"]["dns"]["query"] == "other.test." and f["l4"].get(mode.upper())]

    flows = wait_until(refused, timeout=5)
    assert flows, "a DROPPED DNS flow"
    flow = flows[-1]
    assert flow["Type"] == "L7" and flow["l7"]["dns"]["rcode"] == 5 and flow["source"]["pod_name"] == \
        world.eps["client"]["name"]
    assert flow["egress_denied_by"] == [{"name": "fqdn", "namespace": "default", "kind": "CiliumNetworkPolicy",
                                         "path": "spec.egress[0]"}], flow
    gai = world.resolve_connect("client", "other.test")
    assert "error" in gai, "getaddrinfo fails at once rather than timing out"


def test_a_connection_opened_while_allowed_stays_open_after_expiry(world):
    """Cilium keeps an expired address while a connection uses it: here the FQDN cache keeps it (source
    "connection") while conntrack holds the connection open, so the allow and the connection stand;
    once the connection is closed, the address goes at the next GC."""
    proc, got = world.hold("client", "a.cdn.example.test")
    try:
        assert got["connected"] == {CDN_A: True}, got

        def in_use() -> bool:
            rows = world.cached("client", "a.cdn.example.test")
            return bool(rows) and rows[0]["source"] == "connection" and rows[0]["expires_in_s"] < 0

        assert wait_until(in_use), world.cache()
        time.sleep(2)  # a few GC rounds past the expiry
        for _ in range(3):
            proc.stdin.write("still-there\n")
            proc.stdin.flush()
            assert proc.stdout.readline().strip() == "ok", "the connection survived the expiry"
        assert world.cached("client", "a.cdn.example.test")[0]["source"] == "connection"
    finally:
        proc.stdin.close()
        proc.wait(10)
    assert wait_until(lambda: not world.cached("client", "a.cdn.example.test")), "closed: the address goes"
    assert wait_until(lambda: not world.connects("client", CDN_A))


def test_policy_trace_to_fqdn(world):
    assert world.resolve_connect("client", "long.cdn.example.test")["connected"] == {CDN_LONG: True}
    node = world.node
    out = node.cli_json("policy", "trace", "--from-label", "app=client", "--to-fqdn", "long.cdn.example.test",
                        "--dport", "443/tcp")
    assert out["verdict"] == "ALLOWED" and out["lookup"]["verdict"] == "ALLOWED", out
    assert [a["ip"] for a in out["addresses"]] == [CDN_LONG] and out["addresses"][0]["verdict"] == "ALLOWED"
    assert [s["selector"] for s in out["selectors"]] == ["matchPattern: *.cdn.example.test."]
    text = node.cli("policy", "trace", "--from-label", "app=client", "--to-fqdn", "long.cdn.example.test",
                    "--dport", "443/tcp").stdout
    assert "Final verdict: ALLOWED" in text and CDN_LONG in text
    other_port = node.cli_json("policy", "trace", "--from-label", "app=client", "--to-fqdn",
                               "long.cdn.example.test", "--dport", "80/tcp")
    assert other_port["verdict"] == "DENIED"
    refused = node.cli_json("policy", "trace", "--from-label", "app=client", "--to-fqdn", "other.test",
                            "--dport", "443/tcp")
    assert refused["verdict"] == "DENIED" and refused["lookup"]["verdict"] == "REFUSED"
    assert "spec.egress[0]" in refused["lookup"]["rule"]
    never = node.cli_json("policy", "trace", "--from-label", "app=client", "--to-fqdn", "never.cdn.example.test",
                          "--dport", "443/tcp")
    assert never["verdict"] == "UNRESOLVED" and never["addresses"] == []


@pytest.mark.parametrize("args,code,message", [
    (["policy", "trace", "--from-label", "app=client", "--to-fqdn", "bad..name", "--dport", "443"], 1,
     "--to-fqdn: 'bad..name' is not a DNS name"),
    (["policy", "trace", "--from-label", "app=client", "--to-fqdn", "*.example.test", "--dport", "443"], 1,
     "matchName takes no wildcard"),
    (["policy", "trace", "--from-label", "app=client", "--to-fqdn", "a.test", "--to-ip", "192.0.2.1",
      "--dport", "443"], 2, "give --to-label or --to-ip or --to-fqdn (one of them)"),
    (["policy", "trace", "--from-ip", "192.0.2.1", "--to-fqdn", "a.test", "--dport", "443"], 1,
     "--to-fqdn: the source must be an endpoint of node"),
    (["fqdn", "cache", "list", "--endpoint", "nobody"], 1, "unknown endpoint 'nobody'"),
])
def test_bad_input_is_one_line(world, args, code, message):
    proc = world.node.cli(*args, check=False)
    assert proc.returncode == code and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and (code == 2 or len(proc.stderr.strip().splitlines()) == 1)


def test_the_cache_survives_an_agent_restart(world):
    """The restarted agent loads the cache from its state directory, so its first reconcile keeps the
    allows its predecessor wrote (without it, that reconcile would remove them)."""
    world.resolve_connect("client", "long.cdn.example.test")
    before = world.cached("client", "long.cdn.example.test")
    assert before and before[0]["expires_in_s"] > 100
    world.node.stop_agent()
    world.node.start_agent()
    after = world.cached("client", "long.cdn.example.test")
    assert [r["ips"] for r in after] == [[CDN_LONG]] and after[0]["expires"] == before[0]["expires"]
    assert world.connects("client", CDN_LONG)
