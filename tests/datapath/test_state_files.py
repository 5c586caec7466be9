"""The node's state is root's alone: every file the agent and its L7 processor keep (config snapshot
with client labels, CIDR identities, log, lock, PID file, flows socket, the store) is 0600 in 0700
directories. The one exception is an endpoint's hosts file, which its processes read as any user."""

from __future__ import annotations

import os
import stat
from pathlib import Path

SERVICE = """
apiVersion: v1
kind: Service
metadata: {name: files-web, namespace: default}
spec:
  selector: {app: files-web}
  ports: [{port: 80}]
"""


def _modes(root: str) -> dict[str, int]:
    out = {}
    for path in [Path(root), *Path(root).rglob("*")]:
        out[str(path)] = stat.S_IMODE(os.lstat(path).st_mode)
    return out


def test_state_files_are_private(node):
    web = node.add_endpoint("files-web", "app=files-web")
    node.apply(SERVICE)
    state, store = node.config["state_dir"], node.config["store"][len("dir://"):]
    found = {**_modes(state), **_modes(store)}
    names = {os.path.basename(p) for p in found}
    assert {f"l7-{node.name}.json", f"l7-{node.name}.pid", f"l7-{node.name}.log", f"agent-{node.name}.lock",
            f"cidr-identities-{node.name}.json"} <= names, sorted(names)
    loose = {p: oct(m) for p, m in found.items()
             if (os.path.isdir(p) and m != 0o700) or (not os.path.isdir(p) and m != 0o600)}
    assert not loose, loose
    assert stat.S_IMODE(os.stat(node.config["api_socket"]).st_mode) == 0o600
    hosts = f"/etc/netns/{node.netns_of(web)}/hosts"
    assert stat.S_IMODE(os.stat(hosts).st_mode) == 0o644, "processes in the endpoint read it as any user"
