"""A throwaway CA for the lab's etcd: a server certificate for etcd and a client certificate per node.

Only for `Lab(tls=True)`: etcd then serves https and asks every client for a certificate of this CA
(`--client-cert-auth`), and each node's config names its own files as `store_ca`, `store_cert` and
`store_key`. Keys are ECDSA P-256, certificates valid for 30 days, keys written 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass

VALIDITY = datetime.timedelta(days=30)


@dataclass(frozen=True)
class CertFiles:
    """A certificate, its key and the CA that signed it: what a TLS client or server is given."""

    ca: str
    cert: str
    key: str


def _write(path: str, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


class Pki:
    """A CA kept in ``directory`` (ca.pem, ca-key.pem) that issues certificates into it."""

    def __init__(self, directory: str, name: str = "meshagent-lab"):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509 import oid
        from cryptography.x509.oid import NameOID

        self._x509, self._hashes, self._ser, self._ec, self._oid = x509, hashes, serialization, ec, oid
        self.directory = directory
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")])
        now = datetime.datetime.now(datetime.UTC)
        self._name = subject
        self._ca = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(self._key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.ca_path = os.path.join(directory, "ca.pem")
        _write(self.ca_path, self._ca.public_bytes(serialization.Encoding.PEM), 0o644)
        _write(os.path.join(directory, "ca-key.pem"), self._pem_key(self._key), 0o600)

    def _pem_key(self, key) -> bytes:
        ser = self._ser
        return key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption())

    def issue(self, name: str, *, server_ips: tuple[str, ...] = (), client: bool = True) -> CertFiles:
        """A certificate for ``name`` (its CN), written as NAME.pem and NAME-key.pem. With
        ``server_ips`` it is a server certificate for those addresses (and localhost)."""
        x509, oid = self._x509, self._oid
        key = self._ec.generate_private_key(self._ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        usages = ([oid.ExtendedKeyUsageOID.SERVER_AUTH] if server_ips else []) + (
            [oid.ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(self._oid.NameOID.COMMON_NAME, name)]))
            .issuer_name(self._name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        )
        if server_ips:
            alt = [x509.IPAddress(ipaddress.ip_address(ip)) for ip in (*server_ips, "127.0.0.1")]
            builder = builder.add_extension(x509.SubjectAlternativeName([*alt, x509.DNSName("localhost")]),
                                            critical=False)
        cert = builder.sign(self._key, self._hashes.SHA256())
        files = CertFiles(self.ca_path, os.path.join(self.directory, f"{name}.pem"),
                          os.path.join(self.directory, f"{name}-key.pem"))
        _write(files.cert, cert.public_bytes(self._ser.Encoding.PEM), 0o644)
        _write(files.key, self._pem_key(key), 0o600)
        return files
