"""Python copies of the datapath's numeric constants must match bpf/lib/*.h.

The struct layouts are checked against BCC's types at load time (agent/datapath/maps.py
check_layout) and the drop-reason, verdict, event and match numbering in test_reasons.py; this
module covers every other constant the agent, the CLI or the L7 processor writes into a map,
reads out of one, or puts on a packet. Each Python value is imported from where it lives.
"""

import re

import pytest

from agent import flows, identity
from agent.datapath import maps, reasons, sockets, tc
from agent.policy import types
from tests.unit.agent.datapath.bpf_headers import define_list, defines
from userspace_l7 import origdst


def test_directions():
    assert defines("common.h", "DIR_") == {"DIR_INGRESS": types.INGRESS, "DIR_EGRESS": types.EGRESS}


def test_endpoint_flags():
    flags = defines("common.h", "EP_F_")
    assert flags == {
        "EP_F_ENFORCE_INGRESS": maps.EP_F_ENFORCE[types.INGRESS],
        "EP_F_ENFORCE_EGRESS": maps.EP_F_ENFORCE[types.EGRESS],
        "EP_F_AUDIT_INGRESS": maps.EP_F_AUDIT[types.INGRESS],
        "EP_F_AUDIT_EGRESS": maps.EP_F_AUDIT[types.EGRESS],
    }


def test_endpoint_array_size():
    assert defines("common.h", "ENDPOINT_ARRAY_SIZE") == {"ENDPOINT_ARRAY_SIZE": tc.ENDPOINT_ARRAY_SIZE}


def test_proxy_marks():
    marks = defines("common.h", "MARK_")
    assert marks == {
        "MARK_MAGIC_MASK": origdst.MARK_MAGIC_MASK,
        "MARK_MAGIC_IDENTITY": origdst.MARK_MAGIC_IDENTITY,
        "MARK_IDENTITY_MASK": origdst.MARK_IDENTITY_MASK,
        "MARK_MAGIC_PROXY_EGRESS": origdst.MARK_MAGIC_PROXY_EGRESS,
        "MARK_EP_ID_MASK": origdst.MARK_EP_ID_MASK,
    }


def test_policy_constants():
    assert defines("policy.h", "ANY_IDENTITY") == {"ANY_IDENTITY": types.ANY_IDENTITY}
    assert defines("policy.h", "POLICY_ACTION_") == {
        "POLICY_ACTION_ALLOW": types.Action.ALLOW,
        "POLICY_ACTION_DENY": types.Action.DENY,
    }
    assert defines("policy.h", "POLICY_F_") == {"POLICY_F_AUDIT": maps.POLICY_F_AUDIT}
    assert defines("policy.h", "MATCH_") == {
        "MATCH_NONE": 0,
        "MATCH_L3_ONLY": maps.MATCH_L3_ONLY,
        "MATCH_L3_L4": maps.MATCH_L3_L4,
        "MATCH_L4_ONLY": maps.MATCH_L4_ONLY,
        "MATCH_ALL": maps.MATCH_ALL,
    }
    # The kernel looks up full-length keys: a Python key for one port of one protocol is one.
    key = types.PolicyKey(ep_id=1, direction=types.INGRESS, identity=300, proto=6, port=80, port_prefix=16)
    assert maps.policy_key_to_c(key).prefixlen == defines("policy.h", "POLICY_FULL_PREFIX")["POLICY_FULL_PREFIX"]


def test_match_type_names():
    match = defines("policy.h", "MATCH_")
    assert reasons.MATCH_TYPES[match["MATCH_NONE"]] == "none"
    assert reasons.MATCH_TYPES[match["MATCH_L3_ONLY"]] == "L3-Only"
    assert reasons.MATCH_TYPES[match["MATCH_L3_L4"]] == "L3-L4"
    assert reasons.MATCH_TYPES[match["MATCH_L4_ONLY"]] == "L4-Only"
    assert reasons.MATCH_TYPES[match["MATCH_ALL"]] == "all"


def test_reserved_identities():
    assert defines("ipcache.h", "IDENTITY_") == {
        "IDENTITY_HOST": identity.HOST,
        "IDENTITY_WORLD": identity.WORLD,
        "IDENTITY_REMOTE_NODE": identity.REMOTE_NODE,
        "IDENTITY_CIDR_BASE": identity.CIDR_BASE,
    }


def test_by_address_key_bit():
    """policy_lookup_by_address keys an ipBlock's by-address entries with this bit; the compiler writes them."""
    assert defines("policy.h", "POLICY_BY_ADDRESS") == {"POLICY_BY_ADDRESS": types.BY_ADDRESS}
    assert types.BY_ADDRESS > identity.CIDR_BASE and types.BY_ADDRESS & identity.CIDR_BASE == 0


def test_conntrack_closed_flags():
    """agent/daemon.py ct_gc() treats ``entry.flags & CT_F_CLOSED`` as "the flow closed": FIN either
    way, or RST."""
    from agent.daemon import CT_F_CLOSED

    ct = defines("conntrack.h", "CT_F_")
    assert ct["CT_F_FIN_FWD"] | ct["CT_F_FIN_REV"] | ct["CT_F_RST"] == CT_F_CLOSED
    bits = list(ct.values())
    assert all(b and b & (b - 1) == 0 for b in bits) and len(set(bits)) == len(bits)  # distinct single bits


def test_lb_flags():
    assert defines("lb.h", "LB_F_") == {"LB_F_L7": sockets.LB_F_L7}


def test_fastpath_flags():
    assert defines("sockmap.h", "FP_CFG_") == {"FP_CFG_ENABLED": sockets.FP_CFG_ENABLED}
    assert defines("fastpath_flows.h", "FP_FLOW_") == {
        "FP_FLOW_TCP_FOR_GOOD": sockets.FP_FLOW_TCP_FOR_GOOD,
        "FP_FLOW_ON_TCP": sockets.FP_FLOW_ON_TCP,
        "FP_FLOW_NODE_SIDE": sockets.FP_FLOW_NODE_SIDE,
    }
    default = defines("fastpath_flows.h", "FASTPATH_FLOW_MAP_SIZE")["FASTPATH_FLOW_MAP_SIZE"]
    assert default == sockets.MAP_SIZES["FASTPATH_FLOW_MAP_SIZE"]


def test_fastpath_outcomes_in_index_order():
    """FASTPATH_OUTCOMES[i] is the label of fastpath_metrics index i: each FP_* outcome's comment
    in sockmap.h starts with its quoted label."""
    count = defines("sockmap.h", "FP_OUTCOMES")["FP_OUTCOMES"]
    outcomes = [d for d in define_list("sockmap.h", "FP_") if re.match(r'"\w+"', d.comment)]
    by_index = {d.value: d.comment.split('"')[1] for d in outcomes}
    assert sorted(by_index) == list(range(count)) == [d.value for d in outcomes]
    assert tuple(by_index[i] for i in range(count)) == sockets.FASTPATH_OUTCOMES


@pytest.mark.parametrize(("prefix", "header", "names"), [
    ("VERDICT_", "common.h", ("FORWARDED", "DROPPED", "REDIRECTED", "AUDIT")),
    ("EVENT_", "events.h", ("FLOW_NEW", "DROP", "FLOW_END")),
])
def test_flows_copies(prefix, header, names):
    """agent/flows.py keeps its own VERDICT_* / EVENT_* numbers next to reasons.VERDICTS and
    reasons.EVENT_TYPES: both copies must be the header's."""
    assert defines(header, prefix) == {prefix + n: getattr(flows, prefix + n) for n in names}
