"""Constants read out of the datapath's C headers, for the tests that check their Python mirrors.

Only plain ``#define NAME <number>`` lines count (decimal or hex, an optional ``UL``-style suffix,
an optional comment after the number): an expression such as ``(16 << 20)`` is not a constant
anyone mirrors. ``#ifndef`` defaults count like any other line. A define whose value starts with a
digit but does not read as one of those is an error, so that no constant is skipped unnoticed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tests.paths import BPF

BPF_LIB = BPF / "lib"

# The comment may go on over the next lines: only its first line is kept.
_DEFINE = re.compile(
    r"^[ \t]*#[ \t]*define[ \t]+(\w+)[ \t]+(0[xX][0-9a-fA-F]+|\d+)[uUlL]*"
    r"[ \t]*(?:/\*[ \t]*(.*?)[ \t]*(?:\*/)?)?[ \t]*$",
    re.MULTILINE,
)
_NUMERIC_DEFINE = re.compile(r"^[ \t]*#[ \t]*define[ \t]+(\w+)[ \t]+\d", re.MULTILINE)


@dataclass(frozen=True)
class Define:
    name: str
    value: int
    comment: str  # the comment after the value (its first line), "" if none


def define_list(header: str, prefix: str = "") -> list[Define]:
    """``#define``s of ``bpf/lib/<header>`` whose names start with ``prefix``, in file order."""
    text = (BPF_LIB / header).read_text()
    unread = {m.group(1) for m in _NUMERIC_DEFINE.finditer(text)} - {m.group(1) for m in _DEFINE.finditer(text)}
    if unread:
        raise AssertionError(f"bpf/lib/{header}: cannot read #define {', '.join(sorted(unread))}")
    found = [
        Define(m.group(1), int(m.group(2), 0), m.group(3) or "")
        for m in _DEFINE.finditer(text)
        if m.group(1).startswith(prefix)
    ]
    if not found:
        raise AssertionError(f"no #define {prefix}* in bpf/lib/{header}")
    return found


def defines(header: str, prefix: str = "") -> dict[str, int]:
    """Name -> value of the ``#define``s of ``bpf/lib/<header>`` whose names start with ``prefix``."""
    return {d.name: d.value for d in define_list(header, prefix)}
