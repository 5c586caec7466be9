from userspace_l7.outlier import OutlierDetector
from userspace_l7.snapshot import OutlierPolicy

A, B, C = ("10.0.0.1", 80), ("10.0.0.2", 80), ("10.0.0.3", 80)


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def ident(h):
    return h


def detector(**kw):
    clock = Clock()
    policy = OutlierPolicy(**{"consecutive_5xx": 3, "interval": 1.0, "base_ejection_time": 5.0,
                              "max_ejection_percent": 100, **kw})
    return OutlierDetector(policy, [A, B, C], clock), clock


def test_ejects_after_consecutive_5xx_and_returns_after_base_ejection_time():
    d, clock = detector()
    d.record(A, 500)
    d.record(A, 500)
    assert not d.is_ejected(A)
    d.record(A, 503)
    assert d.is_ejected(A)
    assert d.available([A, B, C], ident) == [B, C]
    clock.now += 4.5
    assert d.is_ejected(A)
    clock.now += 1.0
    assert not d.is_ejected(A)
    assert d.available([A, B, C], ident) == [A, B, C]


def test_success_resets_the_count():
    d, _ = detector()
    for status in (500, 500, 200, 500, 500):
        d.record(A, status)
    assert not d.is_ejected(A)


def test_second_ejection_lasts_twice_as_long():
    d, clock = detector()
    for _ in range(3):
        d.record(A, 500)
    clock.now += 5.0
    assert not d.is_ejected(A)
    for _ in range(3):
        d.record(A, 500)
    clock.now += 6.0
    assert d.is_ejected(A)
    clock.now += 5.0
    assert not d.is_ejected(A)


def test_gateway_errors_and_local_failures():
    d, _ = detector(consecutive_5xx=0, consecutive_gateway=2)
    d.record(A, 500)
    d.record(A, 500)
    assert not d.is_ejected(A)
    d.record_failure(B)
    d.record(B, 502)
    assert d.is_ejected(B)


def test_max_ejection_percent_always_allows_one():
    d, _ = detector(max_ejection_percent=10)
    for h in (A, B):
        for _ in range(3):
            d.record(h, 500)
    assert d.is_ejected(A) and not d.is_ejected(B)


def test_min_health_percent_uses_all_hosts():
    d, _ = detector(min_health_percent=80)
    for _ in range(3):
        d.record(A, 500)
    assert d.is_ejected(A)
    assert d.available([A, B, C], ident) == [A, B, C]


def test_reload_keeps_state_of_hosts_that_stay():
    d, _ = detector()
    for _ in range(3):
        d.record(A, 500)
    d.set_hosts([A, B])
    assert d.is_ejected(A)
    d.set_hosts([B])
    assert d.available([B], ident) == [B]
