"""Labels and Kubernetes label selectors (matchLabels / matchExpressions), as pure functions.

An endpoint's *security labels* are its user labels plus two labels the agent adds, as Cilium does,
so that policies can scope by namespace and service account:

    io.kubernetes.pod.namespace=<namespace>
    io.cilium.k8s.policy.serviceaccount=<serviceaccount>
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from agent.errors import MeshError

NAMESPACE_LABEL = "io.kubernetes.pod.namespace"
SERVICEACCOUNT_LABEL = "io.cilium.k8s.policy.serviceaccount"
# Kubernetes labels every namespace with its own name; namespaceSelector matches on it.
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"

Labels = Mapping[str, str]

_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_KEY_RE = re.compile(rf"^([a-z0-9]([-a-z0-9.]{{0,251}}[a-z0-9])?/)?{_NAME}$")
_VALUE_RE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


class LabelError(MeshError, ValueError):
    """A label or selector written by the user is not valid."""


def check_key(key: str) -> None:
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
        raise LabelError(
            f"invalid label key {key!r}: use [prefix/]name, name of up to 63 chars of [A-Za-z0-9-_.]"
        )


def check_value(value: str) -> None:
    if not isinstance(value, str) or not _VALUE_RE.fullmatch(value):
        raise LabelError(
            f"invalid label value {value!r}: up to 63 chars of [A-Za-z0-9-_.], starting and ending alphanumeric"
        )


def parse_labels(text: str) -> dict[str, str]:
    """Parse ``k=v,k2=v2`` (the CLI form). Raises LabelError on malformed input."""
    labels: dict[str, str] = {}
    if not text.strip():
        return labels
    for item in text.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep:
            raise LabelError(f"invalid label {item.strip()!r}: expected KEY=VALUE")
        check_key(key)
        check_value(value)
        if key in labels:
            raise LabelError(f"label {key!r} given twice")
        labels[key] = value
    return labels


def format_labels(labels: Labels) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def security_labels(labels: Labels, namespace: str, serviceaccount: str) -> dict[str, str]:
    out = dict(labels)
    out[NAMESPACE_LABEL] = namespace
    out[SERVICEACCOUNT_LABEL] = serviceaccount
    return out


_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")


@dataclass(frozen=True)
class Requirement:
    key: str
    operator: str  # one of _OPERATORS
    values: tuple[str, ...] = ()

    def matches(self, labels: Labels) -> bool:
        present = self.key in labels
        if self.operator == "In":
            return present and labels[self.key] in self.values
        if self.operator == "NotIn":
            return not present or labels[self.key] not in self.values
        if self.operator == "Exists":
            return present
        return not present  # DoesNotExist


@dataclass(frozen=True)
class Selector:
    """A label selector. The empty selector matches everything."""

    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: Labels) -> bool:
        return all(r.matches(labels) for r in self.requirements)

    def with_label(self, key: str, value: str) -> Selector:
        """This selector, further restricted to ``key=value`` (used to scope by namespace)."""
        return Selector(self.requirements + (Requirement(key, "In", (value,)),))

    def constrains(self, key: str) -> bool:
        return any(r.key == key for r in self.requirements)

    @classmethod
    def from_dict(cls, spec: Mapping | None) -> Selector:
        """Build from ``{matchLabels: {...}, matchExpressions: [...]}``; raises LabelError."""
        if spec is None:
            return cls()
        if not isinstance(spec, Mapping):
            raise LabelError("a selector must be a mapping with matchLabels and/or matchExpressions")
        reqs: list[Requirement] = []
        match_labels = spec.get("matchLabels") or {}
        if not isinstance(match_labels, Mapping):
            raise LabelError("matchLabels must be a mapping of label keys to values")
        for key, value in match_labels.items():
            value = "" if value is None else str(value)
            check_key(str(key))
            check_value(value)
            reqs.append(Requirement(str(key), "In", (value,)))
        for i, expr in enumerate(spec.get("matchExpressions") or []):
            if not isinstance(expr, Mapping):
                raise LabelError(f"matchExpressions[{i}] must be a mapping with key, operator, values")
            key, op = expr.get("key"), expr.get("operator")
            values = tuple(str(v) for v in (expr.get("values") or []))
            check_key(str(key))
            if op not in _OPERATORS:
                raise LabelError(f"matchExpressions[{i}].operator {op!r}: supported: {', '.join(_OPERATORS)}")
            if op in ("In", "NotIn") and not values:
                raise LabelError(f"matchExpressions[{i}]: operator {op} needs a non-empty values list")
            if op in ("Exists", "DoesNotExist") and values:
                raise LabelError(f"matchExpressions[{i}]: operator {op} takes no values")
            reqs.append(Requirement(str(key), op, values))
        return cls(tuple(reqs))
