"""FqdnPolicyHook (agent/dns/hook.py): DNS rules decide queries; answers go into the FQDN cache, and an
answer a toFQDNs selector wants waits (bounded) for the reconcile that puts it in the datapath."""

from __future__ import annotations

import threading
import time

from agent.dns.fqdn import FqdnCache
from agent.dns.hook import FqdnPolicyHook, FqdnView
from agent.dns.proxy import DnsClient
from agent.dns.rules import DnsPolicy, DnsRule, FqdnSelector

CLIENT = DnsClient(name="client", namespace="default", ip="10.200.0.10", ep_id=1, identity=300)
OTHER = DnsClient(name="other", namespace="default", ip="10.200.0.11", ep_id=2, identity=301)
API = DnsRule(FqdnSelector(match_name="api.example.test."), 11)
DNS = {1: DnsPolicy(any_name=False, rules=(DnsRule(FqdnSelector(match_pattern="*.example.test."), 10),), rule_id=10)}


def allowed(snap) -> dict[int, frozenset[str]]:
    """What the compiler would allow: the client's (ep 1) addresses of api.example.test."""
    return {1: frozenset(snap.names.get("client", {}).get("api.example.test.", ()))}


class FakeAgent:
    """The agent's reconcile_fqdn: compiles the cache's snapshot into a new view (after ``delay``)."""

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.calls = 0
        self.hook: FqdnPolicyHook | None = None
        self.lock = threading.Lock()

    def reconcile(self, generation: int, timeout: float) -> None:
        if not self.lock.acquire(timeout=timeout):
            return
        try:
            if self.hook.view.generation >= generation:
                return
            self.calls += 1
            snap = self.hook.cache.snapshot()
            time.sleep(self.delay)
            self.hook.update(FqdnView(DNS, {1: (API,)}, allowed(snap), snap.generation))
        finally:
            self.lock.release()


def make(delay: float = 0.0, wait_s: float = 0.9) -> tuple[FqdnPolicyHook, FakeAgent]:
    agent = FakeAgent(delay)
    hook = FqdnPolicyHook(FqdnCache(min_ttl=60), reconcile=agent.reconcile, wait_s=wait_s)
    agent.hook = hook
    hook.update(FqdnView(DNS, {1: (API,)}, {}, 0))
    return hook, agent


def test_check_applies_the_endpoints_dns_rules():
    hook, _ = make()
    ok = hook.check(CLIENT, "api.example.test.", "A")
    assert ok.allowed and ok.rule_id == 10
    refused = hook.check(CLIENT, "evil.example.com.", "A")
    assert not refused.allowed and refused.rule_id == 10 and "no DNS rule" in refused.description
    assert hook.check(OTHER, "evil.example.com.", "A").allowed  # no DNS policy compiled for it: any name


def test_an_audit_refusal_is_answered_and_says_so():
    hook, _ = make()
    hook.update(FqdnView({1: DnsPolicy(any_name=False, rule_id=4, audit=True)}, {}, {}, 0))
    v = hook.check(CLIENT, "x.test.", "A")
    assert v.allowed and v.description.startswith("audit mode, would be refused")


def test_a_selected_answer_waits_for_the_datapath():
    hook, agent = make()
    assert not hook.observed_fast(CLIENT, "api.example.test.", ("192.0.2.10",), 5)  # must wait
    hook.observed(CLIENT, "api.example.test.", ("192.0.2.10",), 5)
    assert agent.calls == 1 and hook.view.generation == hook.cache.generation
    # the same answer again: already in the datapath, nothing to wait for, even after other answers
    hook.observed(CLIENT, "evil.example.test.", ("192.0.2.66",), 5)
    assert hook.observed_fast(CLIENT, "api.example.test.", ("192.0.2.10",), 5)
    assert hook.observed_fast(CLIENT, "api.example.test.", ("192.0.2.10", "2001:db8::1"), 5)  # IPv6 allows nothing
    assert not hook.observed_fast(CLIENT, "api.example.test.", ("192.0.2.10", "192.0.2.12"), 5)  # one is new


def test_an_unselected_answer_is_recorded_without_waiting():
    hook, agent = make()
    assert hook.observed_fast(CLIENT, "evil.example.test.", ("192.0.2.66",), 5)
    assert hook.observed_fast(OTHER, "api.example.test.", ("192.0.2.10",), 5)  # no toFQDNs for it
    hook.observed(CLIENT, "evil.example.test.", ("192.0.2.66",), 5)
    assert agent.calls == 0
    # the client has DNS rules, so its lookups are followed; `other` has no DNS-aware policy: not recorded
    assert hook.cache.snapshot().names == {"client": {"evil.example.test.": ("192.0.2.66",)}}
    assert hook.tracked(CLIENT.ep_id) and not hook.tracked(OTHER.ep_id)


def test_the_wait_is_bounded():
    hook, agent = make(delay=0.5, wait_s=0.2)
    hook.update(FqdnView(DNS, {1: (API,)}, {}, 0))
    agent.lock.acquire()  # someone else holds the agent's lock (a long reconcile)
    try:
        started = time.monotonic()
        hook.observed(CLIENT, "api.example.test.", ("192.0.2.10",), 5)
        took = time.monotonic() - started
    finally:
        agent.lock.release()
    assert agent.calls == 0 and took < 2.0  # gave up; generous bound: never asserts speed


def test_concurrent_answers_share_one_reconcile():
    hook, agent = make(delay=0.1)
    threads = [threading.Thread(target=hook.observed, args=(CLIENT, "api.example.test.", (f"192.0.2.{i}",), 5))
               for i in range(1, 9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert hook.view.generation == hook.cache.generation
    assert agent.calls < 8


def test_a_failing_reconcile_releases_the_answer(caplog):
    def broken(generation: int, timeout: float) -> None:
        raise RuntimeError("store away")

    hook = FqdnPolicyHook(FqdnCache(min_ttl=60), reconcile=broken)
    hook.update(FqdnView(DNS, {1: (API,)}, {}, 0))
    hook.observed(CLIENT, "api.example.test.", ("192.0.2.10",), 5)
    assert "reconcile for api.example.test. of client failed" in caplog.text
