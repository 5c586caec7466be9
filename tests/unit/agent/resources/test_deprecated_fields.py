"""Istio fields deprecated but still read upstream are accepted, read as Istio reads them, and warned
about; those Istio no longer reads are refused in one line (issue 13).

Istio (pilot/pkg/networking/core/route/route.go, TranslateFault and mirrorPercent): a delay's
``percentage`` wins over its integer ``percent``; ``mirrorPercentage`` wins over ``mirrorPercent``,
which the protobuf JSON reader also takes as ``mirror_percent`` (the JSON name wins when both are
given). None of these combinations is an error upstream. An abort's ``percent`` is gone from the API
(virtual_service.proto reserves it), so Istio ignores it.
"""

from __future__ import annotations

import random

import pytest

from agent.resources import ResourceError, fault_percent, mirror_percent, parse_documents
from userspace_l7.http1 import Request
from userspace_l7.routing import route
from userspace_l7.snapshot import L7Config

# Istio's Request Timeouts task (istio.io/latest/docs/tasks/traffic-management/request-timeouts/):
# reviews routed to v2, and a 2 s delay on every call to ratings, written with the deprecated percent.
REQUEST_TIMEOUTS = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts:
    - reviews
  http:
  - route:
    - destination:
        host: reviews
        subset: v2
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: ratings
spec:
  hosts:
  - ratings
  http:
  - fault:
      delay:
        percent: 100
        fixedDelay: 2s
    route:
    - destination:
        host: ratings
        subset: v1
"""

DELAY_WARNING = ("VirtualService default/ratings: spec.http[0].fault.delay.percent: deprecated upstream; read as "
                 "percentage: {value: 100}, as upstream reads it; write that instead")


def mirrored(extra: str) -> str:
    return f"""\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: ratings}}
spec:
  hosts: [ratings]
  http:
  - route: [{{destination: {{host: ratings, subset: v1}}}}]
    mirror: {{host: ratings, subset: v2}}
{extra}"""


def test_the_request_timeouts_task_applies_with_a_deprecation_warning():
    reviews, ratings = parse_documents(REQUEST_TIMEOUTS, "timeouts.yaml")
    assert reviews.warnings == ()
    assert ratings.warnings == (DELAY_WARNING,)
    assert ratings.body["spec"]["http"][0]["fault"]["delay"] == {"percent": 100, "fixedDelay": "2s"}  # as written


@pytest.mark.parametrize("extra,percent,warnings", [
    ("", 100.0, []),
    ("    mirrorPercentage: {value: 12.5}\n", 12.5, []),
    ("    mirrorPercent: 40\n", 40.0, ["spec.http[0].mirrorPercent: deprecated upstream; read as "
                                      "mirrorPercentage: {value: 40}"]),
    ("    mirror_percent: 30\n", 30.0, ["spec.http[0].mirror_percent: deprecated upstream; read as "
                                       "mirrorPercentage: {value: 30}"]),
    ("    mirror_percent: 30\n    mirrorPercent: 40\n", 40.0, [
        "spec.http[0].mirror_percent: deprecated upstream, and ignored: mirrorPercent is given too and wins",
        "spec.http[0].mirrorPercent: deprecated upstream; read as mirrorPercentage: {value: 40}"]),
    ("    mirrorPercent: 40\n    mirrorPercentage: {value: 5}\n", 5.0, [
        "spec.http[0].mirrorPercent: deprecated upstream, and ignored: mirrorPercentage is given too and wins"]),
    ("    mirrorPercent: 0\n", 0.0, ["read as mirrorPercentage: {value: 0}"]),
])
def test_mirror_percentages_are_read_as_istio_reads_them(extra, percent, warnings):
    (r,) = parse_documents(mirrored(extra), "m.yaml")
    assert mirror_percent(r.body["spec"]["http"][0]) == percent
    assert len(r.warnings) == len(warnings)
    for line, expected in zip(r.warnings, warnings, strict=True):
        assert line.startswith("VirtualService default/ratings: ") and expected in line, line


@pytest.mark.parametrize("delay,percent,warned", [
    ({"fixedDelay": "2s"}, 0.0, False),  # Istio: no percentage, no percent: no request delayed
    ({"fixedDelay": "2s", "percent": 100}, 100.0, True),
    ({"fixedDelay": "2s", "percent": 0}, 0.0, True),
    ({"fixedDelay": "2s", "percentage": {"value": 0.5}}, 0.5, False),
    ({"fixedDelay": "2s", "percent": 100, "percentage": {"value": 25}}, 25.0, True),  # percentage wins
])
def test_delay_percent_is_read_as_istio_reads_it(delay, percent, warned):
    text = mirrored("").replace("    mirror: {host: ratings, subset: v2}\n", f"    fault: {{delay: {delay}}}\n")
    (r,) = parse_documents(text, "d.yaml")
    assert fault_percent(r.body["spec"]["http"][0]["fault"]["delay"]) == percent
    assert bool(r.warnings) == warned
    if "percentage" in delay and "percent" in delay:
        assert "ignored: percentage is given too and wins" in r.warnings[0]


@pytest.mark.parametrize("text,needle", [
    (mirrored("    mirrorPercent: 101\n"), "spec.http[0].mirrorPercent: 101 is out of range 0-100"),
    (mirrored("    mirrorPercent: 50.5\n"), "spec.http[0].mirrorPercent: expected an integer, got number 50.5"),
    (mirrored("    mirrorPercent: {value: 5}\n"), "spec.http[0].mirrorPercent: expected an integer, got a mapping"),
    (mirrored("").replace("    mirror: {host: ratings, subset: v2}\n", "    mirrorPercent: 5\n"),
     "spec.http[0].mirrorPercent: mirrorPercent needs mirror"),
    (REQUEST_TIMEOUTS.replace("percent: 100", "percent: 150"), "fault.delay.percent: 150 is out of range 0-100"),
    (REQUEST_TIMEOUTS.replace("delay:", "abort:").replace("fixedDelay: 2s", "httpStatus: 500"),
     "spec.http[0].fault.abort.percent: percent was removed from Istio's abort, which ignores it; write "
     "percentage: {value: N}"),
])
def test_bad_deprecated_fields_are_one_line_errors(text, needle):
    with pytest.raises(ResourceError) as info:
        parse_documents(text, "bad.yaml")
    assert needle in str(info.value) and "\n" not in str(info.value)


# --- the L7 processor reads them the same way ----------------------------------------------------

SERVICES = [{"name": "ratings", "namespace": "default", "vip": "10.96.0.11",
             "ports": [{"port": 9080, "target_port": 9080}],
             "backends": [{"ip": "10.200.0.9", "labels": {"app": "ratings", "version": "v1"}}]}]
SUBSETS = {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": {"name": "ratings"},
           "spec": {"host": "ratings", "subsets": [{"name": "v1", "labels": {"version": "v1"}},
                                                   {"name": "v2", "labels": {"version": "v2"}}]}}


class Always(random.Random):
    """The unluckiest draw: random() just under 1, so only a 100% fault or mirror fires."""

    def random(self) -> float:
        return 0.9999999


def snapshot(text: str) -> L7Config:
    return L7Config.from_dict({"services": SERVICES, "destination_rules": [SUBSETS],
                               "virtual_services": [r.body for r in parse_documents(text, "vs.yaml")
                                                    if r.name == "ratings"]})


def test_the_snapshot_reads_percent_100_as_a_delay_of_every_request():
    config = snapshot(REQUEST_TIMEOUTS)
    (rule,) = config.vs_for[("default", "ratings")].routes
    assert (rule.fault.delay, rule.fault.delay_percent, rule.fault.abort_percent) == (2.0, 100.0, 0.0)
    head = Request("GET", "/ratings/0", [("host", "ratings")], "1.1", True, "ratings")
    decision = route(config, head, ("10.96.0.11", 9080), Always())
    assert decision.delay == 2.0 and decision.status == 0 and decision.subset == "v1"


def test_the_snapshot_reads_mirror_percent():
    config = snapshot(mirrored("    mirrorPercent: 40\n"))
    (rule,) = config.vs_for[("default", "ratings")].routes
    assert rule.mirror_percent == 40.0
    config = snapshot(mirrored("    mirror_percent: 100\n"))
    head = Request("GET", "/", [("host", "ratings")], "1.1", True, "ratings")
    assert route(config, head, ("10.96.0.11", 9080), Always()).mirror.key == ("default", "ratings", 9080, "v2")
