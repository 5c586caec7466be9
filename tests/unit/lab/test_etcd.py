"""lab.etcd: one etcd member's settings, as flags (the lab) and as /etc/default/etcd (the VMs)."""

from __future__ import annotations

import subprocess
import sys

from lab import etcd
from lab.pki import CertFiles
from tests.paths import REPO


def test_flags_and_environment_say_the_same():
    s = etcd.settings("n1", "192.168.56.11", "/var/lib/etcd/meshagent")
    assert s["listen-client-urls"] == "http://192.168.56.11:2379,http://127.0.0.1:2379"
    assert s["advertise-client-urls"] == "http://192.168.56.11:2379"
    assert s["initial-cluster"] == "n1=http://127.0.0.1:2380"
    args = etcd.as_args(s)
    env = dict(line.split("=", 1) for line in etcd.as_env(s).splitlines())
    assert len(args) == len(env) == len(s)
    for key, value in s.items():
        assert f"--{key}={value}" in args
        assert env[f"ETCD_{key.upper().replace('-', '_')}"] == value
    assert "client-cert-auth" not in s


def test_tls_serves_https_and_asks_clients_for_a_certificate():
    tls = CertFiles("/p/ca.pem", "/p/etcd.pem", "/p/etcd-key.pem")
    s = etcd.settings("lab-etcd", "192.168.77.1", "/tmp/d", tls)
    assert s["advertise-client-urls"] == "https://192.168.77.1:2379"
    assert (s["trusted-ca-file"], s["cert-file"], s["key-file"], s["client-cert-auth"]) == (
        "/p/ca.pem", "/p/etcd.pem", "/p/etcd-key.pem", "true")
    assert etcd.etcdctl("https://192.168.77.1:2379", CertFiles("/c", "/n1.pem", "/n1-key.pem"))[-3:] == [
        "--cacert=/c", "--cert=/n1.pem", "--key=/n1-key.pem"]


def test_the_command_writes_an_environment_file():
    out = subprocess.run([sys.executable, "-m", "lab.etcd", "env", "--name", "n1", "--client-ip", "192.168.56.11",
                          "--data-dir", "/var/lib/etcd/meshagent"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("#")
    assert "ETCD_LISTEN_CLIENT_URLS=http://192.168.56.11:2379,http://127.0.0.1:2379" in lines
