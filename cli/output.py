"""What the meshagent CLI prints: aligned tables, JSON, YAML, and Hubble-style flow lines.

Pure functions from the agent's replies (plain dicts) to text: no I/O, no click, no sockets, so
each one is tested on its own (tests/unit/test_output.py). cli/main.py decides what to call and
where the text goes.

Tables look like kubectl's and cilium's: an upper-case header, columns padded with three spaces,
no trailing blanks. ``-o json`` and ``-o yaml`` print the agent's data as it came.

A flow line reads like `hubble observe`'s compact output (time in local time):

    Nov 25 20:01:02.123  default/client:34567 (ID:12345) -> default/server:80 (ID:23456)  \
        to-endpoint FORWARDED (TCP Flags: SYN)
    Nov 25 20:01:03.456  default/client:34568 (ID:12345) -> default/db:5432 (ID:34567)  \
        to-endpoint DROPPED (POLICY_DENIED) by default/deny-all default-deny
    Nov 25 20:01:04.001  default/client:34570 (ID:12345) <- default/web:80 (ID:23456)  \
        http-response FORWARDED (HTTP/1.1 200 3ms (GET http://web/))

(each is one line; a reply is printed with its arrow reversed, so the client stays on the left).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, tzinfo
from typing import Any

import yaml

from agent.identity import RESERVED
from agent.named_ports import ports_text
from agent.policy.icmp import ICMP_TYPE_NAMES
from agent.store.base import hhmmss

OUTPUT_FORMATS = ("table", "json", "yaml")

# Resource kinds (SPEC §4): canonical kind -> (API group, the names kubectl users type for it).
KINDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "Service": ("", ("service", "services", "svc")),
    "CiliumNetworkPolicy": ("cilium.io", ("ciliumnetworkpolicy", "ciliumnetworkpolicies", "cnp")),
    "NetworkPolicy": ("networking.k8s.io", ("networkpolicy", "networkpolicies", "netpol")),
    "VirtualService": ("networking.istio.io", ("virtualservice", "virtualservices", "vs")),
    "DestinationRule": ("networking.istio.io", ("destinationrule", "destinationrules", "dr")),
    "PeerAuthentication": ("security.istio.io", ("peerauthentication", "peerauthentications", "pa")),
    "AuthorizationPolicy": ("security.istio.io", ("authorizationpolicy", "authorizationpolicies", "ap")),
    "ServiceEntry": ("networking.istio.io", ("serviceentry", "serviceentries", "se")),
    "Namespace": ("", ("namespace", "namespaces", "ns")),
}


def canonical_kind(name: str) -> str | None:
    """``svc``, ``services``, ``Service``, ``cnp.cilium.io`` -> the canonical kind; None if unknown."""
    typed = name.lower()
    for kind, (group, aliases) in KINDS.items():
        names = {kind.lower(), *aliases}
        if typed in names or (group and typed in {f"{n}.{group}" for n in names}):
            return kind
    return None


def resource_ref(kind: str, name: str) -> str:
    """kubectl's way of naming a resource: ``ciliumnetworkpolicy.cilium.io/allow-web``, ``service/web``."""
    group = KINDS.get(kind, ("",))[0]
    return f"{kind.lower()}.{group}/{name}" if group else f"{kind.lower()}/{name}"


# ---- generic rendering -------------------------------------------------------------------------


def as_json(data: Any) -> str:
    return json.dumps(data, indent=2)


def as_yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


def render(data: Any, fmt: str, as_text: Callable[[Any], str]) -> str:
    """``data`` in the output format the user picked; ``as_text`` makes the table form."""
    if fmt == "json":
        return as_json(data)
    if fmt == "yaml":
        return as_yaml(data).rstrip("\n")
    return as_text(data)


def cell(value: Any) -> str:
    """One table cell: booleans as yes/no, label mappings as k=v,k=v, lists comma-joined, None as -."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Mapping):
        return labels_text(value)
    if isinstance(value, list | tuple):
        return ",".join(cell(v) for v in value) or "-"
    return str(value)


def labels_text(labels: Mapping[str, Any] | Iterable[str]) -> str:
    """``{"app": "web"}`` -> ``app=web``; a label with an empty value (``reserved:host``) prints alone."""
    if isinstance(labels, Mapping):
        parts = [f"{k}={v}" if v not in (None, "") else str(k) for k, v in sorted(labels.items())]
    else:
        parts = sorted(str(x) for x in labels)
    return ",".join(parts) or "-"


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Aligned columns under an upper-case header, three spaces apart, no trailing blanks."""
    lines = [[h.upper() for h in headers]] + [[cell(v) for v in row] for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(headers))]
    return "\n".join(
        "   ".join(text.ljust(width) for text, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def auto_table(items: Sequence[Mapping[str, Any]]) -> str:
    """A table whose columns are the first item's keys, in order (for raw map dumps)."""
    if not items:
        return ""
    keys = list(items[0])
    return table(keys, ([item.get(k) for k in keys] for item in items))


def key_values(pairs: Iterable[tuple[str, Any]]) -> str:
    """``Key:   value`` lines with the values aligned, like `cilium status`."""
    pairs = [(f"{k}:", cell(v)) for k, v in pairs]
    width = max((len(k) for k, _ in pairs), default=0)
    return "\n".join(f"{k.ljust(width)}   {v}".rstrip() for k, v in pairs)


# ---- one renderer per kind of reply ------------------------------------------------------------


def status_text(status: Mapping[str, Any]) -> str:
    programs = status.get("programs") or []
    pairs: list[tuple[str, Any]] = [
        ("Node", status.get("node")),
        ("Ready", status.get("ready")),
        ("Version", status.get("version")),
        ("Programs", ", ".join(f"{p.get('name')} ({_attached(p.get('attached'))})" for p in programs)),
        ("Endpoints", status.get("endpoints")),
        ("Policies", f"{status.get('policies', '-')} (revision {status.get('policy_revision', '-')})"),
        ("Policy enforcement", status.get("policy_enforcement")),
        ("Lost flow events", status.get("lost_events")),
        ("L7 processor", _l7_processor(status.get("l7_processor"))),
        ("Socket fast path", _fastpath(status.get("socket_fastpath"))),
        ("DNS proxy", _dns_proxy(status.get("dns_proxy"))),
        ("Node IP, pod CIDR", f"{status.get('node_ip', '-')}, {status.get('pod_cidr', '-')}"),
        ("Store", _store(status.get("store"), status.get("store_status"), status.get("last_sync_age_s"))),
        ("Peers", _peers(status.get("peers"))),
        ("BPF filesystem", status.get("bpffs_dir")),
        ("API socket", status.get("api_socket")),
    ]
    return key_values(pairs)


def _store(url: Any, st: Mapping[str, Any] | None, sync_age: Any) -> str:
    """``etcd://10.0.0.1:2379: connected, datapath synced 0.4s ago`` or ``...: unreachable since 12:03:04 (...)``."""
    if not st:
        return str(url or "-")
    if st.get("connected", True):
        state = "connected"
    else:
        since = st.get("since")
        when = hhmmss(since) if isinstance(since, int | float) else "?"
        state = f"unreachable since {when}" + (f" ({st['error']})" if st.get("error") else "")
    synced = f", datapath synced {sync_age}s ago" if sync_age is not None else ""
    return f"{st.get('url', url)}: {state}{synced}"


def _peers(peers: Any) -> str:
    if not peers:
        return "none"
    return ", ".join(f"{p.get('name')} ({p.get('node_ip')}, {p.get('health')})" for p in peers)


def _l7_processor(l7: Mapping[str, Any] | None) -> str:
    if not l7:
        return "-"
    state = f"pid {l7['pid']}" if l7.get("pid") else "not running"
    workers = l7.get("workers", 1)
    return (f"{state} on {l7.get('listen', '-')}, {workers} worker{'s' if workers != 1 else ''}, "
            f"{l7.get('restarts', 0)} restarts")


def _dns_proxy(dns: Mapping[str, Any] | None) -> str:
    """``10.200.0.1:15053 (UDP, TCP), forwarding to 10.0.0.2:53``."""
    if not dns:
        return "off (dns_proxy: false)"
    return f"{dns.get('listen', '-')} (UDP, TCP), forwarding to {', '.join(dns.get('upstreams') or ['-'])}"


def _fastpath(fp: Mapping[str, Any] | None) -> str:
    """``enabled, 1.2 MiB redirected in 31 messages, 2 fell back``."""
    if not fp:
        return "-"
    if not fp.get("enabled"):
        return "disabled (socket_fastpath: false)"
    counters = fp.get("counters") or {}
    redirected = counters.get("redirected", {})
    fell_back = sum(c.get("messages", 0) for name, c in counters.items() if name.startswith("pass_")
                    and name != "pass_fallen_back")
    return (f"enabled, {redirected.get('bytes', 0) / (1 << 20):.1f} MiB redirected in "
            f"{redirected.get('messages', 0)} messages, {fell_back} fell back to TCP")


def _attached(attached: Any) -> str:
    if isinstance(attached, bool):
        return "attached" if attached else "not attached"
    if isinstance(attached, int):  # a count of interfaces the program is attached to
        return f"attached to {attached} interface{'' if attached == 1 else 's'}"
    return cell(attached)


def not_ready_reason(status: Mapping[str, Any]) -> str:
    detached = [p.get("name") for p in status.get("programs") or [] if p.get("attached") is False]
    why = f": program {', '.join(map(str, detached))} not attached" if detached else ""
    return f"the agent on node {status.get('node', '?')} is not ready{why}"


def applied_lines(results: Iterable[Mapping[str, Any]]) -> list[str]:
    """``ciliumnetworkpolicy.cilium.io/allow-web created``, one per result, as kubectl prints them."""
    return [f"{resource_ref(r['kind'], r['name'])} {r['action']}" for r in results]


def warning_lines(warnings: Iterable[str]) -> list[str]:
    """The agent's warnings on an apply, as kubectl prints server warnings: ``Warning: <line>``."""
    return [f"Warning: {w}" for w in warnings]


def resources_table(items: Sequence[Mapping[str, Any]], with_kind: bool = False) -> str:
    columns = (["kind"] if with_kind else []) + ["namespace", "name", "apiVersion"]
    return table([c.upper() for c in columns], ([i.get(c) for c in columns] for i in items))


def namespaces_table(items: Sequence[Mapping[str, Any]]) -> str:
    """`get Namespace`: cluster-scoped, so its name and labels (as `kubectl get ns --show-labels`)."""
    return table(["NAME", "LABELS"], ([i.get("name"), labels_text(((i.get("body") or {}).get("metadata") or {})
                                                                   .get("labels") or {})] for i in items))


def endpoints_table(items: Sequence[Mapping[str, Any]]) -> str:
    return table(
        ["ID", "NAME", "NAMESPACE", "IP", "IDENTITY", "STATE", "LABELS", "PORTS"],
        (
            [e.get("ep_id"), e.get("name"), e.get("namespace"), e.get("ip"), e.get("identity"),
             e.get("state"), labels_text(e.get("labels") or {}), ports_text(e.get("ports"))]
            for e in items
        ),
    )


def identities_table(items: Sequence[Mapping[str, Any]]) -> str:
    return table(["ID", "LABELS"], ([i.get("id"), labels_text(i.get("labels") or {})] for i in items))


def trace_text(result: Mapping[str, Any]) -> str:
    steps = result.get("steps") or []
    rows = (
        [s.get("direction"), s.get("endpoint"), s.get("node", "-"), s.get("identity"), s.get("peer_identity"),
         s.get("verdict"), s.get("match"), _rule(s)]
        for s in steps
    )
    text = table(["DIRECTION", "ENDPOINT", "NODE", "IDENTITY", "PEER", "VERDICT", "MATCH", "DECIDED BY"], rows)
    named = [f"  {s.get('direction')} at {s.get('endpoint')}: {line}"
             for s in steps for line in s.get("named_ports") or ()]
    names = "\n\nNamed ports:\n" + "\n".join(named) if named else ""
    sources = sorted({s["source"] for s in steps if s.get("source")})
    read = f"\nRead from: {'; '.join(sources)}" if sources else ""
    return f"{text}{names}\n\nFinal verdict: {result.get('verdict', '?')}{read}"


def _expires(item: Mapping[str, Any]) -> str:
    """``Nov 25 20:01:02 (in 42s)``, or for an address kept by a connection ``... (expired 3s ago, in use)``."""
    when = flow_time(item.get("expires"))[:-4]
    left = item.get("expires_in_s")
    if not isinstance(left, int):
        return when
    if left >= 0:
        return f"{when} (in {left}s)"
    in_use = ", in use" if item.get("source") == "connection" else ""
    return f"{when} (expired {-left}s ago{in_use})"


def _allowed_by(item: Mapping[str, Any]) -> str:
    return "; ".join(f"rule {a.get('rule_id')}: {a.get('selector')} ({a.get('rule')})"
                     for a in item.get("allowed_by") or item.get("selectors") or ()) or "-"


def fqdn_cache_table(items: Sequence[Mapping[str, Any]]) -> str:
    """`meshagent fqdn cache list`: one row per endpoint, name and expiry."""
    return table(["ENDPOINT", "NAME", "IPS", "EXPIRES", "SOURCE", "ALLOWED BY"],
                 ([i.get("endpoint"), i.get("name"), i.get("ips"), _expires(i), i.get("source"), _allowed_by(i)]
                  for i in items))


def fqdn_trace_text(result: Mapping[str, Any]) -> str:
    """`policy trace --to-fqdn`: the lookup, the toFQDNs selectors, then each cached address's L4 trace."""
    lookup = result.get("lookup") or {}
    rule = f"rule {lookup['rule_id']}: {lookup.get('rule')}" if lookup.get("rule_id") else lookup.get("rule", "-")
    lines = [key_values([
        ("Lookup", f"{lookup.get('verdict')} {result.get('fqdn')} by {result.get('endpoint')}"),
        ("Decided by", rule),
        ("Why", lookup.get("reason")),
        ("toFQDNs", _allowed_by(result)),
    ])]
    addresses = result.get("addresses") or []
    if addresses:
        lines.append("")
        lines.append(table(["ADDRESS", "EXPIRES", "VERDICT", "DECIDED BY"], (
            [a.get("ip"), _expires(a), a.get("verdict"),
             "; ".join(f"{s.get('direction')}: {_rule(s)}" for s in a.get("steps") or ())]
            for a in addresses)))
    elif lookup.get("verdict") != "REFUSED":
        lines.append(f"\nThe FQDN cache holds no address of {result.get('fqdn')} for {result.get('endpoint')}: "
                     "toFQDNs allows only addresses the DNS proxy answered it; look the name up first.")
    lines.append(f"\nFinal verdict: {result.get('verdict', '?')}")
    return "\n".join(lines)


def _rule(step: Mapping[str, Any]) -> str:
    rule = step.get("rule") or "-"
    by_address = step.get("by_address")  # a NetworkPolicy ipBlock matched the peer's address
    if by_address:
        rule += f", peer address {by_address.get('address')} in {by_address.get('prefix')}"
    return f"rule {step['rule_id']}: {rule}" if step.get("rule_id") else rule


# ---- flows -------------------------------------------------------------------------------------

LOST_WARNING = "warning: {count} flow events were lost (ring buffer full); the list is incomplete"

_TCP_FLAGS = ("SYN", "ACK", "RST", "FIN", "PSH", "URG", "ECE", "CWR", "NS")
_TIME = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)?$")


def lost_warning(count: int) -> str:
    return LOST_WARNING.format(count=count)


def flow_time(value: Any, tz: tzinfo | None = None) -> str:
    """RFC 3339 (nanoseconds allowed) -> ``Nov 25 20:01:02.123`` in ``tz`` (default: local time)."""
    m = _TIME.match(str(value or ""))
    if not m:
        return str(value or "-")
    base, frac, zone = m.groups()
    micros = (frac or "0")[:6].ljust(6, "0")
    zone = "+00:00" if zone in (None, "Z") else zone
    t = datetime.fromisoformat(f"{base}.{micros}{zone}").astimezone(tz)
    return f"{t:%b %d %H:%M:%S}.{t.microsecond // 1000:03d}"


def format_flow(flow: Mapping[str, Any], tz: tzinfo | None = None) -> str:
    """One flow (Hubble's schema) as one `hubble observe`-like line."""
    src, dst = _peer(flow, "source"), _peer(flow, "destination")
    arrow = "->"
    if flow.get("is_reply"):  # as Hubble does: keep the connection's initiator on the left
        src, dst, arrow = dst, src, "<-"
    verdict = flow.get("verdict") or "UNKNOWN"
    parts = [_observation_point(flow, verdict), verdict]
    if verdict in ("DROPPED", "AUDIT") and flow.get("drop_reason_desc"):
        parts.append(f"({flow['drop_reason_desc']})")
    if (flow.get("l7") or {}).get("dns") is not None:
        parts.append(f"({flow.get('Summary') or 'DNS'})")  # the agent's, as Hubble prints it (flows.dns_summary)
    elif flow.get("l7"):
        parts.append(_l7_summary(flow["l7"]))
    elif verdict not in ("DROPPED", "AUDIT"):
        parts.append(_l4_summary(flow.get("l4") or {}))
    if flow.get("event_type") == "flow-end" and ("packets" in flow or "bytes" in flow):
        parts.append(f"packets={flow.get('packets', 0)} bytes={flow.get('bytes', 0)}")
    policy = flow.get("policy") or {}
    if verdict in ("DROPPED", "AUDIT") and policy.get("name"):
        parts += ["by", policy["name"]] + ([policy["path"]] if policy.get("path") else [])
    return f"{flow_time(flow.get('time'), tz)}  {src} {arrow} {dst}  {' '.join(p for p in parts if p)}"


def _peer(flow: Mapping[str, Any], side: str) -> str:
    ep = flow.get(side) or {}
    ip = (flow.get("IP") or {}).get(side) or "?"
    name = f"{ep.get('namespace') or 'default'}/{ep['pod_name']}" if ep.get("pod_name") else ip
    l4 = flow.get("l4") or {}
    ports = l4.get("TCP") or l4.get("UDP") or {}
    port = ports.get(f"{side}_port")
    text = f"{name}:{port}" if port is not None else name
    ident = ep.get("identity")
    if ident is None:
        return text
    reserved = RESERVED.get(ident) or next(
        (lbl for lbl in ep.get("labels") or [] if str(lbl).startswith("reserved:")), None
    )
    return f"{text} ({reserved.split(':', 1)[1]})" if reserved else f"{text} (ID:{ident})"


def _observation_point(flow: Mapping[str, Any], verdict: str) -> str:
    l7 = flow.get("l7")
    if l7 or flow.get("Type") == "L7":
        kind = (l7 or {}).get("type")
        proto = "dns" if (l7 or {}).get("dns") is not None else "http"
        return {"REQUEST": f"{proto}-request", "RESPONSE": f"{proto}-response"}.get(kind, "l7")
    if flow.get("event_type") == "flow-end":
        return "flow-end"
    if verdict == "REDIRECTED":
        return "to-proxy"
    return {"INGRESS": "to-endpoint", "EGRESS": "from-endpoint"}.get(flow.get("traffic_direction"), "trace")


def _l4_summary(l4: Mapping[str, Any]) -> str:
    if "TCP" in l4:
        flags = (l4["TCP"] or {}).get("flags") or {}
        names = [f for f in _TCP_FLAGS if flags.get(f)]
        return f"(TCP Flags: {', '.join(names)})" if names else "(TCP)"
    if "UDP" in l4:
        return "(UDP)"
    for key in ("ICMPv4", "ICMPv6"):
        if key in l4:
            icmp = l4[key] or {}
            if icmp.get("type") is None and "id" in icmp:  # an echo: agent/flows.py keeps its id, not its type
                return f"({key} echo id {icmp['id']})"
            icmp_type = icmp.get("type")
            return f"({key} {ICMP_TYPE_NAMES.get(icmp_type, f'type {icmp_type}')})"
    return ""


def _l7_summary(l7: Mapping[str, Any]) -> str:
    http = l7.get("http") or {}
    proto = http.get("protocol") or "HTTP/1.1"
    request = f"{http.get('method', '?')} {http.get('url', '?')}"
    if l7.get("type") == "RESPONSE":
        latency = f" {int(l7['latency_ns']) // 1_000_000}ms" if l7.get("latency_ns") is not None else ""
        flags = http.get("response_flags")
        flags = f" {flags}" if flags and flags != "-" else ""  # Envoy's: the processor answered itself
        return f"({proto} {http.get('code', '?')}{latency}{flags} ({request}))"
    return f"({proto} {request})"
