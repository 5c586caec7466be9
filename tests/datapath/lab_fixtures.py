"""Multi-node fixtures: a node lab (lab/) for a test module, imported by conftest.py.

    def test_across_nodes(lab):                    # 3 nodes, agents ready, the store of LAB_STORE
        n1, n2 = lab.node(1), lab.node(2)          # LabNode: .name .ip .pod_cidr .netns .api_socket
        client = n1.add_endpoint("c", "app=client") # (endpoint names are machine-wide today: make them unique)
        n2.cli("get", "CiliumNetworkPolicy")       # `meshagent --node <n2> get ...`
        n1.ns(["ip", "route"])                     # a command in node n1's namespace
        lab.stop_etcd(); lab.start_etcd()          # faults: also n1.kill_agent(), n1.start_agent()

    def test_etcd_tls(lab_factory):
        lab = lab_factory(nodes=2, store="etcd", tls=True)

Each lab has names of its own (lab `lt<hex>`, nodes `lt<hex>-n1`, ..., sockets
/run/meshagent/lt<hex>-n<i>.sock), so labs of runs in parallel and a demo lab never meet; pods are
10.(150 + i).0.0/24. Every lab is taken down at the module's end, also when a test fails, and on
SIGTERM (Ctrl-C is pytest's KeyboardInterrupt: the finalizers run).

LAB_STORE (env MESHAGENT_TEST_STORE, default dir) is the store of the `lab` fixture: `etcd` runs the
same tests on the lab's etcd.
"""

from __future__ import annotations

import contextlib
import os
import uuid

import pytest

from lab import Lab, LabSpec

LAB_STORE = os.environ.get("MESHAGENT_TEST_STORE", "dir")
TEST_POD_BASE = 150


def make_spec(nodes: int = 3, store: str = LAB_STORE, **kw) -> LabSpec:
    """A LabSpec with a name of its own (see the module's docstring)."""
    name = kw.pop("name", None) or f"lt{uuid.uuid4().hex[:6]}"
    kw.setdefault("pod_base", TEST_POD_BASE)
    kw.setdefault("node_prefix", f"{name}-")
    return LabSpec(name=name, nodes=nodes, store=store, **kw)


@pytest.fixture(scope="module")
def lab_factory():
    """``make(nodes=3, store=LAB_STORE, **LabSpec fields) -> Lab``, up; all go down at the module's end."""
    with contextlib.ExitStack() as stack:

        def make(nodes: int = 3, store: str = LAB_STORE, **kw) -> Lab:
            return stack.enter_context(Lab(make_spec(nodes, store, **kw)))

        yield make


@pytest.fixture(scope="module")
def lab(lab_factory) -> Lab:
    """Three nodes with their agents ready, on LAB_STORE."""
    return lab_factory()
