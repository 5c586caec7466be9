"""Python mirror of bpf/lib/drop_reasons.h and the verdict/event numbering of bpf/lib/common.h and
events.h. tests/unit/test_reasons.py parses the headers and fails if these drift."""

from __future__ import annotations

# Keep in step with bpf/lib/drop_reasons.h: number -> name printed as drop_reason_desc.
DROP_REASONS: dict[int, str] = {
    0: "FORWARDED",
    132: "INVALID_SOURCE_IP",
    133: "POLICY_DENIED",
    134: "INVALID_PACKET_DROPPED",
    135: "CT_TRUNCATED_OR_INVALID_HEADER",
    139: "UNSUPPORTED_L3_PROTOCOL",
    145: "ENDPOINT_NOT_FOUND",
    155: "FRAGMENT_NOT_FOUND",
    181: "POLICY_DENY",
    182: "POLICY_REVOKED",
    183: "POLICY_DENIED_CLIENT_EGRESS",  # the L7 processor's upstream leg: the client's egress policy
}

# Drops that are a policy's verdict (the rest are parse / anti-spoofing / lookup failures), by name:
# drop_reasons.h names them DROP_POLICY* and POLICY_*, and no other reason so.
POLICY_DROP_REASONS: frozenset[str] = frozenset(n for n in DROP_REASONS.values() if n.startswith("POLICY_"))

# bpf/lib/common.h VERDICT_*
VERDICTS: dict[int, str] = {1: "FORWARDED", 2: "DROPPED", 4: "REDIRECTED", 6: "AUDIT"}

# bpf/lib/events.h EVENT_*
EVENT_TYPES: dict[int, str] = {1: "flow-new", 2: "drop", 3: "flow-end"}

# bpf/lib/policy.h MATCH_*
MATCH_TYPES: dict[int, str] = {0: "none", 1: "L3-Only", 2: "L3-L4", 3: "L4-Only", 4: "all"}


def reason_name(code: int) -> str:
    return DROP_REASONS.get(code, f"UNKNOWN_REASON_{code}")
