"""The etcd store against a real etcd: the watch, compaction, etcd going away and coming back, the
cache file, the node's lease."""

from __future__ import annotations

import logging
import os
import signal
import stat
import threading
import time

import pytest

from agent.store import StoreError
from agent.store.etcd import PREFIX
from tests.etcd.etcd_server import eventually, free_port

pytestmark = pytest.mark.etcd

TTL = 3


def guarded(fn, what: str, timeout: float = 30.0):
    """``fn()``'s result or exception, failing (instead of hanging the suite) if it never returns."""
    out: dict = {}

    def run():
        try:
            out["result"] = fn()
        except Exception as e:  # handed to the test
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"{what} did not return within {timeout:g} s"
    if "error" in out:
        raise out["error"]
    return out.get("result")


def test_a_change_by_another_client_reaches_the_mirror(shared_etcd, stores):
    store = stores.etcd(shared_etcd.url, prefix="/watch-test/")
    g = store.generation()
    shared_etcd.put_raw("/watch-test/nodes/n9", b'{"node_ip": "192.168.77.19"}')
    eventually(lambda: store.generation() != g, "the watch delivers the change")
    assert store.get("nodes/n9") == {"node_ip": "192.168.77.19"}
    shared_etcd.post("/v3/kv/deleterange", {"key": "L3dhdGNoLXRlc3Qvbm9kZXMvbjk="})  # /watch-test/nodes/n9
    eventually(lambda: store.get("nodes/n9") is None, "the watch delivers the delete")


def test_a_watch_behind_a_compaction_reads_everything_again(etcd_server, stores, caplog):
    caplog.set_level(logging.INFO, logger="meshagent.store")
    writer, reader = stores.etcd(etcd_server.url), stores.etcd(etcd_server.url)
    writer.put("resources/Service/default/keep", {"v": 1})
    writer.put("resources/Service/default/gone", {"v": 1})
    eventually(lambda: len(reader.list("resources")) == 2, "the reader sees both keys")
    reader._pause_watch()  # the reader's watch falls behind ...
    writer.put("resources/Service/default/keep", {"v": 2})
    writer.put("resources/Service/default/new", {"v": 1})
    writer.delete("resources/Service/default/gone")
    for i in range(20):
        writer.put("heartbeats/n1", {"at": i})
    compacted = etcd_server.compact()  # ... and etcd forgets the history it would resume from
    assert reader.status()["revision"] < compacted
    g = reader.generation()
    reader._resume_watch()
    eventually(lambda: reader.list("") == writer.list(""), "the reader's mirror matches the store again")
    assert reader.list("resources") == {"resources/Service/default/keep": {"v": 2},
                                        "resources/Service/default/new": {"v": 1}}
    assert reader.generation() != g
    assert f"compaction at revision {compacted}" in caplog.text and "reading every key again" in caplog.text
    writer.put("resources/Service/default/after", {"v": 1})  # and the watch runs again afterwards
    eventually(lambda: reader.get("resources/Service/default/after"), "the watch resumes after the resync")


def test_etcd_away_reads_answer_writes_fail_at_once_and_it_reconnects(etcd_server, stores):
    store = stores.etcd(etcd_server.url)
    store.put("resources/CiliumNetworkPolicy/default/allow", {"spec": {"x": 1}})
    before = time.time()
    etcd_server.stop()
    status = eventually(lambda: (s := store.status()) and not s["connected"] and s, "status says unreachable")
    assert status["since"] >= before and status["error"] and "\n" not in status["error"]
    # reads: the last known state
    assert store.get("resources/CiliumNetworkPolicy/default/allow") == {"spec": {"x": 1}}
    assert list(store.list("resources")) == ["resources/CiliumNetworkPolicy/default/allow"]
    # writes: one line at once, nothing half-applied
    writes = [lambda: store.put("a/b", {}), lambda: store.put("a/c", {}, owned=True),
              lambda: store.create("a/d", {}), lambda: store.create_all({"a/e": {}, "a/f": {}}),
              lambda: store.delete("resources/CiliumNetworkPolicy/default/allow"),
              lambda: store.put_all({"a/g": {}, "a/h": {}})]
    for write in writes:
        with pytest.raises(StoreError) as e:
            guarded(write, "a write while etcd is away")
        message = str(e.value)
        assert message.startswith(f"etcd store {etcd_server.url}: unreachable since ") and "\n" not in message
        assert "connection refused" in message and "the change was not made" in message
    assert store.list("a") == {}
    assert store.get("resources/CiliumNetworkPolicy/default/allow") == {"spec": {"x": 1}}
    # etcd back: the same store object reconnects and catches up with what others wrote
    etcd_server.start()
    eventually(lambda: store.status()["connected"], "the store reconnects", timeout=30)
    other = stores.etcd(etcd_server.url)
    other.put("resources/CiliumNetworkPolicy/default/later", {"spec": {}})
    eventually(lambda: store.get("resources/CiliumNetworkPolicy/default/later"), "the watch runs again")
    assert store.status()["error"] == "" and other.list("a") == {}
    store.put("a/b", {"ok": 1})
    assert other.get("a/b") == {"ok": 1} or eventually(lambda: other.get("a/b"), "the write lands")


def test_a_hung_etcd_bounds_every_call(etcd_server, stores):
    """etcd stopped with SIGSTOP: connections are accepted and never answered."""
    store = stores.etcd(etcd_server.url, lease_ttl=TTL)
    store.put("nodes/n1", {"v": 1})
    os.kill(etcd_server.proc.pid, signal.SIGSTOP)
    try:
        with pytest.raises(StoreError) as e:
            guarded(lambda: store.put("nodes/n1", {"v": 2}), "a write to a hung etcd")
        assert "no answer within 5 s; the change may or may not have been made" in str(e.value)
        assert "\n" not in str(e.value)
        assert guarded(lambda: store.get("nodes/n1"), "a read") == {"v": 1}
        eventually(lambda: not store.status()["connected"], "status says unreachable")
    finally:
        os.kill(etcd_server.proc.pid, signal.SIGCONT)
    eventually(lambda: store.status()["connected"], "the store reconnects", timeout=30)
    store.put("nodes/n1", {"v": 3})
    assert store.get("nodes/n1") == {"v": 3}


def test_the_cache_serves_a_store_opened_while_etcd_is_down(etcd_server, stores, workdir):
    state = workdir / "state"
    first = stores.etcd(etcd_server.url, state_dir=str(state), node_name="n1")
    first.put("resources/Service/default/web", {"spec": {"ports": [80]}})
    first.put("endpoints/n1/web-1", {"ip": "10.200.0.2"})
    cache = state / "store-cache-n1.json"
    eventually(lambda: cache.exists() and "endpoints/n1/web-1" in cache.read_text(),
               "the cache follows changes while the store runs")
    synced = first.status()["last_sync"]
    first.close()
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o600
    etcd_server.stop()
    again = stores.etcd(etcd_server.url, state_dir=str(state), node_name="n1")
    assert again.get("resources/Service/default/web") == {"spec": {"ports": [80]}}
    assert set(again.list("")) == {"resources/Service/default/web", "endpoints/n1/web-1"}
    status = again.status()
    assert status["connected"] is False and "connection refused" in status["error"]
    assert synced <= status["last_sync"] < status["since"]
    etcd_server.start()
    eventually(lambda: again.status()["connected"], "the store reconnects", timeout=30)
    first_writer = stores.etcd(etcd_server.url)
    first_writer.delete("endpoints/n1/web-1")
    eventually(lambda: again.get("endpoints/n1/web-1") is None, "the store follows etcd again")


def test_no_cache_and_no_etcd_is_one_line(workdir):
    port = free_port()
    with pytest.raises(StoreError) as e:
        guarded(lambda: _open(f"etcd://127.0.0.1:{port}", state_dir=str(workdir), node_name="n1"), "open")
    message = str(e.value)
    assert "unreachable (connection refused)" in message and "no cached state" in message
    assert str(workdir / "store-cache-n1.json") in message and "\n" not in message


def _open(url, **kw):
    from agent.store.etcd import EtcdStore

    return EtcdStore(url, **kw)


def test_owned_keys_vanish_once_the_node_stops_keeping_its_lease(etcd_server, stores, workdir):
    node = stores.etcd(etcd_server.url, lease_ttl=TTL, state_dir=str(workdir / "n1"), node_name="n1")
    node.put("nodes/n1", {"node_ip": "192.168.77.11"}, owned=True)
    node.create("heartbeats/n1", {"at": 1}, owned=True)
    node.put("resources/Service/default/web", {"spec": {}})
    watcher = stores.etcd(etcd_server.url)
    eventually(lambda: watcher.get("nodes/n1"), "the other node sees n1")
    g = watcher.generation()
    node.close()  # the keepalives stop; the lease is left to expire
    eventually(lambda: watcher.get("nodes/n1") is None, "n1's owned key expires with its lease", timeout=30)
    assert watcher.get("heartbeats/n1") is None and watcher.generation() != g
    assert watcher.get("resources/Service/default/web") == {"spec": {}}  # not owned: stays


def test_a_store_reopened_within_the_ttl_adopts_the_lease_and_keeps_the_keys(etcd_server, stores, workdir):
    state = str(workdir / "n1")
    node = stores.etcd(etcd_server.url, lease_ttl=TTL, state_dir=state, node_name="n1")
    node.put("nodes/n1", {"node_ip": "192.168.77.11"}, owned=True)
    lease = node.status()["lease"]["id"]
    node.close()
    again = stores.etcd(etcd_server.url, lease_ttl=TTL, state_dir=state, node_name="n1")
    assert again.status()["lease"]["id"] == lease
    time.sleep(3 * TTL)  # well past the TTL: the new store's keepalives hold the keys
    assert f"{PREFIX}nodes/n1" in etcd_server.keys(PREFIX)
    # and the adopted keys are its own: a lost lease puts them again
    etcd_server.revoke(lease)
    eventually(lambda: (again.status()["lease"] or {}).get("id") not in (None, lease), "a new lease")
    eventually(lambda: f"{PREFIX}nodes/n1" in etcd_server.keys(PREFIX), "n1's key is put again")


def test_a_lost_lease_is_replaced_and_owned_keys_are_put_again(etcd_server, stores, workdir):
    node = stores.etcd(etcd_server.url, lease_ttl=TTL, state_dir=str(workdir / "n1"), node_name="n1")
    node.put("nodes/n1", {"node_ip": "192.168.77.11"}, owned=True)
    node.put("nodes/n1-extra", {"x": 1}, owned=True)
    node.put("nodes/n1-extra", {"x": 2})  # not owned any more: not put again
    old = node.status()["lease"]["id"]
    etcd_server.revoke(old)  # as if it had expired while the node was away
    eventually(lambda: (node.status()["lease"] or {}).get("id") not in (None, old), "a new lease")
    keys = eventually(lambda: (k := etcd_server.keys(PREFIX)) and f"{PREFIX}nodes/n1" in k and k, "n1 put again")
    assert keys[f"{PREFIX}nodes/n1"] == {"node_ip": "192.168.77.11"}
    assert node.get("nodes/n1") == {"node_ip": "192.168.77.11"}
    node.put("heartbeats/n1", {"at": 2}, owned=True)  # owned writes use the new lease


def test_the_next_endpoint_answers_when_the_first_is_down(etcd_server, stores):
    dead = free_port()
    url = f"etcd://127.0.0.1:{dead},127.0.0.1:{etcd_server.client_port}"
    store = stores.etcd(url)
    store.put("a/b", {"v": 1})
    other = stores.etcd(etcd_server.url)
    g = store.generation()
    other.put("a/c", {"v": 2})
    eventually(lambda: store.generation() != g, "the watch on the second endpoint")
    assert store.status()["connected"] and store.list("a") == {"a/b": {"v": 1}, "a/c": {"v": 2}}
