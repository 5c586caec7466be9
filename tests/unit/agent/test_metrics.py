"""The node scrape's re-export of the L7 processor's workers' metrics (agent/metrics.py)."""

from prometheus_client import generate_latest
from prometheus_client.core import CollectorRegistry

from agent.metrics import merge_families

WORKER = """# HELP istio_requests_total Requests
# TYPE istio_requests_total counter
istio_requests_total{response_code="200"} N.0
# HELP istio_request_duration_milliseconds Request duration
# TYPE istio_request_duration_milliseconds histogram
istio_request_duration_milliseconds_bucket{response_code="200",le="1.0"} N.0
istio_request_duration_milliseconds_bucket{response_code="200",le="+Inf"} N.0
istio_request_duration_milliseconds_count{response_code="200"} N.0
istio_request_duration_milliseconds_sum{response_code="200"} 0.5
# HELP python_gc_objects_collected_total Objects collected
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 7.0
"""


def test_workers_metrics_add_up_and_others_are_left_out():
    class Collector:
        def collect(self):
            return merge_families([WORKER.replace("N", "2"), WORKER.replace("N", "3")], prefixes=("istio_",))

    registry = CollectorRegistry()
    registry.register(Collector())
    text = generate_latest(registry).decode()
    assert 'istio_requests_total{response_code="200"} 5.0' in text
    assert 'istio_request_duration_milliseconds_bucket{le="+Inf",response_code="200"} 5.0' in text
    assert 'istio_request_duration_milliseconds_sum{response_code="200"} 1.0' in text
    assert "python_gc" not in text
