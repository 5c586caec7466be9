"""ServiceEntry MESH_EXTERNAL on the real kernel: a host outside the mesh becomes a name with a VIP,
its HTTP port goes through the L7 processor (so VirtualService rules on the host apply), its TCP
port is balanced in the kernel straight to the external endpoints.

The "outside" is a network namespace this module creates, joined to the node's namespace by a veth
with addresses from 192.168.77.0/24; two HTTP servers and a TCP echo server run in it. Everything it
creates is removed at the end, also on failure: processes are killed by PID, the namespace deleted
(which takes the veth with it).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

PY = sys.executable
NETTOOL = str(Path(__file__).with_name("nettool.py"))
HOST = "api.external.test"
NODE_SIDE, SERVER_A, SERVER_B = "192.168.77.1", "192.168.77.2", "192.168.77.3"

# An HTTP server outside the mesh: answers with its name and what it saw of the request.
SERVER = r"""
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
name, ip = sys.argv[1], sys.argv[2]
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = json.dumps({"name": name, "path": self.path, "host": self.headers.get("host"),
                           "x-route": self.headers.get("x-route"), "peer": self.client_address[0]}).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
srv = ThreadingHTTPServer((ip, 8080), H)
print("ready", flush=True)
srv.serve_forever()
"""

# N keep-alive requests to http://HOST/PATH; prints {"<status>:<server name>": count}.
CLIENT = r"""
import http.client, json, sys
host, n, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
conn = http.client.HTTPConnection(host, 80, timeout=5)
out = {}
for _ in range(n):
    conn.request("GET", path)
    r = conn.getresponse()
    body = r.read().decode()
    try:
        who = json.loads(body)["name"]
    except ValueError:
        who = "-"
    key = f"{r.status}:{who}"
    out[key] = out.get(key, 0) + 1
print(json.dumps(out))
"""

ENTRY = f"""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: ext-api, namespace: default}}
spec:
  hosts: [{HOST}]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports:
  - {{number: 80, name: http, protocol: HTTP, targetPort: 8080}}
  - {{number: 9000, name: tcp-echo, protocol: TCP}}
  endpoints:
  - {{address: {SERVER_A}, labels: {{version: a}}}}
  - {{address: {SERVER_B}, labels: {{version: b}}}}
"""

SUBSETS = f"""
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: ext-api, namespace: default}}
spec:
  host: {HOST}
  subsets:
  - {{name: a, labels: {{version: a}}}}
  - {{name: b, labels: {{version: b}}}}
"""


class Outside:
    """A network namespace outside the mesh, joined to the node by a veth."""

    def __init__(self, node):
        self.node = node
        self.netns = f"mtx-{node.tag}"
        self.host_if, self.peer_if = f"sx{node.tag}h", f"sx{node.tag}e"
        self.processes: list[subprocess.Popen] = []
        subprocess.run(["ip", "netns", "add", self.netns], check=True)
        try:
            node.ns(["ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.peer_if,
                     "netns", self.netns])
            node.ns(["ip", "addr", "add", f"{NODE_SIDE}/24", "dev", self.host_if])
            node.ns(["ip", "link", "set", self.host_if, "up"])
            for cmd in (["link", "set", "lo", "up"],
                        ["addr", "add", f"{SERVER_A}/24", "dev", self.peer_if],
                        ["addr", "add", f"{SERVER_B}/24", "dev", self.peer_if],
                        ["link", "set", self.peer_if, "up"],
                        # Replies to endpoints (the L4 port is not proxied: its source is the pod address).
                        ["route", "add", "default", "via", NODE_SIDE]):
                subprocess.run(["ip", "-n", self.netns, *cmd], check=True, capture_output=True)
        except Exception:
            self.cleanup()
            raise

    def spawn(self, cmd: list[str]) -> subprocess.Popen:
        proc = subprocess.Popen(["ip", "netns", "exec", self.netns, *cmd], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.processes.append(proc)
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read() if proc.poll() is not None else ""
        return proc

    def cleanup(self) -> None:
        for proc in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                proc.wait(5)
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)  # the veth goes with it


@pytest.fixture(scope="module")
def outside(node):
    out = Outside(node)
    try:
        out.spawn([PY, "-c", SERVER, "a", SERVER_A])
        out.spawn([PY, "-c", SERVER, "b", SERVER_B])
        out.spawn([PY, NETTOOL, "serve-tcp", "9000"])
        yield out
    finally:
        out.cleanup()


@pytest.fixture(scope="module")
def client(node, outside):
    ep = node.add_endpoint("client", "role=client")
    node.apply(ENTRY)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # the processor polls its config file once a second
        if any(k.startswith("200:") for k in requests(node, ep, 1)):
            break
        time.sleep(0.5)
    return ep


def requests(node, ep, n: int, path: str = "/") -> dict:
    proc = subprocess.run([*node.in_ep(ep), PY, "-c", CLIENT, HOST, str(n), path],
                          capture_output=True, text=True, timeout=120)
    return json.loads(proc.stdout) if proc.returncode == 0 else {"error": proc.stderr[-300:]}


def curl(node, ep, path: str) -> tuple[int, str]:
    proc = node.ns([*node.in_ep(ep), "curl", "-s", "-m", "5", "-w", "\n%{http_code}", f"http://{HOST}{path}"],
                   check=False)
    body, _, code = proc.stdout.rpartition("\n")
    return int(code or 0), body


def entry_row(node) -> dict:
    items = node.cli_json("service", "list")
    items = items["items"] if isinstance(items, dict) else items
    return next(s for s in items if s["name"] == HOST)


def test_service_list_shows_vip_ports_backends_and_mode(node, client):
    row = entry_row(node)
    assert row["kind"] == "ServiceEntry/ext-api"
    assert row["vip"].startswith("10.96.")  # allocated from the default service_cidr
    assert row["ports"] == ["80/tcp->8080 HTTP", "9000/tcp TCP"]
    assert row["backends"] == [SERVER_A, SERVER_B]
    assert row["mode"] == "L7 80; L4 9000"
    table = node.cli("service", "list").stdout
    assert HOST in table and "ServiceEntry/ext-api" in table


def test_host_resolves_inside_endpoints_and_reaches_the_outside_through_the_processor(node, client):
    vip = entry_row(node)["vip"]
    # The node's DNS proxy answers the host's name (the hosts file names no service with it).
    found = node.ns([*node.in_ep(client), "getent", "ahostsv4", HOST]).stdout.split()
    assert found[:1] == [vip], found
    assert HOST not in Path(f"/etc/netns/{node.netns_of(client)}/hosts").read_text()
    code, body = curl(node, client, "/hello")
    assert code == 200, body
    seen = json.loads(body)
    assert seen["name"] in ("a", "b") and seen["path"] == "/hello" and seen["host"] == HOST
    assert seen["peer"] == NODE_SIDE  # the processor connected, from the node's side of the veth
    got = requests(node, client, 20)
    assert got.get("200:a", 0) + got.get("200:b", 0) == 20 and got.get("200:a") and got.get("200:b"), got


def test_requests_show_in_l7_flows(node, client):
    requests(node, client, 3, "/flows/ext")
    time.sleep(1.0)  # the processor flushes flows every 0.25 s
    flows = [f for f in node.flows("--type", "l7") if f["l7"].get("http", {}).get("url") == "/flows/ext"]
    assert len(flows) >= 3, flows
    f = flows[-1]
    assert f["l7"]["http"]["code"] == 200 and f["source"]["pod_name"] == client["name"]
    assert f["destination"]["service"] == HOST
    assert f["destination"]["address"] in (f"{SERVER_A}:8080", f"{SERVER_B}:8080")


def test_tcp_port_is_balanced_in_the_kernel_to_the_outside(node, client):
    proc = node.ns([*node.in_ep(client), PY, NETTOOL, "tcp", HOST, "9000", "3"], check=False)
    assert proc.returncode == 0, proc.stderr


def test_virtualservice_on_the_host_applies(node, client):
    node.apply(SUBSETS + f"""
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: ext-api, namespace: default}}
spec:
  hosts: [{HOST}]
  http:
  - match: [{{uri: {{prefix: /teapot}}}}]
    fault: {{abort: {{httpStatus: 418, percentage: {{value: 100}}}}}}
    route: [{{destination: {{host: {HOST}, subset: a}}}}]
  - headers: {{request: {{set: {{x-route: via-mesh}}}}}}
    route:
    - {{destination: {{host: {HOST}, subset: a}}, weight: 75}}
    - {{destination: {{host: {HOST}, subset: b}}, weight: 25}}
""")
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and curl(node, client, "/teapot")[0] != 418:
            time.sleep(0.5)
        code, _ = curl(node, client, "/teapot")
        assert code == 418  # the fault abort answers for the external host; nothing left the node
        code, body = curl(node, client, "/edit")
        assert code == 200 and json.loads(body)["x-route"] == "via-mesh"  # the server saw the header set
        n = 400
        got = requests(node, client, n, "/split")
        b = got.get("200:b", 0)
        assert got.get("200:a", 0) + b == n, got
        assert abs(b - n * 0.25) <= 5 * math.sqrt(n * 0.25 * 0.75), got
    finally:
        node.cli("delete", "VirtualService", "ext-api")
        node.cli("delete", "DestinationRule", "ext-api")


@pytest.mark.parametrize("doc, words", [
    ("""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: no-endpoints, namespace: default}
spec:
  hosts: [empty.external.test]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP}]
""", "resolution STATIC needs endpoints"),
    ("""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: taken, namespace: default}
spec:
  hosts: [taken.external.test]
  addresses: [10.96.200.7]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP}]
  endpoints: [{address: 192.168.77.2}]
""", "address 10.96.200.7 is already the VIP of Service default/holder"),
    (f"""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: same-host, namespace: other}}
spec:
  hosts: [{HOST}]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  endpoints: [{{address: 192.168.77.2}}]
""", f"host {HOST} is already a name of ServiceEntry default/ext-api"),
    ("""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: internal, namespace: default}
spec:
  hosts: [vm.internal.test]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP}]
  endpoints: [{address: 192.168.77.2}]
""", "MESH_INTERNAL is not supported"),
    ("""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: passthrough, namespace: default}
spec:
  hosts: [pass.external.test]
  location: MESH_EXTERNAL
  ports: [{number: 80, name: http, protocol: HTTP}]
""", "resolution NONE"),
], ids=["static-without-endpoints", "address-conflicts-with-service-vip", "host-in-two-entries",
        "mesh-internal", "resolution-none"])
def test_bad_entries_get_one_line_errors_and_change_nothing(node, client, doc, words):
    node.apply("""
apiVersion: v1
kind: Service
metadata: {name: holder, namespace: default}
spec:
  clusterIP: 10.96.200.7
  ports: [{port: 80}]
""")
    before = (node.cli_json("get", "all"), node.cli_json("service", "list"))
    # With a valid Service in the same apply, to see that the apply is all or nothing.
    proc = node.apply("""
apiVersion: v1
kind: Service
metadata: {name: bystander, namespace: default}
spec:
  ports: [{port: 80}]
---""" + doc, check=False)
    assert proc.returncode == 1, proc.stdout
    error = proc.stderr.strip()
    assert len(error.splitlines()) == 1 and words in error, error
    assert "Traceback" not in proc.stderr
    assert (node.cli_json("get", "all"), node.cli_json("service", "list")) == before


def test_explicit_address_endpoint_ports_and_dns_resolution(node, client):
    """An entry's own address is the VIP (outside service_cidr here, as Istio users write real
    addresses); an endpoint's named port overrides the port number. With resolution DNS the agent
    resolves the endpoint address (a literal here: the test may not touch the machine's resolver)."""
    node.apply(f"""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: ext-pinned, namespace: default}}
spec:
  hosts: [pinned.external.test]
  addresses: [192.168.78.10]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  endpoints: [{{address: {SERVER_B}, ports: {{http: 8080}}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: ext-dns, namespace: default}}
spec:
  hosts: [dns.external.test]
  location: MESH_EXTERNAL
  resolution: DNS
  ports: [{{number: 80, name: http, targetPort: 8080}}]
  endpoints: [{{address: "{SERVER_A}"}}]
""")
    try:
        items = node.cli_json("service", "list")
        items = {s["name"]: s for s in (items["items"] if isinstance(items, dict) else items)}
        pinned = items["pinned.external.test"]
        assert pinned["vip"] == "192.168.78.10" and pinned["backends"] == [f"{SERVER_B} [http:8080]"]
        assert items["dns.external.test"]["backends"] == [SERVER_A] and items["dns.external.test"]["mode"] == "L7"
        for host, server in (("pinned.external.test", "b"), ("dns.external.test", "a")):
            deadline = time.monotonic() + 20
            while True:
                proc = node.ns([*node.in_ep(client), "curl", "-s", "-m", "5", f"http://{host}/x"], check=False)
                if (proc.returncode == 0 and proc.stdout.startswith("{")) or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert json.loads(proc.stdout)["name"] == server, proc.stdout
    finally:
        node.cli("delete", "ServiceEntry", "ext-pinned")
        node.cli("delete", "ServiceEntry", "ext-dns")


def test_entry_survives_an_agent_restart_with_the_same_vip(node, client):
    vip = entry_row(node)["vip"]
    node.stop_agent()
    node.start_agent()
    assert entry_row(node)["vip"] == vip
    deadline = time.monotonic() + 20
    while curl(node, client, "/again")[0] != 200 and time.monotonic() < deadline:
        time.sleep(0.5)  # the restarted agent starts a new processor
    code, body = curl(node, client, "/again")
    assert code == 200 and json.loads(body)["path"] == "/again", body


def test_deleting_the_entry_removes_name_vip_and_routing(node, client):
    vip = entry_row(node)["vip"]
    node.cli("delete", "ServiceEntry", "ext-api")
    items = node.cli_json("service", "list")
    items = items["items"] if isinstance(items, dict) else items
    assert all(s["name"] != HOST for s in items)
    assert HOST not in Path(f"/etc/netns/{node.netns_of(client)}/hosts").read_text()
    # The VIP no longer goes anywhere: the service CIDR's unreachable route refuses it at once.
    proc = node.ns([*node.in_ep(client), "curl", "-s", "-m", "3", f"http://{vip}/"], check=False)
    assert proc.returncode != 0
