"""Port ranges as aligned LPM blocks (agent/policy/portrange.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.policy.portrange import MAX_PORT, block_range, port_mask, prefix_covers, range_to_prefixes

ports = st.integers(min_value=0, max_value=MAX_PORT)


@pytest.mark.parametrize(
    ("start", "end", "expected"),
    [
        (80, 80, [(80, 16)]),
        (0, MAX_PORT, [(0, 0)]),
        (0, 0, [(0, 16)]),
        (MAX_PORT, MAX_PORT, [(MAX_PORT, 16)]),
        (8080, 8083, [(8080, 14)]),
        (8000, 8100, [(8000, 10), (8064, 11), (8096, 14), (8100, 16)]),
        (1024, 65535, [(1024, 6), (2048, 5), (4096, 4), (8192, 3), (16384, 2), (32768, 1)]),
    ],
)
def test_examples(start, end, expected):
    assert range_to_prefixes(start, end) == expected


def test_worst_cases():
    assert len(range_to_prefixes(1, MAX_PORT)) == 16
    assert len(range_to_prefixes(1, MAX_PORT - 1)) == 30


@pytest.mark.parametrize(("start", "end"), [(-1, 5), (5, 4), (0, MAX_PORT + 1)])
def test_rejects_bad_ranges(start, end):
    with pytest.raises(ValueError):
        range_to_prefixes(start, end)


def test_prefix_covers_examples():
    assert prefix_covers(0, 0, 443, 16)  # any port covers everything
    assert prefix_covers(8000, 10, 8050, 15)
    assert not prefix_covers(8050, 15, 8000, 10)  # the smaller block does not cover the larger
    assert not prefix_covers(8064, 11, 8050, 16)
    assert prefix_covers(80, 16, 80, 16)


@given(ports, ports)
def test_blocks_cover_the_range_exactly(a, b):
    start, end = min(a, b), max(a, b)
    blocks = range_to_prefixes(start, end)
    assert 1 <= len(blocks) <= 30
    spans = [block_range(port, prefix) for port, prefix in blocks]
    for (port, prefix), (first, _) in zip(blocks, spans, strict=True):
        assert port == first and port & ~port_mask(prefix) == 0  # aligned, canonical
    # In order, disjoint and contiguous: their union is exactly start..end.
    assert spans[0][0] == start and spans[-1][1] == end
    for (_, last), (first, _) in zip(spans, spans[1:], strict=False):
        assert first == last + 1
    # Minimal: no two neighbours could have been one aligned block.
    for (p1, l1), (p2, l2) in zip(blocks, blocks[1:], strict=False):
        assert not (l1 == l2 and l1 > 0 and p1 & port_mask(l1 - 1) == p1 and p2 == p1 + (1 << (16 - l1)))


@given(ports, st.integers(0, 16), ports, st.integers(0, 16))
def test_prefix_covers_is_block_containment(p1, l1, p2, l2):
    p1, p2 = p1 & port_mask(l1), p2 & port_mask(l2)
    (a1, b1), (a2, b2) = block_range(p1, l1), block_range(p2, l2)
    assert prefix_covers(p1, l1, p2, l2) == (a1 <= a2 and b2 <= b1)
