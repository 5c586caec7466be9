"""DNS names in CiliumNetworkPolicy: the selectors of toFQDNs and toPorts.rules.dns, and the decision
whether an endpoint may look a name up. Pure: no I/O, no clock.

Cilium's semantics (pkg/policy/api/fqdn.go, pkg/fqdn/matchpattern), which users' policies rely on:

- Names are compared fully qualified (a trailing dot is added), case-insensitively, after
  trimming spaces. The characters allowed are letters, digits, ``-``, ``_`` and ``.`` (``_`` for SRV
  and DNS-SD names); a pattern also takes ``*``; at most 255 characters.
- ``matchName`` matches that one name.
- ``matchPattern``: a pattern made only of ``*`` (``*``, ``**``, ``*.``) matches every name, the root
  ``.`` included. Otherwise each run of ``*`` matches zero or more DNS characters *within one label*
  (never a dot), so ``*.cilium.io`` matches ``sub.cilium.io`` but neither ``cilium.io`` nor
  ``a.b.cilium.io``; ``sub*.cilium.io`` matches ``sub.cilium.io`` and ``subway.cilium.io``;
  ``*cilium.io`` matches ``cilium.io`` and ``xcilium.io`` but not ``www.cilium.io``. A leading ``**.``
  (two or more stars, then a dot) matches one or more whole labels: ``**.cilium.io`` matches
  ``a.cilium.io`` and ``a.b.cilium.io`` but not ``cilium.io`` (Cilium 1.18's subdomain wildcard).

The DNS rules of an endpoint (`DnsPolicy`, compiled per endpoint by agent/policy/compiler.py) say
which names it may look up; `decide` applies them to one query.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["MAX_NAME_LENGTH", "DnsDecision", "DnsPolicy", "DnsRule", "FqdnSelector", "check_match_name",
           "check_match_pattern", "decide", "fqdn", "pattern_regex"]

MAX_NAME_LENGTH = 255  # Cilium's MaxFQDNLength, for matchName and matchPattern alike

# Cilium's CRD patterns, ^([-a-zA-Z0-9_]+[.]?)+$ and ^([-a-zA-Z0-9_*]+[.]?)+$, written without the
# nested repetition, which backtracks exponentially in Python's engine on a long name with one bad
# character: labels of allowed characters, single dots between them, an optional trailing dot.
_NAME = re.compile(r"[-a-zA-Z0-9_]+(?:\.[-a-zA-Z0-9_]+)*\.?")
_PATTERN = re.compile(r"[-a-zA-Z0-9_*]+(?:\.[-a-zA-Z0-9_*]+)*\.?")
_DNS_CHAR = "[-a-z0-9_]"  # names are lowercased before they are matched
_MATCH_ALL = re.compile(r"\*+\.?")  # Cilium's isDNSWildcard: '*', '**', '*.', ...
_SUBDOMAINS = re.compile(r"\*{2,}\.")  # a leading '**.': one or more whole labels


def fqdn(name: str) -> str:
    """``name`` as selectors compare it: trimmed, lowercased, with its trailing dot."""
    name = name.strip().lower()
    return name if name.endswith(".") else name + "."


def _shown(text: str) -> str:
    return repr(text if len(text) <= 60 else text[:57] + "...")


def check_match_name(text: str) -> str:
    """A matchName, normalized (`fqdn`); ValueError with a one-line message if it is not a DNS name."""
    name = text.strip()
    if not name:
        raise ValueError("matchName is empty: give a DNS name such as api.example.com")
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"{_shown(name)} is longer than {MAX_NAME_LENGTH} characters")
    if not _NAME.fullmatch(name):
        if "*" in name:
            raise ValueError(f"{_shown(name)}: matchName takes no wildcard; use matchPattern")
        raise ValueError(f"{_shown(name)} is not a DNS name: only letters, digits, '-', '_' and '.' "
                         "(one dot between labels) are allowed")
    return fqdn(name)


def check_match_pattern(text: str) -> str:
    """A matchPattern, normalized (lowercased, trailing dot unless it matches everything); ValueError
    with a one-line message if it is not one."""
    pattern = text.strip()
    if not pattern:
        raise ValueError("matchPattern is empty: give a pattern such as *.example.com, or '*' for every name")
    if len(pattern) > MAX_NAME_LENGTH:
        raise ValueError(f"{_shown(pattern)} is longer than {MAX_NAME_LENGTH} characters")
    if not _PATTERN.fullmatch(pattern):
        raise ValueError(f"{_shown(pattern)} is not a DNS name pattern: only letters, digits, '-', '_', '.' "
                         "(one dot between labels) and '*' are allowed")
    pattern = pattern.lower()
    return pattern if _MATCH_ALL.fullmatch(pattern) else fqdn(pattern)


@functools.lru_cache(maxsize=4096)
def pattern_regex(pattern: str) -> re.Pattern[str]:
    """The anchored regular expression of a normalized matchPattern (Cilium's ToAnchoredRegexp)."""
    if _MATCH_ALL.fullmatch(pattern):
        return re.compile(rf"(?:{_DNS_CHAR}+\.)+|\.")
    out, rest = [], pattern
    lead = _SUBDOMAINS.match(rest)
    if lead:
        out.append(rf"{_DNS_CHAR}+(?:\.{_DNS_CHAR}+)*\.")
        rest = rest[lead.end():]
    for part in re.split(r"(\*+)", rest):
        if part.startswith("*"):
            out.append(f"{_DNS_CHAR}*")
        else:
            out.append(re.escape(part))
    return re.compile("".join(out))


@dataclass(frozen=True)
class FqdnSelector:
    """One ``{matchName: ...}`` or ``{matchPattern: ...}``, normalized; exactly one is set."""

    match_name: str = ""
    match_pattern: str = ""

    def __post_init__(self) -> None:
        if bool(self.match_name) == bool(self.match_pattern):
            raise ValueError("an FQDN selector needs exactly one of matchName and matchPattern")

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> FqdnSelector:
        """From a policy's ``{matchName}`` or ``{matchPattern}``; ValueError naming what is wrong."""
        name, pattern = obj.get("matchName"), obj.get("matchPattern")
        for key, value in (("matchName", name), ("matchPattern", pattern)):
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{key} must be a string")
        unknown = sorted(set(obj) - {"matchName", "matchPattern"})
        if unknown:
            raise ValueError(f"{unknown[0]}: not supported (supported: matchName, matchPattern)")
        if (name is None) == (pattern is None):
            raise ValueError("set exactly one of matchName, matchPattern")
        if name is not None:
            return cls(match_name=check_match_name(name))
        return cls(match_pattern=check_match_pattern(pattern or ""))

    def matches(self, qname: str) -> bool:
        """Whether the name ``qname`` (any case, with or without its trailing dot) is selected."""
        name = fqdn(qname)
        if self.match_name:
            return name == self.match_name
        return pattern_regex(self.match_pattern).fullmatch(name) is not None

    def __str__(self) -> str:
        return f"matchName: {self.match_name}" if self.match_name else f"matchPattern: {self.match_pattern}"

    def to_dict(self) -> dict[str, str]:
        return {"matchName": self.match_name} if self.match_name else {"matchPattern": self.match_pattern}


@dataclass(frozen=True)
class DnsRule:
    """A selector an endpoint may look names up by, and the policy rule (RuleInfo id) that gives it."""

    selector: FqdnSelector
    rule_id: int


@dataclass(frozen=True)
class DnsPolicy:
    """What one endpoint may look up, as its egress policy says.

    - ``any_name``: every name. Not under egress enforcement (``rule_id`` 0), or a rule allows port 53
      without DNS rules (``rule_id`` is that rule): Cilium then wildcards the port's DNS rules.
    - else the names ``rules`` select; a name none selects is refused by ``rule_id``: the first rule
      with DNS rules, the policy's default deny when no rule allows port 53 at all, or a deny rule
      that closes port 53 to every peer. ``audit``: the policies deciding are in audit mode, so a
      refusal is only reported.
    """

    any_name: bool
    rules: tuple[DnsRule, ...] = ()
    rule_id: int = 0
    audit: bool = False


UNRESTRICTED = DnsPolicy(any_name=True)


@dataclass(frozen=True)
class DnsDecision:
    allowed: bool
    rule_id: int  # the rule that allowed or refused it (0: no policy applies)
    reason: str  # one line: which selector matched, or why none did
    audit: bool = False  # refused by policy in audit mode: answered, and reported
    # Refused because egress policy does not allow DNS at all (no DNS rules): the mesh's own names
    # (Services, ServiceEntries) are still answered, as the hosts files gave them before the proxy
    # and as ztunnel's DNS proxy does; only forwarding to the outside is refused.
    mesh_names: bool = False


def decide(policy: DnsPolicy, qname: str) -> DnsDecision:
    """May an endpoint with ``policy`` look up ``qname``? The first selector that matches decides."""
    if policy.any_name:
        if not policy.rule_id:
            return DnsDecision(True, 0, "no egress policy applies to the endpoint")
        return DnsDecision(True, policy.rule_id, "port 53 is allowed without DNS rules: every name")
    for rule in policy.rules:
        if rule.selector.matches(qname):
            return DnsDecision(True, rule.rule_id, f"{rule.selector} matches {fqdn(qname)}")
    if policy.rules:
        return DnsDecision(policy.audit, policy.rule_id, f"no DNS rule of the endpoint matches {fqdn(qname)}",
                           audit=policy.audit)
    return DnsDecision(policy.audit, policy.rule_id, "the endpoint's egress policy does not allow port 53 (DNS): "
                       "only the mesh's own names are answered", audit=policy.audit, mesh_names=True)
