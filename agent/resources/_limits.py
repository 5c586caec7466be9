"""How much one apply may read and build, checked before any schema work.

Three limits, each refused with one line naming the limit and how to raise it:

- ``max_bytes``: what one apply carries (8 MiB): the YAML it reads, all its files together, and
  its documents as JSON, all together (aliases make the second larger than the first). Each file
  is read with at most the remaining budget plus one byte, so a 60 MB file costs 8 MiB of reading.
- ``max_document_bytes``: one document's size as JSON with its aliases expanded (3 MiB, the request
  body limit of kube-apiserver, `MaxRequestBodyBytes`: twice etcd's 1.5 MiB request limit, because
  JSON is larger than the protobuf etcd stores). Counted while the YAML is composed, from the node
  graph (an alias adds its anchor's size without expanding it), so a 6.8 KB alias bomb is refused
  before it becomes 7 MB of JSON; and counted again on the built value by `json_size`, which is how
  the agent checks what reaches it through the API.
- Excessive aliasing, decided as go-yaml v3 decides it for Kubernetes (`decode.go`: the
  ``allowedAliasRatio`` check in ``unmarshal``): once a document has more than 100 nodes from alias
  expansion and more than 1,000 in all, at most 99% of them may come from aliases, falling linearly to
  10% between 400,000 and 4,000,000 nodes. Not configurable, as in Kubernetes; the answer is to write
  the repeated parts out.

The CLI takes ``--max-bytes`` and ``--max-document-bytes``; both sides read
``MESHAGENT_APPLY_MAX_BYTES`` and ``MESHAGENT_APPLY_MAX_DOCUMENT_BYTES`` (the agent from its own
environment), as a number of bytes or with a unit: 16MiB, 512KiB, 4M.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii

from ._model import ResourceError

MAX_BYTES = 8 << 20
MAX_DOCUMENT_BYTES = 3 << 20
MAX_BYTES_ENV = "MESHAGENT_APPLY_MAX_BYTES"
MAX_DOCUMENT_BYTES_ENV = "MESHAGENT_APPLY_MAX_DOCUMENT_BYTES"

# go-yaml v3, decode.go: the alias-ratio range and the absolute floor below which it does not check.
ALIAS_RATIO_RANGE_LOW = 400_000
ALIAS_RATIO_RANGE_HIGH = 4_000_000
ALIAS_FLOOR = 100  # alias-expanded nodes
NODE_FLOOR = 1_000  # nodes in all


def allowed_alias_ratio(nodes: int) -> float:
    """The share of a document's ``nodes`` that may come from alias expansion (go-yaml v3)."""
    if nodes <= ALIAS_RATIO_RANGE_LOW:
        return 0.99
    if nodes >= ALIAS_RATIO_RANGE_HIGH:
        return 0.10
    return 0.99 - 0.89 * (nodes - ALIAS_RATIO_RANGE_LOW) / (ALIAS_RATIO_RANGE_HIGH - ALIAS_RATIO_RANGE_LOW)


def excessive_aliasing(aliased: int, nodes: int) -> bool:
    """go-yaml's test: ``aliased`` of a document's ``nodes`` so far came from alias expansion."""
    return aliased > ALIAS_FLOOR and nodes > NODE_FLOOR and aliased / nodes > allowed_alias_ratio(nodes)


# --- sizes as users write them -------------------------------------------------------------------

_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30}
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kKmMgG]i?)?[bB]?\s*")


def parse_size(text: str) -> int:
    """``"8MiB"``, ``"8Mi"``, ``"512KiB"``, ``"4M"`` (10^6), ``"8388608"`` -> bytes. Raises ValueError."""
    m = _SIZE.fullmatch(text)
    if not m:
        raise ValueError(f"{text!r:.40} is not a size: write bytes, or a number with KiB, MiB or GiB (e.g. 16MiB)")
    size = float(m[1]) * _UNITS[(m[2] or "").lower()]
    if not math.isfinite(size) or size < 1 or size > 1 << 40:
        raise ValueError(f"{text!r:.40}: a size must be between 1 byte and 1 TiB")
    return int(size)


def format_size(size: int) -> str:
    """8388608 -> ``8 MiB``; 1000 -> ``1000 bytes``."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    if size >= 1 << 20:
        return f"{size / (1 << 20):.1f} MiB"
    return f"{size} bytes"


# --- the limits of one apply ---------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """The limits one apply is held to, and how the reader of an error raises each: the CLI names its
    options, the agent its environment."""

    max_bytes: int = MAX_BYTES
    max_document_bytes: int = MAX_DOCUMENT_BYTES
    raise_bytes: str = f"set {MAX_BYTES_ENV}"
    raise_document_bytes: str = f"set {MAX_DOCUMENT_BYTES_ENV}"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Limits:
        """The agent's limits: the defaults, or its environment's. A bad value is a ResourceError."""
        sizes: dict[str, int] = {}
        for name, key in (("max_bytes", MAX_BYTES_ENV), ("max_document_bytes", MAX_DOCUMENT_BYTES_ENV)):
            if environ.get(key):
                try:
                    sizes[name] = parse_size(environ[key])
                except ValueError as e:
                    raise ResourceError(f"the agent's {key}: {e}") from None
        return cls(**sizes, raise_bytes=f"set {MAX_BYTES_ENV} in the agent's environment",
                   raise_document_bytes=f"set {MAX_DOCUMENT_BYTES_ENV} in the agent's environment")

    def too_many_bytes(self, what: str) -> ResourceError:
        """``what`` ("x.yaml: the file is", "this apply's documents are") is larger than max_bytes."""
        return ResourceError(f"{what} larger than {format_size(self.max_bytes)}, the most one apply may "
                             f"carry; to raise the limit, {self.raise_bytes}")

    def document_too_large(self, where: str, detail: str = "") -> ResourceError:
        return ResourceError(f"{where}: the document is larger than {format_size(self.max_document_bytes)} as "
                             f"JSON with its aliases expanded{detail}, the most one document may be; to raise "
                             f"the limit, {self.raise_document_bytes}")


def json_size(value: object, limit: int) -> int:
    """About how many bytes ``value`` takes as JSON (``json.dumps``' separators, ASCII), counting a
    value shared by several parents (a YAML alias) each time. Stops as soon as the count passes
    ``limit`` and returns it, so the walk is bounded even for a cyclic value."""
    total, stack = 0, [value]
    while stack and total <= limit:
        v = stack.pop()
        if isinstance(v, dict):
            total += 2 + 4 * len(v)  # {} and, per pair, ": " and ", "
            for k, item in v.items():
                total += _scalar_size(k) if isinstance(k, str) else _scalar_size(k) + 2  # keys become strings
                stack.append(item)
        elif isinstance(v, list | tuple):
            total += 2 + 2 * len(v)
            stack.extend(v)
        else:
            total += _scalar_size(v)
    return total


def str_size(text: str) -> int:
    """Exactly how many bytes ``text`` takes as a JSON string (``json.dumps``, ASCII)."""
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return len(text) + 2
    return len(encode_basestring_ascii(text))  # escapes: \n, \" and \uXXXX


def _scalar_size(v: object) -> int:
    if isinstance(v, str):
        return str_size(v)
    if v is None or isinstance(v, bool):
        return 5
    if isinstance(v, int):  # str() of a very long int raises (int_max_str_digits); its length will do
        return len(str(v)) if abs(v) < 10**18 else v.bit_length() * 30103 // 100000 + 2
    return len(repr(v))  # float, and anything else JSON would show in a few characters
