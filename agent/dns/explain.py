"""What the CLI shows of DNS policy: `meshagent fqdn cache list` rows and `policy trace --to-fqdn`.
Pure: the agent hands in the FQDN cache's entries, the hook's compiled view, the rules and the time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from agent.dns.fqdn import FqdnIp
from agent.dns.hook import FqdnView
from agent.dns.rules import UNRESTRICTED, DnsRule, decide
from agent.flows import format_time
from agent.policy.types import RuleInfo

__all__ = ["fqdn_cache_rows", "fqdn_trace"]


def _rule(rule_id: int, rules: Mapping[int, RuleInfo]) -> str:
    info = rules.get(rule_id)
    return info.describe() if info else ("no policy" if not rule_id else "?")


def _allowed_by(selectors: Sequence[DnsRule], name: str, rules: Mapping[int, RuleInfo]) -> list[dict[str, Any]]:
    return [{"selector": str(r.selector), "rule_id": r.rule_id, "rule": _rule(r.rule_id, rules)}
            for r in selectors if r.selector.matches(name)]


def _expiry(expires: float, in_use: bool, now: float) -> dict[str, Any]:
    return {"expires": format_time(round(expires * 1000) * 1_000_000), "expires_in_s": round(expires - now),
            # Cilium's cache names where an entry comes from: a lookup, or a connection still using it
            "source": "connection" if in_use else "lookup"}


def fqdn_cache_rows(entries: Sequence[FqdnIp], ep_ids: Mapping[str, int], view: FqdnView,
                    rules: Mapping[int, RuleInfo], now: float) -> list[dict[str, Any]]:
    """One row per endpoint, name and expiry (the addresses of one answer share one): the addresses,
    when they stop being allowed (a negative ``expires_in_s`` with source ``connection``: past its
    expiry, kept while a connection uses it), and the toFQDNs rules of the endpoint that allow them
    (none: cached, allowing nothing until a toFQDNs policy selects the name)."""
    groups: dict[tuple[str, str, bool, float], list[str]] = {}
    for e in entries:
        groups.setdefault((e.endpoint, e.name, e.in_use, round(e.expires, 3)), []).append(e.ip)
    rows = []
    for (endpoint, name, in_use, expires), ips in groups.items():
        selectors = view.selectors.get(ep_ids.get(endpoint, -1), ())
        rows.append({"endpoint": endpoint, "name": name, "ips": sorted(ips), **_expiry(expires, in_use, now),
                     "allowed_by": _allowed_by(selectors, name, rules)})
    return rows


def fqdn_trace(endpoint: str, ep_id: int, name: str, view: FqdnView, rules: Mapping[int, RuleInfo],
               entries: Sequence[FqdnIp], l4: Mapping[str, Mapping[str, Any]], now: float) -> dict[str, Any]:
    """`policy trace --to-fqdn NAME`: may ``endpoint`` look ``name`` up (its DNS rules), which of its
    toFQDNs selectors match the name, and for each address the FQDN cache holds for it the L4 trace
    (``l4``: address -> agent/policy/trace.py's result).

    The verdict: DENIED if the lookup is refused (the proxy answers REFUSED) or any address is denied;
    AUDIT if audit mode let something through; ALLOWED if the lookup and every address are allowed;
    UNRESOLVED if the lookup is allowed but the cache holds no address of the name for the endpoint
    (toFQDNs allows only addresses the proxy gave it: look the name up first).
    """
    d = decide(view.dns.get(ep_id, UNRESTRICTED), name)
    lookup = {"verdict": ("AUDIT" if d.audit else "ALLOWED") if d.allowed else "REFUSED", "rule_id": d.rule_id,
              "rule": _rule(d.rule_id, rules), "reason": d.reason}
    addresses = [{"ip": e.ip, **_expiry(e.expires, e.in_use, now), "verdict": l4[e.ip]["verdict"],
                  "steps": l4[e.ip]["steps"]} for e in entries if e.ip in l4]
    verdicts = [a["verdict"] for a in addresses]
    if not d.allowed or "DENIED" in verdicts:
        final = "DENIED"
    elif not addresses:
        final = "UNRESOLVED"
    elif d.audit or "AUDIT" in verdicts:
        final = "AUDIT"
    else:
        final = "ALLOWED"
    return {"verdict": final, "endpoint": endpoint, "fqdn": name, "lookup": lookup,
            "selectors": _allowed_by(view.selectors.get(ep_id, ()), name, rules), "addresses": addresses,
            "steps": []}
