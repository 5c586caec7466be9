"""Every refusal the schema tables can make is one line, and nothing else is ever raised.

The cases come from the tables themselves (`_kinds.KIND_INFO`), so an entry added later is covered
without touching this file: for every `Obj` reachable in every kind's document, each of its
``unsupported`` entries and each `Required` field; for every `Enum`, an unknown value and each value
refused as unsupported; for every scalar and every map key, hostile values (braces and percent signs,
which once went through ``str.format``, huge numbers, wrong types). Each document is built to reach
exactly that place: the keys on the path, and in the target object only the required fields before
the one left out, filled with values a small generator finds valid. `Deprecated` fields are checked
the other way round: in a complete valid document, each gives one warning naming its path.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from agent.resources import ResourceError, validate
from agent.resources._kinds import KIND_INFO
from agent.resources._schema import (
    Deprecated,
    Enum,
    Invalid,
    ListOf,
    MapOf,
    Node,
    Obj,
    Required,
    Scalar,
    Unsupported,
    _is,
    refusal,
    walk,
)

# --- where every node of the tables is --------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    how: str  # "field" (of obj, named name), "item" (of a list), "value" (of a map, under a sample key)
    node: Node
    name: str = ""


@dataclass(frozen=True)
class Place:
    kind: str
    steps: tuple[Step, ...]
    node: Node

    @property
    def path(self) -> str:
        out = ""
        for s in self.steps:
            out += f".{s.name}" if s.how == "field" else "[0]" if s.how == "item" else "[k]"
        return out.lstrip(".")


def _places() -> Iterator[Place]:
    """Every schema node of every kind, once (at the first path that reaches it), depth first."""
    seen: set[int] = set()

    def visit(kind: str, steps: tuple[Step, ...], node: Node) -> Iterator[Place]:
        if id(node) in seen:
            return
        seen.add(id(node))
        yield Place(kind, steps, node)
        if isinstance(node, Obj):
            for name, spec in node.fields.items():
                child = spec.node if isinstance(spec, Required | Deprecated) else spec
                yield from visit(kind, (*steps, Step("field", node, name)), child)
        elif isinstance(node, ListOf):
            yield from visit(kind, (*steps, Step("item", node)), node.item)
        elif isinstance(node, MapOf):
            yield from visit(kind, (*steps, Step("value", node)), node.value)

    for kind, info in KIND_INFO.items():
        yield from visit(kind, (), info.schema)


PLACES = list(_places())

# --- values the tables accept --------------------------------------------------------------------

_STRINGS = ("x", "app", "web", "reviews", "10.0.0.0/8", "10.0.0.1", "1s", "80", "example.com", "GET",
            "5xx", "source.ip", "/x", "*", "ISTIO_MUTUAL", "mesh")
_NUMBERS = (80, 1, 0, 100, 200, 301, 50.0)


def sample(node: Node) -> Any:
    """A value ``node`` accepts (with every rule of an `Obj` holding); AssertionError if none is found."""
    if isinstance(node, Enum):
        return node.values[0]
    if isinstance(node, Scalar):
        for candidate in (*_STRINGS, *_NUMBERS, True):
            if _is(candidate, node.types) and _ok(node, candidate):
                return candidate
        raise AssertionError(f"no sample value for {node}: add one to _STRINGS or _NUMBERS")
    if isinstance(node, ListOf):
        return [sample(node.item)]
    if isinstance(node, MapOf):
        return {sample(node.key): sample(node.value)}
    assert isinstance(node, Obj)
    return complete(node, {})


def complete(obj: Obj, given: dict) -> dict:
    """``given`` plus the required fields, plus the fewest optional ones the rules need."""
    base = {name: sample(spec.node) for name, spec in obj.fields.items()
            if isinstance(spec, Required) and name not in given} | given
    optional = [name for name, spec in obj.fields.items()
                if not isinstance(spec, Required | Deprecated) and name not in base]
    for n in range(3):
        for extra in itertools.combinations(optional, n):
            value = base | {name: sample(obj.fields[name]) for name in extra}
            if _ok(obj, value):
                return value
    raise AssertionError(f"no valid sample for an object with fields {list(obj.fields)}")


def _ok(node: Node, value: Any) -> bool:
    try:
        walk(node, value, "")
    except (Invalid, ValueError):
        return False
    return True


def document(place: Place, leaf: Any, whole: bool = False) -> dict:
    """A document with ``leaf`` at ``place``: only the keys on the way there, or (``whole``) every
    object on the way completed with valid samples."""
    value = leaf
    for step in reversed(place.steps):
        if step.how == "field":
            value = complete(step.node, {step.name: value}) if whole else {step.name: value}
        elif step.how == "item":
            value = [value]
        else:
            value = {sample(step.node.key): value}
    versions = KIND_INFO[place.kind].api_versions
    head = {"apiVersion": versions[0], "kind": place.kind}
    return value | head if isinstance(value, dict) else head


def refused(doc: object, where: str = "t.yaml: document 1") -> str:
    """validate() either accepts ``doc`` or raises ResourceError with one short line; never anything else."""
    try:
        validate(doc, where)
    except ResourceError as e:
        message = str(e)
        assert message and "\n" not in message and message == message.strip(), message
        assert message.startswith(where), message
        assert "supported: {supported}" not in message, message  # a template left unfilled
        assert len(message) < 1000, message
        return message
    return ""


# --- the cases -----------------------------------------------------------------------------------

UNSUPPORTED = [(p, key) for p in PLACES if isinstance(p.node, Obj) for key in p.node.unsupported]
REQUIRED = [(p, name) for p in PLACES if isinstance(p.node, Obj)
            for name, spec in p.node.fields.items() if isinstance(spec, Required)]
ENUMS = [p for p in PLACES if isinstance(p.node, Enum)]
SCALARS = [p for p in PLACES if isinstance(p.node, Scalar)]
MAPS = [p for p in PLACES if isinstance(p.node, MapOf)]
DEPRECATED = [(p, name) for p in PLACES if isinstance(p.node, Obj)
              for name, spec in p.node.fields.items() if isinstance(spec, Deprecated)]

HOSTILE: tuple[Any, ...] = (
    "{value}", "{supported}", "{}", "{0}", "%s", "%(x)s", "%", "", " ", "\n", "a\nb", "x" * 10_000,
    -1, 0, 2**64, -(2**64), 10**400, 1e309, -1e309, math.nan, 1.5, True, None, [], {}, ["{value}"],
    {"{value}": "%s"}, {"x": {"y": ["{supported}"]}},
)


def _id(item) -> str:
    place, name = item if isinstance(item, tuple) else (item, "")
    return f"{place.kind}:{place.path}{'.' + name if name else ''}"


def test_the_tables_have_cases_of_every_sort():
    assert len(UNSUPPORTED) > 50 and len(REQUIRED) > 30 and len(ENUMS) > 10 and len(SCALARS) > 50
    assert {name for _, name in DEPRECATED} == {"percent", "mirrorPercent", "mirror_percent"}


@pytest.mark.parametrize("case", UNSUPPORTED, ids=_id)
def test_every_unsupported_entry_is_refused_in_one_line(case):
    place, key = case
    reason = place.node.unsupported[key]
    assert isinstance(reason, Unsupported) or (isinstance(reason, str) and reason.strip()), \
        f"{_id(case)}: an unsupported entry needs a reason"
    message = refused(document(place, {key: "{value: N}"}))
    expected = refusal(place.node, key)
    assert message.endswith(f"{key}: {expected}"), message


@pytest.mark.parametrize("case", REQUIRED, ids=_id)
def test_every_required_field_is_asked_for_in_one_line(case):
    place, name = case
    before = list(place.node.fields)[:list(place.node.fields).index(name)]
    partial = {n: sample(place.node.fields[n].node) for n in before
               if isinstance(place.node.fields[n], Required)}
    doc = document(place, partial)
    if not place.steps and name in ("apiVersion", "kind"):  # validate() asks for these two itself
        del doc[name]
    message = refused(doc)
    assert f"{name}: required field missing" in message, message


@pytest.mark.parametrize("place", ENUMS, ids=_id)
def test_every_enum_refuses_unknown_and_unsupported_values(place):
    assert "unknown value" in refused(document(place, "NoSuchValue{value}"))
    for value in place.node.unsupported:
        assert f"{value!r} is not supported" in refused(document(place, value))
    for value in HOSTILE:
        refused(document(place, value))


@pytest.mark.parametrize("place", SCALARS, ids=_id)
def test_every_scalar_refuses_hostile_values_in_one_line(place):
    for value in HOSTILE:
        refused(document(place, value))


@pytest.mark.parametrize("place", MAPS, ids=_id)
def test_every_map_refuses_hostile_keys_in_one_line(place):
    for key in ("{value}", "%s", "", "a\nb", "x" * 10_000, 0, -1, 1.5, None, True):
        refused(document(place, {key: sample(place.node.value)}))
    for value in HOSTILE:
        refused(document(place, {sample(place.node.key): value}))


@pytest.mark.parametrize("case", DEPRECATED, ids=_id)
def test_every_deprecated_field_is_accepted_with_one_warning(case):
    place, name = case
    spec = place.node.fields[name]
    value = sample(spec.node)
    doc = document(place, complete(place.node, {name: value}), whole=True)
    res = validate(doc, "t.yaml: document 1")
    lines = [w for w in res.warnings if f".{name}:" in w]
    assert len(lines) == 1, res.warnings
    assert lines[0].startswith(f"{place.kind} default/") and "deprecated" in lines[0], lines[0]
    assert spec.read_as(value) in lines[0]
