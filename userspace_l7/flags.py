"""Envoy's response flags: why an answer is what it is, when the processor had a hand in it.

Istio labels `istio_requests_total` and `istio_request_duration_milliseconds` with them
(``response_flags``, "-" when none) and its access log prints them, so a 503 the processor made
because a connection pool overflowed (UO) reads apart from a 503 the backend sent ("-"). The
processor puts the same string in the ``response_flags`` label and in each L7 flow
(``l7.http.response_flags``; Hubble has no such field).

The flags, with Envoy's meaning and where the processor sets them:

    UH    no healthy upstream: every backend of the cluster is ejected, or the subset is empty (503)
    UF    upstream connection failure: connect refused or timed out (503)
    UO    upstream overflow: the DestinationRule's connectionPool is full (503)
    NR    no route: no service at the destination, no such port, no route matched (404)
    NC    no cluster: the route's destination host or subset names nothing (503)
    UT    upstream request timeout: the route's timeout or the last per-try timeout (504)
    UC    upstream connection termination: the backend closed or broke before the response head
          (503), or in the middle of the body (the backend's status, cut short)
    URX   upstream retry limit exceeded: retries ran out on a retriable outcome (with that outcome's
          flag, or alone on a retriable response of the backend's, which is forwarded)
    FI    fault injection abort (the abort's status)
    DI    fault injection delay (on whatever answer follows the delay)
    DC    downstream connection termination: the client closed its connection (or its sending side, as
          Envoy takes an HTTP/1 client's FIN) before its answer was written
    DPE   downstream protocol error: a malformed or oversized request (400, 405, 413, 431, 501)

and three that stand for answers Envoy makes with no flag of its own (documented deviations):

    SI    the request (head or whole) did not arrive within request_headers_timeout /
          request_timeout (408). Envoy answers those two timers with a 408 and no flag (only a
          response code detail); SI, its stream idle timeout's flag, is the flag it puts on a 408
          for a downstream that is too slow, so dashboards read it the same way.
    UAEX  the kernel's policy denies the client -> backend flow (403 "RBAC: access denied").
          Envoy's RBAC filter sets no flag (Istio logs "-" with rbac_access_denied_matched_policy);
          UAEX is ext_authz's 403, a denial by an authority outside the proxy, which the datapath's
          policy is here.
    OM    the processor refused the connection to protect itself: the client endpoint holds its
          share of the processor's descriptors (admission.py) (503). Envoy's overload manager
          flag; UO and DO are about upstream clusters (circuit breaking, EDS drop_overload).

A direct response or an HTTP redirect from a VirtualService is configuration, not a failure: "-", as
in Envoy. Several flags join with "," in Envoy's order (`join`).
"""

from __future__ import annotations

__all__ = ["DC", "DI", "DPE", "FI", "NC", "NONE", "NR", "OM", "SI", "UAEX", "UC", "UF", "UH", "UO", "URX", "UT",
           "join"]

NONE = "-"
UH, UF, UO, NR, NC, UT, UC, URX = "UH", "UF", "UO", "NR", "NC", "UT", "UC", "URX"
FI, DI, DC, DPE, SI, UAEX, OM = "FI", "DI", "DC", "DPE", "SI", "UAEX", "OM"

# Envoy's order (ResponseFlagUtils): flags print in it, whatever order they were set in.
_ORDER = ("LH", UH, UT, "LR", "UR", UF, UC, UO, NR, DI, FI, "RL", UAEX, "RLSE", DC, URX, SI, "IH", DPE, "UMSDR",
          "RFCF", "NFCF", "DT", "UPE", NC, OM, "DF", "DO", "DR", "UDO")
_RANK = {f: i for i, f in enumerate(_ORDER)}
_JOINED: dict[frozenset[str], str] = {}


def join(*flags: str) -> str:
    """One flags string from some flags or flag strings ("-" and "" are none): "UF,URX"."""
    parts = frozenset(p for f in flags if f and f != NONE for p in f.split(","))
    text = _JOINED.get(parts)
    if text is None:
        text = _JOINED[parts] = ",".join(sorted(parts, key=lambda f: _RANK.get(f, len(_ORDER)))) or NONE
    return text
