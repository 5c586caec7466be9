"""The Python mirror of the datapath's numbering must match the C headers."""

from agent.datapath import reasons
from tests.unit.agent.datapath.bpf_headers import define_list, defines


def _drop_reasons():
    return define_list("drop_reasons.h", "DROP_") + define_list("drop_reasons.h", "REASON_")


def test_drop_reasons_match_header():
    # The comment after each number is the name `meshagent flows` prints: a single word.
    assert {d.value: d.comment for d in _drop_reasons()} == reasons.DROP_REASONS


def test_drop_reason_numbers_unique():
    numbers = [d.value for d in _drop_reasons()]
    assert len(numbers) == len(set(numbers))


def test_policy_drop_reasons_match_header():
    policy = define_list("drop_reasons.h", "DROP_POLICY")
    assert {d.comment for d in policy} == reasons.POLICY_DROP_REASONS
    # The header's rule: DROP_POLICY* and POLICY_* go together, so the mirror's name test holds.
    for d in _drop_reasons():
        assert d.name.startswith("DROP_POLICY") == d.comment.startswith("POLICY_"), d.name


def test_verdicts_match_header():
    verdicts = defines("common.h", "VERDICT_")
    assert {v: k.removeprefix("VERDICT_") for k, v in verdicts.items()} == reasons.VERDICTS


def test_event_types_match_header():
    events = defines("events.h", "EVENT_")
    assert set(events.values()) == set(reasons.EVENT_TYPES)


def test_match_types_match_header():
    match = defines("policy.h", "MATCH_")
    assert set(match.values()) == set(reasons.MATCH_TYPES)


def test_unknown_reason_has_a_name():
    assert reasons.reason_name(250) == "UNKNOWN_REASON_250"
