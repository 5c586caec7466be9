"""ICMPv4 type names as CiliumNetworkPolicy `icmps[].fields[].type` accepts them.

The one table of these names: the resource schema (`meshagent apply`), the policy compiler and the
CLI's flow lines all read it, so a name one of them accepts the others accept too.
"""

from __future__ import annotations

import re

# Cilium's icmpIpv4TypeNameToCode (pkg/policy/api/icmp.go), every name and no other: Cilium
# refuses a name it does not list (SourceQuench, type 4, is written as 4). Where two names share a
# number the first is the one a flow line shows (EchoRequest, not Echo).
ICMP_TYPES: dict[str, int] = {
    "EchoReply": 0,
    "DestinationUnreachable": 3,
    "Redirect": 5,
    "EchoRequest": 8,
    "Echo": 8,
    "RouterAdvertisement": 9,
    "RouterSelection": 10,
    "TimeExceeded": 11,
    "ParameterProblem": 12,
    "Timestamp": 13,
    "TimestampReply": 14,
    "Photuris": 40,
    "ExtendedEchoRequest": 42,
    "ExtendedEchoReply": 43,
}

# number -> the name a flow line shows
ICMP_TYPE_NAMES: dict[int, str] = {}
for _name, _number in ICMP_TYPES.items():
    ICMP_TYPE_NAMES.setdefault(_number, _name)


def icmp_type_number(value: int | str) -> int:
    """An ICMPv4 type as Cilium accepts it (8, "8" or "EchoRequest") -> its number; else ValueError."""
    if isinstance(value, str):
        if value in ICMP_TYPES:
            return ICMP_TYPES[value]
        if not re.fullmatch(r"[0-9]{1,3}", value):
            known = ", ".join(ICMP_TYPES)
            raise ValueError(f"unknown ICMP type {value!r}; supported: 0-255 or {known}")
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"ICMP type {value!r} is not a name or a number 0-255")
    if not 0 <= value <= 255:
        raise ValueError(f"ICMP type {value} is out of range 0-255")
    return value
