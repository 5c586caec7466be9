"""Per client endpoint shares of a worker's descriptors (userspace_l7/admission.py), sans-IO."""

import subprocess
import sys

from tests.paths import REPO
from userspace_l7.admission import ENDPOINT, UNKNOWN, WORKER, Admission, Limits


def test_budget_formula():
    # (20000 - 64) // 2 downstream, an eighth of that per endpoint
    assert Limits.from_nofile(20000) == Limits(per_endpoint=1246, per_worker=9968)
    assert Limits.from_nofile(524288) == Limits(per_endpoint=32764, per_worker=262112)
    # a small table still lets an endpoint hold a few connections, never more than the worker's total
    assert Limits.from_nofile(100) == Limits(per_endpoint=16, per_worker=18)
    assert Limits.from_nofile(70) == Limits(per_endpoint=3, per_worker=3)
    # the node setting replaces the share, not the worker's total
    assert Limits.from_nofile(20000, per_endpoint=50) == Limits(per_endpoint=50, per_worker=9968)
    assert Limits.from_nofile(1000, per_endpoint=5000).per_endpoint == 468


def test_an_endpoint_over_its_share_is_refused_and_others_are_not():
    a = Admission(Limits(per_endpoint=2, per_worker=5))
    assert a.admit(7) is None and a.admit(7) is None
    assert a.admit(7) == ENDPOINT  # its third
    assert a.admit(8) is None and a.admit(UNKNOWN) is None and a.admit(UNKNOWN) is None
    assert a.admit(UNKNOWN) == ENDPOINT  # the unknown clients share one bucket
    assert a.admit(9) == WORKER  # five held: the worker's total
    assert a.refused == {(7, ENDPOINT): 1, (UNKNOWN, ENDPOINT): 1, (9, WORKER): 1}
    a.release(7)
    assert a.admit(9) is None  # a slot came free
    assert a.admit(7) == WORKER
    for client in (7, 8, 9, UNKNOWN, UNKNOWN):
        a.release(client)
    assert a.total == 0 and a.held == {}


def test_raise_nofile_lifts_the_soft_limit_to_the_hard_one():
    script = ("import resource; from userspace_l7.admission import raise_nofile; "
              "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE); "
              "resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard)); "
              "print(raise_nofile() == hard == resource.getrlimit(resource.RLIMIT_NOFILE)[0] or hard == -1)")
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "True", out.stderr
