"""Constants read out of the datapath's C headers, for the tests that check their Python mirrors.

Only plain ``#define NAME <number>`` lines count (decimal or hex, an optional ``UL``-style suffix,
an optional one-line comment after the number): an expression such as ``(16 << 20)`` is not a
constant anyone mirrors. ``#ifndef`` defaults count like any other line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

BPF_LIB = Path(__file__).resolve().parents[2] / "bpf" / "lib"

_DEFINE = re.compile(
    r"^[ \t]*#[ \t]*define[ \t]+(\w+)[ \t]+(0[xX][0-9a-fA-F]+|\d+)[uUlL]*"
    r"[ \t]*(?:/\*[ \t]*(.*?)[ \t]*\*/)?[ \t]*$",
    re.MULTILINE,
)


@dataclass(frozen=True)
class Define:
    name: str
    value: int
    comment: str  # the comment on the same line, "" if none (or if it continues on the next line)


def define_list(header: str, prefix: str = "") -> list[Define]:
    """``#define``s of ``bpf/lib/<header>`` whose names start with ``prefix``, in file order."""
    text = (BPF_LIB / header).read_text()
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
