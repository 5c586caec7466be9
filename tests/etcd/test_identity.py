"""Identity allocation (agent/identity.py) through both store backends."""

from __future__ import annotations

import threading

import pytest

from agent.identity import MAX_CLUSTER, MIN_CLUSTER, IdentityAllocator, _labels_key

pytestmark = pytest.mark.etcd

WEB = {"k8s:app": "web", "k8s:io.kubernetes.pod.namespace": "default"}
DB = {"k8s:app": "db", "k8s:io.kubernetes.pod.namespace": "default"}


def preferred(labels: dict[str, str]) -> int:
    return MIN_CLUSTER + int(_labels_key(labels), 16) % (MAX_CLUSTER - MIN_CLUSTER + 1)


def test_the_hash_preferred_number_and_lookup(backend):
    ids = IdentityAllocator(backend.open())
    assert ids.lookup(WEB) is None
    n = ids.allocate(WEB)
    assert n == preferred(WEB)
    assert ids.allocate(WEB) == n and ids.lookup(WEB) == n
    assert ids.allocate(DB) == preferred(DB) != n
    assert ids.all() == {n: WEB, preferred(DB): DB}


def test_a_taken_number_probes_upwards(backend):
    store = backend.open()
    taken = preferred(WEB)
    store.put(f"identities/by-id/{taken}", {"id": taken, "labels": {"other": "set"}})
    n = IdentityAllocator(store).allocate(WEB)
    assert n == (taken + 1 if taken < MAX_CLUSTER else MIN_CLUSTER)


def test_release_frees_the_number(backend):
    ids = IdentityAllocator(backend.open())
    n = ids.allocate(WEB)
    ids.release(WEB)
    assert ids.lookup(WEB) is None and n not in ids.all()
    assert ids.allocate(WEB) == n


def test_two_nodes_racing_for_one_label_set_get_one_number(backend):
    """Two agents (two store handles) allocate the same label sets at the same moment."""
    nodes = [IdentityAllocator(backend.open()), IdentityAllocator(backend.open())]
    label_sets = [{"k8s:app": f"app-{i}"} for i in range(10)]
    got: dict[int, list[int]] = {0: [], 1: []}
    barrier = threading.Barrier(2)

    def run(i):
        barrier.wait()
        for labels in label_sets:
            got[i].append(nodes[i].allocate(labels))

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got[0] == got[1]  # the same number for the same label set on both nodes
    assert len(set(got[0])) == len(label_sets)  # and no two label sets share one

