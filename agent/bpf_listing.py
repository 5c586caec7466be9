"""`meshagent bpf ... list`: the kernel maps as rows a person can read. Read-only."""

from __future__ import annotations

from collections.abc import Mapping

from agent.datapath import clock, maps
from agent.policy.types import BY_ADDRESS, DIRECTION_NAMES, PROTO_NAMES, PolicyEntry, PolicyKey, RuleInfo


def ct_entries(ct_map) -> list[dict]:
    """Every conntrack entry with its counters, rule and idle time."""
    now = clock.jiffies()
    items = []
    for k, v in ct_map.items():
        items.append({
            "endpoint": k.ep_id, "direction": DIRECTION_NAMES.get(k.dir, k.dir),
            "proto": PROTO_NAMES.get(k.proto, k.proto),
            "source": f"{maps.be32_to_ip(k.saddr)}:{k.sport}",
            "destination": f"{maps.be32_to_ip(k.daddr)}:{k.dport}",
            "packets": v.packets_fwd + v.packets_rev, "bytes": v.bytes_fwd + v.bytes_rev,
            "rule_id": v.rule_id, "remote_identity": v.remote_identity, "revision": v.revision,
            "flags": v.flags, "idle_s": round(clock.seconds_since(v.last_seen, now), 1),
        })
    return items


def policy_entries(policy: Mapping[PolicyKey, PolicyEntry], endpoint_names: Mapping[int, str],
                   rules: Mapping[int, RuleInfo], ipblock_cidrs: Mapping[str, int] | None = None) -> list[dict]:
    """The policy map's entries with the endpoint's name, the port range and the rule that wrote each.
    A by-address entry's identity reads ``address in PREFIX`` (its ipblock_cidrs prefix)."""
    prefixes = {n: p for p, n in (ipblock_cidrs or {}).items()}
    items = []
    for key, entry in sorted(policy.items()):
        rule = rules.get(entry.rule_id)
        ports = "any" if key.proto == 0 or key.port_prefix == 0 else (
            str(key.port) if key.port_prefix == 16 else
            f"{key.port}-{key.port + (1 << (16 - key.port_prefix)) - 1}")
        items.append({
            "endpoint": endpoint_names.get(key.ep_id, key.ep_id), "direction": DIRECTION_NAMES[key.direction],
            "identity": "any" if key.identity == 0 else _identity(key.identity, prefixes),
            "proto": "any" if key.proto == 0 else PROTO_NAMES.get(key.proto, key.proto), "ports": ports,
            "action": entry.action.name.lower(), "audit": entry.audit, "rule_id": entry.rule_id,
            "rule": rule.describe() if rule else "",
        })
    return items


def _identity(identity: int, prefixes: Mapping[int, str]) -> int | str:
    if not identity & BY_ADDRESS:
        return identity
    cidr_identity = identity & ~BY_ADDRESS
    return f"address in {prefixes.get(cidr_identity, cidr_identity)}"


def ipblock_entries(ipblock_cidrs: Mapping[str, int]) -> list[dict]:
    """The ipblock_cidrs trie: the NetworkPolicy ipBlock prefixes peers' addresses are looked up in."""
    return [{"prefix": p, "identity": n} for p, n in sorted(ipblock_cidrs.items())]


def fastpath_sockets(sockets) -> list[dict]:
    """The sockets on the socket fast path now (bpf/lib/sockmap.h), with their state."""
    state = {(s["local"], s["remote"]): s for s in sockets.fastpath()["sockets"]}
    items = []
    for lip, lport, rip, rport in sorted(sockets.fastpath_sockets()):
        local, remote = f"{lip}:{lport}", f"{rip}:{rport}"
        s = state.get((local, remote), {})
        items.append({"local": local, "remote": remote, "path": s.get("path", "tcp (no state)"),
                      "policy_revision": s.get("revision", "-")})
    return items
