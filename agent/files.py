"""File writes: the one way the agent replaces a file that someone may be reading.

Write a temporary file in the same directory, then rename it over the old one: a reader (the L7
processor polling its snapshot, another agent reading the store) sees the old file or the new one,
never half of one. A file that is bind-mounted elsewhere (an endpoint's /etc/netns/NAME/hosts,
which `ip netns exec` mounts over /etc/hosts) is overwritten in place instead: the mount holds the
inode, and a rename would never reach it (`write_in_place`).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any

# The agent's own files hold workload names, labels and policy: root's alone (issue: 0644 leaked them).
FILE_MODE = 0o600
DIR_MODE = 0o700
# A file every process of an endpoint reads (its /etc/hosts), whatever user it runs as.
PUBLIC_FILE_MODE, PUBLIC_DIR_MODE = 0o644, 0o755


def make_dirs(path: str, mode: int = DIR_MODE) -> None:
    """os.makedirs, with ``mode`` on every directory it creates (os.makedirs gives it to the last one
    only, and the umask applies)."""
    missing = []
    while path and not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(directory, mode)
            os.chmod(directory, mode)


def private_dir(path: str) -> None:
    """Create ``path`` (and parents) and make it root's alone, also if it existed."""
    make_dirs(path)
    os.chmod(path, DIR_MODE)


def open_private(path: str, flags: int = os.O_WRONLY | os.O_CREAT | os.O_APPEND) -> int:
    """os.open with the agent's file mode (an existing file is made private too)."""
    fd = os.open(path, flags, FILE_MODE)
    os.fchmod(fd, FILE_MODE)
    return fd


def write_atomic(path: str, text: str, mode: int = FILE_MODE, dir_mode: int = DIR_MODE) -> None:
    """Replace ``path`` with ``text`` (creating its directory with ``dir_mode``), readable as ``mode``."""
    directory = os.path.dirname(path) or "."
    make_dirs(directory, dir_mode)
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


def write_in_place(path: str, text: str, mode: int = FILE_MODE, dir_mode: int = DIR_MODE) -> None:
    """Overwrite ``path`` with ``text`` keeping its inode, for a file that is bind-mounted elsewhere:
    `ip netns exec` mounts /etc/netns/NAME/hosts over a process's /etc/hosts, and a rename would
    leave that process with the old inode for good. The new text goes over the old one before the
    file is cut to its length, so a reader never finds it empty; for the moment of that one write it
    may see new lines followed by the tail of old ones, which the next read corrects (a rename is
    the better choice for any file nobody mounts)."""
    make_dirs(os.path.dirname(path) or ".", dir_mode)
    data = text.encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, mode)  # never through a planted link
    try:
        os.fchmod(fd, mode)
        done = 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], done)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


def write_text_if_changed(path: str, text: str, mode: int = FILE_MODE, dir_mode: int = DIR_MODE,
                          in_place: bool = False) -> bool:
    """Replace ``path`` with ``text`` unless it holds exactly that already (with ``mode``); return
    whether it wrote. ``in_place``: keep the inode (`write_in_place`), else rename (`write_atomic`)."""
    with contextlib.suppress(FileNotFoundError, UnicodeDecodeError), open(path) as f:
        if f.read() == text and os.stat(f.fileno()).st_mode & 0o777 == mode:
            return False
    (write_in_place if in_place else write_atomic)(path, text, mode, dir_mode)
    return True


def write_json(path: str, value: Any, mode: int = FILE_MODE) -> None:
    write_atomic(path, json.dumps(value, sort_keys=True), mode)
