"""Where things are in this checkout, for tests at any depth of the tree."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BPF = REPO / "bpf"
