"""Byte layouts of the datapath's maps and events, and conversions to and from the agent's types.

The ctypes classes here are the one hand-written copy of the structs in bpf/lib/*.h, so that events
can be decoded and keys built without a kernel (unit tests, the CLI, the L7 processor, which reads
l7_origdst without BCC). `check_layout()` compares each
copy with the type BCC built from the C at load time and refuses to run if they differ: our
version of Cilium's alignchecker.
"""

from __future__ import annotations

import ctypes as ct
import ipaddress
import socket

from agent.policy.types import ANY_IDENTITY, ANY_PROTO, Action, Enforcement, PolicyEntry, PolicyKey


class DatapathLayoutError(RuntimeError):
    """The Python copy of a struct does not match the compiled C: a bug in this repository."""


class EndpointInfoC(ct.Structure):
    _fields_ = [
        ("ip", ct.c_uint32),
        ("identity", ct.c_uint32),
        ("ep_id", ct.c_uint16),
        ("flags", ct.c_uint8),
        ("pad", ct.c_uint8),
        ("deny_rule_ingress", ct.c_uint32),
        ("deny_rule_egress", ct.c_uint32),
    ]


class DatapathConfigC(ct.Structure):
    _fields_ = [
        ("policy_revision", ct.c_uint32),
        ("proxy_ip", ct.c_uint32),  # network order; 0 = no L7 processor
        ("proxy_port", ct.c_uint16),  # network order
        ("dns_port", ct.c_uint16),  # network order; 0 = no DNS proxy (bpf/lib/dns.h)
    ]


class IpcacheKeyC(ct.Structure):
    _fields_ = [("prefixlen", ct.c_uint32), ("addr", ct.c_uint32)]


class IpcacheEntryC(ct.Structure):
    _fields_ = [("identity", ct.c_uint32), ("pad", ct.c_uint32)]


class PolicyKeyC(ct.Structure):
    _fields_ = [
        ("prefixlen", ct.c_uint32),
        ("ep_id", ct.c_uint16),
        ("dir", ct.c_uint8),
        ("pad", ct.c_uint8),
        ("identity", ct.c_uint32),
        ("proto", ct.c_uint8),
        ("pad2", ct.c_uint8),
        ("dport", ct.c_uint16),
    ]


class PolicyEntryC(ct.Structure):
    _fields_ = [
        ("rule_id", ct.c_uint32),
        ("action", ct.c_uint8),
        ("flags", ct.c_uint8),
        ("match", ct.c_uint8),
        ("pad", ct.c_uint8),
    ]


class CtKeyC(ct.Structure):
    _fields_ = [
        ("saddr", ct.c_uint32),
        ("daddr", ct.c_uint32),
        ("sport", ct.c_uint16),
        ("dport", ct.c_uint16),
        ("proto", ct.c_uint8),
        ("dir", ct.c_uint8),
        ("ep_id", ct.c_uint16),
    ]


class CtEntryC(ct.Structure):
    _fields_ = [
        ("created_ns", ct.c_uint64),
        ("last_seen", ct.c_uint64),
        ("packets_fwd", ct.c_uint64),
        ("bytes_fwd", ct.c_uint64),
        ("packets_rev", ct.c_uint64),
        ("bytes_rev", ct.c_uint64),
        ("rule_id", ct.c_uint32),
        ("revision", ct.c_uint32),
        ("remote_identity", ct.c_uint32),
        ("flags", ct.c_uint8),
        ("pad", ct.c_uint8),
        ("proxy_ep_id", ct.c_uint16),  # CT_F_PROXY_ID: the client endpoint of the L7 processor's flow
    ]


class FlowEventC(ct.Structure):
    _fields_ = [
        ("ts_ns", ct.c_uint64),
        ("saddr", ct.c_uint32),
        ("daddr", ct.c_uint32),
        ("sport", ct.c_uint16),
        ("dport", ct.c_uint16),
        ("proto", ct.c_uint8),
        ("type", ct.c_uint8),
        ("verdict", ct.c_uint8),
        ("dir", ct.c_uint8),
        ("drop_reason", ct.c_uint8),
        ("is_reply", ct.c_uint8),
        ("tcp_flags", ct.c_uint8),
        ("match", ct.c_uint8),
        ("ep_id", ct.c_uint16),
        ("pad", ct.c_uint16),
        ("ifindex", ct.c_uint32),
        ("src_identity", ct.c_uint32),
        ("dst_identity", ct.c_uint32),
        ("rule_id", ct.c_uint32),
        ("packets", ct.c_uint64),
        ("bytes", ct.c_uint64),
    ]


class MetricsValueC(ct.Structure):
    _fields_ = [("packets", ct.c_uint64), ("bytes", ct.c_uint64)]


# C struct name -> (our copy, the map and side BCC exposes it on), for check_layout() (bpf/policy.c's maps).
LAYOUTS = {
    "endpoint_info": (EndpointInfoC, "endpoints", "Leaf"),
    "datapath_config": (DatapathConfigC, "config_map", "Leaf"),
    "ipcache_key": (IpcacheKeyC, "ipcache", "Key"),  # ipblock_cidrs has the same key and value
    "ipcache_entry": (IpcacheEntryC, "ipcache", "Leaf"),
    "policy_key": (PolicyKeyC, "policy_map", "Key"),
    "policy_entry": (PolicyEntryC, "policy_map", "Leaf"),
    "ct_key": (CtKeyC, "ct_map", "Key"),
    "ct_entry": (CtEntryC, "ct_map", "Leaf"),
}


# ---- bpf/redirect.c's maps (bpf/lib/lb.h, netns.h, sockmap.h, fastpath_flows.h) -----------------------


class EndpointNetnsC(ct.Structure):
    _fields_ = [("ep_id", ct.c_uint16), ("pad", ct.c_uint16), ("identity", ct.c_uint32)]


class Lb4KeyC(ct.Structure):
    _fields_ = [("vip", ct.c_uint32), ("port", ct.c_uint16), ("proto", ct.c_uint8), ("pad", ct.c_uint8)]


class Lb4ServiceC(ct.Structure):
    _fields_ = [
        ("service_id", ct.c_uint32),
        ("backend_count", ct.c_uint16),
        ("flags", ct.c_uint8),
        ("pad", ct.c_uint8),
    ]


class Lb4BackendKeyC(ct.Structure):
    _fields_ = [("service_id", ct.c_uint32), ("slot", ct.c_uint16), ("pad", ct.c_uint16)]


class Lb4BackendC(ct.Structure):
    _fields_ = [("ip", ct.c_uint32), ("port", ct.c_uint16), ("pad", ct.c_uint16)]


class Lb4RevnatKeyC(ct.Structure):
    _fields_ = [("cookie", ct.c_uint64), ("ip", ct.c_uint32), ("port", ct.c_uint16), ("pad", ct.c_uint16)]


class Lb4RevnatC(ct.Structure):
    _fields_ = [("vip", ct.c_uint32), ("port", ct.c_uint16), ("pad", ct.c_uint16)]


class LbConfigC(ct.Structure):
    _fields_ = [("proxy_ip", ct.c_uint32), ("proxy_port", ct.c_uint16), ("pad", ct.c_uint16)]


class L7OrigDstC(ct.Structure):
    _fields_ = [
        ("vip", ct.c_uint32),  # network order
        ("port", ct.c_uint16),  # network order
        ("ep_id", ct.c_uint16),
        ("identity", ct.c_uint32),
        ("pad", ct.c_uint32),
    ]


class L7ClientKeyC(ct.Structure):
    _fields_ = [("ip", ct.c_uint32), ("port", ct.c_uint16), ("pad", ct.c_uint16)]  # network order


class SockKeyC(ct.Structure):
    _fields_ = [
        ("local_ip", ct.c_uint32),  # network order
        ("remote_ip", ct.c_uint32),
        ("local_port", ct.c_uint16),  # host order
        ("remote_port", ct.c_uint16),
        ("pad", ct.c_uint32),
        ("netns", ct.c_uint64),  # loopback pairs only
    ]


class FastpathFlowC(ct.Structure):
    _fields_ = [("revision", ct.c_uint32), ("flags", ct.c_uint32), ("sk", ct.c_uint64)]


class FastpathConfigC(ct.Structure):
    _fields_ = [
        ("node_netns", ct.c_uint64),
        ("pod_net", ct.c_uint32),  # network order
        ("pod_mask", ct.c_uint32),
        ("flags", ct.c_uint32),
        ("pad", ct.c_uint32),
    ]


class FastpathCounterC(ct.Structure):
    _fields_ = [("messages", ct.c_uint64), ("bytes", ct.c_uint64)]


class DnsOrigDstC(ct.Structure):
    _fields_ = [("addr", ct.c_uint32), ("port", ct.c_uint16), ("pad", ct.c_uint16)]  # network order


# C struct name -> (our copy, the map and side BCC exposes it on), for check_layout() (bpf/redirect.c's maps).
SOCKET_LAYOUTS = {
    "endpoint_netns_info": (EndpointNetnsC, "endpoint_netns", "Leaf"),
    "lb4_key": (Lb4KeyC, "lb_services", "Key"),
    "lb4_service": (Lb4ServiceC, "lb_services", "Leaf"),
    "lb4_backend_key": (Lb4BackendKeyC, "lb_backends", "Key"),
    "lb4_backend": (Lb4BackendC, "lb_backends", "Leaf"),
    "lb4_revnat_key": (Lb4RevnatKeyC, "lb_revnat", "Key"),
    "lb4_revnat": (Lb4RevnatC, "lb_revnat", "Leaf"),
    "lb_config": (LbConfigC, "lb_config", "Leaf"),
    "l7_origdst": (L7OrigDstC, "l7_origdst", "Leaf"),
    "l7_client_key": (L7ClientKeyC, "l7_origdst", "Key"),
    "sock_key": (SockKeyC, "fastpath_flows", "Key"),
    "fastpath_flow": (FastpathFlowC, "fastpath_flows", "Leaf"),
    "fastpath_config": (FastpathConfigC, "fastpath_config", "Leaf"),
    "fastpath_counter": (FastpathCounterC, "fastpath_metrics", "Leaf"),
    "dns_origdst": (DnsOrigDstC, "dns_origdst", "Leaf"),
}


def check_layout(ours: type[ct.Structure], theirs: type) -> None:
    """Raise DatapathLayoutError unless ``ours`` has the size and field offsets of ``theirs``."""
    name = ours.__name__
    if ct.sizeof(ours) != ct.sizeof(theirs):
        raise DatapathLayoutError(f"{name}: {ct.sizeof(ours)} bytes here, {ct.sizeof(theirs)} in the BPF C")
    for field_name, *_ in ours._fields_:
        if field_name.startswith("pad"):
            continue
        mine, other = getattr(ours, field_name), getattr(theirs, field_name, None)
        if other is None or mine.offset != other.offset or mine.size != other.size:
            raise DatapathLayoutError(f"{name}.{field_name}: offset/size differ from the BPF C struct")


# ---- conversions -------------------------------------------------------------------------------

# Verdict-match numbering of bpf/lib/policy.h (MATCH_*).
MATCH_L3_ONLY, MATCH_L3_L4, MATCH_L4_ONLY, MATCH_ALL = 1, 2, 3, 4
POLICY_F_AUDIT = 0x1

EP_F_ENFORCE = {0: 0x1, 1: 0x2}  # by direction: INGRESS, EGRESS
EP_F_AUDIT = {0: 0x4, 1: 0x8}


def ip_to_be32(ip: str) -> int:
    """An IPv4 address as the u32 the kernel holds in network order, read on this (little-endian) host."""
    return int.from_bytes(socket.inet_aton(ip), "little")


def be32_to_ip(value: int) -> str:
    return socket.inet_ntoa(value.to_bytes(4, "little"))


def htons(v: int) -> int:
    return socket.htons(v)


def htonl(v: int) -> int:
    return socket.htonl(v)


def policy_key_to_c(key: PolicyKey) -> PolicyKeyC:
    prefix = 64 + (16 + key.port_prefix if key.proto != ANY_PROTO else 0)
    return PolicyKeyC(
        prefixlen=prefix,
        ep_id=htons(key.ep_id),
        dir=key.direction,
        identity=htonl(key.identity),
        proto=key.proto,
        dport=htons(key.port if key.proto != ANY_PROTO else 0),
    )


def policy_key_from_c(c) -> PolicyKey:
    port_prefix = max(0, c.prefixlen - 80) if c.prefixlen > 64 else 0
    proto = c.proto if c.prefixlen > 64 else ANY_PROTO
    return PolicyKey(
        ep_id=socket.ntohs(c.ep_id),
        direction=c.dir,
        identity=socket.ntohl(c.identity),
        proto=proto,
        port=socket.ntohs(c.dport),
        port_prefix=port_prefix,
    )


def match_type(key: PolicyKey) -> int:
    specific_l3 = key.identity != ANY_IDENTITY
    specific_l4 = key.proto != ANY_PROTO
    if specific_l3:
        return MATCH_L3_L4 if specific_l4 else MATCH_L3_ONLY
    return MATCH_L4_ONLY if specific_l4 else MATCH_ALL


def policy_entry_to_c(key: PolicyKey, entry: PolicyEntry) -> PolicyEntryC:
    return PolicyEntryC(
        rule_id=entry.rule_id,
        action=int(entry.action),
        flags=POLICY_F_AUDIT if entry.audit else 0,
        match=match_type(key),
    )


def policy_entry_from_c(c) -> PolicyEntry:
    return PolicyEntry(action=Action(c.action), audit=bool(c.flags & POLICY_F_AUDIT), rule_id=c.rule_id)


def ipcache_key_to_c(prefix: str) -> IpcacheKeyC:
    net = ipaddress.IPv4Network(prefix)
    return IpcacheKeyC(prefixlen=net.prefixlen, addr=ip_to_be32(str(net.network_address)))


def ipcache_key_from_c(c) -> str:
    return f"{be32_to_ip(c.addr)}/{c.prefixlen}"


def endpoint_info_to_c(
    ip: str, identity: int, ep_id: int, ingress: Enforcement, egress: Enforcement
) -> EndpointInfoC:
    flags = 0
    for direction, enf in ((0, ingress), (1, egress)):
        if enf.enforced:
            flags |= EP_F_ENFORCE[direction]
            if enf.audit:
                flags |= EP_F_AUDIT[direction]
    return EndpointInfoC(
        ip=ip_to_be32(ip),
        identity=identity,
        ep_id=ep_id,
        flags=flags,
        deny_rule_ingress=ingress.rule_id,
        deny_rule_egress=egress.rule_id,
    )


def same_bytes(a, b) -> bool:
    """Whether two ctypes values hold the same bytes (BCC's generated types and ours compare so)."""
    return bytes(a) == bytes(b)
