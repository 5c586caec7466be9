"""Fixtures of the NetworkPolicy e2e cases: one node with the nine endpoints for the whole module
(`cluster`), and `case`, which hands it to one test and undoes that test's changes afterwards,
also when it fails, waiting until everyone reaches everyone again."""

from __future__ import annotations

import pytest

from tests.datapath.netpol.harness import Cluster, cluster_on


@pytest.fixture(scope="module")
def cluster(node_factory) -> Cluster:
    # UDP 53 is a port like any other here, as in upstream's suite (harness.py): no DNS proxy, whose
    # redirect would take every port-53 datagram (bpf/lib/dns.h).
    with cluster_on(node_factory(extra={"dns_proxy": False})) as c:
        yield c


@pytest.fixture
def case(cluster: Cluster) -> Cluster:
    yield cluster
    cluster.reset()
