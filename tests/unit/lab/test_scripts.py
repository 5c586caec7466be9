"""The multi-node demo's and the VMs' scripts parse, and the demo's resources validate."""

from __future__ import annotations

import subprocess

import pytest

from agent.resources import load_paths
from tests.paths import REPO


@pytest.mark.parametrize("script", ["examples/multinode/demo.sh", "vagrant/provision.sh"])
def test_script_parses(script):
    out = subprocess.run(["bash", "-n", str(REPO / script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_the_demo_resources_validate():
    resources = load_paths([str(REPO / "examples" / "multinode")])
    assert sorted((r.kind, r.name) for r in resources) == [("CiliumNetworkPolicy", "web-from-client"),
                                                            ("Service", "web")]
