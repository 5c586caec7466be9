"""Offsets of kernel struct members, from the running kernel's BTF (/sys/kernel/btf/vmlinux).

BCC compiles against the kernel headers it finds, which need not match the running kernel (on
these machines the headers are 6.1's and the kernel is newer: struct sock differs by 24 bytes
before sk_user_data). BCC has no CO-RE relocations, so the few kernel fields a program reads are
located here and handed to the compiler as -D constants (agent/datapath/sockets.py).
"""

from __future__ import annotations

import re
import subprocess
from functools import cache

VMLINUX_BTF = "/sys/kernel/btf/vmlinux"

_STRUCT = re.compile(r"^\[\d+\] STRUCT '(\w+)' size=\d+ vlen=\d+$")
_MEMBER = re.compile(r"^\s+'(\w+)' type_id=\d+ bits_offset=(\d+)")


@cache
def _struct_members(path: str = VMLINUX_BTF) -> dict[str, dict[str, int]]:
    """struct name -> member name -> byte offset, for every named struct (first definition wins)."""
    try:
        text = subprocess.run(["bpftool", "btf", "dump", "file", path, "format", "raw"], capture_output=True,
                              text=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    structs: dict[str, dict[str, int]] = {}
    current: dict[str, int] | None = None
    for line in text.splitlines():
        if line.startswith("["):
            m = _STRUCT.match(line)
            current = None
            if m and m.group(1) not in structs:
                current = structs[m.group(1)] = {}
        elif current is not None and (m := _MEMBER.match(line)):
            bits = int(m.group(2))
            if bits % 8 == 0:  # bitfields are of no use to a byte-offset reader
                current[m.group(1)] = bits // 8
    return structs


def member_offset(struct: str, member: str) -> int | None:
    """Byte offset of ``struct``.``member`` in the running kernel, or None if BTF does not have it."""
    return _struct_members().get(struct, {}).get(member)
