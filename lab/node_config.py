"""The one writer of node configs for several nodes: the lab's nodes and the Vagrant VMs.

Both number their nodes from 1 and derive a node's addresses from its index the same way:

    node i:  node_name n<i>,  node_ip = <underlay network> + 10 + i,  pod_cidr = 10.(100 + i).0.0/24

so the lab's node 2 is 192.168.77.12 with pods in 10.102.0.0/24, and the second VM is 192.168.56.12
with the same pod CIDR. The config is the agent's (SPEC §6a, read by `agent.node_config.load`); this
module writes only the keys it is given, so every other key keeps the agent's default. The store's
TLS keys (`store_ca`, `store_cert`, `store_key`) and `store_lease_ttl` are written only when asked.

As a command (vagrant/provision.sh runs it in each VM):

    python -m lab.node_config write --index 2 --underlay 192.168.56.0/24 \\
        --store etcd://192.168.56.11:2379 --out /etc/meshagent/agent.yaml
    python -m lab.node_config address --index 1 --underlay 192.168.56.0/24   # 192.168.56.11 10.101.0.0/24
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
import tempfile

import yaml

NODE_IP_OFFSET = 10  # node i is host 10 + i of the underlay: .11, .12, .13
POD_BASE = 100  # node i's pods are in 10.(100 + i).0.0/24
ETCD_CLIENT_PORT = 2379

# The keys in the order a reader expects them; a key not listed here goes after them, sorted.
KEY_ORDER = (
    "node_name", "node_ip", "pod_cidr", "store", "store_ca", "store_cert", "store_key", "store_lease_ttl",
    "state_dir", "bpffs_dir", "cgroup", "api_socket", "metrics_addr",
)


def node_name(index: int, prefix: str = "") -> str:
    return f"{prefix}n{index}"


def node_ip(index: int, underlay: str = "192.168.77.0/24", offset: int = NODE_IP_OFFSET) -> str:
    """Node ``index``'s address on the underlay (from 1: host offset + index of the network)."""
    net = ipaddress.IPv4Network(underlay)
    if index < 1 or offset + index >= net.num_addresses - 1:
        raise ValueError(f"node {index} has no address in {underlay} (host {offset + index})")
    return str(net.network_address + offset + index)


def pod_cidr(index: int, base: int = POD_BASE) -> str:
    if index < 1 or base + index > 255:
        raise ValueError(f"node {index} has no pod CIDR 10.{base + index}.0.0/24")
    return f"10.{base + index}.0.0/24"


def etcd_store(*hosts: str, port: int = ETCD_CLIENT_PORT) -> str:
    """The store URL of an etcd cluster: etcd://HOST:2379[,HOST:2379...]."""
    return "etcd://" + ",".join(f"{h}:{port}" for h in hosts)


def node_settings(name: str, ip: str | None, cidr: str, store: str, *, store_ca: str | None = None,
                  store_cert: str | None = None, store_key: str | None = None, store_lease_ttl: int | None = None,
                  **more) -> dict:
    """A node's config as a mapping: the given keys only (``more``: state_dir, api_socket, ...; a None
    value is left out, so the agent's default applies)."""
    settings = {"node_name": name, "node_ip": ip, "pod_cidr": cidr, "store": store, "store_ca": store_ca,
                "store_cert": store_cert, "store_key": store_key, "store_lease_ttl": store_lease_ttl, **more}
    return {k: v for k, v in settings.items() if v is not None}


def render(settings: dict, origin: str = "lab.node_config") -> str:
    """The YAML text of a node config, keys in KEY_ORDER, with a header naming its writer."""
    ordered = {k: settings[k] for k in KEY_ORDER if k in settings}
    ordered.update({k: settings[k] for k in sorted(settings) if k not in ordered})
    header = (f"# meshagent node config (SPEC §6a), written by {origin}.\n"
              "# Keys not written here take the agent's defaults; examples/node/agent.yaml lists them all.\n")
    return header + yaml.safe_dump(ordered, sort_keys=False, default_flow_style=False)


def write(path: str, settings: dict, origin: str = "lab.node_config") -> None:
    """Write the config atomically (a reader sees the old file or the new one), mode 0644: it holds
    no secret, only the paths of the store's key and certificates."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".agent-", suffix=".yaml")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(render(settings, origin))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.node_config", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for cmd in ("write", "address"):
        p = sub.add_parser(cmd)
        p.add_argument("--index", type=int, required=True, help="node number, from 1")
        p.add_argument("--underlay", default="192.168.77.0/24", help="the nodes' network (node i: host 10 + i)")
        p.add_argument("--pod-base", type=int, default=POD_BASE, help="node i's pods: 10.(BASE + i).0.0/24")
    w = sub.choices["write"]
    w.add_argument("--store", required=True, help="dir:///PATH or etcd://HOST:2379[,HOST:2379...]")
    w.add_argument("--node-name", help="default: n<index>")
    w.add_argument("--node-ip", help="default: from --index and --underlay")
    w.add_argument("--pod-cidr", help="default: from --index and --pod-base")
    for key in ("store-ca", "store-cert", "store-key", "state-dir", "bpffs-dir", "cgroup", "api-socket",
                "metrics-addr"):
        w.add_argument(f"--{key}")
    w.add_argument("--store-lease-ttl", type=int)
    w.add_argument("--out", default="-", help="file to write (default: standard output)")
    args = parser.parse_args(argv)
    try:
        ip = getattr(args, "node_ip", None) or node_ip(args.index, args.underlay)
        cidr = getattr(args, "pod_cidr", None) or pod_cidr(args.index, args.pod_base)
    except ValueError as e:
        parser.error(str(e))
    if args.command == "address":
        print(ip, cidr)
        return 0
    settings = node_settings(
        args.node_name or node_name(args.index), ip, cidr, args.store, store_ca=args.store_ca,
        store_cert=args.store_cert, store_key=args.store_key, store_lease_ttl=args.store_lease_ttl,
        state_dir=args.state_dir, bpffs_dir=args.bpffs_dir, cgroup=args.cgroup, api_socket=args.api_socket,
        metrics_addr=args.metrics_addr)
    if args.out == "-":
        sys.stdout.write(render(settings, "python -m lab.node_config"))
    else:
        write(args.out, settings, "python -m lab.node_config")
        print(f"wrote {args.out} (node {settings['node_name']}, {ip}, pods {cidr}, store {args.store})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
