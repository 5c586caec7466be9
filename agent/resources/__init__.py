"""Parsing and validation of `meshagent apply -f FILE|DIR` documents (SPEC §4, §8).

Kubernetes-style YAML, several documents per file, of the kinds in `KINDS`. Each document is checked
field by field against a schema table (`_kinds.py`) by one generic walker (`_schema.py`); a field we
do not support is an error naming the document, the field path and what is supported. No I/O other
than reading the files given.

    resources = load_paths(["examples/"])        # all documents valid, or ResourceError
    for r in resources:
        r.key, r.audit, r.body["spec"], r.warnings   # warnings: deprecated fields, how they are read
"""

from ._kinds import fault_percent, mirror_percent
from ._load import KINDS, load_paths, parse_documents, validate
from ._model import Resource, ResourceError, audit_requested
from ._values import parse_duration, port_number

__all__ = [
    "KINDS",
    "Resource",
    "ResourceError",
    "audit_requested",
    "fault_percent",
    "load_paths",
    "mirror_percent",
    "parse_documents",
    "parse_duration",
    "port_number",
    "validate",
]
