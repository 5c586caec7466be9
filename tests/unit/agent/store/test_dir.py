"""The directory store's own behaviour (the shared interface is tests/etcd/test_store_interface.py,
which runs on both backends)."""

from __future__ import annotations

import os
import stat
import threading

import pytest

from agent.store import DirStore, StoreError, open_store


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_files_are_root_s_alone(tmp_path):
    store = DirStore(str(tmp_path / "store"))
    store.put("resources/Service/default/web", {"spec": {}})
    store.put_all({"a/b": {}, "a/c": {}})
    store.create_all({"i/1": {}})
    for path in (tmp_path / "store").rglob("*"):
        assert mode(path) == (0o700 if path.is_dir() else 0o600), path
    assert not [p for p in (tmp_path / "store").rglob(".tmp-*")]  # no staged file left behind


def test_generation_is_shared_through_the_directory(tmp_path):
    a, b = DirStore(str(tmp_path)), DirStore(str(tmp_path))
    g = b.generation()
    a.put("x/y", {"v": 1})
    assert b.generation() == g + 1
    a.put("heartbeats/n1", {"at": 1})
    assert b.generation() == g + 1


def test_create_all_under_the_lock_from_many_threads(tmp_path):
    stores = [DirStore(str(tmp_path)) for _ in range(4)]
    wins = []
    barrier = threading.Barrier(8)

    def race(i):
        barrier.wait()
        if stores[i % 4].create_all({"identities/by-id/300": {"n": i}, "identities/by-labels/h": {"n": i}}):
            wins.append(i)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(wins) == 1
    assert stores[0].get("identities/by-id/300") == stores[0].get("identities/by-labels/h") == {"n": wins[0]}


def test_a_failed_write_leaves_nothing(tmp_path):
    store = DirStore(str(tmp_path / "s"))
    (tmp_path / "s" / "blocked").write_text("a file where a directory must go")
    with pytest.raises(StoreError, match="nothing was changed"):
        store.put_all({"a/ok": {}, "blocked/x": {}})
    assert store.list("") == {} and store.generation() == 0


def test_status(tmp_path):
    status = DirStore(str(tmp_path)).status()
    assert status["backend"] == "dir" and status["connected"] and status["lease"] is None
    assert status["url"] == f"dir://{tmp_path}"


@pytest.mark.parametrize("url", ["dir://relative", "dir://", "file:///x", "redis://x"])
def test_bad_urls(url):
    with pytest.raises(StoreError) as e:
        open_store(url)
    assert url in str(e.value) and "\n" not in str(e.value)


def test_open_store_dir(tmp_path):
    store = open_store(f"dir://{tmp_path}/store")
    assert isinstance(store, DirStore) and store.root == tmp_path / "store"
    store.close()
