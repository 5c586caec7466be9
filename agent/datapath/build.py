"""What compiling, loading and pinning BPF programs needs on this machine, for both datapaths.

BCC compiles at run time against the kernel headers under /lib/modules/$(uname -r)/build (there
is no package for this kernel: `make install` links Debian's generic headers, KERNEL-NOTES.md), and
every map is pinned under the node's bpffs directory so a restarted agent gets the same maps.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

from agent.errors import MeshError


class DatapathError(MeshError):
    """The kernel or the machine lacks something the datapath needs; the message says what."""

    culprit = "node"


def kernel_build_dir() -> Path:
    return Path("/lib/modules") / platform.release() / "build"


def check_kernel_headers() -> None:
    build = kernel_build_dir()
    if not (build / "include").is_dir():
        raise DatapathError(
            f"cannot compile BPF: no kernel headers at {build} (BCC needs them). Install Debian's "
            f"linux-headers-amd64 and link {build} and ../source to /usr/src/linux-headers-<ver>-amd64 "
            "and -common, which `make install` does"
        )


def import_bcc():
    """BCC's BPF class, or an error that says how to get it."""
    try:
        from bcc import BPF
    except ImportError:
        raise DatapathError(
            "cannot import bcc: install Debian's python3-bpfcc and run the agent from a virtualenv "
            "created with --system-site-packages (`make install` does both)"
        ) from None
    return BPF


def bpf_cflags(bpffs_dir: str, map_sizes: dict[str, int]) -> list[str]:
    """Load-time options as -D flags: where the pins live, and the map sizes."""
    return [f'-DPIN_DIR="{bpffs_dir}"', *(f"-D{k}={v}" for k, v in map_sizes.items())]


def ensure_bpffs(bpffs_dir: str) -> None:
    """Mount bpffs at /sys/fs/bpf if nothing is mounted there, then create the node's directory."""
    if not _is_bpffs("/sys/fs/bpf") and bpffs_dir.startswith("/sys/fs/bpf/"):
        os.makedirs("/sys/fs/bpf", exist_ok=True)
        subprocess.run(["mount", "-t", "bpf", "bpf", "/sys/fs/bpf"], check=True, capture_output=True)
    os.makedirs(bpffs_dir, exist_ok=True)
    if not _is_bpffs(bpffs_dir):
        raise DatapathError(f"{bpffs_dir} is not on a bpffs mount: mount one (mount -t bpf bpf /sys/fs/bpf)")


def _is_bpffs(path: str) -> bool:
    stat = os.statvfs(path) if os.path.exists(path) else None
    if stat is None:
        return False
    # statfs f_type is not in os.statvfs; read /proc/self/mounts instead.
    real = os.path.realpath(path)
    with open("/proc/self/mounts") as mounts:
        points = [line.split()[1] for line in mounts if line.split()[2] == "bpf"]
    return any(real == p or real.startswith(p.rstrip("/") + "/") for p in points)


def cgroup2_root(mounts: str = "/proc/self/mounts") -> str:
    """Where cgroup v2 is mounted: /sys/fs/cgroup/unified on these machines (v1 controllers beside
    it, KERNEL-NOTES.md), /sys/fs/cgroup on a pure v2 system such as Debian 12's default. The socket
    programs attach at its root; an endpoint's cgroup lives below it."""
    try:
        with open(mounts) as f:
            points = [line.split()[1] for line in f if len(line.split()) > 2 and line.split()[2] == "cgroup2"]
    except OSError:
        points = []
    for preferred in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
        if preferred in points:
            return preferred
    return points[0] if points else "/sys/fs/cgroup/unified"
