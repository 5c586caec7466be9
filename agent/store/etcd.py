"""The etcd store (`etcd://HOST:2379[,HOST:2379...]`): etcd v3 through its gRPC gateway, as Cilium's
kvstore mode keeps its cluster state in etcd.

Layout. Every key lives under PREFIX ("/meshagent/resources/Service/default/web"); a value is a
JSON object. etcd3gw (HTTP/JSON to the gateway on the client URL, over requests) does the unary
calls: KV ranges, transactions, leases.

Reads never go to etcd. A `Mirror` holds every key under the prefix: a full range read at open,
then a watch on the prefix from the next revision. The watch is our own small loop over the
gateway's streaming /v3/watch (etcd3gw's Watcher drops compaction and cancellation silently):

    open ---range read---> mirror @R ---watch from R+1---> events applied in revision order
      stream ends or breaks:  watch again from the mirror's revision + 1 (at once, then with backoff
                              while it fails); etcd sends every change since, nothing is lost
      idle for WATCH_IDLE_S:  watch again (a silently dead connection cannot look alive for longer)
      compaction past it:     full range read (replace the mirror), watch again
      another cluster, or a revision lower than ours (etcd restored): full range read

`connected` turns false when a request or a watch finds etcd unreachable (a failed request also
breaks the watch, so a hung etcd is noticed), and true again when etcd confirms a new watch.

So the agent keeps enforcing its last known state while etcd is away, and a write followed by a read
sees the write (our own writes go into the mirror at once, ordered by revision: mirror.py).

Writes are one etcd transaction each (put_all and create_all too: all or none). A transaction holds
at most MAX_TXN_OPS (128, etcd's default --max-txn-ops) writes: more are refused, never split, so a
multi-key write is never half-applied (an apply through put_all of more than 128 resources must be
split by the user; the error says so). etcd also refuses a request above --max-request-bytes (1.5
MiB by default); that error is a one-line StoreError too.

Lease. One lease per store, granted at open with ``lease_ttl`` seconds and kept alive from a thread
every ttl/3. Writes with owned=True are bound to it: the keys vanish when the node is gone for
longer than the TTL. Its id is saved in the node's state_dir, so an agent restarted within the TTL
adopts it and its owned keys never vanish. If the lease is lost anyway (etcd or the node away for
longer than the TTL), a new one is granted and every owned key this store holds is put again.

Cache. The mirror is saved (atomically, 0600) to state_dir/store-cache-NODE.json about a second
after it changes. An agent that starts while etcd is unreachable loads it and serves it, stale
(connected: false, last_sync from the file), until etcd answers. With no cache either, open fails:
an empty mirror would make the agent remove its whole datapath.

Bounds. A request connects within CONNECT_TIMEOUT_S and is answered within REQUEST_TIMEOUT_S; the
endpoints are tried in turn, the next only while REQUEST_TIMEOUT_S has not passed since the first.
A failure is a one-line StoreError at once, never a hang. The watch, keepalive and cache threads are
daemons; close() stops them.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import requests
from etcd3gw import exceptions as etcd3gw_errors
from etcd3gw.client import Etcd3Client
from etcd3gw.lease import Lease

from agent.files import write_json
from agent.store.base import (
    MAX_TXN_OPS,
    StoreError,
    check_key,
    check_prefix,
    check_value,
    corrupt_error,
    decode,
    encode,
    hhmmss,
    status_record,
    store_name,
)
from agent.store.mirror import CORRUPT, Change, Mirror

log = logging.getLogger("meshagent.store")

PREFIX = "/meshagent/"
DEFAULT_PORT = 2379
DEFAULT_LEASE_TTL_S = 30
CONNECT_TIMEOUT_S = 2.0
REQUEST_TIMEOUT_S = 5.0
# A watch with no message for this long is made again (cheap: it resumes at the mirror's revision);
# it bounds how long a silently dead connection can look alive.
WATCH_IDLE_S = 15.0
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.2, 3.0
CACHE_DEBOUNCE_S = 1.0
JOIN_TIMEOUT_S = 3.0
CACHE_FORMAT = 1

# gRPC status codes that etcd's gateway returns in {"error", "code"} bodies.
_UNAVAILABLE = (4, 14)  # DEADLINE_EXCEEDED, UNAVAILABLE (no leader, quorum lost, stopping)
_REFUSED = (7, 16)  # PERMISSION_DENIED, UNAUTHENTICATED
_NOT_FOUND = 5  # "requested lease not found"
_OUT_OF_RANGE = 11  # "required revision has been compacted"

T = TypeVar("T")


class _Failure(Exception):
    """A failed request, classified: unreachable | tls | timeout | etcd (etcd answered an error)."""

    def __init__(self, kind: str, reason: str, code: int | None = None):
        super().__init__(reason)
        self.kind, self.reason, self.code = kind, reason, code


class _Resync(Exception):
    """The watch cannot resume from the mirror's revision: read everything again."""


def parse_url(url: str) -> list[tuple[str, int]]:
    """``etcd://HOST[:PORT][,HOST[:PORT]...]`` -> [(host, port)]; IPv6 hosts in brackets."""
    bad = StoreError(f"store {url!r}: use etcd://HOST:PORT[,HOST:PORT...] (port {DEFAULT_PORT} if left out)")
    if not isinstance(url, str) or not url.startswith("etcd://"):
        raise bad
    rest = url[len("etcd://"):]
    if not rest or any(c in rest for c in "/?#@ "):
        raise bad
    out = []
    for part in rest.split(","):
        if part.startswith("["):
            host, sep, tail = part[1:].partition("]")
            if not sep or (tail and not tail.startswith(":")):
                raise bad
            port_text = tail[1:] if tail else ""
        else:
            host, _, port_text = part.partition(":")
        if not host:
            raise bad
        if port_text and not (port_text.isdigit() and 0 < int(port_text) < 65536):
            raise bad
        out.append((host, int(port_text) if port_text else DEFAULT_PORT))
    return out


def _b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def _range_end(prefix: str) -> str:
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception it wraps (requests and urllib3 nest them several deep)."""
    seen: set[int] = set()
    todo: list[Any] = [exc]
    while todo:
        e = todo.pop(0)
        if not isinstance(e, BaseException) or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__, getattr(e, "reason", None), *e.args]


def _etcd_error(text: str | None) -> tuple[str, int | None] | None:
    """(message, code) from a gateway error body {"error", "message", "code"}, if it is one."""
    try:
        body = json.loads(text or "")
    except ValueError:
        return None
    if not isinstance(body, dict) or not (body.get("message") or body.get("error")):
        return None
    message = body.get("message") or body.get("error")
    if isinstance(message, dict):  # a watch stream's {"error": {"grpc_code", "message", ...}}
        return str(message.get("message", message)), message.get("grpc_code") or message.get("code")
    return str(message), body.get("code")


def classify(exc: BaseException) -> _Failure:
    """What went wrong with a request to etcd, in words an operator can act on."""
    chain = list(_causes(exc))
    for e in chain:
        if isinstance(e, ssl.SSLCertVerificationError):
            return _Failure("tls", f"certificate verify failed: etcd's certificate is not trusted by store_ca: "
                                   f"{e.verify_message}")
    for e in chain:
        if isinstance(e, ssl.SSLError):
            return _Failure("tls", _tls_reason(e))
    for e in chain:
        if isinstance(e, requests.exceptions.ConnectTimeout):
            return _Failure("unreachable", f"no connection within {CONNECT_TIMEOUT_S:g} s")
        if isinstance(e, requests.exceptions.ReadTimeout | TimeoutError | socket.timeout):
            return _Failure("timeout", f"no answer within {REQUEST_TIMEOUT_S:g} s")
    detail = getattr(exc, "detail_text", None)
    parsed = _etcd_error(detail) if detail else None
    if parsed is not None:
        message, code = parsed
        kind = "unreachable" if code in _UNAVAILABLE else "etcd"
        return _Failure(kind, message, code)
    for e in chain:
        if isinstance(e, ConnectionRefusedError):
            return _Failure("unreachable", "connection refused")
        if isinstance(e, socket.gaierror):
            return _Failure("unreachable", "host name not found")
        if isinstance(e, ConnectionResetError):
            return _Failure("unreachable", "connection reset")
        if isinstance(e, OSError) and e.strerror:
            return _Failure("unreachable", e.strerror.lower())
    if isinstance(exc, etcd3gw_errors.ConnectionFailedError | requests.exceptions.ConnectionError):
        return _Failure("unreachable", "cannot connect")
    if isinstance(exc, etcd3gw_errors.ConnectionTimeoutError):
        return _Failure("timeout", f"no answer within {REQUEST_TIMEOUT_S:g} s")
    return _Failure("etcd", str(detail or exc).strip().splitlines()[0] if str(detail or exc).strip() else repr(exc))


def _tls_reason(e: ssl.SSLError) -> str:
    code = (getattr(e, "reason", None) or "").upper()
    if isinstance(e, ssl.SSLEOFError) or "EOF" in code:
        return "etcd ended the handshake: it may require a client certificate (store_cert, store_key)"
    if "ALERT" in code:  # etcd's alert about our certificate: bad, unknown CA, required, expired
        return f"etcd refused the client certificate, or its absence: {code.lower().replace('_', ' ')}"
    return (code or str(e)).lower().replace("_", " ")


class EtcdStore:
    """The store interface over etcd (see agent/store/__init__.py and this module's doc)."""

    backend = "etcd"

    def __init__(self, url: str, *, ca: str | None = None, cert: str | None = None, key: str | None = None,
                 lease_ttl: int = DEFAULT_LEASE_TTL_S, state_dir: str | None = None, node_name: str | None = None,
                 prefix: str = PREFIX):
        self.url = url
        self.name = store_name("etcd", url)
        self.endpoints = parse_url(url)
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        self.lease_ttl = int(lease_ttl)
        for what, path in (("store_ca", ca), ("store_cert", cert), ("store_key", key)):
            if path is not None and not os.access(path, os.R_OK):
                reason = "no such file" if not os.path.exists(path) else "not readable"
                raise StoreError(f"{self.name}: {what} {path}: {reason}; check the node config")
        if (cert is None) != (key is None):
            raise StoreError(f"{self.name}: store_cert and store_key go together; set both or neither")
        self._tls = {"verify": ca if ca else True, "cert": (cert, key) if cert and key else None}
        protocol = "https" if (ca or cert) else "http"
        self._plain = protocol == "http"
        self._clients = [Etcd3Client(host=h, port=p, protocol=protocol, ca_cert=ca, cert_cert=cert, cert_key=key,
                                     timeout=(CONNECT_TIMEOUT_S, REQUEST_TIMEOUT_S), api_path="/v3/")
                         for h, p in self.endpoints]
        for c in self._clients:
            # requests lets REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE override a session's CA (etcd3gw sets only
            # session.verify), and would send etcd's traffic through HTTP(S)_PROXY: neither applies
            c.session.trust_env = False
        self._current = 0  # the endpoint that answered last
        node = node_name or "node"
        self._cache_path = os.path.join(state_dir, f"store-cache-{node}.json") if state_dir else None
        self._lease_path = os.path.join(state_dir, f"store-lease-{node}.json") if state_dir else None

        self._mirror = Mirror()
        self._state_lock = threading.Lock()
        self._connected, self._since, self._last_sync, self._error = False, time.time(), 0.0, ""
        self._lease_lock = threading.RLock()  # the lease id, the owned keys, and owned writes
        self._lease_id: int | None = None
        self._owned: dict[str, dict] = {}
        self._reput_pending = False
        self._stopping = threading.Event()
        self._resume = threading.Event()  # cleared while a test holds the watch (_pause_watch)
        self._resume.set()
        self._dirty = threading.Event()
        self.changed = threading.Event()  # set when generation() moves: the agent wakes on it
        self._watch_lock = threading.Lock()
        self._watch_resp: requests.Response | None = None
        self._closed = False

        need_full = False
        try:
            self._full_sync()
            self._set_connected()
        except _Failure as f:
            if f.kind not in ("unreachable", "timeout"):
                raise self._error_for(f, write=False) from None
            if not self._load_cache(f.reason):
                where = f" in {self._cache_path}" if self._cache_path else " (no state_dir to keep one in)"
                raise StoreError(f"{self.name}: unreachable ({self._hint(f.reason)}), and there is no cached "
                                 f"state{where} to start from; check that etcd runs and the node reaches it") from None
            need_full = True
        if self._connected:
            try:
                with self._lease_lock:
                    self._acquire_lease()
            except _Failure as f:
                if f.kind not in ("unreachable", "timeout"):
                    raise self._error_for(f, write=False) from None
                self._set_disconnected(f.reason)  # the keepalive thread grants it when etcd answers
            self._dirty.set()  # a first cache file right away
        self._threads = [
            threading.Thread(target=self._watch_loop, args=(need_full,), name="store-watch", daemon=True),
            threading.Thread(target=self._keepalive_loop, name="store-lease", daemon=True),
            threading.Thread(target=self._cache_loop, name="store-cache", daemon=True),
        ]
        for t in self._threads:
            t.start()

    # ---- requests --------------------------------------------------------------------------------

    def _call(self, fn: Callable[[Etcd3Client], T]) -> T:
        """``fn(client)`` on the endpoint that answered last, then on the others in turn while the
        request timeout has not passed; raises _Failure."""
        deadline = time.monotonic() + REQUEST_TIMEOUT_S
        failure: _Failure | None = None
        n = len(self._clients)
        for i in range(n):
            if i and time.monotonic() >= deadline:
                break
            index = (self._current + i) % n
            try:
                result = fn(self._clients[index])
            except (etcd3gw_errors.Etcd3Exception, requests.exceptions.RequestException, ValueError, KeyError) as e:
                failure = classify(e)  # (ValueError, KeyError: an answer that is not what the call expects)
                if failure.kind != "unreachable":
                    raise failure from None
                continue
            self._current = index
            return result
        assert failure is not None
        raise failure

    def _post(self, path: str, payload: dict) -> dict:
        return self._call(lambda c: c.post(c.get_url(path), json=payload))

    def _txn(self, txn: dict) -> dict:
        """A write transaction, or the StoreError that says why it was not made."""
        try:
            return self._post("/kv/txn", txn)
        except _Failure as f:
            raise self._error_for(f, write=True) from None

    # ---- errors and connection state ---------------------------------------------------------------

    def _error_for(self, f: _Failure, *, write: bool) -> StoreError:
        not_made = "the change was not made; " if write else ""
        if f.kind in ("unreachable", "timeout"):
            self._set_disconnected(f.reason)
        if f.kind == "unreachable":
            with self._state_lock:
                since = self._since
            return StoreError(f"{self.name}: unreachable since {hhmmss(since)} ({self._hint(f.reason)}); "
                              f"{not_made}check that etcd runs and the node reaches it")
        if f.kind == "timeout":
            maybe = "the change may or may not have been made; " if write else ""
            return StoreError(f"{self.name}: {f.reason}; {maybe}check etcd's health (etcdctl endpoint health)")
        if f.kind == "tls":
            return StoreError(f"{self.name}: TLS with etcd failed ({f.reason}); {not_made}check store_ca, "
                              "store_cert and store_key in the node config against etcd's certificates")
        if "too many operations" in f.reason:
            return StoreError(f"{self.name}: more writes in one transaction than etcd allows (--max-txn-ops, "
                              f"{MAX_TXN_OPS} by default); {not_made}write fewer at a time")
        if "request is too large" in f.reason:
            return StoreError(f"{self.name}: the change is larger than etcd accepts in one request "
                              f"(--max-request-bytes, 1.5 MiB by default); {not_made}write it in smaller parts")
        if f.code in _REFUSED:
            return StoreError(f"{self.name}: refused ({f.reason}); {not_made}check the node's credentials "
                              "(store_cert, store_key) and its permissions in etcd")
        return StoreError(f"{self.name}: etcd answered: {f.reason}; {not_made}".rstrip("; "))

    def _hint(self, reason: str) -> str:
        """An etcd that serves TLS resets a plain HTTP connection: say so when we spoke plain HTTP."""
        if self._plain and reason == "connection reset":
            return f"{reason}: if etcd serves TLS, set store_ca, store_cert and store_key"
        return reason

    def _set_connected(self) -> None:
        with self._state_lock:
            now = time.time()
            self._last_sync = now
            if not self._connected:
                if self._since and self._error:
                    log.info("%s: connected again (revision %d)", self.name, self._mirror.revision)
                self._connected, self._since, self._error = True, now, ""

    def _set_disconnected(self, reason: str) -> None:
        """A request found etcd unreachable. The watch is made again too: only a watch that etcd
        confirms (or a message on it) says connected again, and a stream to a hung etcd would
        otherwise look alive until its idle timeout."""
        self._kick_watch()
        with self._state_lock:
            self._error = reason
            if self._connected:
                self._connected, self._since = False, time.time()
                log.warning("%s: unreachable (%s); serving its last known state, of %s", self.name, reason,
                            hhmmss(self._last_sync))

    def _synced(self) -> None:
        with self._state_lock:
            self._last_sync = time.time()

    # ---- reads -----------------------------------------------------------------------------------

    def get(self, key: str) -> dict | None:
        entry = self._mirror.get(check_key(key))
        if entry is None:
            return None
        if entry.corrupt:
            raise corrupt_error(self.name, key, f"rewrite it or delete it (etcdctl del {self.prefix}{key})")
        return entry.value

    def list(self, prefix: str) -> dict[str, dict]:
        """Every key under ``prefix`` ("" for all), from the mirror; corrupt values are left out."""
        return self._mirror.list(check_prefix(prefix))

    def generation(self) -> int:
        return self._mirror.generation

    # ---- writes ----------------------------------------------------------------------------------

    def _put_op(self, key: str, value: dict, lease: int) -> dict:
        op: dict[str, Any] = {"key": _b64(self.prefix + key), "value": _b64(encode(value))}
        if lease:
            op["lease"] = str(lease)
        return {"request_put": op}

    def _applied(self, changes: list[Change]) -> None:
        if self._mirror.apply(changes):
            self._dirty.set()  # the cache follows changes outside heartbeats/
            self.changed.set()

    def _write(self, txn_for: Callable[[int], dict], owned: bool) -> dict:
        """Run the transaction ``txn_for(lease)``; owned writes hold the lease lock, so a new lease
        cannot come between, and are tried again once with a new lease if etcd no longer knows ours."""
        if not owned:
            return self._txn(txn_for(0))
        with self._lease_lock:
            for attempt in (1, 2):
                try:
                    if self._lease_id is None:
                        self._acquire_lease()
                    return self._post("/kv/txn", txn_for(self._lease_id))
                except _Failure as f:
                    if attempt == 1 and f.code == _NOT_FOUND and "lease" in f.reason:
                        log.warning("%s: lease %x is gone; granting a new one", self.name, self._lease_id or 0)
                        self._lease_id = None
                        continue
                    raise self._error_for(f, write=True) from None
        raise AssertionError("unreachable")

    def _owning(self, owned: bool):
        """Owned writes hold the lease lock until they are recorded, so a new lease's re-put of the
        owned keys cannot miss them (or bind them to the lease that was lost)."""
        return self._lease_lock if owned else contextlib.nullcontext()

    def put(self, key: str, value: dict, *, owned: bool = False) -> None:
        check_value(check_key(key), value)
        with self._owning(owned):
            resp = self._write(lambda lease: {"success": [self._put_op(key, value, lease)]}, owned)
            self._after_put({key: value}, resp, owned)

    def put_all(self, items: dict[str, dict]) -> None:
        """Every item in one transaction: all or none. At most MAX_TXN_OPS items."""
        self._check_items(items)
        if not items:
            return
        resp = self._txn({"success": [self._put_op(k, v, 0) for k, v in items.items()]})
        self._after_put(items, resp, False)

    def create(self, key: str, value: dict, *, owned: bool = False) -> bool:
        return self.create_all({key: value}, owned=owned)

    def create_all(self, items: dict[str, dict], *, owned: bool = False) -> bool:
        """Every item in one transaction if none of the keys exists; else nothing, and the mirror
        learns the keys' current values (so get() right after a lost race sees the winner's)."""
        self._check_items(items)
        if not items:
            return True
        compare = [{"key": _b64(self.prefix + k), "target": "CREATE", "result": "EQUAL", "create_revision": "0"}
                   for k in items]
        failure = [{"request_range": {"key": _b64(self.prefix + k)}} for k in items]
        with self._owning(owned):
            resp = self._write(lambda lease: {"compare": compare, "success": [self._put_op(k, v, lease)
                                                                               for k, v in items.items()],
                                              "failure": failure}, owned)
            if resp.get("succeeded"):
                self._after_put(items, resp, owned)
                return True
        revision = int(resp["header"]["revision"])
        found: dict[str, Change] = {}
        for r in resp.get("responses", []):
            for kv in r.get("response_range", {}).get("kvs", []):
                change = self._change(kv)
                if change is not None:
                    found[change.key] = change
        self._applied(list(found.values()))
        for k in items:
            if k not in found and self._mirror.get(k) is not None:
                self._mirror.forget(k, revision)
        return False

    def delete(self, key: str) -> bool:
        check_key(key)
        with self._owning(key in self._owned):  # (a new lease's re-put must not bring it back)
            resp = self._txn({"success": [{"request_delete_range": {"key": _b64(self.prefix + key)}}]})
            self._owned.pop(key, None)
        deleted = int(resp.get("responses", [{}])[0].get("response_delete_range", {}).get("deleted", 0))
        revision = int(resp["header"]["revision"])
        if (deleted or self._mirror.get(key) is not None) and self._mirror.forget(key, revision):
            self._dirty.set()  # (not deleted: gone already, and the watch has not told us yet)
        return bool(deleted)

    def _check_items(self, items: dict[str, dict]) -> None:
        for k, v in items.items():
            check_value(check_key(k), v)
        if len(items) > MAX_TXN_OPS:
            raise StoreError(f"{self.name}: {len(items)} writes at once, more than etcd's limit of {MAX_TXN_OPS} "
                             "in one transaction (--max-txn-ops); nothing was changed; write fewer at a time "
                             f"(meshagent apply: at most {MAX_TXN_OPS} resources at once)")

    def _after_put(self, items: dict[str, dict], resp: dict, owned: bool) -> None:
        revision = int(resp["header"]["revision"])
        lease = (self._lease_id or 0) if owned else 0  # (owned: the caller holds the lease lock)
        self._applied([Change(k, revision, v, lease) for k, v in items.items()])
        if not owned and not any(k in self._owned for k in items):
            return  # (no need to wait for the lease lock)
        with self._lease_lock:
            for k, v in items.items():
                if owned:
                    self._owned[k] = v
                else:
                    self._owned.pop(k, None)

    # ---- the mirror: full reads and the watch ------------------------------------------------------

    def _change(self, kv: dict, deleted: bool = False) -> Change | None:
        full = base64.b64decode(kv.get("key", "")).decode("utf-8", "replace")
        key = full[len(self.prefix):] if full.startswith(self.prefix) else None
        revision = int(kv.get("mod_revision", 0))
        if key is None:
            return None
        try:
            check_key(key)
        except StoreError:
            log.warning("%s: skipped key %s (revision %d): not a valid meshagent key", self.name, full, revision)
            return None
        if deleted:
            return Change(key, revision, None)
        value = decode(base64.b64decode(kv.get("value", "")))
        if value is None:
            log.warning("%s: skipped key %s (revision %d): its value is not a JSON object", self.name, key, revision)
        return Change(key, revision, CORRUPT if value is None else value, int(kv.get("lease", 0)))

    def _full_sync(self) -> None:
        """Read every key under the prefix and make it the mirror."""
        resp = self._post("/kv/range", {"key": _b64(self.prefix), "range_end": _b64(_range_end(self.prefix))})
        header = resp["header"]
        changes = [c for c in (self._change(kv) for kv in resp.get("kvs", [])) if c is not None]
        if self._mirror.replace(changes, int(header["revision"]), str(header.get("cluster_id", ""))):
            self._dirty.set()
            self.changed.set()
        self._synced()
        log.info("%s: read %d keys at revision %s", self.name, len(changes), header["revision"])

    def _watch_loop(self, need_full: bool) -> None:
        failures = 0
        while not self._stopping.is_set():
            self._resume.wait()
            if self._stopping.is_set():
                break
            started = time.monotonic()
            try:
                if need_full:
                    self._full_sync()
                    need_full = False
                self._watch_stream()
                if time.monotonic() - started > 1.0:
                    failures = 0
                    continue  # a stream that lived: make the next one at once
                failures += 1  # streams that end as soon as they start: back off as from failures
            except _Resync as e:
                log.info("%s: %s; reading every key again", self.name, e)
                need_full = True
                continue
            except _Failure as f:
                failures += 1
                if self._stopping.is_set():
                    break
                self._set_disconnected(f.reason)
                self._current = (self._current + 1) % len(self._clients)  # try the next endpoint next
            except Exception:  # a bug: keep the mirror alive, say so, and try again
                failures += 1
                log.exception("%s: watch failed", self.name)
            delay = min(BACKOFF_MAX_S, BACKOFF_MIN_S * 2 ** min(failures, 8)) * random.uniform(0.5, 1.0)
            self._stopping.wait(delay)

    def _watch_session(self) -> requests.Session:
        session = requests.Session()
        session.trust_env = False  # as the clients' sessions
        session.verify = self._tls["verify"]
        if self._tls["cert"]:
            session.cert = self._tls["cert"]
        return session

    def _watch_stream(self) -> None:
        """One watch from the mirror's revision + 1 until the stream ends (returns) or cannot be
        made (raises _Failure) or cannot resume (raises _Resync)."""
        client = self._clients[self._current]
        body = {"create_request": {"key": _b64(self.prefix), "range_end": _b64(_range_end(self.prefix)),
                                   "start_revision": str(self._mirror.revision + 1), "progress_notify": True}}
        session = self._watch_session()
        resp = None
        created = False
        try:
            try:
                resp = session.post(client.get_url("/watch"), json=body, stream=True,
                                    timeout=(CONNECT_TIMEOUT_S, WATCH_IDLE_S))
            except requests.exceptions.RequestException as e:
                raise classify(e) from None
            if resp.status_code != 200:
                raise classify(etcd3gw_errors.Etcd3Exception(resp.text))
            with self._watch_lock:
                self._watch_resp = resp
            if self._stopping.is_set() or not self._resume.is_set():
                return
            for line in resp.iter_lines(chunk_size=None):
                if not line:
                    continue
                msg = json.loads(line)
                if "error" in msg:
                    parsed = _etcd_error(line) or (str(msg["error"]), None)
                    if not created:
                        raise _Failure("unreachable", parsed[0], parsed[1])
                    log.info("%s: the watch ended: %s", self.name, parsed[0])
                    return
                created = self._on_watch_message(msg.get("result") or {}, created)
        except (requests.exceptions.RequestException, ValueError) as e:
            if not created:
                raise classify(e) from None
            # after it was made: idle for WATCH_IDLE_S, broken, or shut by close()/_pause_watch()
        finally:
            with self._watch_lock:
                self._watch_resp = None
            if resp is not None:
                resp.close()
            session.close()

    def _on_watch_message(self, result: dict, created: bool) -> bool:
        header = result.get("header") or {}
        revision = int(header.get("revision", 0))
        if result.get("compact_revision") not in (None, "0", 0):
            raise _Resync(f"the watch fell behind a compaction at revision {result['compact_revision']}")
        if result.get("canceled"):
            raise _Resync(f"etcd cancelled the watch ({result.get('cancel_reason') or 'no reason given'})")
        if result.get("created"):
            cluster = str(header.get("cluster_id", ""))
            if self._mirror.cluster_id and cluster != self._mirror.cluster_id:
                raise _Resync(f"etcd is another cluster now ({cluster}, was {self._mirror.cluster_id})")
            if revision < self._mirror.revision:
                raise _Resync(f"etcd's revision {revision} is below the mirror's {self._mirror.revision} "
                              "(restored from a backup?)")
            self._set_connected()
            return True
        events = result.get("events") or []
        if events:
            changes = [c for c in (self._change(ev.get("kv") or {}, ev.get("type") == "DELETE") for ev in events)
                       if c is not None]
            if self._mirror.apply(changes, watched=True):
                self._dirty.set()
                self.changed.set()
            self._mirror.caught_up(max(int((ev.get("kv") or {}).get("mod_revision", 0)) for ev in events))
        elif revision:
            self._mirror.caught_up(revision)  # a progress notice: everything up to it was sent
        self._set_connected()
        return created

    def _kick_watch(self) -> None:
        """Break the current watch stream (its thread makes a new one, or stops)."""
        with self._watch_lock:
            resp = self._watch_resp
        if resp is None:
            return
        with contextlib.suppress(Exception):
            if hasattr(resp.raw, "shutdown"):
                resp.raw.shutdown()
            else:  # urllib3 < 2.3
                resp.raw._connection.sock.shutdown(socket.SHUT_RDWR)

    def _pause_watch(self) -> None:
        """For tests: end the watch and make no new one until _resume_watch()."""
        self._resume.clear()
        self._kick_watch()

    def _resume_watch(self) -> None:
        self._resume.set()

    # ---- the lease -------------------------------------------------------------------------------

    def _acquire_lease(self) -> None:
        """Adopt the lease saved by this node's previous agent if etcd still holds it, else grant a
        new one and put every owned key again. Caller holds _lease_lock; raises _Failure."""
        saved = _read_json(self._lease_path) if self._lease_path else None
        if saved and saved.get("url") == self.url and saved.get("prefix") == self.prefix and not self._owned:
            old = int(saved.get("id", 0))
            ttl = self._call(lambda c: Lease(old, c).refresh()) if old else -1
            if ttl > 0:
                self._lease_id = old
                self._owned = self._mirror.leased(old)
                log.info("%s: adopted lease %x with %d owned keys", self.name, old, len(self._owned))
                return
            log.info("%s: lease %x of the previous agent has expired", self.name, old)
        lease = self._call(lambda c: c.lease(self.lease_ttl))
        self._lease_id = lease.id
        self._reput_pending = bool(self._owned)
        if self._lease_path:
            try:
                write_json(self._lease_path, {"id": lease.id, "ttl": self.lease_ttl, "url": self.url,
                                              "prefix": self.prefix})
            except OSError as e:
                log.warning("%s: cannot save the lease id in %s: %s", self.name, self._lease_path, e.strerror)
        self._reput_owned()

    def _reput_owned(self) -> None:
        """Bind every owned key to the current lease again (after a new lease). Caller holds _lease_lock."""
        owned = list(self._owned.items())
        for i in range(0, len(owned), MAX_TXN_OPS):
            chunk = dict(owned[i:i + MAX_TXN_OPS])
            resp = self._post("/kv/txn", {"success": [self._put_op(k, v, self._lease_id) for k, v in chunk.items()]})
            revision = int(resp["header"]["revision"])
            self._applied([Change(k, revision, v, self._lease_id) for k, v in chunk.items()])
        if owned:
            log.info("%s: put %d owned keys again under lease %x", self.name, len(owned), self._lease_id)
        self._reput_pending = False

    def _keepalive_loop(self) -> None:
        interval = max(self.lease_ttl / 3.0, 0.5)
        while not self._stopping.wait(interval if self._lease_id is not None else min(interval, 1.0)):
            try:
                with self._lease_lock:
                    if self._lease_id is None:
                        self._acquire_lease()
                        continue
                    if self._reput_pending:
                        self._reput_owned()
                    lease = self._lease_id
                ttl = self._call(lambda c, lease=lease: Lease(lease, c).refresh())
                if ttl <= 0:
                    with self._lease_lock:
                        if self._lease_id == lease:
                            log.warning("%s: lease %x expired; granting a new one", self.name, lease)
                            self._lease_id = None
                            with contextlib.suppress(FileNotFoundError, TypeError):
                                os.unlink(self._lease_path)
                            self._acquire_lease()
            except _Failure as f:
                if f.kind in ("unreachable", "timeout"):
                    self._set_disconnected(f.reason)
                else:
                    log.warning("%s: keeping the lease alive: %s", self.name, f.reason)
            except Exception:
                log.exception("%s: keeping the lease alive failed", self.name)

    # ---- the cache file --------------------------------------------------------------------------

    def _load_cache(self, reason: str) -> bool:
        data = _read_json(self._cache_path) if self._cache_path else None
        if data is None:
            return False
        if data.get("format") != CACHE_FORMAT or data.get("url") != self.url or data.get("prefix") != self.prefix:
            log.warning("%s: ignored the cache %s: it was written for %s", self.name, self._cache_path,
                        data.get("url"))
            return False
        try:
            self._mirror.load_json(data)
            last_sync = float(data["last_sync"])
        except (KeyError, TypeError, ValueError) as e:
            log.warning("%s: ignored the cache %s: %s", self.name, self._cache_path, e)
            return False
        with self._state_lock:
            self._connected, self._since, self._last_sync, self._error = False, time.time(), last_sync, reason
        log.warning("%s: unreachable (%s); serving %d keys from %s, as of %s", self.name, reason,
                    len(self._mirror), self._cache_path, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last_sync)))
        return True

    def _write_cache(self) -> None:
        if not self._cache_path:
            return
        data = self._mirror.to_json()
        with self._state_lock:
            data.update(format=CACHE_FORMAT, url=self.url, prefix=self.prefix, last_sync=self._last_sync)
        try:
            write_json(self._cache_path, data)
        except OSError as e:
            log.warning("%s: cannot write the cache %s: %s", self.name, self._cache_path, e.strerror)

    def _cache_loop(self) -> None:
        while not self._stopping.is_set():
            self._dirty.wait()
            if self._stopping.wait(CACHE_DEBOUNCE_S):
                break  # close() writes the last one
            self._dirty.clear()
            self._write_cache()

    # ---- status and close ------------------------------------------------------------------------

    def status(self) -> dict:
        with self._state_lock:
            connected, since, last_sync, error = self._connected, self._since, self._last_sync, self._error
        lease = self._lease_id
        return status_record("etcd", self.url, connected=connected, since=since, last_sync=last_sync,
                             revision=self._mirror.revision, error=error,
                             lease={"id": lease, "ttl": self.lease_ttl} if lease is not None else None)

    def close(self, revoke: bool = False) -> None:
        """Stop the threads and save the cache. The lease is left to expire (an agent restarted within
        its TTL adopts it), unless ``revoke``: then the owned keys go at once."""
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        self._resume.set()
        self._dirty.set()
        self._kick_watch()
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        for t in self._threads:  # a thread still in a request ends with it (daemon threads)
            t.join(max(0.0, deadline - time.monotonic()))
        if revoke and self._lease_id is not None:
            with contextlib.suppress(_Failure):
                lease = self._lease_id
                self._call(lambda c: Lease(lease, c).revoke())
                self._lease_id = None
                with contextlib.suppress(FileNotFoundError, TypeError):
                    os.unlink(self._lease_path)
        self._write_cache()
        for c in self._clients:
            c.session.close()

    def __repr__(self) -> str:
        return f"EtcdStore({self.url!r})"


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None
