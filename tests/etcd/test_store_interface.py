"""The store interface, one suite for both backends: a directory and a real etcd behave the same."""

from __future__ import annotations

import threading

import pytest

from agent.store import MAX_TXN_OPS, StoreError
from tests.etcd.etcd_server import eventually

pytestmark = pytest.mark.etcd


def test_put_get_list_delete(backend):
    store = backend.open()
    assert store.get("resources/Service/default/web") is None
    store.put("resources/Service/default/web", {"spec": {"ports": [80]}})
    store.put("resources/Service/prod/api", {"spec": {}})
    store.put("endpoints/n1/web-1", {"ip": "10.0.0.2"})
    assert store.get("resources/Service/default/web") == {"spec": {"ports": [80]}}
    assert store.list("resources/Service") == {"resources/Service/default/web": {"spec": {"ports": [80]}},
                                               "resources/Service/prod/api": {"spec": {}}}
    assert store.list("resources/Service/") == store.list("resources/Service")
    assert set(store.list("")) == {"resources/Service/default/web", "resources/Service/prod/api", "endpoints/n1/web-1"}
    store.put("resources/Service/default/web", {"spec": {"ports": [8080]}})
    assert store.get("resources/Service/default/web") == {"spec": {"ports": [8080]}}
    assert store.delete("resources/Service/default/web") is True
    assert store.delete("resources/Service/default/web") is False
    assert store.get("resources/Service/default/web") is None
    assert list(store.list("resources")) == ["resources/Service/prod/api"]


def test_a_prefix_is_a_directory(backend):
    store = backend.open()
    store.put("nodes/n1", {"a": 1})
    store.put("nodes/n10", {"a": 10})
    store.put("nodes-old/n1", {"a": 0})
    assert set(store.list("nodes")) == {"nodes/n1", "nodes/n10"}
    assert store.list("nodes/n1") == {}  # a key is not a directory of itself
    assert store.list("nothing") == {}


def test_create_only_if_absent(backend):
    store = backend.open()
    assert store.create("identities/by-id/300", {"id": 300}) is True
    assert store.create("identities/by-id/300", {"id": 999}) is False
    assert store.get("identities/by-id/300") == {"id": 300}


def test_create_all_is_all_or_nothing(backend):
    store = backend.open()
    assert store.create_all({"x/a": {"n": 1}, "x/b": {"n": 2}}) is True
    assert store.create_all({"x/b": {"n": 3}, "x/c": {"n": 4}}) is False
    assert store.list("x") == {"x/a": {"n": 1}, "x/b": {"n": 2}}  # x/c was not written


def test_put_all_writes_every_item(backend):
    store = backend.open()
    store.put("r/old", {"v": 0})
    store.put_all({f"r/{i}": {"v": i} for i in range(MAX_TXN_OPS)})
    assert len(store.list("r")) == MAX_TXN_OPS + 1
    store.put_all({})


def test_put_all_over_the_limit_is_refused_and_writes_nothing(backend):
    store = backend.open()
    with pytest.raises(StoreError) as e:
        store.put_all({f"r/{i}": {"v": i} for i in range(MAX_TXN_OPS + 1)})
    assert str(MAX_TXN_OPS) in str(e.value) and "\n" not in str(e.value)
    assert store.list("r") == {}


@pytest.mark.parametrize("key", ["/leading", "trailing/", "a//b", "a/../b", "", "a b", ".hidden", 5])
def test_invalid_keys_are_refused(backend, key):
    store = backend.open()
    with pytest.raises(StoreError, match="invalid store key"):
        store.put(key, {})
    with pytest.raises(StoreError):
        store.get(key)


def test_values_must_be_json_objects(backend):
    store = backend.open()
    with pytest.raises(TypeError):
        store.put("a/b", ["not", "an", "object"])
    with pytest.raises(TypeError):
        store.put_all({"a/b": {}, "a/c": "text"})
    assert store.list("a") == {}


def test_generation_moves_on_changes_but_not_on_heartbeats(backend):
    store = backend.open()
    g0 = store.generation()
    store.put("heartbeats/n1", {"at": 1})
    store.put("heartbeats/n1", {"at": 2})
    assert store.generation() == g0
    assert store.get("heartbeats/n1") == {"at": 2}  # kept, only not counted
    store.put("nodes/n1", {"node_ip": "192.168.77.11"})
    g1 = store.generation()
    assert g1 != g0
    store.delete("nodes/n1")
    assert store.generation() != g1


def test_another_handle_sees_changes_and_only_real_ones_move_generation(backend):
    writer, reader = backend.open(), backend.open()
    g0 = reader.generation()
    writer.put("resources/CiliumNetworkPolicy/default/allow", {"spec": {}})
    eventually(lambda: reader.generation() != g0, "the other handle's generation moves")
    assert reader.get("resources/CiliumNetworkPolicy/default/allow") == {"spec": {}}
    g1 = reader.generation()
    writer.put("heartbeats/n2", {"at": 5})
    eventually(lambda: reader.get("heartbeats/n2") == {"at": 5}, "the heartbeat reaches the other handle")
    assert reader.generation() == g1


def test_a_corrupt_value_is_skipped_by_list_and_named_by_get(backend, caplog):
    store = backend.open()
    store.put("resources/Service/default/good", {"ok": True})
    backend.write_raw("resources/Service/default/bad", b"[1, 2")
    backend.write_raw("resources/Service/default/list", b"[1, 2]")
    eventually(lambda: "bad" in caplog.text and "/list" in caplog.text or backend.kind == "dir",
               "the watch reports the corrupt values")
    assert store.list("resources/Service") == {"resources/Service/default/good": {"ok": True}}
    assert "resources/Service/default/bad" in caplog.text
    with pytest.raises(StoreError) as e:
        store.get("resources/Service/default/bad")
    assert "resources/Service/default/bad" in str(e.value) and "not a JSON object" in str(e.value)
    assert "\n" not in str(e.value)


def test_status(backend):
    store = backend.open()
    status = store.status()
    assert set(status) == {"backend", "url", "connected", "since", "last_sync", "revision", "error", "lease"}
    assert status["backend"] == backend.kind and status["connected"] is True and status["error"] == ""
    assert status["since"] <= status["last_sync"]
    if backend.kind == "etcd":
        assert status["url"] == backend.server.url and status["lease"]["ttl"] == 30
    else:
        assert status["url"].startswith("dir:///") and status["lease"] is None


def test_racing_create_all_has_exactly_one_winner(backend):
    """Two handles (two nodes) create the same pair of keys from many threads at once."""
    handles = [backend.open(), backend.open()]
    for round_ in range(5):
        results: list[bool] = []
        barrier = threading.Barrier(6)
        keys = (f"race/{round_}/id", f"race/{round_}/labels")

        def race(store, n, barrier=barrier, keys=keys, results=results):
            barrier.wait()
            results.append(store.create_all({k: {"by": n} for k in keys}))

        threads = [threading.Thread(target=race, args=(handles[i % 2], i)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(results) == [False] * 5 + [True]
        winner = eventually(lambda k=keys[0]: handles[0].get(k), "the winner's key")
        for store in handles:  # after a refused create_all, get() answers the winner's value
            assert store.get(keys[1]) == winner
