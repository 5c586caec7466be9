"""Byte layouts and conversions of the datapath's maps, without a kernel."""

import ctypes as ct
import re

import pytest

from agent.datapath import maps
from agent.policy.types import ANY_IDENTITY, ANY_PROTO, EGRESS, INGRESS, Action, Enforcement, PolicyEntry, PolicyKey
from tests.paths import BPF as BPF_ROOT

BPF = BPF_ROOT / "lib"


def _documented_size(struct: str) -> int:
    """The size each struct's layout comment states (`};  /* N bytes */`)."""
    for header in BPF.glob("*.h"):
        m = re.search(rf"struct {struct} \{{.*?\}};\s*/\* (\d+) bytes \*/", header.read_text(), re.S)
        if m:
            return int(m.group(1))
    raise AssertionError(f"struct {struct} has no layout comment")


@pytest.mark.parametrize("struct", sorted(maps.LAYOUTS) + ["flow_event", "metrics_value"])
def test_sizes_match_layout_comments(struct):
    ours = maps.LAYOUTS[struct][0] if struct in maps.LAYOUTS else {
        "flow_event": maps.FlowEventC, "metrics_value": maps.MetricsValueC}[struct]
    assert ct.sizeof(ours) == _documented_size(struct)


def test_check_layout_detects_drift():
    class Other(ct.Structure):
        _fields_ = [("prefixlen", ct.c_uint32), ("addr", ct.c_uint16), ("x", ct.c_uint16)]

    with pytest.raises(maps.DatapathLayoutError):
        maps.check_layout(maps.IpcacheKeyC, Other)
    maps.check_layout(maps.IpcacheKeyC, maps.IpcacheKeyC)


@pytest.mark.parametrize("key", [
    PolicyKey(1, INGRESS, 300, 6, 80, 16),
    PolicyKey(7, EGRESS, ANY_IDENTITY, 17, 1024, 6),
    PolicyKey(2, INGRESS, 12345, ANY_PROTO, 0, 0),
    PolicyKey(65000, EGRESS, 1 << 24, 6, 0, 0),
])
def test_policy_key_round_trip(key):
    c = maps.policy_key_to_c(key)
    assert maps.policy_key_from_c(c) == key


def test_policy_key_prefix_lengths():
    assert maps.policy_key_to_c(PolicyKey(1, INGRESS, 5, ANY_PROTO)).prefixlen == 64
    assert maps.policy_key_to_c(PolicyKey(1, INGRESS, 5, 6, 0, 0)).prefixlen == 80
    assert maps.policy_key_to_c(PolicyKey(1, INGRESS, 5, 6, 80, 16)).prefixlen == 96


def test_policy_key_is_network_order():
    raw = bytes(maps.policy_key_to_c(PolicyKey(0x0102, INGRESS, 0x01020304, 6, 0x0050, 16)))
    assert raw[4:6] == b"\x01\x02" and raw[8:12] == b"\x01\x02\x03\x04" and raw[14:16] == b"\x00\x50"


def test_entry_carries_match_type():
    key = PolicyKey(1, INGRESS, ANY_IDENTITY, 6, 80, 16)
    c = maps.policy_entry_to_c(key, PolicyEntry(Action.DENY, True, 42))
    assert (c.action, c.flags, c.match, c.rule_id) == (2, maps.POLICY_F_AUDIT, maps.MATCH_L4_ONLY, 42)
    assert maps.policy_entry_from_c(c) == PolicyEntry(Action.DENY, True, 42)


def test_ipcache_and_address_conversions():
    c = maps.ipcache_key_to_c("10.1.0.0/16")
    assert c.prefixlen == 16 and bytes(c)[4:] == bytes([10, 1, 0, 0])
    assert maps.ipcache_key_from_c(c) == "10.1.0.0/16"
    assert maps.be32_to_ip(maps.ip_to_be32("192.0.2.7")) == "192.0.2.7"


def test_endpoint_info_flags():
    info = maps.endpoint_info_to_c("10.0.0.2", 300, 4, Enforcement(True, False, 11), Enforcement(True, True, 12))
    assert info.flags == 0x1 | 0x2 | 0x8
    assert (info.deny_rule_ingress, info.deny_rule_egress, info.ep_id) == (11, 12, 4)


def test_cgroup2_root_is_found_where_it_is_mounted(tmp_path):
    from agent.datapath.build import cgroup2_root

    hybrid = tmp_path / "hybrid"
    hybrid.write_text("cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n")
    pure = tmp_path / "pure"
    pure.write_text("cgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n")
    assert cgroup2_root(str(hybrid)) == "/sys/fs/cgroup/unified"  # these machines
    assert cgroup2_root(str(pure)) == "/sys/fs/cgroup"  # Debian 12's default (the Vagrant VMs)
