"""Parsing and validation of `meshagent apply -f FILE|DIR` documents (SPEC §4, §8).

Kubernetes-style YAML, several documents per file, of the kinds in `KINDS`. The input is first held to
`Limits` (bytes read, each document's size with its aliases expanded, go-yaml's alias ratio), then each
document is checked field by field against a schema table (`_kinds.py`) by one generic walker
(`_schema.py`); a field we do not support is an error naming the document, the field path and what is
supported. No I/O other than reading the files given.

    resources = load_paths(["examples/"])        # all documents valid, or ResourceError
    for r in resources:
        r.key, r.audit, r.body["spec"], r.warnings   # warnings: deprecated fields, how they are read
"""

from ._kinds import fault_percent, mirror_percent
from ._limits import (
    MAX_BYTES,
    MAX_BYTES_ENV,
    MAX_DOCUMENT_BYTES,
    MAX_DOCUMENT_BYTES_ENV,
    Limits,
    format_size,
    parse_size,
)
from ._load import KINDS, check_apply_size, load_paths, parse_documents, validate
from ._model import (
    Resource,
    ResourceError,
    audit_requested,
    cluster_scoped,
    namespace_warning,
    parse_store_key,
    store_key,
)
from ._values import parse_duration, port_number

__all__ = [
    "KINDS",
    "MAX_BYTES",
    "MAX_BYTES_ENV",
    "MAX_DOCUMENT_BYTES",
    "MAX_DOCUMENT_BYTES_ENV",
    "Limits",
    "Resource",
    "ResourceError",
    "audit_requested",
    "check_apply_size",
    "cluster_scoped",
    "fault_percent",
    "format_size",
    "load_paths",
    "mirror_percent",
    "namespace_warning",
    "parse_documents",
    "parse_duration",
    "parse_size",
    "parse_store_key",
    "port_number",
    "store_key",
    "validate",
]
