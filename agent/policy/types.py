"""The policy compiler's output: what goes into the kernel's policy map, and who decided it.

These are the Python-side view of `bpf/lib/policy.h`. `agent/datapath/maps.py` turns them into
the kernel's byte layout; nothing else in the agent needs to know that layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

from agent.dns.rules import DnsPolicy, DnsRule
from agent.named_ports import NamedPort

# Directions as the datapath numbers them (bpf/lib/common.h: DIR_INGRESS / DIR_EGRESS).
INGRESS = 0
EGRESS = 1
DIRECTION_NAMES = {INGRESS: "ingress", EGRESS: "egress"}

ANY_IDENTITY = 0  # policy key identity that matches every peer
# Policy key identity bit of a by-address entry (bpf/lib/policy.h POLICY_BY_ADDRESS): BY_ADDRESS | the
# CIDR identity of an ipBlock prefix holds a NetworkPolicy ipBlock's allow for a peer matched by its
# address (an endpoint, the host, a remote node), apart from the entries CIDR rules write for the
# prefix's own identity (which the ipcache gives addresses outside the cluster).
BY_ADDRESS = 0x80000000
ANY_PROTO = 0  # policy key protocol that matches every protocol (the port is then wildcarded too)

PROTO_NUMBERS = {"TCP": 6, "UDP": 17, "ICMP": 1, "SCTP": 132}
PROTO_NAMES = {v: k for k, v in PROTO_NUMBERS.items()}


class Action(IntEnum):
    ALLOW = 1
    DENY = 2


@dataclass(frozen=True, order=True)
class PolicyKey:
    """One LPM-trie key of the policy map.

    ``port_prefix`` is how many leading bits of ``port`` must match: 16 for one port, fewer for a
    power-of-two aligned block of a port range, 0 for any port. With ``proto == ANY_PROTO`` the
    port is not looked at (port and port_prefix must be 0). For ICMP the "port" is the ICMP type.
    """

    ep_id: int
    direction: int  # INGRESS or EGRESS, seen from the endpoint
    identity: int  # peer identity, or ANY_IDENTITY
    proto: int  # IP protocol number, or ANY_PROTO
    port: int = 0
    port_prefix: int = 0


@dataclass(frozen=True)
class PolicyEntry:
    action: Action
    audit: bool  # from a policy annotated meshagent.io/audit: "true": a deny here only reports
    rule_id: int  # RuleInfo that produced this entry; the datapath reports it with the verdict


@dataclass(frozen=True)
class Enforcement:
    """Whether an endpoint is under default deny in one direction, and which policy put it there."""

    enforced: bool
    audit: bool = False  # every policy selecting it in this direction is in audit mode
    rule_id: int = 0  # RuleInfo of kind "default-deny" naming the selecting policy


@dataclass(frozen=True)
class RuleInfo:
    rule_id: int
    policy: str  # "namespace/name"
    kind: str  # CiliumNetworkPolicy | NetworkPolicy
    path: str  # where in the policy: "spec.ingress[0]", "spec.egressDeny[1]", or "default-deny"
    action: str  # "allow" | "deny" | "default-deny"
    audit: bool = False
    # The port names the rule gives, each with the protocols it asks for: (("http", ("TCP",)),).
    # `policy trace` explains their resolution on the endpoint the traffic goes to.
    named_ports: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def describe(self) -> str:
        if self.action == "default-deny":
            return f"{self.kind} {self.policy} selects the endpoint and no rule matched (default deny)"
        return f"{self.kind} {self.policy} {self.path} ({self.action})"


@dataclass(frozen=True)
class IdentityInfo:
    id: int
    labels: dict[str, str]


@dataclass(frozen=True)
class EndpointInfo:
    ep_id: int
    name: str
    namespace: str
    ip: str
    identity: int
    labels: dict[str, str]  # security labels (agent.labels.security_labels)
    ports: tuple[NamedPort, ...] = ()  # its named ports (agent.named_ports.ports_of its record)


@dataclass
class CompiledPolicy:
    entries: dict[PolicyKey, PolicyEntry] = field(default_factory=dict)
    enforcement: dict[tuple[int, int], Enforcement] = field(default_factory=dict)  # (ep_id, direction)
    rules: dict[int, RuleInfo] = field(default_factory=dict)
    cidr_identities: dict[str, int] = field(default_factory=dict)  # "10.0.0.0/8" -> local CIDR identity
    # The prefixes NetworkPolicy ipBlocks name -> their CIDR identities: bpf/lib/ipcache.h ipblock_cidrs
    ipblock_cidrs: dict[str, int] = field(default_factory=dict)
    # Per local endpoint (ep_id): the names it may look up (toPorts.rules.dns and port 53 rules), read
    # by the DNS proxy's policy hook, and the toFQDNs selectors of its egress rules (with their rules).
    dns: dict[int, DnsPolicy] = field(default_factory=dict)
    fqdn_selectors: dict[int, tuple[DnsRule, ...]] = field(default_factory=dict)
    # The /32 prefixes that toFQDNs selectors gave CIDR identities -> the names or patterns that chose
    # them ("api.example.com.", "*.example.com."), which label those identities in flows as Cilium's
    # fqdn:<pattern> labels do.
    fqdn_prefixes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Per local endpoint (ep_id): the addresses its toFQDNs selectors allow (the DNS proxy's hook
    # releases an answer at once when they hold all of its addresses)
    fqdn_allowed: dict[int, frozenset[str]] = field(default_factory=dict)
