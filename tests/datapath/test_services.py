"""Services on the real kernel: VIPs balanced at connect time, names, policy through the VIP."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

PY = sys.executable

SERVER = r"""
import socket, sys, threading
name, port = sys.argv[1], int(sys.argv[2])
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", port)); srv.listen(128); print("ready", flush=True)
while True:
    c, _ = srv.accept()
    with c:
        c.sendall(name.encode())
"""

# Connects N times to HOST:PORT; prints each answer and the peer address the socket reports.
CLIENT = r"""
import socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for _ in range(n):
    try:
        with socket.create_connection((host, port), timeout=1) as s:
            peer = s.getpeername()[0]
            print(s.recv(64).decode(), peer, flush=True)
    except OSError as e:
        print("FAIL", type(e).__name__, flush=True)
"""

SERVICE = """
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP}]
"""


@pytest.fixture(scope="module")
def svc(node):
    eps = {n: node.add_endpoint(n, "app=web") for n in ("web1", "web2")}
    eps["client"] = node.add_endpoint("client", "role=client")
    eps["blocked"] = node.add_endpoint("blocked", "role=blocked")
    for n in ("web1", "web2"):
        srv = node.spawn([*node.in_ep(eps[n]), PY, "-c", SERVER, n, "8080"])
        assert srv.stdout.readline().strip() == "ready"
    node.apply(SERVICE)
    return eps


def connect(node, ep, host, n=1, via="ip-netns-exec") -> list[tuple[str, str]]:
    cmd = [PY, "-c", CLIENT, host, "80", str(n)]
    if via == "meshagent-exec":
        proc = node.cli("exec", ep["name"], "--", *cmd, timeout=120)
    else:
        proc = subprocess.run([*node.in_ep(ep), *cmd], capture_output=True, text=True, timeout=120)
    return [tuple(line.split()[:2]) for line in proc.stdout.splitlines()]


def vip_of(node) -> str:
    items = node.cli_json("service", "list")
    items = items["items"] if isinstance(items, dict) else items
    return next(s["vip"] for s in items if s["name"] == "web")


def test_service_list_shows_vip_and_backends(node, svc):
    items = node.cli_json("service", "list")
    items = items["items"] if isinstance(items, dict) else items
    web = next(s for s in items if s["name"] == "web")
    assert web["vip"].startswith("10.96.")
    assert sorted(b.split()[0] for b in web["backends"]) == sorted([svc["web1"]["ip"], svc["web2"]["ip"]])
    assert web["mode"] == "L4"


def test_vip_is_balanced_and_peer_stays_the_vip(node, svc):
    vip = vip_of(node)
    answers = connect(node, svc["client"], vip, n=60)
    assert len(answers) == 60 and all(a[0] != "FAIL" for a in answers), answers
    seen = Counter(a[0] for a in answers)
    assert set(seen) == {"web1", "web2"}, seen
    assert all(peer == vip for _, peer in answers), "getpeername() reports the VIP, not the backend"


def test_service_name_resolves_inside_endpoints(node, svc):
    vip = vip_of(node)
    hosts = subprocess.run([*node.in_ep(svc["client"]), "getent", "hosts", "web"], capture_output=True,
                           text=True).stdout
    assert hosts.split()[0] == vip
    answers = connect(node, svc["client"], "web.default.svc.cluster.local", n=4, via="meshagent-exec")
    assert answers and all(a[0] in ("web1", "web2") for a in answers), answers


def test_processes_outside_the_endpoint_cgroup_are_balanced_too(node, svc):
    """`ip netns exec` puts the client in no endpoint cgroup: the hook is at the cgroup root."""
    answers = connect(node, svc["client"], vip_of(node), n=6)
    assert all(a[0] in ("web1", "web2") for a in answers), answers


def test_denied_client_reaches_nothing_via_the_vip(node, svc):
    node.apply("""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web-only-client, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {role: client}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
""")
    try:
        assert all(a[0] in ("web1", "web2") for a in connect(node, svc["client"], vip_of(node), n=4))
        blocked = connect(node, svc["blocked"], vip_of(node), n=4)
        assert blocked and all(a[0] == "FAIL" for a in blocked), blocked
    finally:
        node.cli("delete", "CiliumNetworkPolicy", "web-only-client")


def test_backends_follow_endpoints(node, svc):
    extra = node.add_endpoint("web3", "app=web")
    srv = node.spawn([*node.in_ep(extra), PY, "-c", SERVER, "web3", "8080"])
    assert srv.stdout.readline().strip() == "ready"
    seen = Counter(a[0] for a in connect(node, svc["client"], vip_of(node), n=60))
    assert "web3" in seen, seen
    node.cli("endpoint", "delete", extra["name"])
    seen = Counter(a[0] for a in connect(node, svc["client"], vip_of(node), n=30))
    assert set(seen) <= {"web1", "web2"}, seen


def test_conflicting_cluster_ip_is_refused(node, svc):
    vip = vip_of(node)
    proc = node.apply(SERVICE.replace("name: web,", "name: web-copy,").replace(
        "selector: {app: web}", f"selector: {{app: web}}\n  clusterIP: {vip}"), check=False)
    assert proc.returncode == 1 and "already used by Service default/web" in proc.stderr
    out = subprocess.run([*node.in_ep(svc["client"]), "cat", "/etc/hosts"], capture_output=True, text=True).stdout
    assert "web-copy" not in out


def test_deleting_the_service_stops_translation(node, svc):
    vip = vip_of(node)
    node.cli("delete", "Service", "web")
    answers = connect(node, svc["client"], vip, n=2)
    assert all(a[0] == "FAIL" for a in answers), answers
    assert Path(f"/etc/netns/{node.netns_of(svc['client'])}/hosts").read_text().count("web.default") == 0


def test_same_node_connections_take_the_socket_fast_path(node, svc):
    """The agent turns the sk_msg fast path on (socket_fastpath, bpf/lib/sockmap.h): each backend's
    answer goes straight into the client's socket, and status and metrics count it."""
    node.apply(SERVICE)  # an earlier test deleted it
    before = node.cli_json("status")["socket_fastpath"]
    assert before["enabled"] is True
    answers = connect(node, svc["client"], vip_of(node), n=10)
    assert len(answers) == 10 and all(a[0] in ("web1", "web2") for a in answers), answers
    after = node.cli_json("status")["socket_fastpath"]
    redirected = after["counters"]["redirected"]["messages"] - before["counters"]["redirected"]["messages"]
    assert redirected >= 10, after
    metrics = node.ns(["curl", "-s", f"http://{node.config['metrics_addr']}/metrics"]).stdout
    assert 'meshagent_fastpath_bytes_total{outcome="redirected"}' in metrics
    assert "Socket fast path:" in node.cli("status").stdout


def test_bpf_fastpath_list_shows_an_open_connection(node, svc):
    """A connection held open by a client shows up on the redirect path, towards the backend (not the
    VIP). The backend's end is gone already: the test server closes after its answer."""
    node.apply(SERVICE)
    hold = node.spawn([*node.in_ep(svc["client"]), PY, "-c",
                       "import socket, sys, time\n"
                       f"s = socket.create_connection(({vip_of(node)!r}, 80)); s.recv(64)\n"
                       "print(s.getsockname()[1], flush=True); time.sleep(30)"])
    port = int(hold.stdout.readline())
    items = node.cli_json("bpf", "fastpath", "list")
    items = items["items"] if isinstance(items, dict) else items
    mine = [i for i in items if i["local"] == f"{svc['client']['ip']}:{port}"]
    assert len(mine) == 1 and mine[0]["path"] == "redirect", items
    assert mine[0]["remote"] in (f"{svc['web1']['ip']}:8080", f"{svc['web2']['ip']}:8080"), items


ECHO = r"""
import socket, sys, threading
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", int(sys.argv[1]))); srv.listen(16); print("ready", flush=True)
def serve(c):
    with c:
        while data := c.recv(65536):
            c.sendall(data)
while True:
    threading.Thread(target=serve, args=(srv.accept()[0],), daemon=True).start()
"""

# One connection; a round per line on stdin: 1000 bytes out, the echo back (2 s at most).
ROUNDS = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)
print(s.getsockname()[1], flush=True)
for i, _ in enumerate(sys.stdin):
    msg = bytes([i % 251]) * 1000
    try:
        s.sendall(msg)
        got = b""
        while len(got) < len(msg) and (chunk := s.recv(65536)):
            got += chunk
        print("ok" if got == msg else "BAD", flush=True)
    except OSError as e:
        print("FAIL", type(e).__name__, flush=True)
"""

ALLOW_CLIENT = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: echo-from, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {role: ROLE}}]
"""


def test_policy_change_rechecks_fast_path_connections(node, svc):
    """A policy change sends every fast-path connection through TC once: an allow that stands
    brings it back onto the fast path (fastpath_confirm), a revoked one cuts it."""
    echo = node.spawn([*node.in_ep(svc["web1"]), PY, "-c", ECHO, "9090"])
    assert echo.stdout.readline().strip() == "ready"
    client = node.spawn([*node.in_ep(svc["client"]), PY, "-c", ROUNDS, svc["web1"]["ip"], "9090"],
                        stdin=subprocess.PIPE)

    def rounds(n: int) -> list[str]:
        client.stdin.write("go\n" * n)
        client.stdin.flush()
        return [client.stdout.readline().strip() for _ in range(n)]

    def my_socket() -> dict:
        items = node.cli_json("bpf", "fastpath", "list")
        items = items["items"] if isinstance(items, dict) else items
        (mine,) = [i for i in items if i["local"] == f"{svc['client']['ip']}:{port}"]
        return mine

    def redirected() -> int:
        return node.cli_json("status")["socket_fastpath"]["counters"]["redirected"]["messages"]

    port = int(client.stdout.readline())
    try:
        assert rounds(3) == ["ok"] * 3
        first = my_socket()
        assert first["path"] == "redirect", first
        node.apply(ALLOW_CLIENT.replace("ROLE", "client"))
        assert rounds(1) == ["ok"]  # through TC: re-checked, allowed, confirmed
        before = redirected()
        assert rounds(5) == ["ok"] * 5
        assert redirected() - before >= 10, "both ends are back on the fast path"
        back = my_socket()
        assert back["path"] == "redirect" and back["policy_revision"] > first["policy_revision"], back
        node.apply(ALLOW_CLIENT.replace("ROLE", "nobody"))
        assert rounds(1)[0].startswith("FAIL"), "a revoked allow cuts the fast-path connection"
    finally:
        node.cli("delete", "CiliumNetworkPolicy", "echo-from", check=False)
        client.kill()
        echo.kill()


MIXED = """
apiVersion: v1
kind: Service
metadata: {name: mixed, namespace: default}
spec:
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: tcp-echo, port: 81, targetPort: 9090}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: mixed, namespace: default}
spec:
  host: mixed
  trafficPolicy: {loadBalancer: {simple: RANDOM}}
"""

RAW_ECHO = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], 81), timeout=3)
msg = b"\x00\x01 not http \xff" * 100
s.sendall(msg)
got = b""
while len(got) < len(msg) and (chunk := s.recv(65536)):
    got += chunk
print("ok" if got == msg else "BAD", flush=True)
"""


def test_a_service_with_l7_config_keeps_its_non_http_ports_at_l4(node, svc):
    """Istio's protocol selection: with a DestinationRule on the service, its `http` port goes to the
    L7 processor and its `tcp-echo` port stays balanced in the kernel, so non-HTTP bytes get through."""
    echoes = [node.spawn([*node.in_ep(svc[n]), PY, "-c", ECHO, "9090"]) for n in ("web1", "web2")]
    for e in echoes:
        assert e.stdout.readline().strip() == "ready"
    node.apply(MIXED)
    try:
        items = node.cli_json("service", "list")
        items = items["items"] if isinstance(items, dict) else items
        mixed = next(s for s in items if s["name"] == "mixed")
        assert mixed["mode"] == "L7 80; L4 81", mixed
        assert mixed["ports"] == ["80/tcp->8080 HTTP", "81/tcp->9090 TCP"], mixed
        out = subprocess.run([*node.in_ep(svc["client"]), PY, "-c", RAW_ECHO, mixed["vip"]],
                             capture_output=True, text=True, timeout=30)
        assert out.stdout.strip() == "ok", out.stderr
    finally:
        node.delete(MIXED)
        for e in echoes:
            e.kill()
