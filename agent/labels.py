"""Labels and Kubernetes label selectors (matchLabels / matchExpressions), as pure functions.

An endpoint's *security labels* are its user labels plus the labels the agent adds, as Cilium does,
so that policies can scope by namespace, namespace labels and service account:

    io.kubernetes.pod.namespace=<namespace>
    io.cilium.k8s.policy.serviceaccount=<serviceaccount>
    io.cilium.k8s.namespace.labels.<key>=<value>       each label of the endpoint's Namespace resource
    io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=<namespace>   always, as Kubernetes
                                                        labels every namespace with its name

A namespace with no Namespace resource has only that implicit name label, as Kubernetes' own
namespaces do before anyone labels them.
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
# Cilium's prefix for the labels of an endpoint's namespace among its security labels
# (k8sConst.PodNamespaceMetaLabelsPrefix).
NAMESPACE_LABELS_PREFIX = "io.cilium.k8s.namespace.labels."
# Labels the agent sets on every endpoint: a user may not set them on an endpoint.
RESERVED_KEYS = (NAMESPACE_LABEL, SERVICEACCOUNT_LABEL)

Labels = Mapping[str, str]

_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_KEY_RE = re.compile(rf"^([a-z0-9]([-a-z0-9.]{{0,251}}[a-z0-9])?/)?{_NAME}$")
_VALUE_RE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


class LabelError(MeshError, ValueError):
    """A label or selector written by the user is not valid."""


def check_key(key: str) -> None:
    # A namespace label among security labels keeps its own key after Cilium's prefix, so the whole
    # may be longer than a Kubernetes key: check the namespace's key itself.
    plain = key
    if isinstance(key, str) and key.startswith(NAMESPACE_LABELS_PREFIX) and len(key) > len(NAMESPACE_LABELS_PREFIX):
        plain = key[len(NAMESPACE_LABELS_PREFIX):]
    if not isinstance(plain, str) or not _KEY_RE.fullmatch(plain):
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


def reserved_key(key: str) -> bool:
    """Whether ``key`` is one the agent sets on every endpoint (the namespace, the service account,
    the namespace's labels), which a user cannot set on an endpoint."""
    return key in RESERVED_KEYS or key.startswith(NAMESPACE_LABELS_PREFIX)


def security_labels(labels: Labels, namespace: str, serviceaccount: str,
                    namespace_labels: Labels | None = None) -> dict[str, str]:
    """The labels an endpoint's identity is derived from (module doc). ``namespace_labels``: the
    labels of its Namespace resource, None if there is none."""
    out = dict(labels)
    for key, value in (namespace_labels or {}).items():
        out[NAMESPACE_LABELS_PREFIX + key] = value
    out[NAMESPACE_LABELS_PREFIX + NAMESPACE_NAME_LABEL] = namespace
    out[NAMESPACE_LABEL] = namespace
    out[SERVICEACCOUNT_LABEL] = serviceaccount
    return out


def namespace_labels_of(labels: Labels) -> dict[str, str]:
    """The labels of an endpoint's namespace, from its security labels: what a NetworkPolicy
    namespaceSelector matches. The implicit name label is there whatever the identity's age."""
    out = {k[len(NAMESPACE_LABELS_PREFIX):]: v for k, v in labels.items() if k.startswith(NAMESPACE_LABELS_PREFIX)}
    if NAMESPACE_LABEL in labels:
        out.setdefault(NAMESPACE_NAME_LABEL, labels[NAMESPACE_LABEL])
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

    def constrains_prefix(self, prefix: str) -> bool:
        return any(r.key.startswith(prefix) for r in self.requirements)

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
