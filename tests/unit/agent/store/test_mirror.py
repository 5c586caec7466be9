"""The etcd store's mirror (sans-IO): revision ordering of watch events and our own writes, full
resyncs, generation, the cache format."""

from __future__ import annotations

import pytest

from agent.store.mirror import CORRUPT, Change, Mirror


def put(key, rev, value=None, lease=0):
    return Change(key, rev, {"v": rev} if value is None else value, lease)


def delete(key, rev):
    return Change(key, rev, None)


def test_watch_events_in_order():
    m = Mirror()
    m.apply([put("a/x", 2), put("a/y", 3)], watched=True)
    m.apply([delete("a/x", 4)], watched=True)
    assert m.list("a") == {"a/y": {"v": 3}} and m.revision == 4


def test_an_older_event_never_overwrites_a_newer_own_write():
    m = Mirror()
    m.apply([put("k", 10, {"mine": 1})])  # our write, at once
    m.apply([put("k", 8, {"theirs": 1})], watched=True)  # someone's older write, on the watch later
    assert m.get("k").value == {"mine": 1}
    m.apply([put("k", 10, {"mine": 1})], watched=True)  # the watch delivers ours: nothing changes
    assert m.get("k").value == {"mine": 1} and m.revision == 10


def test_our_delete_keeps_older_puts_out_until_the_watch_passes_it():
    m = Mirror()
    m.apply([put("k", 5)], watched=True)
    assert m.forget("k", 7)  # our delete at 7
    m.apply([put("k", 6)], watched=True)  # a write at 6 still on the watch
    assert m.get("k") is None
    m.apply([delete("k", 7)], watched=True)
    m.apply([put("k", 9)], watched=True)  # a later write comes in
    assert m.get("k").value == {"v": 9}


def test_forget_keeps_a_newer_write():
    m = Mirror()
    m.apply([put("k", 12)])
    assert not m.forget("k", 11) and m.get("k").revision == 12


def test_generation_counts_changes_outside_heartbeats():
    m = Mirror()
    g = m.generation
    assert not m.apply([put("heartbeats/n1", 2), put("heartbeats/n1", 3)], watched=True)
    assert m.generation == g and m.get("heartbeats/n1").value == {"v": 3}
    assert m.apply([put("nodes/n1", 4)], watched=True) and m.generation == g + 1
    assert not m.apply([put("nodes/n1", 5, {"v": 4})], watched=True)  # same value, newer revision
    assert m.generation == g + 1
    assert m.apply([delete("nodes/n1", 6)], watched=True) and m.generation == g + 2
    assert not m.apply([delete("nodes/n1", 7)], watched=True)  # absent already


def test_replace_takes_a_full_read_but_keeps_newer_own_writes():
    m = Mirror()
    m.apply([put("a", 2), put("b", 3), put("c", 4)], watched=True)
    m.apply([put("mine", 30)])  # our write after the read's revision
    m.forget("b", 31)  # our delete after it
    moved = m.replace([put("a", 2), put("b", 3), put("d", 20)], revision=25, cluster_id="c1")
    assert moved
    assert set(m.list("")) == {"a", "d", "mine"}  # c is gone, b stays deleted, mine stays
    assert m.revision == 25 and m.cluster_id == "c1"


def test_corrupt_values_are_listed_nowhere_but_known():
    m = Mirror()
    m.apply([put("a/ok", 2), Change("a/bad", 3, CORRUPT)], watched=True)
    assert m.list("a") == {"a/ok": {"v": 2}}
    assert m.get("a/bad").corrupt
    m.apply([put("a/bad", 4)], watched=True)  # rewritten
    assert m.list("a") == {"a/ok": {"v": 2}, "a/bad": {"v": 4}}


def test_progress_notices_advance_the_revision_and_end_tombstones():
    m = Mirror()
    m.forget("k", 5)
    m.caught_up(9)  # the watch has sent everything up to 9, our delete at 5 included
    assert m.revision == 9 and m._tombstones == {}
    m.caught_up(3)
    assert m.revision == 9  # never backwards


def test_leased_keys():
    m = Mirror()
    m.apply([put("nodes/n1", 2, lease=77), put("heartbeats/n1", 3, lease=77), put("x", 4)], watched=True)
    assert set(m.leased(77)) == {"nodes/n1", "heartbeats/n1"}


def test_the_cache_round_trip():
    m = Mirror()
    m.apply([put("a", 2, lease=5), Change("bad", 3, CORRUPT)], watched=True)
    m.replace([put("a", 2, lease=5), put("b", 6)], revision=7, cluster_id="c9")
    other = Mirror()
    other.load_json(m.to_json())
    assert other.list("") == m.list("") and other.revision == 7 and other.cluster_id == "c9"
    assert other.get("a").lease == 5 and other.generation > 0


@pytest.mark.parametrize("data", [{}, {"keys": {"a": {"revision": 1, "value": [1]}}, "revision": 1, "cluster_id": ""},
                                  {"keys": [], "revision": 1, "cluster_id": ""}])
def test_a_bad_cache_is_refused(data):
    with pytest.raises((KeyError, TypeError, ValueError, AttributeError)):
        Mirror().load_json(data)
