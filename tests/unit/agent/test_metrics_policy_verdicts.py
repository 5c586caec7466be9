"""meshagent_policy_verdicts_total counts every drop that is a policy decision.

The datapath's policy drops are the DROP_POLICY* reasons of bpf/lib/drop_reasons.h; the agent
counts a drop event as a policy verdict when its reason is one of them (agent/flows.py
policy_verdict_key). A reason left out of that set silently vanishes from the metric.
"""

from types import SimpleNamespace

import pytest
from prometheus_client import generate_latest
from prometheus_client.core import CollectorRegistry

from agent.datapath.maps import FlowEventC, ip_to_be32
from agent.datapath.reasons import DROP_REASONS
from agent.flows import FlowContext, FlowCounters, decode_event
from agent.metrics import AgentCollector
from agent.policy.types import EGRESS
from tests.unit.agent.datapath.bpf_headers import defines

CLIENT_IP, BACKEND_IP = "10.200.0.10", "10.200.0.11"
CLIENT_ID, BACKEND_ID = 300, 301
CTX = FlowContext(node_name="n1", endpoints_by_ip={}, identity_labels={}, rules={}, boot_offset_ns=0)


def drop_event(reason: int) -> FlowEventC:
    """A drop as bpf/policy.c reports it: for 183, the L7 processor's upstream SYN to the backend,
    denied by the client's egress policy and reported as the client's egress drop."""
    return FlowEventC(
        ts_ns=10**9, saddr=ip_to_be32(CLIENT_IP), daddr=ip_to_be32(BACKEND_IP), sport=40000, dport=8080,
        proto=6, type=2, verdict=2, dir=EGRESS, drop_reason=reason, tcp_flags=0x02, ep_id=12, ifindex=40,
        src_identity=CLIENT_ID, dst_identity=BACKEND_ID, rule_id=5,
    )


def scrape(counters: FlowCounters) -> str:
    """The node's /metrics text built from ``counters`` (no kernel: empty datapath counters)."""
    agent = SimpleNamespace(
        counters=counters,
        datapath=SimpleNamespace(metrics=dict, lost_events=lambda: 0),
        endpoints=SimpleNamespace(ifindex={}),
        sync=None,
        sockets=SimpleNamespace(fastpath_summary=lambda: {"counters": {}}),
        l7=None,
    )
    registry = CollectorRegistry()
    registry.register(AgentCollector(agent))
    return generate_latest(registry).decode()


def test_client_egress_drop_is_a_policy_verdict():
    counters = FlowCounters()
    counters.observe(decode_event(drop_event(183), CTX))
    assert counters.snapshot()[1] == {("egress", "none"): 1}
    assert 'meshagent_policy_verdicts_total{direction="egress",match="none"} 1.0' in scrape(counters)


@pytest.mark.parametrize("reason", sorted(DROP_REASONS))
def test_only_policy_drops_are_policy_verdicts(reason):
    counters = FlowCounters()
    counters.observe(decode_event(drop_event(reason), CTX))
    counted = counters.snapshot()[1] == {("egress", "none"): 1}
    assert counted == (reason in defines("drop_reasons.h", "DROP_POLICY").values())
