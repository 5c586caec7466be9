"""Prometheus metrics (SPEC §7), read at scrape time from the kernel maps and the agent's counters."""

from __future__ import annotations

import urllib.request

from prometheus_client import start_http_server
from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from agent.datapath.reasons import reason_name
from agent.policy.types import DIRECTION_NAMES


class AgentCollector:
    def __init__(self, agent):
        self.agent = agent

    def collect(self):
        a = self.agent
        flows_by_verdict, verdicts = a.counters.snapshot()
        fp = CounterMetricFamily("meshagent_flows_processed", "Flow events processed by the agent",
                                 labels=["verdict", "type"])
        for (verdict, typ), n in sorted(flows_by_verdict.items()):
            fp.add_metric([verdict, typ], n)
        yield fp

        pv = CounterMetricFamily("meshagent_policy_verdicts", "Policy decisions on new flows",
                                 labels=["direction", "match"])
        for (direction, match), n in sorted(verdicts.items()):
            pv.add_metric([direction, match], n)
        yield pv

        drops = CounterMetricFamily("meshagent_drop_count", "Packets dropped by the datapath",
                                    labels=["reason", "direction"])
        drop_bytes = CounterMetricFamily("meshagent_drop_bytes", "Bytes dropped by the datapath",
                                         labels=["reason", "direction"])
        fwd = CounterMetricFamily("meshagent_forward_count", "Packets forwarded by the datapath",
                                  labels=["direction"])
        for (reason, direction), (packets, nbytes) in sorted(a.datapath.metrics().items()):
            d = DIRECTION_NAMES.get(direction, str(direction)).upper()
            if reason == 0:
                fwd.add_metric([d], packets)
            else:
                drops.add_metric([reason_name(reason), d], packets)
                drop_bytes.add_metric([reason_name(reason), d], nbytes)
        yield drops
        yield drop_bytes
        yield fwd

        eps = GaugeMetricFamily("meshagent_endpoints", "Endpoints managed by this node's agent")
        eps.add_metric([], len(a.endpoints.ifindex))
        yield eps
        ops = CounterMetricFamily("meshagent_bpf_map_ops", "BPF map writes made by the agent")
        ops.add_metric([], a.sync.ops_total if a.sync else 0)
        yield ops
        lost = CounterMetricFamily("meshagent_lost_events", "Flow events lost because the ring buffer was full")
        lost.add_metric([], a.datapath.lost_events())
        yield lost
        yield from self._fastpath_metrics()
        yield from self._dns_metrics()
        yield from self._l7_metrics()

    def _fastpath_metrics(self):
        msgs = CounterMetricFamily("meshagent_fastpath_messages", "sendmsg() chunks seen by the socket fast path",
                                   labels=["outcome"])
        nbytes = CounterMetricFamily("meshagent_fastpath_bytes", "Bytes seen by the socket fast path",
                                     labels=["outcome"])
        for outcome, c in self.agent.sockets.fastpath_summary()["counters"].items():
            msgs.add_metric([outcome], c["messages"])
            nbytes.add_metric([outcome], c["bytes"])
        yield msgs
        yield nbytes

    def _dns_metrics(self):
        """The DNS proxy's counts (agent/dns/proxy.py DnsCounters), named as Cilium's DNS proxy and
        ztunnel's name theirs."""
        dns = getattr(self.agent, "dns", None)  # None: dns_proxy off
        if dns is None:
            return
        c = dns.counters.snapshot()
        requests = CounterMetricFamily("meshagent_dns_requests", "DNS questions from endpoints, by query type",
                                       labels=["qtype"])
        for qtype, n in sorted(c["requests"].items()):
            requests.add_metric([qtype], n)
        responses = CounterMetricFamily("meshagent_dns_responses", "DNS answers given, by rcode", labels=["rcode"])
        for rcode, n in sorted(c["responses"].items()):
            responses.add_metric([rcode], n)
        errors = CounterMetricFamily("meshagent_dns_upstream_errors",
                                     "Failed questions to upstream resolvers, by reason", labels=["reason"])
        for reason, n in sorted(dict(dns.upstreams.errors).items()):
            errors.add_metric([reason], n)
        dropped = CounterMetricFamily("meshagent_dns_dropped", "DNS messages not answered, by reason",
                                      labels=["reason"])
        for reason, n in sorted(c["dropped"].items()):
            dropped.add_metric([reason], n)
        hits = CounterMetricFamily("meshagent_dns_cache_hits", "Forwarded names answered from the cache")
        hits.add_metric([], c["cache_hits"])
        misses = CounterMetricFamily("meshagent_dns_cache_misses", "Forwarded names asked upstream")
        misses.add_metric([], c["cache_misses"])
        unknown = CounterMetricFamily("meshagent_dns_unknown_clients",
                                      "DNS questions refused: their source is no endpoint of this node")
        unknown.add_metric([], c["unknown_clients"])
        refused = CounterMetricFamily("meshagent_dns_policy_refused",
                                      "DNS questions refused by the asking endpoint's DNS rules")
        refused.add_metric([], c["policy_refused"])
        entries = GaugeMetricFamily("meshagent_dns_cache_entries", "Forwarded answers held in the DNS cache")
        entries.add_metric([], len(dns.cache))
        yield from (requests, responses, errors, dropped, hits, misses, unknown, refused, entries)

    def _l7_metrics(self):
        """The L7 processor's istio_* and meshagent_l7_* metrics, re-exported so one scrape of the node
        sees all: its workers' samples summed (counters and histograms both add up)."""
        l7 = self.agent.l7
        if l7 is None or l7.pid() is None:
            return
        texts = []
        for addr in l7.metrics_addrs():
            try:
                with urllib.request.urlopen(f"http://{addr}/metrics", timeout=1) as resp:
                    texts.append(resp.read().decode())
            except OSError:
                continue  # a worker restarting: this scrape goes without its part
        yield from merge_families(texts, prefixes=("istio_", "meshagent_l7_"))


def merge_families(texts: list[str], prefixes: tuple[str, ...]) -> list[Metric]:
    """The metric families whose names start with one of ``prefixes`` of several Prometheus texts,
    with the values of equal samples (same name and labels) added: several processes' counters and
    histograms as one. (Gauges add up too: each worker's connections and limits are its own.)"""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple, float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            if not family.name.startswith(prefixes):
                continue
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type)
                values[family.name] = {}
            sums = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                sums[key] = sums.get(key, 0.0) + sample.value
    for name, family in families.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
    return list(families.values())


def start_metrics(agent) -> None:
    host, port = agent.cfg.metrics_host_port
    REGISTRY.register(AgentCollector(agent))
    start_http_server(port, addr=host)
