"""Spoofed and malformed packets (scapy) get a defined verdict and never break the datapath."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

NETTOOL = str(Path(__file__).with_name("nettool.py"))
PY = sys.executable

# Runs inside the endpoint: sends raw frames on eth0 with scapy.
SENDER = r"""
import sys
from scapy.all import Ether, IP, TCP, UDP, Raw, sendp, get_if_hwaddr, fragment
src, dst, gw_mac, kind = sys.argv[1:5]
eth = Ether(src=get_if_hwaddr("eth0"), dst=gw_mac, type=0x0800)
if kind == "spoof":
    pkts = [eth / IP(src="10.99.99.99", dst=dst) / TCP(dport=80, flags="S")]
elif kind == "bad-ihl":
    pkts = [eth / Raw(bytes(IP(src=src, dst=dst, ihl=3) / TCP(dport=80)))]
elif kind == "truncated-tcp":
    pkts = [eth / Raw(bytes(IP(src=src, dst=dst, proto=6, len=28)) + b"\x00\x50\x00\x50\x00\x00\x00\x00")]
elif kind == "fragments":
    pkts = [eth / f for f in fragment(IP(src=src, dst=dst) / UDP(dport=53) / Raw(b"x" * 3000), fragsize=1000)]
elif kind == "orphan-fragment":
    pkts = [eth / IP(src=src, dst=dst, proto=17, frag=100, id=4242) / Raw(b"y" * 64)]
elif kind == "unknown-proto":
    pkts = [eth / IP(src=src, dst=dst, proto=253) / Raw(b"z" * 32)]
sendp(pkts, iface="eth0", verbose=False)
"""


@pytest.fixture(scope="module")
def pair(node):
    client = node.add_endpoint("pc", "role=client")
    server = node.add_endpoint("ps", "app=server")
    srv = node.spawn([*node.in_ep(server), PY, NETTOOL, "serve-tcp", "80"])
    assert srv.stdout.readline().strip() == "ready"
    return client, server


def send(node, client, server, kind):
    subprocess.run([*node.in_ep(client), PY, "-c", SENDER, client["ip"], server["ip"], client["host_mac"], kind],
                   check=True, capture_output=True)
    time.sleep(0.3)


def drops(node, client, reason):
    return [f for f in node.flows("--verdict", "DROPPED") if f.get("drop_reason_desc") == reason
            and f["traffic_direction"] == "EGRESS"]


def still_works(node, client, server):
    ok = subprocess.run([*node.in_ep(client), PY, NETTOOL, "tcp", server["ip"], "80", "2"]).returncode == 0
    return ok and node.cli("status", check=False).returncode == 0


def test_spoofed_source_is_dropped(node, pair):
    client, server = pair
    send(node, client, server, "spoof")
    found = [f for f in drops(node, client, "INVALID_SOURCE_IP") if f["IP"]["source"] == "10.99.99.99"]
    assert found, "the spoofed SYN shows as DROPPED with a spoofing reason"
    # The address proves nothing: the source is unknown, and the sender is named apart.
    assert found[-1]["source"] == {"identity": 0, "labels": ["reserved:unknown"]}
    assert f"sent by endpoint default/{client['name']}" in found[-1]["Summary"]
    assert still_works(node, client, server)


@pytest.mark.parametrize("kind,reason", [
    ("bad-ihl", "INVALID_PACKET_DROPPED"),
    ("truncated-tcp", "CT_TRUNCATED_OR_INVALID_HEADER"),
    ("orphan-fragment", "FRAGMENT_NOT_FOUND"),
])
def test_malformed_packets_are_dropped_with_a_reason(node, pair, kind, reason):
    client, server = pair
    send(node, client, server, kind)
    assert drops(node, client, reason), f"{kind} is dropped as {reason}"
    assert still_works(node, client, server)


def test_fragments_of_an_allowed_flow_pass(node, pair):
    client, server = pair
    send(node, client, server, "fragments")
    dropped = [f for f in drops(node, client, "FRAGMENT_NOT_FOUND") if f["IP"]["destination"] == server["ip"]
               and f.get("l4", {}).get("UDP", {}).get("destination_port") == 53]
    assert not dropped
    new = [f for f in node.flows("--from-ip", client["ip"], "--protocol", "udp", "--port", "53")]
    assert new, "the fragmented datagram is tracked as one UDP flow"
    assert still_works(node, client, server)


def test_unknown_protocol_gets_a_policy_verdict(node, pair):
    client, server = pair
    send(node, client, server, "unknown-proto")
    seen = [f for f in node.flows("--from-ip", client["ip"], "--to-ip", server["ip"])
            if f.get("l4", {}) == {} or "protocol" in f.get("l4", {})]
    assert seen, "a protocol without ports is still a flow with a verdict"
    assert still_works(node, client, server)


FLOOD = r"""
import sys
from scapy.all import Ether, IP, TCP, sendp, get_if_hwaddr
src, dst, gw_mac, count = sys.argv[1:5]
pkt = Ether(src=get_if_hwaddr("eth0"), dst=gw_mac, type=0x0800) / IP(src="10.99.0.1", dst=dst) / TCP(dport=81)
sendp(pkt, iface="eth0", count=int(count), verbose=False)
"""


def test_event_flood_is_bounded_and_reported(node, pair):
    """With the agent stopped, a flood of drops fills the ring buffer: the rest is counted, not queued."""
    client, server = pair
    os.kill(node.agent.pid, signal.SIGSTOP)
    try:
        subprocess.run([*node.in_ep(client), PY, "-c", FLOOD, client["ip"], server["ip"], client["host_mac"], "8000"],
                       check=True, capture_output=True, timeout=120)
    finally:
        os.kill(node.agent.pid, signal.SIGCONT)
    time.sleep(1)
    proc = node.cli("flows", "--last", "1")
    assert "lost" in proc.stderr, "meshagent flows says it missed events"
    assert node.cli_json("status")["lost_events"] > 0
    assert still_works(node, client, server)


def test_metrics_count_drops_by_reason(node, pair):
    text = node.ns(["curl", "-s", f"http://{node.config['metrics_addr']}/metrics"]).stdout
    assert 'meshagent_drop_count_total{direction="EGRESS",reason="INVALID_SOURCE_IP"}' in text
    assert "meshagent_endpoints 2.0" in text
    assert "meshagent_flows_processed_total" in text
    assert "meshagent_policy_verdicts_total" in text
    assert "meshagent_bpf_map_ops_total" in text
