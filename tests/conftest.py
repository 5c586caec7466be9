"""The suites by privilege: tests/unit needs no root (pure logic, and the L7 processor on loopback);
every test under tests/datapath is marked `datapath` (root, a BPF-capable kernel, namespaces) and
skipped without root. `pytest -m "not datapath"` runs the first kind only."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

DATAPATH = Path(__file__).resolve().parent / "datapath"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if DATAPATH in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.datapath)
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="datapath tests need root")
        for item in items:
            if item.get_closest_marker("datapath"):
                item.add_marker(skip)
