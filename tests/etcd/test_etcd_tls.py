"""The etcd store over TLS, against an etcd that requires client certificates
(--cert-file --key-file --trusted-ca-file --client-cert-auth), with certificates made here."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from agent.store import StoreError
from tests.etcd.etcd_server import EtcdServer, Pki, eventually, scratch_dir

pytestmark = pytest.mark.etcd


@pytest.fixture(scope="module")
def tls():
    work = scratch_dir()
    pki, other = Pki(work / "pki"), Pki(work / "other", "another-ca")
    server_cert, server_key = pki.issue("etcd-server", server=True)
    node_cert, node_key = pki.issue("node1")
    files = {"ca": pki.ca_path, "cert": node_cert, "key": node_key, "other_ca": other.ca_path}
    files["other_cert"], files["other_key"] = other.issue("intruder")
    server = EtcdServer(work, tls={"ca": pki.ca_path, "cert": server_cert, "key": server_key})
    try:
        server.start(client_tls=(pki.ca_path, node_cert, node_key))
        yield server, files
    finally:
        server.cleanup()
        shutil.rmtree(work, ignore_errors=True)


def _open(stores, server, ca: Path | None, cert: Path | None, key: Path | None):
    return stores.etcd(server.url, ca=str(ca) if ca else None, cert=str(cert) if cert else None,
                       key=str(key) if key else None)


def test_the_right_ca_and_client_certificate_work(tls, stores):
    server, f = tls
    a = _open(stores, server, f["ca"], f["cert"], f["key"])
    b = _open(stores, server, f["ca"], f["cert"], f["key"])
    a.put("resources/Service/default/web", {"spec": {}}, owned=True)
    eventually(lambda: b.get("resources/Service/default/web"), "the watch over TLS")
    assert a.status()["connected"] and a.status()["lease"] is not None


# Without the right client certificate, etcd's alert races our request (TLS 1.3 ends the handshake
# before the server has checked the certificate): we read either the alert or the closed connection.
REFUSED = ("(etcd refused the client certificate, or its absence: sslv3 alert bad certificate)",
           "(etcd ended the handshake: it may require a client certificate (store_cert, store_key))")


@pytest.mark.parametrize("case,needle", [
    ("wrong CA", ("(certificate verify failed: etcd's certificate is not trusted by store_ca: ",)),
    ("no client certificate", REFUSED),
    ("client certificate of another CA", REFUSED),
])
def test_wrong_credentials_are_one_line(tls, stores, case, needle):
    server, f = tls
    ca, cert, key = {"wrong CA": (f["other_ca"], f["cert"], f["key"]),
                     "no client certificate": (f["ca"], None, None),
                     "client certificate of another CA": (f["ca"], f["other_cert"], f["other_key"])}[case]
    with pytest.raises(StoreError) as e:
        _open(stores, server, ca, cert, key)
    message = str(e.value)
    assert message.startswith(f"etcd store {server.url}: TLS with etcd failed ") and "\n" not in message
    assert any(n in message for n in needle), message
    assert "store_ca, store_cert and store_key" in message


def test_plain_http_to_a_tls_etcd_is_one_line(tls, stores):
    server, _ = tls
    with pytest.raises(StoreError) as e:
        stores.etcd(server.url)
    message = str(e.value)
    assert message.startswith(f"etcd store {server.url}: unreachable (connection reset: if etcd serves TLS, set "
                              "store_ca, store_cert and store_key)") and "\n" not in message


def test_a_missing_certificate_file_is_one_line(tls, stores, workdir):
    server, f = tls
    with pytest.raises(StoreError) as e:
        _open(stores, server, workdir / "nope.pem", f["cert"], f["key"])
    missing = workdir / "nope.pem"
    assert str(e.value) == f"etcd store {server.url}: store_ca {missing}: no such file; check the node config"
