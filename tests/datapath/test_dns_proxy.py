"""The node's DNS proxy with a real agent: questions sent from inside endpoints to the proxy's own
address (the node's pod_cidr address, dns_proxy_port), answered from the mesh's names or forwarded
to an upstream resolver that the test runs in the node's namespace; DNS flows and metrics.

The kernel's redirect of port 53 to the proxy is bpf/redirect.c's (tests of its own); here the
questions go to the proxy's address directly, as a redirected one arrives.
"""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
import sys
import time

import pytest

from tests.datapath.conftest import REPO

PY = sys.executable
UPSTREAM_PORT = 5353
DNS_PORT = 15053

# Asks the proxy each question of argv[3] (JSON: [[name, type, "udp"|"tcp"], ...]); prints one JSON
# line per question: rcode, answers (rdata text) and their TTLs.
ASK = r"""
import json, sys
from dnslib import DNSRecord, RCODE
host, port, questions = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
for name, qtype, proto in questions:
    try:
        raw = DNSRecord.question(name, qtype).send(host, port, tcp=proto == "tcp", timeout=5)
        r = DNSRecord.parse(raw)
        print(json.dumps({"rcode": RCODE.get(r.header.rcode), "answers": [str(rr.rdata) for rr in r.rr],
                          "ttls": [rr.ttl for rr in r.rr], "aa": r.header.aa}), flush=True)
    except Exception as e:
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
"""

SERVICES = """
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: other}
spec:
  selector: {app: db}
  ports: [{name: sql, port: 5432}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: payments, namespace: default}
spec:
  hosts: [payments.partner.test]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{name: https, number: 443, protocol: HTTPS}]
  endpoints: [{address: 192.0.2.50}]
"""


@pytest.fixture(scope="module")
def dns(node_factory):
    node = node_factory(start=False, extra={"dns_upstreams": [f"127.0.0.1:{UPSTREAM_PORT}"]})
    upstream = node.spawn(["nsenter", f"--net=/run/netns/{node.netns}", PY, "-m", "tests.dnsserver",
                           "--port", str(UPSTREAM_PORT), "--record", "api.example.test=192.0.2.10:60"])
    assert upstream.stdout.readline().strip() == "ready"
    node.start_agent()
    eps = {"client": node.add_endpoint("client", "role=client"),
           "web": node.add_endpoint("web", "app=web"),
           "db": node.add_endpoint("db", "app=db", "--namespace", "other")}
    node.apply(SERVICES)
    services = node.cli_json("service", "list")
    vips = {s["name"]: s["vip"] for s in (services["items"] if isinstance(services, dict) else services)}
    proxy = str(next(ipaddress.IPv4Network(node.pod_cidr).hosts()))
    return node, eps, vips, proxy


def ask(node, ep, proxy, *questions, proto="udp") -> list[dict]:
    qs = [[q[0], q[1] if len(q) > 1 else "A", q[2] if len(q) > 2 else proto] for q in questions]
    proc = subprocess.run([*node.in_ep(ep), PY, "-c", ASK, proxy, str(DNS_PORT), json.dumps(qs)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


def scrape(node) -> str:
    return node.ns(["curl", "-s", f"http://{node.config['metrics_addr']}/metrics"]).stdout


def metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    m = re.search(rf"^{name}(?:\{{{re.escape(want)}\}})? (\S+)$", text, re.M) if want else \
        re.search(rf"^{name} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_service_names_short_namespaced_and_full(dns):
    node, eps, vips, proxy = dns
    for proto in ("udp", "tcp"):
        got = ask(node, eps["client"], proxy, ("web",), ("web.default",), ("web.default.svc",),
                  ("WEB.Default.svc.cluster.local",), proto=proto)
        assert [g["answers"] for g in got] == [[vips["web"]]] * 4, (proto, got)
        assert all(g["rcode"] == "NOERROR" and g["aa"] and g["ttls"] == [30] for g in got), got


def test_names_of_another_namespace(dns):
    node, eps, vips, proxy = dns
    from_default = ask(node, eps["client"], proxy, ("db.other",), ("db.other.svc.cluster.local",), ("db",))
    assert [g["answers"] for g in from_default[:2]] == [[vips["db"]]] * 2, from_default
    assert from_default[2]["rcode"] == "NXDOMAIN", "a short name is the asker's namespace only: db is forwarded"
    from_other = ask(node, eps["db"], proxy, ("db",), ("web",), ("web.default",))
    assert from_other[0]["answers"] == [vips["db"]] and from_other[2]["answers"] == [vips["web"]], from_other
    assert from_other[1]["rcode"] == "NXDOMAIN", from_other


def test_missing_names_aaaa_and_service_entry_hosts(dns):
    node, eps, vips, proxy = dns
    got = ask(node, eps["client"], proxy, ("nope.default.svc.cluster.local",), ("web", "AAAA"),
              ("payments.partner.test",))
    assert got[0]["rcode"] == "NXDOMAIN" and got[0]["answers"] == []
    assert got[1]["rcode"] == "NOERROR" and got[1]["answers"] == [], "AAAA of a mesh name: NODATA"
    assert got[2]["answers"] == [vips["payments.partner.test"]], got


def test_reverse_lookups_of_vips_and_endpoints(dns):
    node, eps, vips, proxy = dns
    vip_ptr = ".".join(reversed(vips["web"].split("."))) + ".in-addr.arpa"
    ep_ptr = ".".join(reversed(eps["db"]["ip"].split("."))) + ".in-addr.arpa"
    got = ask(node, eps["client"], proxy, (vip_ptr, "PTR"), (ep_ptr, "PTR"))
    assert got[0]["answers"] == ["web.default.svc.cluster.local."], got
    dashed = eps["db"]["ip"].replace(".", "-")
    assert got[1]["answers"] == [f"{dashed}.other.pod.cluster.local."], got
    forward = ask(node, eps["client"], proxy, (f"{dashed}.other.pod.cluster.local",))
    assert forward[0]["answers"] == [eps["db"]["ip"]], "the reverse name resolves forward"


def test_external_names_are_forwarded_and_cached(dns):
    node, eps, vips, proxy = dns
    before = scrape(node)
    got = ask(node, eps["client"], proxy, ("api.example.test",), ("api.example.test",), ("gone.nx.test",))
    assert got[0]["answers"] == ["192.0.2.10"] and got[0]["ttls"] == [60] and not got[0]["aa"], got
    assert got[1]["answers"] == ["192.0.2.10"] and got[1]["ttls"][0] <= 60, got
    assert got[2]["rcode"] == "NXDOMAIN", got
    after = scrape(node)
    assert metric(after, "meshagent_dns_cache_hits_total") >= metric(before, "meshagent_dns_cache_hits_total") + 1
    assert metric(after, "meshagent_dns_cache_misses_total") >= metric(before, "meshagent_dns_cache_misses_total") + 2


def test_dns_flows_and_metrics(dns):
    node, eps, vips, proxy = dns
    before = scrape(node)
    ask(node, eps["client"], proxy, ("web.default.svc.cluster.local",), ("nope.default.svc.cluster.local",))
    flows = node.flows("--protocol", "dns")
    assert flows and all(f["Type"] == "L7" and "dns" in f["l7"] for f in flows)
    web = [f for f in flows if f["l7"]["dns"]["query"] == "web.default.svc.cluster.local."][-1]
    assert web["verdict"] == "FORWARDED" and web["l7"]["type"] == "RESPONSE" and web["is_reply"]
    assert web["l7"]["dns"]["ips"] == [vips["web"]] and web["l7"]["dns"]["ttl"] == 30
    assert web["l7"]["dns"]["qtypes"] == ["A"] and web["l7"]["dns"]["rcode"] == 0
    assert web["destination"]["pod_name"] == eps["client"]["name"] and web["source"]["identity"] == 1
    assert web["IP"] == {"source": proxy, "destination": eps["client"]["ip"], "ipVersion": "IPv4"}
    assert web["l4"]["UDP"]["source_port"] == 53
    assert any(f["l7"]["dns"]["rcode"] == 3 for f in flows)
    line = node.cli("flows", "--protocol", "dns", "--last", "5").stdout
    assert (f'dns-response FORWARDED (DNS Answer "{vips["web"]}" TTL: 30 '
            "(Proxy web.default.svc.cluster.local. A))") in line, line
    assert "DNS Answer RCode: Non-Existent Domain" in line, line
    after = scrape(node)
    assert metric(after, "meshagent_dns_requests_total", qtype="A") >= \
        metric(before, "meshagent_dns_requests_total", qtype="A") + 2
    assert metric(after, "meshagent_dns_responses_total", rcode="NXDOMAIN") >= \
        metric(before, "meshagent_dns_responses_total", rcode="NXDOMAIN") + 1


def test_names_follow_services_without_restarting_anything(dns):
    node, eps, vips, proxy = dns
    assert ask(node, eps["client"], proxy, ("late",))[0]["rcode"] == "NXDOMAIN"
    node.apply("""
apiVersion: v1
kind: Service
metadata: {name: late, namespace: default}
spec:
  selector: {app: web}
  ports: [{port: 81}]
""")
    try:
        services = node.cli_json("service", "list")
        vip = next(s["vip"] for s in (services["items"] if isinstance(services, dict) else services)
                   if s["name"] == "late")
        assert ask(node, eps["client"], proxy, ("late",))[0]["answers"] == [vip]
    finally:
        node.cli("delete", "Service", "late")
    deadline = time.monotonic() + 10
    while ask(node, eps["client"], proxy, ("late.default.svc.cluster.local",))[0]["rcode"] != "NXDOMAIN":
        assert time.monotonic() < deadline, "a deleted Service's name is gone at the next reconcile"
        time.sleep(0.2)


def test_questions_from_outside_the_endpoints_are_refused(dns):
    node, eps, vips, proxy = dns
    before = metric(scrape(node), "meshagent_dns_unknown_clients_total")
    proc = node.ns([PY, "-c", ASK, proxy, str(DNS_PORT), json.dumps([["web.default.svc.cluster.local", "A", "udp"]])],
                   cwd=REPO)
    assert json.loads(proc.stdout)["rcode"] == "REFUSED", "the node itself is no endpoint of the node"
    assert metric(scrape(node), "meshagent_dns_unknown_clients_total") == before + 1


def test_status_names_the_proxy(dns):
    node, eps, vips, proxy = dns
    status = node.cli_json("status")
    assert status["dns_proxy"] == {"listen": f"{proxy}:{DNS_PORT}", "upstreams": [f"127.0.0.1:{UPSTREAM_PORT}"]}
    assert f"{proxy}:{DNS_PORT}" in node.cli("status").stdout


BLOCKER = r"""
import socket, sys, threading
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
threading.Event().wait()
"""


def test_dns_proxy_false_leaves_the_port_alone(node_factory):
    node = node_factory(extra={"dns_proxy": False})
    assert node.cli_json("status")["dns_proxy"] is None
    assert "off (dns_proxy: false)" in node.cli("status").stdout
    ep = node.add_endpoint("quiet", "app=quiet")
    proxy = str(next(ipaddress.IPv4Network(node.pod_cidr).hosts()))
    got = ask(node, ep, proxy, ("web",))
    assert "error" in got[0], "nothing answers on the proxy's port"


def test_a_taken_proxy_port_stops_the_agent_with_one_line(node_factory):
    node = node_factory(start=False)
    proxy = str(next(ipaddress.IPv4Network(node.pod_cidr).hosts()))
    node.ns(["ip", "addr", "add", f"{proxy}/32", "dev", "lo"])
    blocker = node.spawn(["nsenter", f"--net=/run/netns/{node.netns}", PY, "-c", BLOCKER, proxy, str(DNS_PORT)])
    assert blocker.stdout.readline().strip() == "ready"
    node.start_agent(wait=False)
    assert node.agent.wait(60) == 1
    errors = [line for line in node.log_path.read_text().splitlines() if line.startswith("Error:")]
    assert errors == [f"Error: DNS proxy cannot listen on {proxy}:{DNS_PORT} (UDP and TCP): Address already in use; "
                      "set dns_proxy_port to a free port, or dns_proxy: false"], errors
