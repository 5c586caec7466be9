"""`FqdnPolicyHook`: DNS policy for the DNS proxy (its `DnsPolicyHook`, agent/dns/proxy.py).

- ``check``: may the endpoint look the name up? Its `DnsPolicy` (compiled from toPorts.rules.dns and
  its port 53 rules, agent/policy/compiler.py) decides, from a frozen view the agent swaps on every
  reconcile (`update`). A refusal carries the deciding rule, which the proxy's DROPPED DNS flow names.
- ``observed`` / ``observed_fast``: an answer is about to be given. Its addresses go into the FQDN
  cache (agent/dns/fqdn.py) for that endpoint; when a toFQDNs selector of the endpoint matches the
  name and the last reconcile did not allow all of its addresses yet, the answer waits, at most
  ``wait_s``, for a reconcile to put them in the maps, as Cilium's proxy holds an answer until the
  policy map allows its addresses. So a client that connects right after its lookup is not dropped;
  an answer repeating allowed addresses (its TTL pushed on in the cache) leaves at once.

The hook never writes the datapath itself: it asks the agent's one reconcile path (``reconcile``,
given the cache generation that must be in the maps and the time left).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from agent.dns.fqdn import FqdnCache
from agent.dns.proxy import DnsClient, DnsVerdict
from agent.dns.rules import UNRESTRICTED, DnsPolicy, DnsRule, decide

log = logging.getLogger("meshagent.fqdn")

__all__ = ["OBSERVE_WAIT_S", "FqdnPolicyHook", "FqdnView"]

# How long an answer naming addresses a toFQDNs selector wants may wait for the datapath (Cilium's
# proxy waits for the policy map update too; the proxy bounds the whole observe step at 1 s).
OBSERVE_WAIT_S = 0.9


@dataclass(frozen=True)
class FqdnView:
    """What the last reconcile compiled, as the hook reads it: per local endpoint (ep_id) its DNS
    policy, its toFQDNs selectors and the addresses they allow, and the FQDN cache generation that is
    now in the kernel."""

    dns: Mapping[int, DnsPolicy] = field(default_factory=dict)
    selectors: Mapping[int, tuple[DnsRule, ...]] = field(default_factory=dict)
    allowed: Mapping[int, frozenset[str]] = field(default_factory=dict)
    generation: int = -1  # nothing applied yet


class FqdnPolicyHook:
    def __init__(self, cache: FqdnCache, reconcile: Callable[[int, float], None], wait_s: float = OBSERVE_WAIT_S,
                 clock: Callable[[], float] = time.monotonic):
        self.cache = cache
        self._reconcile = reconcile
        self.wait_s = wait_s
        self._clock = clock
        self.view = FqdnView()

    def update(self, view: FqdnView) -> None:
        """The agent's reconcile swaps in what it compiled and wrote (one reference: readers on the
        proxy's threads see the old view or the new one whole)."""
        self.view = view

    # ---- DnsPolicyHook ---------------------------------------------------------------------------

    def check(self, endpoint: DnsClient, qname: str, qtype: str) -> DnsVerdict:
        d = decide(self.view.dns.get(endpoint.ep_id, UNRESTRICTED), qname)
        reason = f"audit mode, would be refused: {d.reason}" if d.audit else d.reason
        return DnsVerdict(d.allowed, d.rule_id, reason, mesh_names=d.mesh_names)

    def tracked(self, ep_id: int) -> bool:
        """Whether the FQDN cache follows this endpoint's lookups: it has DNS-aware policy (DNS rules or
        toFQDNs selectors), as Cilium's proxy sees only such endpoints' DNS. Others' answers are not
        recorded, so a busy resolver client without such policy costs the cache (and its saves) nothing."""
        view = self.view
        policy = view.dns.get(ep_id)
        return bool(view.selectors.get(ep_id)) or (policy is not None and bool(policy.rules))

    def observed_fast(self, endpoint: DnsClient, qname: str, ips: tuple[str, ...], ttl: int) -> bool:
        """Record the answer; True when nothing is left to wait for (never blocks)."""
        if not self.tracked(endpoint.ep_id):
            return True
        self.cache.record(endpoint.name, qname, ips, ttl)
        return not self._waits(endpoint, qname, ips)

    def observed(self, endpoint: DnsClient, qname: str, ips: tuple[str, ...], ttl: int) -> None:
        """Record the answer and, if a toFQDNs selector wants it, have the datapath take it (bounded)."""
        if not self.tracked(endpoint.ep_id):
            return
        self.cache.record(endpoint.name, qname, ips, ttl)
        if not self._waits(endpoint, qname, ips):
            return
        target = self.cache.generation
        deadline = self._clock() + self.wait_s
        left = self.wait_s
        while self.view.generation < target and self._waits(endpoint, qname, ips) and left > 0:
            try:
                self._reconcile(target, left)
            except Exception:  # the answer goes out anyway; the periodic loop retries
                log.exception("FQDN cache: reconcile for %s of %s failed", qname, endpoint.name)
                return
            left = deadline - self._clock()
        if self._waits(endpoint, qname, ips):
            log.warning("FQDN cache: the answer for %s to %s left before the datapath allowed its addresses",
                        qname, endpoint.name)

    # ----------------------------------------------------------------------------------------------

    def _waits(self, endpoint: DnsClient, qname: str, ips: tuple[str, ...]) -> bool:
        """Whether an answer must wait: a toFQDNs selector of the endpoint matches the name, and the
        last reconcile did not allow every address of the answer to it."""
        view = self.view
        if not any(rule.selector.matches(qname) for rule in view.selectors.get(endpoint.ep_id, ())):
            return False
        allowed = view.allowed.get(endpoint.ep_id, frozenset())
        return not all(ip in allowed for ip in ips if ":" not in ip)  # IPv6 answers allow nothing here

    def selectors_for(self, ep_id: int, qname: str) -> tuple[DnsRule, ...]:
        """The toFQDNs selectors (with their rules) of endpoint ``ep_id`` that match ``qname``."""
        return tuple(rule for rule in self.view.selectors.get(ep_id, ()) if rule.selector.matches(qname))
