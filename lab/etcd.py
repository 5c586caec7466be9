"""One etcd member for the mesh's store: its settings, written once for the lab and the VMs.

`settings()` is the member's configuration as etcd's own flag names. The lab passes them as flags to
an `etcd` it runs in the underlay namespace; vagrant/provision.sh writes them as ETCD_* variables to
/etc/default/etcd, which Debian's etcd.service reads:

    python -m lab.etcd env --name n1 --client-ip 192.168.56.11 --data-dir /var/lib/etcd/meshagent

A single member: clients on CLIENT_IP:2379 (and 127.0.0.1:2379), its peer URL on 127.0.0.1:2380
(there is no other member to talk to). With TLS, clients must show a certificate of the given CA.
"""

from __future__ import annotations

import argparse
import sys

from lab.node_config import ETCD_CLIENT_PORT
from lab.pki import CertFiles

PEER_PORT = 2380


def client_url(ip: str, tls: bool = False) -> str:
    return f"{'https' if tls else 'http'}://{ip}:{ETCD_CLIENT_PORT}"


def settings(name: str, client_ip: str, data_dir: str, tls: CertFiles | None = None) -> dict[str, str]:
    """The member's configuration, keyed by etcd's flag names (etcd --help)."""
    urls = f"{client_url(client_ip, tls is not None)},{client_url('127.0.0.1', tls is not None)}"
    peer = f"http://127.0.0.1:{PEER_PORT}"
    out = {
        "name": name,
        "data-dir": data_dir,
        "listen-client-urls": urls,
        "advertise-client-urls": client_url(client_ip, tls is not None),
        "listen-peer-urls": peer,
        "initial-advertise-peer-urls": peer,
        "initial-cluster": f"{name}={peer}",
        "initial-cluster-state": "new",
        "initial-cluster-token": f"meshagent-{name}",
    }
    if tls is not None:
        out.update({"trusted-ca-file": tls.ca, "cert-file": tls.cert, "key-file": tls.key,
                    "client-cert-auth": "true"})
    return out


def as_args(config: dict[str, str]) -> list[str]:
    """etcd's command-line flags."""
    return [f"--{k}={v}" for k, v in config.items()]


def as_env(config: dict[str, str]) -> str:
    """The same settings as ETCD_* variables, one a line (an EnvironmentFile, /etc/default/etcd)."""
    return "".join(f"ETCD_{k.upper().replace('-', '_')}={v}\n" for k, v in config.items())


def etcdctl(endpoint_url: str, client: CertFiles | None = None) -> list[str]:
    """The start of an etcdctl (v3 API) command line for the member at ``endpoint_url``."""
    cmd = ["etcdctl", f"--endpoints={endpoint_url}", "--dial-timeout=2s", "--command-timeout=3s"]
    if client is not None:
        cmd += [f"--cacert={client.ca}", f"--cert={client.cert}", f"--key={client.key}"]
    return cmd


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.etcd", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    env = sub.add_parser("env", help="print the member's settings as ETCD_* variables (/etc/default/etcd)")
    env.add_argument("--name", required=True)
    env.add_argument("--client-ip", required=True)
    env.add_argument("--data-dir", required=True)
    env.add_argument("--ca")
    env.add_argument("--cert")
    env.add_argument("--key")
    args = parser.parse_args(argv)
    tls_args = (args.ca, args.cert, args.key)
    if any(tls_args) and not all(tls_args):
        parser.error("TLS needs --ca, --cert and --key together")
    tls = CertFiles(*tls_args) if all(tls_args) else None
    sys.stdout.write("# etcd for the meshagent store, written by python -m lab.etcd\n")
    sys.stdout.write(as_env(settings(args.name, args.client_ip, args.data_dir, tls)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
