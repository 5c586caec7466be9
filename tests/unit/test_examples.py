"""The shipped examples are valid resources (the demo applies them)."""

from pathlib import Path

from agent.resources import load_paths

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_examples_validate():
    kinds = {r.kind for r in load_paths([str(EXAMPLES)])}
    assert {"CiliumNetworkPolicy", "NetworkPolicy", "Service", "VirtualService", "DestinationRule"} <= kinds
