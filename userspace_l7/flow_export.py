"""L7 flow records, batched: the hot path appends one tuple; dicts and JSON are built at flush time.

Output: JSON lines (one flow per line) appended to a file, or written to a unix stream socket (the
agent's flow collector), when the server's flush timer fires (every 0.25 s by default). The queue
is bounded: when the writer cannot keep up the oldest records are dropped and counted (``dropped``).

A record, in Hubble's field names (SPEC §6)::

    {"time": "2026-01-01T00:00:00.000000Z", "Type": "L7", "verdict": "FORWARDED", "node_name": "...",
     "IP": {"source": "10.200.0.4", "destination": "10.200.0.2"},
     "l4": {"TCP": {"source_port": 41234, "destination_port": 9080}},
     "source": {"workload": "productpage"},                       # when the resolver knows it
     "destination": {"namespace": "default", "service": "reviews.default.svc.cluster.local",
                     "workload": "reviews-v2", "address": "10.200.0.2:9080"},
     "l7": {"type": "RESPONSE", "latency_ns": 1234567,
            "http": {"method": "GET", "url": "/reviews/1", "code": 200, "response_flags": "-",
                     "protocol": "HTTP/1.1"}},
     "route": "default.reviews.0", "subset": "v2"}

``l7.http.response_flags`` is Envoy's response flags string (flags.py; "-" when none): Hubble has no
such field, and next to the status it qualifies is where it reads. IP.destination and l4
destination_port are the backend that answered (as Hubble shows a request through Cilium's proxy);
requests answered locally (fault abort, no route, 504) have verdict FORWARDED, the client's original
destination there, and no destination.address. Verdict DROPPED: a request the processor refused as
malformed or too slow (DPE, SI), a connection refused over its endpoint's share (OM), a request the
kernel's policy denies (UAEX, with the backend it was for as the destination and, as the kernel's
drop flows carry them, ``drop_reason_desc``, ``traffic_direction`` and ``policy: {"rule_id": N}``:
top-level keys a record may add, its ``extra``).
"""

from __future__ import annotations

import json
import os
import socket
import stat
import time
from json.encoder import encode_basestring_ascii as _str  # C: a quoted, escaped JSON string
from typing import Any

__all__ = ["FlowSink", "flow_line", "flow_record"]

# (time_ns, latency_ns, method, url, code, response_flags, src_ip, src_port, dst_ip, dst_port, route, subset,
#  service_fqdn, namespace, upstream "ip:port", destination_workload, source_workload, verdict, extra)
# extra: "" or a JSON object's members ('"k":v,...') added at the record's top level.
FlowTuple = tuple
# Its last thirteen fields, from src_ip: what the requests of one connection to one route and backend share.
# The server builds that tuple once and queues (time_ns, latency_ns, method, url, code, flags, shared) per
# request.
FlowShared = tuple


_iso_second = [-1, ""]  # the last second formatted: a batch's records mostly share it


def _iso(ns: int) -> str:
    sec, frac = divmod(ns, 1_000_000_000)
    if sec != _iso_second[0]:
        _iso_second[:] = sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    return f"{_iso_second[1]}.{frac // 1000:06d}Z"


def flow_record(t: FlowTuple, node_name: str = "") -> dict[str, Any]:
    (ts, latency, method, url, code, response_flags, src_ip, src_port, dst_ip, dst_port, route, subset, service,
     namespace, upstream, dst_workload, src_workload, verdict, extra) = t
    rec: dict[str, Any] = {
        "time": _iso(ts), "Type": "L7", "verdict": verdict, "node_name": node_name,
        "IP": {"source": src_ip, "destination": dst_ip},
        "l4": {"TCP": {"source_port": src_port, "destination_port": dst_port}},
        "l7": {"type": "RESPONSE", "latency_ns": latency,
               "http": {"method": method, "url": url, "code": code, "response_flags": response_flags,
                        "protocol": "HTTP/1.1"}},
        "route": route, "subset": subset,
    }
    if src_workload and src_workload != "unknown":
        rec["source"] = {"workload": src_workload}
    if service:
        dest = {"namespace": namespace, "service": service}
        if upstream:
            dest["address"] = upstream
            dest["workload"] = dst_workload
        rec["destination"] = dest
    if extra:
        rec.update(json.loads("{" + extra + "}"))
    return rec


def flow_line(t: FlowTuple, node_json: str) -> str:
    """`flow_record` as one JSON line, formatted directly (several times cheaper than json.dumps of the
    dict; `tests/unit/userspace_l7/test_flow_export.py` checks both give the same object)."""
    return _line(t[0], t[1], t[2], t[3], t[4], t[5], t[7], _shared_parts(t[6:], node_json))


def _line(ts: int, latency: int, method: str, url: str, code: int, response_flags: str, src_port: int,
          parts: tuple[str, str, str]) -> str:
    # response_flags: flags.py's strings, capitals and commas: nothing to escape
    return (f'{{"time":"{_iso(ts)}{parts[0]}{int(src_port)}{parts[1]}{int(latency)},"http":{{"method":{_str(method)},'
            f'"url":{_str(url)},"code":{int(code)},"response_flags":"{response_flags}"{parts[2]}')


# The fixed fragments of the lines of one (source, destination, route) combination: flows repeat them.
_parts: dict[tuple, tuple[str, str, str]] = {}
_MAX_PARTS = 4096


def _shared_parts(shared: FlowShared, node_json: str) -> tuple[str, str, str]:
    (src_ip, _, dst_ip, dst_port, route, subset, service, namespace, upstream, dst_workload, src_workload, verdict,
     extra) = shared
    key = (node_json, verdict, src_ip, dst_ip, dst_port, route, subset, service, namespace, upstream, dst_workload,
           src_workload, extra)  # no source port: the connections of one client share the fragments
    parts = _parts.get(key)
    if parts is None:
        parts = _line_parts(key)
    return parts


def _line_parts(key: tuple) -> tuple[str, str, str]:
    (node_json, verdict, src_ip, dst_ip, dst_port, route, subset, service, namespace, upstream, dst_workload,
     src_workload, more) = key
    extra = ""
    if src_workload and src_workload != "unknown":
        extra = f',"source":{{"workload":{_str(src_workload)}}}'
    if service:
        addr = f',"address":{_str(upstream)},"workload":{_str(dst_workload)}' if upstream else ""
        extra += f',"destination":{{"namespace":{_str(namespace)},"service":{_str(service)}{addr}}}'
    if more:
        extra += "," + more
    parts = (f'","Type":"L7","verdict":"{verdict}","node_name":{node_json},'
             f'"IP":{{"source":{_str(src_ip)},"destination":{_str(dst_ip)}}},"l4":{{"TCP":{{"source_port":',
             f',"destination_port":{int(dst_port)}}}}},"l7":{{"type":"RESPONSE","latency_ns":',
             f',"protocol":"HTTP/1.1"}}}},"route":{_str(route)},"subset":{_str(subset)}{extra}}}\n')
    if len(_parts) >= _MAX_PARTS:
        _parts.clear()
    _parts[key] = parts
    return parts


class FlowSink:
    """Flows queued in memory and written in batches by `flush` (the server's timer). ``pending`` is a plain
    list the hot path appends (time_ns, latency_ns, method, url, code, flags, FlowShared) tuples to, with no call;
    between two flushes it holds one interval's requests. A flush keeps the newest ``max_pending`` of them
    and counts the rest as ``dropped``."""

    def __init__(self, path: str | None, *, node_name: str = "", max_pending: int = 20000) -> None:
        self.path, self.node_name = path, node_name
        self.max_pending = max_pending
        self.pending: list[tuple] = []
        self._dropped = 0
        self.written = 0
        self._file = None
        self._sock: socket.socket | None = None

    @property
    def dropped(self) -> int:
        """Flows lost: over ``max_pending`` (counted as soon as they are over) or not written."""
        return self._dropped + max(0, len(self.pending) - self.max_pending)

    def add(self, t: FlowTuple) -> None:
        self.pending.append((t[0], t[1], t[2], t[3], t[4], t[5], t[6:]))

    def flush(self) -> None:
        """Write everything pending; on a write error the batch is dropped (flows are best effort)."""
        items, self.pending = self.pending, []
        if len(items) > self.max_pending:  # the oldest go
            self._dropped += len(items) - self.max_pending
            items = items[-self.max_pending:]
        if not items or self.path is None:
            return
        node = _str(self.node_name)
        parts_of: dict[int, tuple[tuple[str, str, str], int]] = {}  # id(shared) -> fragments, source port
        lines = []
        for ts, latency, method, url, code, response_flags, shared in items:
            p = parts_of.get(id(shared))  # ids are stable: ``items`` holds every shared tuple until the end
            if p is None:
                p = parts_of[id(shared)] = (_shared_parts(shared, node), shared[1])
            lines.append(_line(ts, latency, method, url, code, response_flags, p[1], p[0]))
        data = "".join(lines).encode()
        try:
            self._write(data)
            self.written += len(items)
        except OSError:
            self._dropped += len(items)
            self._close()

    def _write(self, data: bytes) -> None:
        if self._file is None and self._sock is None:
            try:
                is_sock = stat.S_ISSOCK(os.stat(self.path).st_mode)
            except FileNotFoundError:
                is_sock = False
            if is_sock:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(0.5)
                s.connect(self.path)
                self._sock = s
            else:
                self._file = open(self.path, "ab", buffering=0)  # noqa: SIM115 - kept open across flushes
        if self._sock is not None:
            self._sock.sendall(data)
        else:
            self._file.write(data)  # one O_APPEND write per batch: workers' lines do not interleave

    def _close(self) -> None:
        for f in (self._file, self._sock):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass
        self._file = self._sock = None

    def close(self) -> None:
        self.flush()
        self._close()
