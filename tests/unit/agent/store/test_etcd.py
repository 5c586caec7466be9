"""The etcd store's pieces that need no etcd: URLs, error classification, failing to open. The rest
is in tests/etcd/ (a real etcd)."""

from __future__ import annotations

import socket
import ssl

import pytest
import requests
from etcd3gw import exceptions as etcd3gw_errors

from agent.node_config import from_dict
from agent.store import StoreError, open_store
from agent.store.etcd import EtcdStore, classify, parse_url


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("url,endpoints", [
    ("etcd://10.0.0.1:2379", [("10.0.0.1", 2379)]),
    ("etcd://10.0.0.1", [("10.0.0.1", 2379)]),
    ("etcd://a:1,b:2,c", [("a", 1), ("b", 2), ("c", 2379)]),
    ("etcd://[::1]:2379,[fd00::2]", [("::1", 2379), ("fd00::2", 2379)]),
])
def test_urls(url, endpoints):
    assert parse_url(url) == endpoints


@pytest.mark.parametrize("url", ["etcd://", "etcd://a:0", "etcd://a:99999", "etcd://a:x", "etcd://a/prefix",
                                 "etcd://a,,b", "etcd://user@a", "etcd://[::1", "http://a:2379"])
def test_bad_urls_are_one_line(url):
    with pytest.raises(StoreError) as e:
        parse_url(url)
    assert "etcd://HOST:PORT" in str(e.value) and "\n" not in str(e.value)


def _wrapped(inner: BaseException, outer=requests.exceptions.ConnectionError):
    try:
        try:
            raise inner
        except BaseException as e:
            raise outer(e) from None
    except BaseException as e:
        return e


@pytest.mark.parametrize("exc,kind,reason", [
    (_wrapped(ConnectionRefusedError(111, "Connection refused")), "unreachable", "connection refused"),
    (_wrapped(socket.gaierror(-2, "Name or service not known")), "unreachable", "host name not found"),
    (_wrapped(ConnectionResetError(104, "reset")), "unreachable", "connection reset"),
    (requests.exceptions.ConnectTimeout("x"), "unreachable", "no connection within 2 s"),
    (requests.exceptions.ReadTimeout("x"), "timeout", "no answer within 5 s"),
    (_wrapped(ssl.SSLError(1, "[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] alert")), "tls", None),
    (etcd3gw_errors.Etcd3Exception('{"error":"etcdserver: too many operations in txn request","code":3}'),
     "etcd", "etcdserver: too many operations in txn request"),
    (etcd3gw_errors.ConnectionFailedError('{"error":"etcdserver: no leader","code":14}'), "unreachable",
     "etcdserver: no leader"),
])
def test_classify(exc, kind, reason):
    f = classify(exc)
    assert f.kind == kind
    if reason:
        assert f.reason == reason


def test_an_unreachable_etcd_without_a_cache_cannot_be_opened(tmp_path):
    url = f"etcd://127.0.0.1:{free_port()}"
    cfg = from_dict({"node_name": "n1", "store": url, "state_dir": str(tmp_path)})
    with pytest.raises(StoreError) as e:
        open_store(url, cfg)
    assert str(e.value) == (f"etcd store {url}: unreachable (connection refused), and there is no cached state in "
                            f"{tmp_path}/store-cache-n1.json to start from; check that etcd runs and the node "
                            "reaches it")


def test_tls_files_are_checked_first(tmp_path):
    cert = tmp_path / "node.pem"
    cert.write_text("x")
    with pytest.raises(StoreError, match="store_cert and store_key go together"):
        EtcdStore("etcd://127.0.0.1:2379", cert=str(cert))
    with pytest.raises(StoreError, match=r"store_key .*/nope.pem: no such file"):
        EtcdStore("etcd://127.0.0.1:2379", cert=str(cert), key=str(tmp_path / "nope.pem"))
