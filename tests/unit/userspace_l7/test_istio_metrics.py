"""istio_* metrics (userspace_l7/istio_metrics.py) under Istio's names and labels."""

from userspace_l7.istio_metrics import REQUEST_LABELS, L7Metrics


def test_metrics_export_istio_names():
    m = L7Metrics()
    dest = ("reviews-v2", "default", "reviews", "v2", "reviews.default.svc.cluster.local", "reviews", "default")
    labels = ("waypoint", "productpage", "default", "productpage", *dest, "http", "200", "UF", "none")
    assert len(labels) == len(REQUEST_LABELS)
    m.request(labels, 0.7)
    m.request(labels, 12.0)
    m.connection_opened(("waypoint", "unknown", *dest, "none"))
    fams = {f.name: f for f in m.collect()}
    assert fams["istio_requests"].samples[0].value == 2
    assert fams["istio_requests"].samples[0].labels == dict(zip(REQUEST_LABELS, labels, strict=True))
    assert fams["istio_tcp_connections_opened"].samples[0].labels["destination_version"] == "v2"
    buckets = {s.labels["le"]: s.value for s in fams["istio_request_duration_milliseconds"].samples
               if s.name.endswith("_bucket")}
    assert buckets["0.5"] == 0 and buckets["1"] == 1 and buckets["25"] == 2 and buckets["+Inf"] == 2
    assert fams["istio_tcp_connections_opened"].samples[0].value == 1
