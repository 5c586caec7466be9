"""Port ranges as the policy map's LPM trie holds them: power-of-two aligned blocks of 16-bit ports.

A block is ``(port, prefix)``: the ports whose first ``prefix`` bits equal those of ``port``
(``port`` has its remaining bits zero). ``(80, 16)`` is port 80 alone, ``(0, 0)`` every port.
"""

from __future__ import annotations

PORT_BITS = 16
MAX_PORT = (1 << PORT_BITS) - 1


def port_mask(prefix: int) -> int:
    """The bits of a port that a block of this prefix length fixes."""
    if not 0 <= prefix <= PORT_BITS:
        raise ValueError(f"port prefix {prefix} is outside 0..{PORT_BITS}")
    return (MAX_PORT << (PORT_BITS - prefix)) & MAX_PORT


def range_to_prefixes(start: int, end: int) -> list[tuple[int, int]]:
    """The fewest aligned blocks whose union is exactly ports ``start..end`` (inclusive), in order.

    At most 30 blocks (the worst case is 1..65534). ``range_to_prefixes(0, 65535) == [(0, 0)]``.
    """
    if not 0 <= start <= end <= MAX_PORT:
        raise ValueError(f"port range {start}-{end} is not within 0..{MAX_PORT} or is reversed")
    blocks: list[tuple[int, int]] = []
    while start <= end:
        # The largest block that starts at `start` (alignment) and does not pass `end`.
        size = start & -start if start else 1 << PORT_BITS
        while start + size - 1 > end:
            size >>= 1
        blocks.append((start, PORT_BITS - (size.bit_length() - 1)))
        start += size
    return blocks


def prefix_covers(outer_port: int, outer_prefix: int, port: int, prefix: int) -> bool:
    """Whether block ``(outer_port, outer_prefix)`` contains all of block ``(port, prefix)``."""
    if outer_prefix > prefix:
        return False
    return (outer_port ^ port) & port_mask(outer_prefix) == 0


def block_range(port: int, prefix: int) -> tuple[int, int]:
    """The first and last port of a block."""
    first = port & port_mask(prefix)
    return first, first | (MAX_PORT >> prefix)
