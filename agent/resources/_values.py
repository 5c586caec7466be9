"""Checks for single values: names, addresses, ports, durations, regexes, header names.

Each check takes a value already of the right Python type and raises ValueError with a message for
the user (the schema walker adds the field path). The parsers that downstream code also needs
(`parse_duration`, `port_number`) live here so there is one reading of each; ICMP type names are
`agent/policy/icmp.py`'s, which the policy compiler reads too.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable

from agent.labels import check_key, check_value
from agent.named_ports import policy_port_name
from agent.policy.icmp import icmp_type_number

from ._schema import show

# --- names -----------------------------------------------------------------------------------------

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
_HOST_LABEL = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?")


def dns_label(name: str) -> None:
    if not _DNS_LABEL.fullmatch(name):
        raise ValueError(
            f"{show(name)} is not a valid name: up to 63 lowercase letters, digits and '-', "
            "starting and ending with a letter or digit"
        )


def dns1035_label(name: str) -> None:
    """Service names: a DNS label that starts with a letter (Kubernetes' rule, as they become DNS names)."""
    if not _DNS1035_LABEL.fullmatch(name):
        raise ValueError(
            f"{show(name)} is not a valid Service name: up to 63 lowercase letters, digits and '-', "
            "starting with a letter and ending with a letter or digit"
        )


def dns_subdomain(name: str) -> None:
    if len(name) > 253 or not all(_DNS_LABEL.fullmatch(part) for part in name.split(".")):
        raise ValueError(
            f"{show(name)} is not a valid name: up to 253 lowercase letters, digits, '-' and '.', "
            "each dot-separated part starting and ending with a letter or digit"
        )


def host(name: str) -> None:
    """An Istio host: a DNS name, short name or IP, optionally with a leading ``*.``; or ``*``."""
    if name == "*":
        return
    bare = name[2:] if name.startswith("*.") else name
    if len(bare) > 253 or not all(_HOST_LABEL.fullmatch(part) for part in bare.split(".")):
        raise ValueError(f"{show(name)} is not a valid host: use a DNS name such as "
                         "reviews.default.svc.cluster.local or a wildcard such as *.example.com")


def service_host(name: str) -> None:
    """A destination host: like `host` but naming one service, so no wildcard."""
    if "*" in name:
        raise ValueError(f"{show(name)}: a destination host cannot be a wildcard")
    host(name)


def export_to(value: str) -> None:
    if value not in (".", "*"):
        try:
            dns_label(value)
        except ValueError:
            raise ValueError(f"{show(value)}: exportTo takes '.', '*' or a namespace name") from None


# agent.labels quotes a bad label whole; longer than this it cannot be valid, so say so here, shortly.
_MAX_LABEL_KEY = 253 + 1 + 63  # prefix/name
_MAX_LABEL_VALUE = 63


def label_key(key: str) -> None:
    if "\n" in key:  # agent.labels matches with `$`, which also accepts a trailing newline
        raise ValueError(f"invalid label key {show(key)}: contains a line break")
    if len(key) > _MAX_LABEL_KEY:
        raise ValueError(f"invalid label key {show(key)}: {len(key)} characters; at most a 253-character "
                         "prefix, '/' and a 63-character name")
    source, colon, _ = key.partition(":")
    if colon and "/" not in source:
        # Cilium users write source prefixes (k8s:app, reserved:host); we only have Kubernetes labels.
        hint = "; for reserved: labels use fromEntities/toEntities" if source == "reserved" else ""
        raise ValueError(f"invalid label key {show(key)}: label source prefixes such as {source}: "
                         f"are not supported, write the key without it{hint}")
    check_key(key)


def label_value(value: str) -> None:
    if "\n" in value:
        raise ValueError(f"invalid label value {show(value)}: contains a line break")
    if len(value) > _MAX_LABEL_VALUE:
        raise ValueError(f"invalid label value {show(value)}: {len(value)} characters; at most 63")
    check_value(value)


# --- addresses -------------------------------------------------------------------------------------


def cidr(text: str) -> ipaddress.IPv4Network:
    """An IPv4 CIDR with the prefix written out and no host bits set (Kubernetes and Cilium's rule)."""
    addr, slash, prefix = text.partition("/")
    if not slash or not re.fullmatch(r"[0-9]{1,2}", prefix):
        example = f"{addr}/32" if len(addr) <= 15 else "10.0.0.1/32"  # the user's address, if it could be one
        raise ValueError(f"{show(text)} is not a CIDR: write ADDRESS/PREFIX, e.g. 10.0.0.0/8 or {example}")
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as e:
        if "host bits set" not in str(e):
            raise ValueError(f"{show(text)} is not a valid IPv4 CIDR") from None
        fixed = ipaddress.ip_network(text, strict=False)
        raise ValueError(f"{text} has host bits set; did you mean {fixed}?") from None
    if net.version != 4:
        raise ValueError(f"{show(text)}: IPv6 is not supported; the mesh is IPv4-only")
    return net


def ipv4(text: str) -> ipaddress.IPv4Address:
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"{show(text)} is not a valid IPv4 address") from None
    if addr.version != 4:
        raise ValueError(f"{show(text)}: IPv6 is not supported; the mesh is IPv4-only")
    return addr


def ip_or_cidr(text: str) -> None:
    if "/" in text:
        cidr(text)
    else:
        ipv4(text)


def cluster_ip(text: str) -> None:
    if text != "None":  # "None" is Kubernetes' spelling of a headless service
        ipv4(text)


def endpoint_address(text: str) -> None:
    if text.startswith("unix://"):
        raise ValueError(f"{show(text)}: unix domain socket endpoints are not supported")
    try:
        ipv4(text)
    except ValueError:
        try:
            dns_subdomain(text.lower())
        except ValueError:
            raise ValueError(f"{show(text)} is neither an IPv4 address nor a host name") from None


# --- ports -----------------------------------------------------------------------------------------

_SERVICE_NAME = re.compile(r"[a-z0-9-]*[a-z][a-z0-9-]*", re.IGNORECASE)


def port_number(value: int | str) -> int:
    """A port written as 80 or "80" (Cilium's CRD uses strings) -> 80. Named ports are refused."""
    if isinstance(value, str):
        if _SERVICE_NAME.fullmatch(value):
            raise ValueError(f"named ports are not supported ({show(value)}); write the port number")
        if not re.fullmatch(r"[0-9]{1,5}", value):
            raise ValueError(f"{show(value)} is not a port number")
        value = int(value)
    if not 1 <= value <= 65535:
        raise ValueError(f"port {value} is out of range 1-65535")
    return value


def port(value: int | str) -> None:
    port_number(value)


def _policy_port(value: int | str, ignore_case: bool) -> None:
    """A policy's port: a number as `port` takes it, or a port name, resolved per endpoint."""
    if isinstance(value, str) and not re.fullmatch(r"[0-9]{1,5}", value) and _SERVICE_NAME.fullmatch(value):
        policy_port_name(value, ignore_case)
    else:
        port_number(value)


def np_port(value: int | str) -> None:
    """NetworkPolicy ports[].port: a number or a Kubernetes port name (lowercase)."""
    _policy_port(value, ignore_case=False)


def cnp_port(value: int | str) -> None:
    """CiliumNetworkPolicy toPorts[].ports[].port: a number or a port name in any case (Cilium
    lowercases names)."""
    _policy_port(value, ignore_case=True)


def is_port_name(value: object) -> bool:
    """Whether a policy's port value is a name rather than a number."""
    return isinstance(value, str) and not re.fullmatch(r"[0-9]{1,5}", value) and bool(_SERVICE_NAME.fullmatch(value))


# --- Istio values ----------------------------------------------------------------------------------

# Go's time.ParseDuration units, which is what Istio accepts ("250ms", "1.5s", "1m30s", "1h").
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_MAX_DURATION = 315_576_000_000.0  # protobuf Duration's largest value, in seconds


def parse_duration(text: str) -> float:
    """``"1m30s"`` -> 90.0 seconds. Raises ValueError."""
    total, pos = 0.0, 0
    while pos < len(text):
        m = _DURATION_PART.match(text, pos)
        if not m:
            raise ValueError(f"{show(text)} is not a duration: write e.g. 250ms, 1.5s, 1m or 1h")
        total += float(m[1]) * _DURATION_UNITS[m[2]]
        pos = m.end()
    if not text:
        raise ValueError("empty duration: write e.g. 250ms, 1.5s, 1m or 1h")
    if not math.isfinite(total) or total > _MAX_DURATION:
        raise ValueError(f"{show(text)} is too long a duration")
    return total


def duration(text: str) -> None:
    if parse_duration(text) < 0.001:  # Istio's minimum; also refuses "0s"
        raise ValueError(f"{show(text)}: duration must be at least 1ms")


def regex(text: str) -> None:
    # Istio uses RE2; Python's re is close enough to catch what a user gets wrong.
    try:
        re.compile(text)
    except (re.error, OverflowError, RecursionError, ValueError) as e:
        raise ValueError(f"invalid regular expression {show(text)}: {e}") from None


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token: what a header name may contain


def header_name(name: str) -> None:
    if not _TOKEN.fullmatch(name):
        raise ValueError(f"{show(name)} is not a valid HTTP header name")


def header_op_name(name: str) -> None:
    header_name(name)
    if name.lower() == "host":
        raise ValueError("the Host header cannot be set, added or removed; use rewrite.authority")


def http_method(name: str) -> None:
    if not _TOKEN.fullmatch(name):
        raise ValueError(f"{show(name)} is not a valid HTTP method")


def non_empty(text: str) -> None:
    if not text:
        raise ValueError("empty string is not allowed")


RETRY_ON = (
    "5xx", "gateway-error", "reset", "connect-failure", "retriable-4xx", "refused-stream",
    "retriable-status-codes",
)


def retry_on(text: str) -> None:
    for item in text.split(","):
        item = item.strip()
        if item in RETRY_ON or (re.fullmatch(r"[1-5][0-9][0-9]", item)):
            continue
        raise ValueError(f"retry condition {show(item)} is not supported; supported: "
                         f"{', '.join(RETRY_ON)} or HTTP status codes 100-599")


_WHEN_KEYS = (
    "source.ip", "remote.ip", "source.namespace", "source.principal", "destination.ip",
    "destination.port", "connection.sni",
)


def when_key(key: str) -> None:
    if key in _WHEN_KEYS or re.fullmatch(r"request\.headers\[[!#$%&'*+\-.^_`|~0-9A-Za-z]+\]", key):
        return
    if key.startswith("request.auth."):
        raise ValueError(f"{show(key)} needs JWT authentication (RequestAuthentication), "
                         "which is not supported")
    raise ValueError(f"condition key {show(key)} is not supported; supported: "
                     f"request.headers[NAME], {', '.join(_WHEN_KEYS)}")


# --- Cilium ICMP (the names are agent/policy/icmp.py's) --------------------------------------------


def icmp_type(value: int | str) -> None:
    if isinstance(value, str) and len(value) > 40:  # no name is this long; icmp.py would quote it whole
        raise ValueError(f"unknown ICMP type {show(value)}; supported: 0-255 or a name such as EchoRequest")
    icmp_type_number(value)


# --- numbers ---------------------------------------------------------------------------------------


def in_range(lo: float, hi: float) -> Callable[[float], None]:
    def check(value: float) -> None:
        if not lo <= value <= hi:  # written this way round so NaN fails too
            raise ValueError(f"{show(value)} is out of range {lo}-{hi}")

    return check
