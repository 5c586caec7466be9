"""One reading of a duration: Istio fields (agent.resources.parse_duration) and the CLI's
`flows --since` (cli.main.DurationType) accept and refuse the same text, with the same value."""

from __future__ import annotations

import click
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.resources import parse_duration
from cli.main import DurationType

GOOD = {"30s": 30.0, "5m": 300.0, "1h30m": 5400.0, "500ms": 0.5, "1.5s": 1.5, ".5s": 0.5, "1.s": 1.0,
        "250us": 250e-6, "250µs": 250e-6, "100ns": 100e-9, "1h1m1s1ms": 3661.001}
BAD = ["", "30", "1d", "5 minutes", " 5m", "5m ", "-5m", "+5m", "5M", "1h 30m", "s", "m5", "1e3s", "0x10s"]


def cli(text: str) -> float:
    try:
        return DurationType().convert(text, None, None)
    except click.BadParameter as e:
        raise ValueError(e.message) from None


@pytest.mark.parametrize(("text", "seconds"), GOOD.items())
def test_both_accept(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)
    assert cli(text) == parse_duration(text)


@pytest.mark.parametrize("text", BAD)
def test_both_refuse(text):
    with pytest.raises(ValueError):
        parse_duration(text)
    with pytest.raises(ValueError):
        cli(text)


def test_the_cli_also_wants_it_positive():
    assert parse_duration("0s") == 0.0
    with pytest.raises(ValueError, match="must be positive"):
        cli("0s")


@given(st.text(alphabet="0123456789.smhnuµd -+", max_size=12))
def test_any_text_is_read_the_same(text):
    try:
        expected = parse_duration(text)
    except ValueError:
        with pytest.raises(ValueError):
            cli(text)
        return
    if expected > 0:
        assert cli(text) == expected
