"""A real etcd for tests (Debian's etcd-server 3.4), and TLS certificates made with `cryptography`.

`EtcdServer` runs `etcd` on free loopback ports with its data in a temporary directory; it is
stopped, killed and restarted by PID (its data stays, so a restart keeps the cluster and revisions).
`Pki` makes a CA and certificates signed by it, written as PEM files.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import ipaddress
import json
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
START_TIMEOUT_S = 30.0


def scratch_dir() -> Path:
    """A temporary directory; whoever makes one removes it (shutil.rmtree), also on failure."""
    return Path(tempfile.mkdtemp(prefix="meshagent-store-test-"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EtcdServer:
    def __init__(self, workdir: Path, tls: dict[str, Path] | None = None, netns: str | None = None):
        """``tls``: {"ca", "cert", "key"} of the server; clients must then present a certificate
        signed by that CA (--client-cert-auth). ``netns``: run etcd on the loopback of that network
        namespace (a node's, for an agent there); the test then asks it through curl inside it."""
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.netns = netns
        self.data_dir = workdir / "etcd-data"
        self.log_path = workdir / "etcd.log"
        self.tls = tls
        self.client_port, self.peer_port = free_port(), free_port()
        self.proc: subprocess.Popen | None = None
        scheme = "https" if tls else "http"
        self.base = f"{scheme}://127.0.0.1:{self.client_port}"
        self.url = f"etcd://127.0.0.1:{self.client_port}"

    def command(self) -> list[str]:
        peer = f"http://127.0.0.1:{self.peer_port}"
        cmd = [ETCD, "--name", "default", "--data-dir", str(self.data_dir),
               "--listen-client-urls", self.base, "--advertise-client-urls", self.base,
               "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
               "--initial-cluster", f"default={peer}"]
        if self.tls:
            cmd += ["--cert-file", str(self.tls["cert"]), "--key-file", str(self.tls["key"]),
                    "--trusted-ca-file", str(self.tls["ca"]), "--client-cert-auth"]
        return self._in_netns(cmd)

    def _in_netns(self, cmd: list[str]) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.netns}", *cmd] if self.netns else cmd

    def start(self, client_tls: tuple[Path, Path, Path] | None = None) -> EtcdServer:
        """Start etcd and wait until it answers (``client_tls``: (ca, cert, key) to ask it with)."""
        assert self.proc is None or self.proc.poll() is not None, "etcd is running already"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                if self.post("/v3/kv/range", {"key": _b64("health")}, client_tls).get("header"):
                    return self
            except (requests.RequestException, ValueError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"etcd did not answer within {START_TIMEOUT_S:g} s: {self.log_tail()}")
            time.sleep(0.1)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """End etcd by its PID (SIGKILL if it does not go within 10 s)."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def cleanup(self) -> None:
        self.kill()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def log_tail(self, lines: int = 5) -> str:
        with contextlib.suppress(OSError):
            return " | ".join(self.log_path.read_text().strip().splitlines()[-lines:])
        return ""

    # ---- a client of our own, to play another node or an operator ---------------------------------

    def post(self, path: str, body: dict, client_tls: tuple[Path, Path, Path] | None = None) -> dict:
        if self.netns:
            assert client_tls is None, "TLS inside a namespace is not needed yet"
            proc = subprocess.run(self._in_netns(["curl", "-sS", "--fail", "-m", "5", "-X", "POST", "-d",
                                                  json.dumps(body), self.base + path]),
                                  capture_output=True, text=True, timeout=15)
            if proc.returncode:
                raise requests.ConnectionError(proc.stderr.strip())
            return json.loads(proc.stdout)
        kw = {}
        if client_tls:
            ca, cert, key = client_tls
            kw = {"verify": str(ca), "cert": (str(cert), str(key))}
        resp = requests.post(self.base + path, json=body, timeout=5, **kw)
        resp.raise_for_status()
        return resp.json()

    def put_raw(self, key: str, value: bytes) -> int:
        """Write bytes as they are (a corrupt value, when they are not a JSON object)."""
        return int(self.post("/v3/kv/put", {"key": _b64(key), "value": _b64(value)})["header"]["revision"])

    def revision(self) -> int:
        return int(self.post("/v3/kv/range", {"key": _b64("x")})["header"]["revision"])

    def compact(self, revision: int | None = None) -> int:
        revision = revision or self.revision()
        self.post("/v3/kv/compaction", {"revision": str(revision), "physical": True})
        return revision

    def revoke(self, lease: int) -> None:
        self.post("/v3/kv/lease/revoke", {"ID": str(lease)})

    def keys(self, prefix: str) -> dict[str, dict]:
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        resp = self.post("/v3/kv/range", {"key": _b64(prefix), "range_end": _b64(end)})
        return {base64.b64decode(kv["key"]).decode(): json.loads(base64.b64decode(kv.get("value", "")))
                for kv in resp.get("kvs", [])}


def _b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


class Pki:
    """A CA writing PEM files into ``directory``."""

    def __init__(self, directory: Path, name: str = "meshagent-test-ca"):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(minutes=5))
                     .not_valid_after(now + datetime.timedelta(days=1))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                  content_commitment=False, key_encipherment=False,
                                                  data_encipherment=False, key_agreement=False,
                                                  encipher_only=False, decipher_only=False), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.ca_path = self.dir / f"{name}.pem"
        self.ca_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, cn: str, *, server: bool = False, client: bool = True) -> tuple[Path, Path]:
        """A certificate for ``cn`` (with 127.0.0.1 and localhost as names when ``server``): (cert, key).
        etcd 3.4's gateway dials etcd's own gRPC port with the server certificate as its client
        certificate, so a server certificate needs client authentication too (the default here):
        without it every gateway request hangs ("incompatible key usage" in etcd's log)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + ([ExtendedKeyUsageOID.CLIENT_AUTH]
                                                                          if client else [])
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
                   .issuer_name(self.cert.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage(usages), critical=False))
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.IPv4Address("127.0.0.1"))]), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        cert_path, key_path = self.dir / f"{cn}.pem", self.dir / f"{cn}-key.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        key_path.chmod(0o600)
        return cert_path, key_path


def eventually(check, what: str, timeout: float = 20.0, interval: float = 0.05):
    """Poll ``check()`` until it returns something true, and return it; fail naming ``what`` after
    ``timeout`` seconds (a hang guard, not a speed requirement)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(interval)
