"""The Python mirror of the datapath's numbering must match the C headers."""

import re
from pathlib import Path

from agent.datapath import reasons

BPF = Path(__file__).resolve().parents[2] / "bpf" / "lib"


def _defines(header: str, prefix: str) -> dict[str, int]:
    text = (BPF / header).read_text()
    return {m.group(1): int(m.group(2)) for m in re.finditer(rf"#define ({prefix}\w+)\s+(\d+)", text)}


def test_drop_reasons_match_header():
    text = (BPF / "drop_reasons.h").read_text()
    in_c = {int(m.group(2)): m.group(3)
            for m in re.finditer(r"#define (DROP_\w+|REASON_\w+)\s+(\d+)\s*/\* (\w+) \*/", text)}
    assert in_c == reasons.DROP_REASONS


def test_drop_reason_numbers_unique():
    text = (BPF / "drop_reasons.h").read_text()
    numbers = [int(n) for n in re.findall(r"#define (?:DROP|REASON)_\w+\s+(\d+)", text)]
    assert len(numbers) == len(set(numbers))


def test_verdicts_match_header():
    verdicts = _defines("common.h", "VERDICT_")
    assert {v: k.removeprefix("VERDICT_") for k, v in verdicts.items()} == reasons.VERDICTS


def test_event_types_match_header():
    events = _defines("events.h", "EVENT_")
    assert set(events.values()) == set(reasons.EVENT_TYPES)


def test_match_types_match_header():
    match = _defines("policy.h", "MATCH_")
    assert set(match.values()) == set(reasons.MATCH_TYPES)


def test_unknown_reason_has_a_name():
    assert reasons.reason_name(250) == "UNKNOWN_REASON_250"
