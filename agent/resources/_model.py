"""The validated resource and the one error type of this package."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from agent.errors import MeshError

from ._kinds import AUDIT_ANNOTATION, KIND_INFO


class ResourceError(MeshError, ValueError):
    """A document the user gave is wrong. ``str(e)`` is one line naming file, document, field path and
    what is supported; the CLI prints it as is."""

    def __init__(self, message: str) -> None:
        # One line whatever went into it (a key with a line break, a YAML problem text).
        super().__init__(" ".join(part.strip() for part in message.splitlines() if part.strip()))


def audit_requested(body: dict) -> bool:
    """Annotated ``meshagent.io/audit: "true"``: the policy's denies only report (AUDIT verdict). The
    one reading of that annotation."""
    meta = body.get("metadata") if isinstance(body, dict) else None
    annotations = (meta.get("annotations") if isinstance(meta, dict) else None) or {}
    return isinstance(annotations, dict) and annotations.get(AUDIT_ANNOTATION) == "true"


@dataclass(frozen=True)
class Resource:
    """One validated document. ``body`` is the document exactly as loaded (nothing normalised), so
    downstream code reads upstream field names and must apply upstream defaults itself."""

    api_version: str  # as written, e.g. "cilium.io/v2"
    kind: str
    namespace: str  # metadata.namespace, or "default"; "" for a cluster-scoped kind (Namespace)
    name: str
    body: dict = field(hash=False, repr=False)
    where: str = field(default="", compare=False)  # "policies.yaml: document 2", for messages
    # One line each, naming the resource: deprecated fields it uses, and how they are read.
    warnings: tuple[str, ...] = field(default=(), compare=False)
    size: int = field(default=0, compare=False)  # about how many bytes the body takes as JSON

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.kind, self.namespace, self.name)

    @property
    def annotations(self) -> dict[str, str]:
        return dict(self.body.get("metadata", {}).get("annotations") or {})

    @property
    def audit(self) -> bool:
        return audit_requested(self.body)

    @property
    def store_key(self) -> str:
        return store_key(self.kind, self.namespace, self.name)

    def describe(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}" if self.namespace else f"{self.kind} {self.name}"


def cluster_scoped(kind: str) -> bool:
    info = KIND_INFO.get(kind)
    return info is not None and info.cluster_scoped


def store_key(kind: str, namespace: str, name: str) -> str:
    """Where a resource lives in the store: resources/KIND/NAMESPACE/NAME, or resources/KIND/NAME for
    a cluster-scoped kind (whose namespace is ignored)."""
    return f"resources/{kind}/{name}" if cluster_scoped(kind) else f"resources/{kind}/{namespace}/{name}"


def parse_store_key(key: str) -> tuple[str, str, str]:
    """resources/KIND/[NAMESPACE/]NAME -> (kind, namespace, name); namespace "" if cluster-scoped."""
    parts = key.split("/")
    if len(parts) == 3:
        return parts[1], "", parts[2]
    return parts[1], parts[2], parts[3]


def namespace_warning(resource: Resource, namespaces_in_use: Collection[str], node: str) -> str | None:
    """One line if ``resource`` acts on the endpoints of its namespace and ``node`` has none there
    (``namespaces_in_use``: the namespaces of its endpoints). kubectl would refuse a namespace that
    does not exist; here a namespace need not have a Namespace resource (it then has Kubernetes'
    implicit name label only), so the apply goes ahead and says so."""
    info = KIND_INFO.get(resource.kind)
    if info is None or not info.in_empty_namespace or resource.namespace in namespaces_in_use \
            or resource.namespace == info.mesh_wide_namespace:
        return None
    return (f"{resource.describe()}: namespace {resource.namespace} has no endpoints on node {node} yet; "
            f"{info.in_empty_namespace}")
