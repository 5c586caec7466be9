"""The BPF C that BCC compiles, as one text.

BCC rewrites map calls (``map.lookup(&k)``) only in the file it is given, not in headers it
includes, so `bpf/lib/*.h` are spliced in here, each once, in include order. The result is what
`meshagent bpf dump` prints.
"""

from __future__ import annotations

import re
from pathlib import Path

BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"

_LOCAL_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.MULTILINE)


def expand(path: Path, seen: set[Path] | None = None) -> str:
    """Return ``path``'s text with every local ``#include "..."`` replaced by the file itself."""
    seen = set() if seen is None else seen
    path = path.resolve()
    seen.add(path)

    def splice(match: re.Match) -> str:
        target = (path.parent / match.group(1)).resolve()
        if target in seen:
            return f"/* {match.group(1)}: already included */"
        return f"/* ---- {target.parent.name}/{target.name} ---- */\n" + expand(target, seen)

    return _LOCAL_INCLUDE.sub(splice, path.read_text())


def program_source(name: str) -> str:
    """The complete source of ``bpf/<name>.c``."""
    return expand(BPF_DIR / f"{name}.c")
