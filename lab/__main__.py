"""python -m lab: bring a node lab up, look at it, break it, take it down.

    python -m lab up --nodes 3 --store etcd      # 3 nodes, etcd as the store; --tls for etcd over mTLS
    python -m lab status                         # nodes, addresses, agents, etcd
    meshagent --node n1 status                   # each node's API socket is /run/meshagent/<node>.sock
    python -m lab exec n1 -- ip route            # a command in node n1's network namespace
    python -m lab stop n2 [--kill]; python -m lab start n2
    python -m lab etcd stop; python -m lab etcd start
    python -m lab down                           # removes everything `up` made, also after a crash

Exit 0 on success, 1 when the lab could not do it (one line on stderr), 2 on a usage error.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import click

from lab import net
from lab.errors import LabError
from lab.lab import Lab, LabSpec, down_by_name

DEFAULT_NAME = os.environ.get("MESHAGENT_LAB", "mlab")


def name_option(f):
    return click.option("--name", default=DEFAULT_NAME, show_default=True, envvar="MESHAGENT_LAB",
                        help="The lab's name (env MESHAGENT_LAB): namespaces <name>-n<i>, <name>-ul.")(f)


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"lab: {message}", err=True)
    sys.exit(code)


def _terminated(signum, frame):
    raise SystemExit(f"terminated by signal {signum}")


@click.group(epilog="\b\n" + __doc__.split("\n\n")[1])
def main() -> None:
    """A node lab: meshagent nodes as network namespaces on a bridged underlay, with etcd."""


@main.command()
@name_option
@click.option("--nodes", default=3, show_default=True, help="How many nodes.")
@click.option("--store", default="dir", show_default=True,
              help="dir (a directory the nodes share), etcd (the lab's etcd), or a store URL.")
@click.option("--tls", is_flag=True, help="etcd over TLS with client certificates (the lab makes a CA).")
@click.option("--etcd/--no-etcd", default=True, show_default=True, help="Run etcd (also with the dir store).")
@click.option("--agents/--no-agents", default=True, show_default=True,
              help="Start the agents (without: the underlay, etcd and the configs only).")
@click.option("--underlay", default="192.168.77.0/24", show_default=True,
              help="The nodes' network: the bridge and etcd at host 1, node i at host 10 + i.")
@click.option("--pod-base", default=100, show_default=True, help="Node i's pods: 10.(BASE + i).0.0/24.")
@click.option("--node-prefix", default="", help="Node names <prefix>n<i> (default n1, n2, ...).")
@click.option("--store-lease-ttl", type=int, help="Write store_lease_ttl (seconds) into the node configs.")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
def up(name, nodes, store, tls, etcd, agents, underlay, pod_base, node_prefix, store_lease_ttl, output) -> None:
    """Bring the lab up (refused if it is up already)."""
    try:
        lab = Lab(LabSpec(name=name, nodes=nodes, store=store, tls=tls, etcd=etcd, agents=agents, underlay=underlay,
                          pod_base=pod_base, node_prefix=node_prefix, store_lease_ttl=store_lease_ttl))
    except LabError as e:
        _fail(str(e), 2)
    signal.signal(signal.SIGTERM, _terminated)
    try:
        lab.up()
    except LabError as e:
        _fail(str(e))
    except (KeyboardInterrupt, SystemExit):
        _fail("interrupted: removed what it had made", 130)
    _show(lab, output)


@main.command()
@name_option
def down(name) -> None:
    """Remove everything the lab made (namespaces, processes, endpoints, pins, cgroups, files)."""
    problems = down_by_name(name)
    if problems is None:
        click.echo(f"lab {name} is not up")
        return
    for p in problems:
        click.echo(f"lab: could not remove {p}", err=True)
    if problems:
        sys.exit(1)
    click.echo(f"lab {name} removed")


@main.command()
@name_option
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
def status(name, output) -> None:
    """The lab's nodes, addresses, agents and etcd."""
    _show(_attach(name), output)


def _attach(name: str) -> Lab:
    try:
        return Lab.attach(name)
    except LabError as e:
        _fail(str(e))


def _show(lab: Lab, output: str) -> None:
    st = lab.status()
    if output == "json":
        click.echo(json.dumps(st, indent=1))
        return
    etcd = st["etcd"]
    click.echo(f"lab {lab.name}: {st['phase']}, {len(lab.nodes)} nodes, store {st['store']}")
    underlay = f"underlay: netns {lab.underlay_ns}, bridge br0 {lab.etcd_ip}/{lab.spec.underlay.split('/')[1]}"
    if lab.spec.etcd:
        state = "healthy" if etcd["healthy"] else "running, not healthy" if etcd["running"] else "stopped"
        pid = f" pid {etcd['proc']['pid']}" if etcd["running"] else ""
        underlay += f"; etcd {etcd['url']}{pid} ({state})"
    click.echo(underlay)
    rows = [("NODE", "NETNS", "NODE IP", "POD CIDR", "AGENT", "API SOCKET")]
    for n in st["nodes"]:
        agent = n["agent_state"] + (f" (pid {n['agent']['pid']})" if n["agent_state"] != "stopped" else "")
        rows.append((n["name"], n["netns"], n["node_ip"], n["pod_cidr"], agent, n["api_socket"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    click.echo(f"files: {lab.workdir} (n<i>/agent.yaml, n<i>/agent.log, etcd.log); "
               f"try: meshagent --node {lab.nodes[0].name} status")


@main.command(name="exec", context_settings={"ignore_unknown_options": True})
@name_option
@click.argument("node")
@click.argument("cmd", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(name, node, cmd) -> None:
    """Run CMD in NODE's network namespace: python -m lab exec n1 -- ip route."""
    target = _node(name, node)
    sys.exit(subprocess.call(net.in_netns(target.netns, list(cmd))))


def _node(name: str, node: str):
    try:
        return _attach(name).node(node)
    except LabError as e:
        _fail(str(e))


@main.command()
@name_option
@click.argument("node")
@click.option("--kill", is_flag=True, help="SIGKILL (a crash) instead of SIGTERM.")
def stop(name, node, kill) -> None:
    """Stop NODE's agent (its datapath stays pinned and enforcing)."""
    target = _node(name, node)
    ran = target.stop_agent(signal.SIGKILL if kill else signal.SIGTERM)
    click.echo(f"{target.name}: agent {'killed' if kill else 'stopped'}" if ran else f"{target.name}: no agent ran")


@main.command()
@name_option
@click.argument("node")
def start(name, node) -> None:
    """Start NODE's agent and wait until it is ready."""
    target = _node(name, node)
    try:
        target.start_agent()
    except LabError as e:
        _fail(str(e))
    click.echo(f"{target.name}: agent ready (pid {target.agent.pid})")


@main.command()
@name_option
@click.argument("node")
def restart(name, node) -> None:
    """Stop NODE's agent and start it again."""
    target = _node(name, node)
    try:
        target.restart_agent()
    except LabError as e:
        _fail(str(e))
    click.echo(f"{target.name}: agent ready (pid {target.agent.pid})")


@main.command(name="etcd")
@name_option
@click.argument("action", type=click.Choice(["start", "stop", "kill", "status"]))
def etcd_(name, action) -> None:
    """Start, stop (SIGTERM), kill (SIGKILL) etcd, or ask whether it is healthy: for fault tests."""
    lab = _attach(name)
    try:
        if action == "start":
            lab.start_etcd()
        elif action in ("stop", "kill"):
            lab.stop_etcd(signal.SIGKILL if action == "kill" else signal.SIGTERM)
    except LabError as e:
        _fail(str(e))
    healthy = lab.etcd is not None and lab.etcd.alive() and lab.etcd_healthy()
    click.echo(f"etcd {lab.etcd_url}: {'healthy' if healthy else 'down'}")
    if action == "status" and not healthy:
        sys.exit(1)


@main.command(context_settings={"ignore_unknown_options": True})
@name_option
@click.option("--node", help="From this node's namespace, with its client certificate.")
@click.argument("args", nargs=-1, required=True, type=click.UNPROCESSED)
def etcdctl(name, node, args) -> None:
    """etcdctl ARGS against the lab's etcd: python -m lab etcdctl -- get --prefix ''."""
    lab = _attach(name)
    try:
        proc = lab.etcdctl(*args, node=lab.node(node) if node else None, check=False)
    except LabError as e:
        _fail(str(e))
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main(prog_name="python -m lab")
