"""L7 flow records, batched: the hot path appends one tuple; dicts and JSON are built at flush time.

Output: JSON lines (one flow per line) appended to a file, or written to a unix stream socket (the
agent's flow collector), when the server's flush timer fires (every 0.25 s by default). The queue
is bounded: when the writer cannot keep up the oldest records are dropped and counted (``dropped``).

A record, in Hubble's field names (SPEC §6)::

    {"time": "2026-01-01T00:00:00.000000Z", "Type": "L7", "verdict": "FORWARDED", "node_name": "...",
     "IP": {"source": "10.200.0.4", "destination": "10.96.0.10"},
     "l4": {"TCP": {"source_port": 41234, "destination_port": 9080}},
     "source": {"workload": "productpage"},                       # when the resolver knows it
     "destination": {"namespace": "default", "service": "reviews.default.svc.cluster.local",
                     "workload": "reviews-v2", "address": "10.200.0.2:9080"},
     "l7": {"type": "RESPONSE", "latency_ns": 1234567,
            "http": {"method": "GET", "url": "/reviews/1", "code": 200, "protocol": "HTTP/1.1"}},
     "route": "default.reviews.0", "subset": "v2"}

Requests answered locally (fault abort, no route, 504) have verdict FORWARDED and no
destination.address; a request the processor refused as malformed is verdict DROPPED.
"""

from __future__ import annotations

import os
import socket
import stat
import time
from collections import deque
from json.encoder import encode_basestring_ascii as _str  # C: a quoted, escaped JSON string
from typing import Any

__all__ = ["FlowSink", "flow_line", "flow_record"]

# (time_ns, latency_ns, method, url, code, src_ip, src_port, dst_ip, dst_port, route, subset,
#  service_fqdn, namespace, upstream "ip:port", destination_workload, source_workload, verdict)
FlowTuple = tuple


_iso_second = [-1, ""]  # the last second formatted: a batch's records mostly share it


def _iso(ns: int) -> str:
    sec, frac = divmod(ns, 1_000_000_000)
    if sec != _iso_second[0]:
        _iso_second[:] = sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    return f"{_iso_second[1]}.{frac // 1000:06d}Z"


def flow_record(t: FlowTuple, node_name: str = "") -> dict[str, Any]:
    (ts, latency, method, url, code, src_ip, src_port, dst_ip, dst_port, route, subset, service, namespace,
     upstream, dst_workload, src_workload, verdict) = t
    rec: dict[str, Any] = {
        "time": _iso(ts), "Type": "L7", "verdict": verdict, "node_name": node_name,
        "IP": {"source": src_ip, "destination": dst_ip},
        "l4": {"TCP": {"source_port": src_port, "destination_port": dst_port}},
        "l7": {"type": "RESPONSE", "latency_ns": latency,
               "http": {"method": method, "url": url, "code": code, "protocol": "HTTP/1.1"}},
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
    return rec


def flow_line(t: FlowTuple, node_json: str) -> str:
    """`flow_record` as one JSON line, formatted directly (several times cheaper than json.dumps of the
    dict; `tests/unit/l7/test_flows.py` checks both give the same object)."""
    (ts, latency, method, url, code, src_ip, src_port, dst_ip, dst_port, route, subset, service, namespace,
     upstream, dst_workload, src_workload, verdict) = t
    key = (node_json, verdict, src_ip, dst_ip, dst_port, route, subset, service, namespace, upstream, dst_workload,
           src_workload)
    parts = _parts.get(key)
    if parts is None:
        parts = _line_parts(key)
    return (f'{{"time":"{_iso(ts)}{parts[0]}{int(src_port)}{parts[1]}{int(latency)},"http":{{"method":{_str(method)},'
            f'"url":{_str(url)},"code":{int(code)}{parts[2]}')


# The fixed fragments of the lines of one (source, destination, route) combination: flows repeat them.
_parts: dict[tuple, tuple[str, str, str]] = {}
_MAX_PARTS = 4096


def _line_parts(key: tuple) -> tuple[str, str, str]:
    (node_json, verdict, src_ip, dst_ip, dst_port, route, subset, service, namespace, upstream, dst_workload,
     src_workload) = key
    extra = ""
    if src_workload and src_workload != "unknown":
        extra = f',"source":{{"workload":{_str(src_workload)}}}'
    if service:
        addr = f',"address":{_str(upstream)},"workload":{_str(dst_workload)}' if upstream else ""
        extra += f',"destination":{{"namespace":{_str(namespace)},"service":{_str(service)}{addr}}}'
    parts = (f'","Type":"L7","verdict":"{verdict}","node_name":{node_json},'
             f'"IP":{{"source":{_str(src_ip)},"destination":{_str(dst_ip)}}},"l4":{{"TCP":{{"source_port":',
             f',"destination_port":{int(dst_port)}}}}},"l7":{{"type":"RESPONSE","latency_ns":',
             f',"protocol":"HTTP/1.1"}}}},"route":{_str(route)},"subset":{_str(subset)}{extra}}}\n')
    if len(_parts) >= _MAX_PARTS:
        _parts.clear()
    _parts[key] = parts
    return parts


class FlowSink:
    def __init__(self, path: str | None, *, node_name: str = "", max_pending: int = 20000) -> None:
        self.path, self.node_name = path, node_name
        self._pending: deque[FlowTuple] = deque(maxlen=max_pending)
        self.dropped = 0
        self.written = 0
        self._file = None
        self._sock: socket.socket | None = None

    def add(self, t: FlowTuple) -> None:
        p = self._pending
        if len(p) == p.maxlen:
            self.dropped += 1
        p.append(t)

    def flush(self) -> None:
        """Write everything pending; on a write error the batch is dropped (flows are best effort)."""
        if not self._pending or self.path is None:
            self._pending.clear()
            return
        items, self._pending = self._pending, deque(maxlen=self._pending.maxlen)
        node = _str(self.node_name)
        data = "".join(flow_line(t, node) for t in items).encode()
        try:
            self._write(data)
            self.written += len(items)
        except OSError:
            self.dropped += len(items)
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
