"""Atomic file writes: the one way the agent replaces a file that someone may be reading.

Write a temporary file in the same directory, then rename it over the old one: a reader (the L7
processor polling its snapshot, `ip netns exec` binding a hosts file, another agent reading the
store) sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any


def write_atomic(path: str, text: str, mode: int = 0o644) -> None:
    """Replace ``path`` with ``text`` (creating its directory), readable as ``mode``."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_if_changed(path: str, text: str, mode: int = 0o644) -> bool:
    """Replace ``path`` with ``text`` unless it holds exactly that already; return whether it wrote."""
    with contextlib.suppress(FileNotFoundError, UnicodeDecodeError), open(path) as f:
        if f.read() == text:
            return False
    write_atomic(path, text, mode)
    return True


def write_json(path: str, value: Any, mode: int = 0o644) -> None:
    write_atomic(path, json.dumps(value, sort_keys=True), mode)
