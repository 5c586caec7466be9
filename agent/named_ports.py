"""Named ports: an endpoint's ports by name, as a pod's container ports give them, read in one place.

An endpoint may name its ports (`meshagent endpoint add web --port http=8080 --port dns=53/UDP`);
policies then say `port: http` and each endpoint's own number applies (agent/policy/compiler.py
resolves them). Pure: parsing and checking only, errors are `PortSpecError` (one line each).

Names follow Kubernetes' IANA_SVC_NAME rule for container ports (`IsValidPortName`): at most 15
characters of a-z, 0-9 and '-', at least one letter, no '--', no '-' at either end. Cilium's
CiliumNetworkPolicy accepts the same names in any case and compares them lowercased
(`ValidatePortName`), which `policy_port_name(..., ignore_case=True)` does.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from agent.errors import UserError

__all__ = ["NAME_RULE", "PROTOCOLS", "NamedPort", "PortSpecError", "check_ports", "parse_port_spec",
           "policy_port_name", "port_name_problem", "ports_of", "ports_text"]

PROTOCOLS = ("TCP", "UDP", "SCTP")  # a container port's protocols; TCP when not given
MAX_NAME = 15
NAME_RULE = "at most 15 characters of a-z, 0-9 and '-', with a letter, no '--' and no '-' at either end"
_CHARS = re.compile(r"[-a-z0-9]+")
_LETTER = re.compile(r"[a-z]")


class PortSpecError(UserError, ValueError):
    """An endpoint's port list is not valid (the request must be fixed)."""


@dataclass(frozen=True, order=True)
class NamedPort:
    name: str
    port: int  # 1-65535
    protocol: str = "TCP"  # one of PROTOCOLS

    def to_dict(self) -> dict:
        return {"name": self.name, "port": self.port, "protocol": self.protocol}

    def __str__(self) -> str:
        return f"{self.name}={self.port}/{self.protocol}"


def _short(value: object) -> str:
    """A value for an error message, never longer than a line's worth."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def port_name_problem(name: object, ignore_case: bool = False) -> str | None:
    """Why ``name`` is not a port name (Kubernetes' IsValidPortName), or None if it is one."""
    if not isinstance(name, str):
        return "a port name is a string"
    text = name.lower() if ignore_case else name
    if not text or len(text) > MAX_NAME:
        return f"a port name has 1-{MAX_NAME} characters"
    if not _CHARS.fullmatch(text):
        return "a port name has only a-z, 0-9 and '-'"
    if not _LETTER.search(text):
        return "a port name needs at least one letter (a-z)"
    if "--" in text or text[0] == "-" or text[-1] == "-":
        return "a port name has no '--' and no '-' at either end"
    return None


def policy_port_name(value: str, ignore_case: bool = False) -> str | None:
    """A policy's ``port`` string as a port name (lowercased with ``ignore_case``, as Cilium reads
    names), or None when it is a number. Raises ValueError when it is neither."""
    if value.strip().isdigit():
        return None
    problem = port_name_problem(value, ignore_case)
    if problem:
        raise ValueError(f"{_short(value)} is neither a port number nor a port name ({problem})")
    return value.lower() if ignore_case else value


def _check(name: object, port: object, protocol: object) -> NamedPort:
    problem = port_name_problem(name)
    if problem:
        raise PortSpecError(f"port name {_short(name)} is invalid: {problem}")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise PortSpecError(f"port {name}: {_short(port)} is not a port number 1-65535")
    proto = (protocol or "TCP").upper() if isinstance(protocol, str) or protocol is None else protocol
    if proto not in PROTOCOLS:
        raise PortSpecError(f"port {name}: protocol {_short(protocol)} is not one of {', '.join(PROTOCOLS)}")
    return NamedPort(str(name), port, proto)


def parse_port_spec(text: str) -> NamedPort:
    """``NAME=PORT[/PROTO]`` (``http=8080``, ``dns=53/udp``) -> NamedPort."""
    name, sep, rest = text.partition("=")
    if not sep:
        raise PortSpecError(f"{_short(text)}: write NAME=PORT[/PROTO], e.g. http=8080 or dns=53/UDP")
    number, _, proto = rest.partition("/")
    if not number.strip().isdigit() or len(number.strip()) > 5:
        raise PortSpecError(f"{_short(text)}: {_short(number)} is not a port number 1-65535")
    return _check(name.strip(), int(number), proto.strip() or None)


def check_ports(items: Iterable[NamedPort | Mapping[str, Any]]) -> list[NamedPort]:
    """An endpoint's whole port list, checked as Kubernetes checks a pod's container ports: each
    port valid, no name twice, no port/protocol under two names."""
    out: list[NamedPort] = []
    names: dict[str, NamedPort] = {}
    numbers: dict[tuple[int, str], NamedPort] = {}
    for item in items:
        if isinstance(item, Mapping):
            unknown = set(item) - {"name", "port", "protocol"}
            if unknown:
                first = _short(sorted(map(str, unknown))[0])
                raise PortSpecError(f"port {_short(item.get('name'))}: unknown field {first} "
                                    "(a port has name, port, protocol)")
            item = _check(item.get("name"), item.get("port"), item.get("protocol"))
        else:
            item = _check(item.name, item.port, item.protocol)
        if item.name in names:
            raise PortSpecError(f"port name {item.name} is given twice ({names[item.name]} and {item})")
        same = numbers.get((item.port, item.protocol))
        if same is not None:
            raise PortSpecError(f"port {item.port}/{item.protocol} is given twice, as {same.name} and {item.name}")
        names[item.name] = numbers[(item.port, item.protocol)] = item
        out.append(item)
    return out


def ports_of(items: object) -> tuple[NamedPort, ...]:
    """A stored endpoint record's ports, as the policy compiler takes them. Records made before
    endpoints had ports have none; an entry that does not check (a hand-edited store) is skipped,
    so one bad record never stops the node's policy."""
    out = []
    for item in items if isinstance(items, list) else ():
        try:
            out += check_ports([item]) if isinstance(item, Mapping) else []
        except PortSpecError:
            continue
    return tuple(out)


def ports_text(items: object) -> str:
    """``http=80/TCP,metrics=9090/TCP`` for tables; ``-`` for none."""
    return ",".join(str(p) for p in ports_of(items)) or "-"
