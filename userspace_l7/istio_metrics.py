"""istio_* metrics (SPEC §7), counted in plain dicts on the hot path and exported at scrape time.

prometheus_client's Counter/Histogram take a lock per observation; a proxy aiming at haproxy's
requests per CPU-second cannot pay that per request. `L7Metrics` keeps counts keyed by the label
tuple and a `prometheus_client` collector turns them into metric families when /metrics is scraped.

Names and labels follow Istio's standard metrics so existing dashboards work:
``istio_requests_total``, ``istio_request_duration_milliseconds`` (histogram, Istio's buckets) with
Istio's standard labels (`REQUEST_LABELS`: reporter, source and destination workload, namespace and
app, destination version and service, request protocol, response_code, response_flags (Envoy's, "-"
when none: userspace_l7/flags.py), connection_security_policy);
``istio_tcp_connections_opened_total`` (upstream connections opened) with `TCP_LABELS`.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator

from prometheus_client.core import CollectorRegistry, CounterMetricFamily, HistogramMetricFamily

__all__ = ["BUCKETS_MS", "L7Metrics", "observe"]

# Istio's default buckets for istio_request_duration_milliseconds.
BUCKETS_MS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000, 600000,
              1800000, 3600000)
# What `_Records` in server.py builds once per connection, route and backend, in this order; a request's
# row adds response_code, response_flags and connection_security_policy. reporter is "waypoint", as Istio ambient's
# L7 proxy reports: one shared per-node proxy, not a sidecar at either end.
DESTINATION_LABELS = ["destination_workload", "destination_workload_namespace", "destination_app",
                      "destination_version", "destination_service", "destination_service_name",
                      "destination_service_namespace"]
REQUEST_LABELS = ["reporter", "source_workload", "source_workload_namespace", "source_app", *DESTINATION_LABELS,
                  "request_protocol", "response_code", "response_flags", "connection_security_policy"]
TCP_LABELS = ["reporter", "source_workload", *DESTINATION_LABELS, "connection_security_policy"]
REPORTER = "waypoint"


def observe(row: list, duration_ms: float) -> None:
    """Count one request in a row of `L7Metrics.row`."""
    row[0] += 1
    row[1] += duration_ms
    row[2][bisect_left(BUCKETS_MS, duration_ms)] += 1


class L7Metrics:
    def __init__(self) -> None:
        # label tuple -> [count, sum_ms, per-bucket counts (not cumulative) ..., +Inf count]
        self._requests: dict[tuple[str, ...], list] = {}
        self._tcp: dict[tuple[str, ...], int] = {}
        # the processor's own meshagent_l7_* families (connection limits, accept errors), built at scrape time
        self.processor: Callable[[], Iterable] | None = None

    def request(self, labels: tuple[str, ...], duration_ms: float) -> None:
        observe(self.row(labels), duration_ms)

    def row(self, labels: tuple[str, ...]) -> list:
        """The counters of one label tuple, for `observe`: a caller that keeps it skips the label lookup."""
        row = self._requests.get(labels)
        if row is None:
            row = self._requests[labels] = [0, 0.0, [0] * (len(BUCKETS_MS) + 1)]
        return row

    def connection_opened(self, labels: tuple[str, ...]) -> None:
        self._tcp[labels] = self._tcp.get(labels, 0) + 1

    # -- export --

    def collect(self) -> Iterator:
        total = CounterMetricFamily("istio_requests", "Requests served by the L7 processor", labels=REQUEST_LABELS)
        hist = HistogramMetricFamily("istio_request_duration_milliseconds", "Request duration",
                                     labels=REQUEST_LABELS)
        for labels, (count, sum_ms, buckets) in list(self._requests.items()):
            total.add_metric(list(labels), count)
            cumulative, acc = [], 0
            for bound, n in zip((*map(str, BUCKETS_MS), "+Inf"), buckets, strict=True):
                acc += n
                cumulative.append((bound, acc))
            hist.add_metric(list(labels), cumulative, sum_ms)
        tcp = CounterMetricFamily("istio_tcp_connections_opened", "Upstream TCP connections opened",
                                  labels=TCP_LABELS)
        for labels, n in list(self._tcp.items()):
            tcp.add_metric(list(labels), n)
        yield total
        yield hist
        yield tcp
        if self.processor is not None:
            yield from self.processor()

    def registry(self) -> CollectorRegistry:
        reg = CollectorRegistry()
        reg.register(self)
        return reg
