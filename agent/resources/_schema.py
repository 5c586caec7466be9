"""A small schema language for Kubernetes-style documents, and the one walker that checks values with it.

Schemas are data: every kind's document is a tree of the node types below (the tables are in
`_kinds.py`). The walker knows nothing about any kind. What a table cannot say (endPort >= port,
"exactly one of exact/prefix/regex") is a rule: a plain function attached to an `Obj`, run after the
object's fields have passed, so a rule may rely on their types.

Errors are raised as `Invalid(path, message)`, where path is the user's view of the field
(``spec.ingress[0].toPorts[0].ports[1].port``); `agent.resources` adds the file and document.
Messages are plain text, never format strings: table text and user values are joined with f-strings
only, so braces in either (``use percentage: {value: N}``) are just characters.

A field upstream deprecated but still reads (`Deprecated`) is accepted; the walker then adds a note
to the ``notes`` list it is given, which the caller turns into a warning.
"""

from __future__ import annotations

import re
import reprlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


class Invalid(Exception):
    """A value does not fit its schema."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.message = message


class Node:
    """Base of the schema node types."""


@dataclass(frozen=True)
class Scalar(Node):
    """A leaf: one of ``types`` (bool never counts as int), then ``check`` (raises ValueError)."""

    types: tuple[type, ...]
    what: str  # for "expected <what>": "a string", "a port number"
    check: Callable[[Any], object] | None = None


@dataclass(frozen=True)
class Enum(Node):
    values: tuple[str, ...]
    # Values upstream accepts that we knowingly reject: same error, but it says "not supported".
    unsupported: tuple[str, ...] = ()


@dataclass(frozen=True)
class ListOf(Node):
    item: Node
    non_empty: bool = False


@dataclass(frozen=True)
class MapOf(Node):
    key: Node
    value: Node


@dataclass(frozen=True)
class Required:
    """Marks a field of an `Obj` as required."""

    node: Node


@dataclass(frozen=True)
class Deprecated:
    """Marks a field of an `Obj` that upstream deprecated but still reads: accepted, checked against
    ``node``, and noted. ``read_as(value)`` says what it means in today's fields (``percentage:
    {value: 100}``); ``unless`` names newer fields that win over it when given too, as upstream reads
    them. Deprecated fields are not listed among the supported ones."""

    node: Node
    read_as: Callable[[Any], str]
    unless: tuple[str, ...] = ()


@dataclass(frozen=True)
class Unsupported:
    """Why a field upstream has is refused here, followed by the object's supported fields
    ("``why``; supported: a, b, c"). Where the list would not help, the table gives a plain string
    instead, used as the whole message."""

    why: str = "not supported"


Rule = Callable[[Mapping[str, Any], str], None]  # (the object, its path); raises Invalid
FieldSpec = Node | Required | Deprecated


@dataclass(frozen=True, eq=False)
class Obj(Node):
    """A mapping with known fields; any other key is an error naming the supported ones."""

    fields: Mapping[str, FieldSpec]
    # Fields upstream has and we do not: key -> an `Unsupported` reason, or the whole message.
    unsupported: Mapping[str, Unsupported | str] = field(default_factory=dict)
    rules: tuple[Rule, ...] = ()


# Values echoed in messages are cut short: a YAML alias bomb must not turn into a gigabyte repr.
_repr = reprlib.Repr()
_repr.maxstring = 60
_repr.maxother = 60
_repr.maxlevel = 2


def show(value: object) -> str:
    return _repr.repr(value)


_PLAIN_KEY = re.compile(r"[\w./:@*~-]{1,100}")


def key_text(key: object) -> str:
    """A mapping key as it appears in a path: bare if plain, else quoted."""
    return key if isinstance(key, str) and _PLAIN_KEY.fullmatch(key) else show(key)


def join(path: str, name: object) -> str:
    name = key_text(name)
    return f"{path}.{name}" if path else name


def describe(value: object) -> str:
    """What the user wrote, by YAML's names: 'a mapping', 'integer 80', 'null'."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"number {show(value)}"
    if isinstance(value, str):
        return f"string {show(value)}"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"a YAML {type(value).__name__}"


def _is(value: object, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool):  # YAML true/false must not pass as 1/0
        return bool in types
    return isinstance(value, types)


def supported(obj: Obj) -> str:
    return ", ".join(name for name, spec in obj.fields.items() if not isinstance(spec, Deprecated))


def refusal(obj: Obj, key: str) -> str | None:
    """The message for a field ``obj`` knowingly refuses, or None if it is not one of them."""
    reason = obj.unsupported.get(key)
    if isinstance(reason, Unsupported):
        return f"{reason.why}; supported: {supported(obj)}"
    return reason


def _node(spec: FieldSpec) -> Node:
    return spec.node if isinstance(spec, Required | Deprecated) else spec


def walk(node: Node, value: Any, path: str, notes: list[str] | None = None) -> None:
    """Check ``value`` against ``node``; raise Invalid at the first problem, in document order.
    Deprecated fields met on the way add a line each to ``notes`` (a path, then what it means)."""
    if notes is None:
        notes = []
    if isinstance(node, Obj):
        _walk_obj(node, value, path, notes)
    elif isinstance(node, ListOf):
        if not isinstance(value, list):
            raise Invalid(path, f"expected a list, got {describe(value)}")
        if node.non_empty and not value:
            raise Invalid(path, "must not be empty")
        for i, item in enumerate(value):
            walk(node.item, item, f"{path}[{i}]", notes)
    elif isinstance(node, MapOf):
        if not isinstance(value, dict):
            raise Invalid(path, f"expected a mapping, got {describe(value)}")
        for key, item in value.items():
            where = f"{path}[{key_text(key)}]"
            walk(node.key, key, where, notes)
            walk(node.value, item, where, notes)
    elif isinstance(node, Enum):
        if not isinstance(value, str) or value not in node.values:
            what = f"{show(value)} is not supported" if value in node.unsupported else f"unknown value {show(value)}"
            raise Invalid(path, f"{what}; supported: {', '.join(node.values)}")
    elif isinstance(node, Scalar):
        if not _is(value, node.types):
            hint = ""
            if node.types == (str,) and isinstance(value, bool | int | float):
                hint = " (quote it to make it a string)"
            raise Invalid(path, f"expected {node.what}, got {describe(value)}{hint}")
        if node.check is not None:
            try:
                node.check(value)
            except ValueError as e:
                raise Invalid(path, str(e)) from None
    else:  # pragma: no cover - a schema table bug, not user input
        raise TypeError(f"not a schema node: {node!r}")


def _walk_obj(node: Obj, value: Any, path: str, notes: list[str]) -> None:
    if not isinstance(value, dict):
        raise Invalid(path, f"expected a mapping, got {describe(value)}")
    for key, item in value.items():
        spec = node.fields.get(key) if isinstance(key, str) else None
        if spec is None:
            reason = refusal(node, key) if isinstance(key, str) else None
            raise Invalid(join(path, key), reason or f"unknown field; supported: {supported(node)}")
        walk(_node(spec), item, join(path, key), notes)
        if isinstance(spec, Deprecated):
            notes.append(_deprecation(spec, value, item, join(path, key)))
    for name, spec in node.fields.items():
        if isinstance(spec, Required) and name not in value:
            raise Invalid(join(path, name), "required field missing")
    for rule in node.rules:
        rule(value, path)


def _deprecation(spec: Deprecated, obj: Mapping[str, Any], value: Any, path: str) -> str:
    newer = [name for name in spec.unless if name in obj]
    if newer:
        return f"{path}: deprecated upstream, and ignored: {newer[0]} is given too and wins, as upstream reads them"
    return f"{path}: deprecated upstream; read as {spec.read_as(value)}, as upstream reads it; write that instead"


# Rule builders for the common cross-field constraints. Each returns a Rule.


def _present(obj: Mapping[str, Any], names: tuple[str, ...]) -> list[str]:
    return [n for n in names if n in obj]


def exactly_one_of(*names: str) -> Rule:
    def rule(obj: Mapping[str, Any], path: str) -> None:
        given = _present(obj, names)
        if len(given) != 1:
            got = f"got {', '.join(given)}" if given else "got none"
            raise Invalid(path, f"set exactly one of {', '.join(names)} ({got})")

    return rule


def at_most_one_of(*names: str) -> Rule:
    def rule(obj: Mapping[str, Any], path: str) -> None:
        given = _present(obj, names)
        if len(given) > 1:
            raise Invalid(path, f"set at most one of {', '.join(names)} (got {', '.join(given)})")

    return rule


def at_least_one_of(*names: str) -> Rule:
    def rule(obj: Mapping[str, Any], path: str) -> None:
        if not _present(obj, names):
            raise Invalid(path, f"set at least one of {', '.join(names)}")

    return rule


def requires(name: str, other: str) -> Rule:
    def rule(obj: Mapping[str, Any], path: str) -> None:
        if name in obj and other not in obj:
            raise Invalid(join(path, name), f"{name} needs {other}")

    return rule


def unique(list_field: str, key: str) -> Rule:
    """Items of ``obj[list_field]`` must not repeat ``item[key]`` (subset names, port names)."""

    def rule(obj: Mapping[str, Any], path: str) -> None:
        seen: set[object] = set()
        for i, item in enumerate(obj.get(list_field) or ()):
            if key in item:
                if item[key] in seen:
                    raise Invalid(f"{join(path, list_field)}[{i}].{key}", f"{show(item[key])} is used twice")
                seen.add(item[key])

    return rule
