"""meshagent: command line of the sidecarless eBPF service-mesh node agent.

Thin on purpose: a command checks what it can check without the agent (labels, addresses,
durations, YAML files), sends one request to the node agent's API socket (agent/client.py),
and prints the reply through cli/output.py. The agent does the work. Only `agent`, `teardown`
and `bpf dump` run locally.

USAGE: meshagent [--node NAME] [--config FILE] [--socket PATH] COMMAND [ARGS]...

Which agent: --socket PATH, else the api_socket of --config FILE, else the node's default socket
(/run/meshagent/NODE.sock, or api_socket from /etc/meshagent/agent.yaml for that node).

Exit codes: 0 success, 1 operational error (one line on stderr), 2 usage error.

examples:
    meshagent status                                 # is this node's agent ready?
    meshagent --node node2 endpoint list             # another node on this machine
    meshagent apply -f examples/                     # every YAML file in a directory
    meshagent flows --follow --verdict DROPPED       # watch drops as they happen
    meshagent policy trace --from-label app=client --to-label app=server --dport 80/tcp
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import click

from agent import __version__, node_config
from agent.client import AgentClient
from agent.errors import MeshError
from agent.labels import LabelError, check_key, check_value, parse_labels
from agent.named_ports import NamedPort, PortSpecError, check_ports, parse_port_spec
from cli import output as out


def examples(*lines: str) -> str:
    """An examples epilog, kept as written (click's \\b marker stops re-wrapping)."""
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)


# ---- errors ------------------------------------------------------------------------------------


def _operational_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "could not do it" (exit 1, one line), not "bug" (traceback): every
    MeshError (agent/errors.py), and the OS refusing something."""
    return (MeshError, OSError)


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


class MeshGroup(click.Group):
    """The top-level group: turns operational errors into `Error: <message>` and exit 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:  # `meshagent flows | head`: the reader left, nothing to say
            _silence_stdout()
            sys.exit(1)
        except click.ClickException:
            raise
        except Exception as e:
            if isinstance(e, _operational_errors()):
                raise click.ClickException(_one_line(e)) from None
            raise


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


# ---- which agent -------------------------------------------------------------------------------


@dataclass
class Target:
    """The node the user means: --node, --config and --socket of the top-level group."""

    node: str | None = None
    config: str | None = None
    socket: str | None = None

    def node_config(self, config_path: str | None = None) -> node_config.NodeConfig:
        """The node's config: the given file, else /etc/meshagent/agent.yaml or defaults for --node."""
        path = config_path or self.config
        if path:
            return node_config.load(path)
        cfg = node_config.load(None)
        if self.node and self.node != cfg.node_name:
            return node_config.from_dict({"node_name": self.node}, f"<defaults for node {self.node}>")
        return cfg

    def socket_path(self) -> str:
        return self.socket or self.node_config().api_socket

    def client(self, timeout: float | None = 60.0) -> AgentClient:
        return AgentClient(self.socket_path(), timeout=timeout)


pass_target = click.make_pass_decorator(Target)


# ---- parameter types: everything checkable without the agent fails here with exit 2 -------------


class LabelsType(click.ParamType):
    name = "K=V[,K=V...]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> dict[str, str]:
        if isinstance(value, dict):
            return value
        try:
            labels = parse_labels(value)
        except LabelError as e:
            self.fail(str(e), param, ctx)
        if not labels:
            self.fail("expected at least one KEY=VALUE label", param, ctx)
        return labels


class FlowLabelsType(click.ParamType):
    """``app=web``, ``k8s:app=web,tier=fe``, ``reserved:world`` -> ["app=web", ...], checked by the
    agent's own flow-filter parser, so the CLI refuses exactly what the agent would."""

    name = "K=V[,K=V...]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> list[str]:
        if isinstance(value, list):
            return value
        from agent.flows import parse_label_filter

        items = [item.strip() for item in str(value).split(",")]
        try:
            for item in items:
                parse_label_filter(item, f"--{param.name.replace('_', '-')}" if param else "label")
        except ValueError as e:
            self.fail(str(e), param, ctx)
        return items


class IPv4Type(click.ParamType):
    name = "IP"

    def __init__(self, cidr: bool = False):
        self.cidr = cidr
        if cidr:
            self.name = "IP|CIDR"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value).strip()
        try:
            return str(ipaddress.IPv4Network(text, strict=False) if self.cidr and "/" in text
                       else ipaddress.IPv4Address(text))
        except ValueError:
            self.fail(f"{value!r} is not an IPv4 address{' or CIDR' if self.cidr else ''}", param, ctx)


class DurationType(click.ParamType):
    """``30s``, ``5m``, ``1h30m``, ``500ms`` -> seconds as a float: agent.resources.parse_duration, the
    reading of Istio's durations (Go's time.ParseDuration, which hubble observe --since uses too)."""

    name = "DURATION"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, float):
            return value
        from agent.resources import parse_duration  # loaded only when a duration is given

        try:
            seconds = parse_duration(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)
        if seconds <= 0:
            self.fail(f"{value!r}: the duration must be positive", param, ctx)
        return seconds


class SizeType(click.ParamType):
    """``8MiB``, ``512KiB``, ``4M`` (10^6), ``8388608`` -> bytes: agent.resources.parse_size."""

    name = "SIZE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        from agent.resources import parse_size

        try:
            return parse_size(str(value))
        except ValueError as e:
            self.fail(str(e), param, ctx)


class PortProtoType(click.ParamType):
    """``80/tcp``, ``53/udp``, ``80`` (TCP), ``icmp`` or ``8/icmp`` (the ICMP type) -> (port, "TCP")."""

    name = "PORT[/tcp|udp|icmp]"
    _FORM = re.compile(r"^(?:(\d+)(?:/(tcp|udp|icmp))?|(icmp))$", re.IGNORECASE)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple:
        if isinstance(value, tuple):
            return value
        m = self._FORM.match(str(value).strip())
        if not m:
            self.fail(f"{value!r}: expected PORT/PROTOCOL, e.g. 80/tcp, 53/udp or icmp", param, ctx)
        port, proto = int(m.group(1) or 0), (m.group(2) or m.group(3) or "tcp").upper()
        if proto == "ICMP" and port > 255:
            self.fail(f"{value!r}: an ICMP type is 0-255", param, ctx)
        if proto != "ICMP" and not 1 <= port <= 65535:
            self.fail(f"{value!r}: the port must be 1-65535", param, ctx)
        return port, proto


class NamedPortType(click.ParamType):
    """``http=8080``, ``dns=53/udp`` -> NamedPort, as a pod's container port (agent/named_ports.py)."""

    name = "NAME=PORT[/PROTO]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> NamedPort:
        if isinstance(value, NamedPort):
            return value
        try:
            return parse_port_spec(str(value))
        except PortSpecError as e:
            self.fail(str(e), param, ctx)


LABELS = LabelsType()
CONFIG_HELP = "Node config (default /etc/meshagent/agent.yaml)."
# The apply limits' defaults, as agent/resources/_limits.py has them (a unit test keeps them equal;
# the CLI does not import agent.resources until a file is read).
MAX_BYTES_DEFAULT = "8MiB"
MAX_DOCUMENT_BYTES_DEFAULT = "3MiB"
VERDICTS = ("FORWARDED", "DROPPED", "REDIRECTED", "AUDIT")
IPV4 = IPv4Type()


def output_option(*formats: str):
    formats = formats or out.OUTPUT_FORMATS
    return click.option(
        "-o", "--output", type=click.Choice(formats), default=formats[0], show_default=True,
        help="Output format.",
    )


def emit(data: Any, fmt: str, as_text) -> None:
    text = out.render(data, fmt, as_text)
    if text:
        click.echo(text)


def _drain(stream: Iterator[dict], on_item) -> Any:
    """Feed each streamed item to ``on_item``; return the final result."""
    while True:
        try:
            item = next(stream)
        except StopIteration as stop:
            return stop.value
        on_item(item)


# ---- the commands ------------------------------------------------------------------------------


@click.group(
    cls=MeshGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
    epilog=examples(
        "meshagent status",
        "meshagent --node node2 endpoint list",
        "meshagent apply -f examples/",
        "meshagent flows --follow --verdict DROPPED",
        "meshagent policy trace --from-label app=client --to-label app=server --dport 80/tcp",
    ),
)
@click.option("--node", envvar="MESHAGENT_NODE", metavar="NAME",
              help="Node whose agent to talk to (default: this host's; env MESHAGENT_NODE).")
@click.option("--config", "config_path", envvar="MESHAGENT_CONFIG", metavar="FILE",
              help="Node config whose api_socket to use (env MESHAGENT_CONFIG).")
@click.option("--socket", "socket_path", metavar="PATH", help="Agent API socket, overriding the above.")
@click.version_option(__version__, prog_name="meshagent", message="%(prog)s %(version)s")
@click.pass_context
def cli(ctx: click.Context, node: str | None, config_path: str | None, socket_path: str | None) -> None:
    """meshagent: a sidecarless eBPF service mesh, one agent per node.

    Talks to the node agent over its API socket; exit 0 on success, 1 when something could not
    be done (one line on stderr), 2 on a usage error.
    """
    ctx.obj = Target(node=node, config=config_path, socket=socket_path)


@cli.command(epilog=examples(
    "meshagent agent                                  # /etc/meshagent/agent.yaml or defaults",
    "meshagent agent --config /etc/meshagent/node2.yaml",
))
@click.option("--config", "config_path", metavar="FILE", help=CONFIG_HELP)
@pass_target
def agent(target: Target, config_path: str | None) -> None:
    """Run the node agent in the foreground.

    On SIGTERM/SIGINT it exits and leaves the datapath attached and enforcing; the next agent
    adopts it.
    """
    from agent.daemon import run_agent

    if target.node and not (config_path or target.config):
        os.environ["MESHAGENT_NODE"] = target.node  # the daemon's default node name
    sys.exit(run_agent(config_path or target.config))


@cli.command(epilog=examples(
    "meshagent status",
    "meshagent status -o json",
    "until meshagent status >/dev/null 2>&1; do sleep 1; done   # wait for readiness",
))
@output_option()
@pass_target
def status(target: Target, output: str) -> None:
    """Show the agent's state; exit 0 only if it is ready."""
    result = target.client().call("status")
    emit(result, output, out.status_text)
    if not result.get("ready"):
        raise click.ClickException(out.not_ready_reason(result))


def limit_options(f):
    """--max-bytes and --max-document-bytes, for the commands that read YAML files."""
    f = click.option(
        "--max-document-bytes", type=SizeType(), default=MAX_DOCUMENT_BYTES_DEFAULT, show_default=True,
        envvar="MESHAGENT_APPLY_MAX_DOCUMENT_BYTES",
        help="Largest one document may be, as JSON with its YAML aliases expanded "
             "(env MESHAGENT_APPLY_MAX_DOCUMENT_BYTES; the agent reads that variable from its own environment).",
    )(f)
    return click.option(
        "--max-bytes", type=SizeType(), default=MAX_BYTES_DEFAULT, show_default=True,
        envvar="MESHAGENT_APPLY_MAX_BYTES",
        help="Most one command carries: the YAML it reads, and its documents as JSON, each all files "
             "together (env MESHAGENT_APPLY_MAX_BYTES).",
    )(f)


def _documents(paths: tuple[str, ...], max_bytes: int, max_document_bytes: int) -> list[dict]:
    """Read and validate the YAML files locally, so bad input fails before the agent is asked."""
    from agent.resources import MAX_BYTES_ENV, MAX_DOCUMENT_BYTES_ENV, Limits, load_paths

    limits = Limits(max_bytes, max_document_bytes, raise_bytes=f"use --max-bytes or {MAX_BYTES_ENV}",
                    raise_document_bytes=f"use --max-document-bytes or {MAX_DOCUMENT_BYTES_ENV}")
    resources = load_paths(list(paths), limits)
    if not resources:
        raise click.ClickException(f"no resources found in {', '.join(paths)}")
    return [
        {"where": getattr(r, "where", f"{r.kind} {r.namespace}/{r.name}"), "body": r.body}
        for r in resources
    ]


@cli.command(epilog=examples(
    "meshagent apply -f examples/web.yaml",
    "meshagent apply -f policies/ -f services.yaml",
    "meshagent apply -f big-policy.yaml --max-document-bytes 6MiB",
))
@click.option("-f", "--filename", "paths", multiple=True, required=True, metavar="FILE|DIR",
              help="YAML file, or directory of .yaml/.yml files (repeatable).")
@limit_options
@pass_target
def apply(target: Target, paths: tuple[str, ...], max_bytes: int, max_document_bytes: int) -> None:
    """Create or update resources from YAML (all or nothing).

    Before any other check the input is held to limits, each refused with one line: at most
    --max-bytes (8MiB) of YAML read, all files together, and as much of documents as JSON; each
    document at most --max-document-bytes (3MiB) as JSON with its aliases expanded; and aliases may
    not make more of a document than Kubernetes' YAML decoder allows (99% of its nodes, less above
    400,000 nodes). The agent checks the documents' sizes again against its own
    MESHAGENT_APPLY_MAX_DOCUMENT_BYTES and MESHAGENT_APPLY_MAX_BYTES.

    Warnings (a deprecated field and how it is read, a namespace with no endpoints on the node yet)
    are printed as "Warning: ..." on stderr; they do not change the exit code.
    """
    documents = _documents(paths, max_bytes, max_document_bytes)
    result = target.client().call("apply", documents=documents)
    for line in out.warning_lines(result.get("warnings") or []):
        click.echo(line, err=True)
    for line in out.applied_lines(result.get("results") or []):
        click.echo(line)


def _kind_arg(value: str, allow_all: bool) -> str:
    if allow_all and value.lower() == "all":
        return "all"
    kind = out.canonical_kind(value)
    if kind is None:
        names = [aliases[0] for _, aliases in out.KINDS.values()] + (["all"] if allow_all else [])
        raise click.BadParameter(f"unknown kind {value!r}; use one of: {', '.join(names)}", param_hint="KIND")
    return kind


@cli.command(epilog=examples(
    "meshagent delete -f examples/web.yaml",
    "meshagent delete cnp allow-web",
    "meshagent delete virtualservice reviews -n shop",
    "meshagent delete namespace payments",
))
@click.argument("kind", required=False)
@click.argument("name", required=False)
@click.option("-f", "--filename", "paths", multiple=True, metavar="FILE|DIR",
              help="Delete the resources these YAML files describe (repeatable).")
@click.option("-n", "--namespace", metavar="NS", default="default", show_default=True,
              help="Namespace of NAME.")
@click.option("--ignore-not-found", is_flag=True, help="Exit 0 even if a resource does not exist.")
@limit_options
@pass_target
def delete(target: Target, kind: str | None, name: str | None, paths: tuple[str, ...], namespace: str,
           ignore_not_found: bool, max_bytes: int, max_document_bytes: int) -> None:
    """Delete resources, by file (-f) or as KIND NAME.

    Files are read as `apply` reads them, with the same limits.
    """
    if paths and kind:
        raise click.UsageError("give either -f FILE or KIND NAME, not both")
    if paths:
        args: dict[str, Any] = {"documents": _documents(paths, max_bytes, max_document_bytes)}
    elif kind and name:
        args = {"kind": _kind_arg(kind, allow_all=False), "namespace": namespace, "name": name}
    else:
        raise click.UsageError("give -f FILE|DIR, or KIND NAME")
    result = target.client().call("delete", **args)
    missing = 0
    for r in result.get("results") or []:
        if r.get("action") == "not found":
            missing += 1
            if not ignore_not_found:
                where = f" in namespace {r['namespace']}" if r.get("namespace") else ""
                click.echo(f"Error: {out.resource_ref(r['kind'], r['name'])} not found{where}", err=True)
        else:
            click.echo(f"{out.resource_ref(r['kind'], r['name'])} {r.get('action')}")
    if missing and not ignore_not_found:
        sys.exit(1)


@cli.command(epilog=examples(
    "meshagent get cnp                    # every CiliumNetworkPolicy, all namespaces",
    "meshagent get svc web -n shop -o yaml",
    "meshagent get ns                     # Namespaces (cluster-scoped) and their labels",
    "meshagent get all -o yaml > backup.yaml && meshagent apply -f backup.yaml",
))
@click.argument("kind")
@click.argument("name", required=False)
@click.option("-n", "--namespace", metavar="NS", help="Only this namespace (default: every namespace).")
@output_option()
@pass_target
def get(target: Target, kind: str, name: str | None, namespace: str | None, output: str) -> None:
    """List applied resources of KIND (or `all`), or show the one named NAME.

    KIND takes kubectl's names: service/svc, ciliumnetworkpolicy/cnp, networkpolicy/netpol,
    virtualservice/vs, destinationrule/dr, peerauthentication/pa, authorizationpolicy/ap,
    serviceentry/se, namespace/ns, all. `-o yaml` prints documents that `meshagent apply -f` takes back.
    """
    kind = _kind_arg(kind, allow_all=True)
    items = target.client().call("get", kind=kind).get("items") or []
    items = [
        i for i in items
        if (name is None or i.get("name") == name) and (namespace is None or i.get("namespace") == namespace)
    ]
    if name is not None and not items:
        where = f" in namespace {namespace}" if namespace else ""
        raise click.ClickException(f'{kind.lower()} "{name}" not found{where}')
    bodies = [i.get("body") for i in items]
    if output == "yaml":
        click.echo(out.as_yaml(bodies[0]) if name and len(bodies) == 1 else
                   "---\n".join(out.as_yaml(b) for b in bodies), nl=False)
    elif output == "json":
        click.echo(out.as_json(bodies[0] if name and len(bodies) == 1 else
                               {"apiVersion": "v1", "kind": "List", "items": bodies}))
    elif kind == "Namespace":
        click.echo(out.namespaces_table(items))
    else:
        click.echo(out.resources_table(items, with_kind=kind == "all"))


# ---- endpoints, identities, exec ---------------------------------------------------------------


@cli.group(epilog=examples(
    "meshagent endpoint add web-1 --labels app=web,tier=frontend",
    "meshagent endpoint list -o json",
    "meshagent endpoint label web-1 version=v2",
    "meshagent endpoint delete web-1",
))
def endpoint() -> None:
    """Create, list, relabel and delete the node's endpoints (workloads)."""


@endpoint.command("add", epilog=examples(
    "meshagent endpoint add client --labels app=client",
    "meshagent endpoint add web-1 --labels app=web,version=v1 --namespace shop --serviceaccount web",
    "meshagent endpoint add db --labels app=db --netns /run/netns/db --ip 10.200.0.50",
    "meshagent endpoint add x-b --namespace x --labels pod=b --port serve-80-tcp=80 --port serve-81-udp=81/UDP",
))
@click.argument("name")
@click.option("--labels", "labels", type=LABELS, required=True, help="The endpoint's labels.")
@click.option("--namespace", metavar="NS", default="default", show_default=True, help="Its namespace.")
@click.option("--serviceaccount", metavar="SA", default="default", show_default=True,
              help="Its service account (its SPIFFE identity).")
@click.option("--netns", metavar="PATH", help="Attach this existing network namespace instead of making one.")
@click.option("--ip", type=IPV4, help="Address from the node's pod CIDR (default: the next free one).")
@click.option("--port", "ports", type=NamedPortType(), multiple=True,
              help="A named port, as a pod's container port (PROTO: TCP, UDP or SCTP; default TCP); "
                   "policies may then say `port: NAME`. Repeatable.")
@output_option()
@pass_target
def endpoint_add(target: Target, name: str, labels: dict, namespace: str, serviceaccount: str,
                 netns: str | None, ip: str | None, ports: tuple[NamedPort, ...], output: str) -> None:
    """Create endpoint NAME (a network namespace plugged into the node); print its IP and identity."""
    try:
        checked = check_ports(ports)  # a name or a port/protocol given twice
    except PortSpecError as e:
        raise click.BadParameter(str(e), param_hint="'--port'") from None
    result = target.client().call(
        "endpoint_add", name=name, labels=labels, namespace=namespace, serviceaccount=serviceaccount,
        netns=netns, ip=ip, ports=[p.to_dict() for p in checked],
    )
    emit(result, output, lambda ep: out.endpoints_table([ep]))


@endpoint.command("list", epilog=examples("meshagent endpoint list", "meshagent endpoint list -o yaml"))
@output_option()
@pass_target
def endpoint_list(target: Target, output: str) -> None:
    """List the node's endpoints."""
    items = target.client().call("endpoint_list").get("items") or []
    emit(items, output, out.endpoints_table)


class LabelChangeType(click.ParamType):
    """kubectl label's arguments: ``KEY=VALUE`` sets or overwrites, ``KEY-`` removes ->
    ("set", key, value) or ("remove", key, "")."""

    name = "KEY=VALUE|KEY-"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple:
        if isinstance(value, tuple):
            return value
        text = str(value)
        try:
            if "=" not in text and text.endswith("-"):
                check_key(text[:-1])
                return ("remove", text[:-1], "")
            key, sep, val = text.partition("=")
            if not sep:
                self.fail(f"{text!r}: expected KEY=VALUE to set a label or KEY- to remove one", param, ctx)
            check_key(key)
            check_value(val)
        except LabelError as e:
            self.fail(str(e), param, ctx)
        return ("set", key, val)


@endpoint.command("label", epilog=examples(
    "meshagent endpoint label web-1 version=v2            # set or overwrite",
    "meshagent endpoint label web-1 tier=backend canary-  # set one, remove another",
))
@click.argument("name")
@click.argument("changes", nargs=-1, required=True, type=LabelChangeType(), metavar="KEY=VALUE|KEY-...")
@output_option()
@pass_target
def endpoint_label(target: Target, name: str, changes: tuple[tuple[str, str, str], ...], output: str) -> None:
    """Relabel endpoint NAME, as `kubectl label` does: it gets the identity of its new labels and
    policy follows (established flows re-checked)."""
    keys = [key for _, key, _ in changes]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise click.UsageError(f"label {twice[0]!r} is given more than once")
    labels = {key: val for op, key, val in changes if op == "set"}
    remove = [key for op, key, _ in changes if op == "remove"]
    result = target.client().call("endpoint_label", name=name, labels=labels, remove=remove)
    emit(result, output, lambda ep: out.endpoints_table([ep]))


@endpoint.command("delete", epilog=examples("meshagent endpoint delete web-1"))
@click.argument("name")
@pass_target
def endpoint_delete(target: Target, name: str) -> None:
    """Delete endpoint NAME (and its network namespace, if the agent made it)."""
    result = target.client().call("endpoint_delete", name=name)
    click.echo(f"endpoint {result.get('deleted', name)} deleted")


@cli.command(
    "exec",
    context_settings={"allow_interspersed_args": False},  # options after NAME belong to COMMAND
    epilog=examples(
        "meshagent exec client -- curl -s http://web/",
        "meshagent exec web-1 -- python3 -m http.server 80",
        "meshagent exec client -- ping -c1 10.200.0.12",
    ),
)
@click.argument("name")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@pass_target
def exec_(target: Target, name: str, command: tuple[str, ...]) -> None:
    """Run COMMAND inside endpoint NAME (its network namespace and cgroup); exit with its code."""
    if command[:1] == ("--",):  # options stop at NAME, so click hands the separator through
        command = command[1:]
    if not command:
        raise click.UsageError("missing COMMAND: meshagent exec NAME -- COMMAND [ARGS]...")
    ep = target.client().call("endpoint_get", name=name)
    if not ep.get("netns"):
        raise click.ClickException(f"the agent reports no network namespace for endpoint {name}")
    cgroup = ep.get("cgroup")
    if cgroup and os.path.isdir(cgroup):
        with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    sys.stdout.flush()
    sys.stderr.flush()
    netns = ep["netns"]
    try:
        if netns.startswith("/run/netns/"):
            # A named namespace: `ip netns exec` also bind-mounts /etc/netns/NAME/hosts over
            # /etc/hosts (localhost; the service names too when the node runs no DNS proxy, which
            # otherwise answers them: bpf/lib/dns.h).
            os.execvp("ip", ["ip", "netns", "exec", os.path.basename(netns), *command])
        os.execvp("nsenter", ["nsenter", f"--net={netns}", "--", *command])
    except FileNotFoundError as e:
        raise click.ClickException(f"{e.filename} not found: install iproute2 and util-linux") from None


@cli.group(epilog=examples("meshagent identity list"))
def identity() -> None:
    """Security identities (numbers derived from label sets)."""


@identity.command("list", epilog=examples("meshagent identity list", "meshagent identity list -o json"))
@output_option()
@pass_target
def identity_list(target: Target, output: str) -> None:
    """List reserved and allocated identities with their labels."""
    items = target.client().call("identity_list").get("items") or []
    emit(items, output, out.identities_table)


@cli.group(epilog=examples("meshagent service list"))
def service() -> None:
    """Services (virtual IPs load-balanced in the kernel)."""


@service.command("list", epilog=examples("meshagent service list", "meshagent service list -o json"))
@output_option()
@pass_target
def service_list(target: Target, output: str) -> None:
    """List services with their virtual IPs and backends."""
    items = target.client().call("service_list").get("items") or []
    emit(items, output, out.auto_table)


@cli.group(epilog=examples("meshagent node list", "meshagent --node n2 node list -o json"))
def node() -> None:
    """The nodes of the mesh (every node that shares this node's store)."""


@node.command("list", epilog=examples("meshagent node list", "meshagent node list -o json"))
@output_option()
@pass_target
def node_list(target: Target, output: str) -> None:
    """List every node with its node IP, pod CIDR and health (alive while its heartbeat is fresh)."""
    items = target.client().call("node_list").get("items") or []
    emit(items, output, out.auto_table)


# ---- flows -------------------------------------------------------------------------------------


@cli.command(epilog=examples(
    "meshagent flows --last 20",
    "meshagent flows --follow --verdict DROPPED",
    "meshagent flows --since 5m --to-label app=web --port 80 --protocol tcp",
    "meshagent flows --type l7 -o json | jq .l7.http.code",
    "meshagent flows --protocol dns --last 20",
))
@click.option("-f", "--follow", is_flag=True, help="Keep printing new flows until interrupted.")
@click.option("--last", type=click.IntRange(min=1), metavar="N", help="The last N matching flows.")
@click.option("--since", type=DurationType(), help="Flows of the last DURATION (30s, 5m, 1h).")
@click.option("--from-label", "from_label", type=FlowLabelsType(), multiple=True,
              help="Source carries the label(s) (repeatable; all must match; k8s:app=web, reserved:world).")
@click.option("--to-label", "to_label", type=FlowLabelsType(), multiple=True,
              help="Destination carries the label(s) (repeatable; all must match).")
@click.option("--from-ip", type=IPv4Type(cidr=True), help="Source address or CIDR.")
@click.option("--to-ip", type=IPv4Type(cidr=True), help="Destination address or CIDR.")
@click.option("--port", type=click.IntRange(1, 65535), metavar="PORT", help="Source or destination port.")
@click.option("--protocol", type=click.Choice(["tcp", "udp", "icmp", "dns"], case_sensitive=False),
              metavar="tcp|udp|icmp|dns", help="L4 protocol, or dns: the DNS proxy's flows (l7.dns).")
@click.option("--verdict", type=click.Choice(VERDICTS, case_sensitive=False), metavar="|".join(VERDICTS),
              help="Only flows with this verdict.")
@click.option("--type", "type_", type=click.Choice(["l4", "l7"], case_sensitive=False), metavar="l4|l7",
              help="Only L3/L4 (datapath) or L7 (HTTP, DNS) flows.")
@output_option("table", "json", "compact")
@pass_target
def flows(target: Target, follow: bool, last: int | None, since: float | None, from_label: tuple[list, ...],
          to_label: tuple[list, ...], from_ip: str | None, to_ip: str | None, port: int | None,
          protocol: str | None, verdict: str | None, type_: str | None, output: str) -> None:
    """Show flows observed by the datapath and the L7 processor, like `hubble observe`.

    `-o json` prints one Hubble-schema flow per line; `table` and `compact` print one line per flow.
    """
    filters = {
        "from_label": [label for labels in from_label for label in labels],
        "to_label": [label for labels in to_label for label in labels],
        "from_ip": from_ip,
        "to_ip": to_ip,
        "port": port,
        "protocol": protocol.lower() if protocol else None,
        "verdict": verdict.upper() if verdict else None,
        "type": type_.lower() if type_ else None,
    }

    def show(item: dict) -> None:
        if "flow" in item:
            click.echo(json.dumps(item["flow"]) if output == "json" else out.format_flow(item["flow"]))
            if follow:
                sys.stdout.flush()  # a pipe is block-buffered: a follower (| jq) sees each flow now
        elif "lost" in item:
            click.echo(out.lost_warning((item["lost"] or {}).get("count", 0)), err=True)

    stream = target.client(timeout=None if follow else 60.0).stream(
        "flows", last=last, since_s=since, follow=follow, filters=filters,
    )
    try:
        result = _drain(stream, show)
    except KeyboardInterrupt:  # the way to stop --follow
        return
    lost = (result or {}).get("lost_events") or 0
    if lost > 0:
        click.echo(out.lost_warning(lost), err=True)


# ---- policy --------------------------------------------------------------------------------------


@cli.group(epilog=examples("meshagent policy trace --from-label app=client --to-label app=web --dport 80"))
def policy() -> None:
    """Inspect how network policy decides traffic."""


@policy.command("trace", epilog=examples(
    "meshagent policy trace --from-label app=client --to-label app=web --dport 80/tcp",
    "meshagent policy trace --from-label app=a --from-namespace shop --to-label app=db --dport 5432",
    "meshagent policy trace --from-label app=client --to-label reserved=world --dport 53/udp",
    "meshagent policy trace --from-label app=client --to-ip 192.0.2.10 --dport 443",
    "meshagent policy trace --from-label app=client --to-fqdn api.example.com --dport 443",
))
@click.option("--from-label", "from_labels", type=LABELS, multiple=True,
              help="Labels of the source (repeatable); or --from-ip.")
@click.option("--to-label", "to_labels", type=LABELS, multiple=True,
              help="Labels of the destination (repeatable); or --to-ip.")
@click.option("--from-ip", type=IPV4, help="Address of the source: an endpoint's, or one outside the cluster.")
@click.option("--to-ip", type=IPV4, help="Address of the destination (ipBlocks and CIDR rules match it).")
@click.option("--to-fqdn", metavar="NAME",
              help="A DNS name: may the source look it up, and the verdict to each address it was given.")
@click.option("--from-namespace", metavar="NS", help="Namespace of the source (default: any).")
@click.option("--to-namespace", metavar="NS", help="Namespace of the destination (default: any).")
@click.option("--dport", type=PortProtoType(), required=True, help="Destination port and protocol.")
@output_option()
@pass_target
def policy_trace(target: Target, from_labels: tuple[dict, ...], to_labels: tuple[dict, ...],
                 from_ip: str | None, to_ip: str | None, to_fqdn: str | None, from_namespace: str | None,
                 to_namespace: str | None, dport: tuple[int, str], output: str) -> None:
    """Which verdict the datapath gives a new connection, and which rule decided it.

    Each side is given by labels or by address; the destination also by DNS name (--to-fqdn: the
    source's DNS rules, the toFQDNs rules matching the name, and the verdict to each address the
    source's FQDN cache holds for it). Exits 0 whatever the verdict.
    """
    for side, labels, ip, namespace, fqdn in (("from", from_labels, from_ip, from_namespace, None),
                                              ("to", to_labels, to_ip, to_namespace, to_fqdn)):
        given = [f"--{side}-{flag}" for flag, v in (("label", labels), ("ip", ip), ("fqdn", fqdn)) if v]
        if len(given) != 1:
            fqdn_flag = " or --to-fqdn" if side == "to" else ""
            raise click.UsageError(f"give --{side}-label or --{side}-ip{fqdn_flag} (one of them)")
        if namespace and not labels:
            raise click.UsageError(f"--{side}-namespace goes with --{side}-label, not {given[0]}")
    port, protocol = dport
    by_address = {k: v for k, v in (("from_ip", from_ip), ("to_ip", to_ip), ("to_fqdn", to_fqdn)) if v}
    result = target.client().call(
        "policy_trace",
        from_labels={k: v for labels in from_labels for k, v in labels.items()},
        to_labels={k: v for labels in to_labels for k, v in labels.items()},
        from_namespace=from_namespace, to_namespace=to_namespace, dport=port, protocol=protocol, **by_address,
    )
    emit(result, output, out.fqdn_trace_text if to_fqdn else out.trace_text)


# ---- fqdn ----------------------------------------------------------------------------------------


@cli.group(epilog=examples("meshagent fqdn cache list"))
def fqdn() -> None:
    """DNS-based policy (toFQDNs): what the DNS proxy answered the endpoints."""


@fqdn.group("cache", epilog=examples("meshagent fqdn cache list"))
def fqdn_cache() -> None:
    """The FQDN cache: per endpoint, the addresses of the names it looked up, and until when."""


@fqdn_cache.command("list", epilog=examples(
    "meshagent fqdn cache list",
    "meshagent fqdn cache list --endpoint client -o json",
))
@click.option("--endpoint", metavar="NAME", help="Only this endpoint's entries.")
@output_option()
@pass_target
def fqdn_cache_list(target: Target, endpoint: str | None, output: str) -> None:
    """List the addresses the DNS proxy gave each endpoint of this node, when each stops being allowed
    (max(TTL, tofqdns_min_ttl) after the answer; kept while a connection uses it), and the toFQDNs
    rules that allow it."""
    items = target.client().call("fqdn_cache_list", endpoint=endpoint).get("items") or []
    emit(items, output, out.fqdn_cache_table)


# ---- bpf -----------------------------------------------------------------------------------------


@cli.group(epilog=examples("meshagent bpf ct list", "meshagent bpf policy list -o json",
                           "meshagent bpf dump"))
def bpf() -> None:
    """Look at the datapath's BPF maps and programs."""


def _map_command(group: click.Group, name: str, op: str, what: str) -> None:
    @group.command("list", help=f"List the {what}.", epilog=examples(f"meshagent bpf {name} list",
                                                                     f"meshagent bpf {name} list -o json"))
    @output_option()
    @pass_target
    def list_(target: Target, output: str) -> None:
        items = target.client().call(op).get("items") or []
        emit(items, output, out.auto_table)


@bpf.group("ct", epilog=examples("meshagent bpf ct list"))
def bpf_ct() -> None:
    """The connection-tracking map."""


@bpf.group("ipcache", epilog=examples("meshagent bpf ipcache list"))
def bpf_ipcache() -> None:
    """The IP-to-identity map."""


@bpf.group("ipblock", epilog=examples("meshagent bpf ipblock list"))
def bpf_ipblock() -> None:
    """The NetworkPolicy ipBlock prefixes, matched by address (pods included)."""


@bpf.group("policy", epilog=examples("meshagent bpf policy list"))
def bpf_policy() -> None:
    """The policy map (what the kernel enforces)."""


@bpf.group("fastpath", epilog=examples("meshagent bpf fastpath list"))
def bpf_fastpath() -> None:
    """The socket fast path: same-node sockets whose bytes skip TCP (sockhash)."""


_map_command(bpf_ct, "ct", "bpf_ct_list", "connection-tracking entries")
_map_command(bpf_fastpath, "fastpath", "bpf_fastpath_list", "sockets on the socket fast path")
_map_command(bpf_ipcache, "ipcache", "bpf_ipcache_list", "prefixes and their identities")
_map_command(bpf_ipblock, "ipblock", "bpf_ipblock_list", "ipBlock prefixes and their CIDR identities")
_map_command(bpf_policy, "policy", "bpf_policy_list", "policy map entries per endpoint")


@bpf.command("dump", epilog=examples("meshagent bpf dump", "meshagent bpf dump redirect | less"))
@click.argument("program", default="policy")
def bpf_dump(program: str) -> None:
    """Print the complete C source BCC compiles for PROGRAM (policy, redirect)."""
    from agent.datapath.source import program_source

    click.echo(program_source(program), nl=False)


# ---- node lifecycle ------------------------------------------------------------------------------


@cli.command(epilog=examples(
    "meshagent teardown",
    "meshagent teardown --config /etc/meshagent/node2.yaml --endpoints",
))
@click.option("--config", "config_path", metavar="FILE", help=CONFIG_HELP)
@click.option("--endpoints", is_flag=True, help="Remove the node's endpoints too.")
@pass_target
def teardown(target: Target, config_path: str | None, endpoints: bool) -> None:
    """Remove everything the node installed (stop the agent first)."""
    cfg = target.node_config(config_path)
    from agent.node import teardown as node_teardown

    for line in node_teardown(cfg, endpoints=endpoints):
        click.echo(line)


@cli.command(epilog=examples("meshagent version"))
def version() -> None:
    """Print the meshagent version."""
    click.echo(f"meshagent {__version__}")


def main() -> None:
    cli(prog_name="meshagent")


if __name__ == "__main__":
    main()
