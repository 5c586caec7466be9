"""The node lab: several meshagent nodes on one machine, for tests, demos and development.

Each node is a network namespace with its own agent, all on one bridged underlay with an etcd:

    python -m lab up --nodes 3 [--store etcd|dir] [--tls]     # then: meshagent --node n1 status
    python -m lab status
    python -m lab down

or from Python (tests: the `lab` fixtures in tests/datapath/lab_fixtures.py):

    with Lab(nodes=3, store="dir") as lab:
        lab.node(1).cli("status")

`lab.lab` has the layout and the addresses; `lab.node_config` and `lab.etcd` are the configuration
writers the Vagrant VMs use too (vagrant/provision.sh).
"""

from lab.errors import LabError

__all__ = ["Lab", "LabError", "LabNode", "LabSpec", "down_by_name"]


def __getattr__(name: str):
    # Imported on first use, so that `python -m lab.node_config` (in a VM) loads only the writer.
    if name in __all__:
        from lab import lab as _lab

        return getattr(_lab, name)
    raise AttributeError(f"module 'lab' has no attribute {name!r}")
