"""The agent's API on its Unix socket (protocol: see agent/client.py).

Each op is a method `op_<name>(args) -> result`. A UserError (or a validation error) goes back as
{"ok": false, "error": ...}; anything else is a bug, logged with its traceback and reported as an
internal error.
"""

from __future__ import annotations

import json
import logging
import os
import socketserver
import threading
import time

from agent import identity as ids
from agent.daemon import POLICY_KINDS, Agent, UserError
from agent.datapath import clock, maps
from agent.endpoint import EndpointError
from agent.flows import FlowFilter
from agent.labels import LabelError, security_labels
from agent.policy.compiler import PolicyCompileError, PolicyInput
from agent.policy.lookup import lookup
from agent.policy.types import DIRECTION_NAMES, EGRESS, INGRESS, PROTO_NAMES, PROTO_NUMBERS, Enforcement
from agent.resources import KINDS, ResourceError, validate

log = logging.getLogger("meshagent.api")

STREAM_OPS = {"flows"}


class ApiServer:
    def __init__(self, agent: Agent):
        self.agent = agent
        self.ops = Ops(agent)
        path = agent.cfg.api_socket
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if os.path.exists(path):
            os.unlink(path)  # stale: the node lock proved no other agent owns it
        ops = self.ops

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                line = self.rfile.readline()
                if not line:
                    return
                try:
                    req = json.loads(line)
                    op, args = req["op"], req.get("args") or {}
                    if not isinstance(args, dict):
                        raise ValueError("args must be an object")
                except (ValueError, KeyError, TypeError) as e:
                    self._send({"ok": False, "error": f"malformed request: {e}"})
                    return
                fn = getattr(ops, f"op_{op}", None)
                if fn is None:
                    self._send({"ok": False, "error": f"unknown API operation {op!r}"})
                    return
                try:
                    if op in STREAM_OPS:
                        result = fn(args, lambda item: self._send({"item": item}))
                    else:
                        result = fn(args)
                    self._send({"ok": True, "result": result})
                except (BrokenPipeError, ConnectionResetError):
                    pass
                except (UserError, ResourceError, PolicyCompileError, LabelError, EndpointError, ValueError) as e:
                    self._send({"ok": False, "error": str(e)})
                except TypeError as e:
                    self._send({"ok": False, "error": f"bad arguments for {op}: {e}"})
                except Exception as e:  # a bug: keep serving, say so
                    log.exception("API op %s failed", op)
                    self._send({"ok": False, "error": f"internal error in {op}: {e} (see the agent's log)"})

            def _send(self, msg):
                self.wfile.write(json.dumps(msg, default=str).encode() + b"\n")
                self.wfile.flush()

        class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            daemon_threads = True

        self.server = Server(path, Handler)
        os.chmod(path, 0o600)
        self.thread = threading.Thread(target=self.server.serve_forever, name="api", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        try:
            os.unlink(self.agent.cfg.api_socket)
        except FileNotFoundError:
            pass


class Ops:
    def __init__(self, agent: Agent):
        self.agent = agent

    # ---- status and resources --------------------------------------------------------------------

    def op_status(self, args: dict) -> dict:
        return self.agent.status()

    def op_apply(self, args: dict) -> dict:
        resources = []
        seen = set()
        for doc in args.get("documents") or []:
            res = validate(doc.get("body"), doc.get("where") or "request")
            if res.key in seen:
                raise UserError(f"{doc.get('where')}: {res.kind} {res.namespace}/{res.name} appears twice")
            seen.add(res.key)
            resources.append(res)
        if not resources:
            raise UserError("nothing to apply: no documents given")
        a = self.agent
        with a.lock:
            # Semantic check of the policy set as it would be after this apply, before any write.
            current = {tuple(k.split("/")[1:]): v for k, v in a.store.list("resources").items()}
            for res in resources:
                current[res.key] = res.body
            a.check_services([res.body for res in resources if res.kind in ("Service", "ServiceEntry")])
            a.check_policies([
                PolicyInput(kind=k, namespace=ns, name=n, body=b,
                            audit=((b.get("metadata") or {}).get("annotations") or {}).get("meshagent.io/audit")
                            == "true")
                for (k, ns, n), b in current.items() if k in POLICY_KINDS
            ])
            results = []
            for res in resources:
                key = f"resources/{res.kind}/{res.namespace}/{res.name}"
                old = a.store.get(key)
                action = "created" if old is None else ("unchanged" if old == res.body else "configured")
                if action != "unchanged":
                    a.store.put(key, res.body)
                results.append({"kind": res.kind, "namespace": res.namespace, "name": res.name, "action": action})
            a.reconcile()
        return {"results": results}

    def op_delete(self, args: dict) -> dict:
        targets = []
        if args.get("documents"):
            for doc in args["documents"]:
                res = validate(doc.get("body"), doc.get("where") or "request")
                targets.append(res.key)
        else:
            kind, name = args.get("kind"), args.get("name")
            if kind not in KINDS:
                raise UserError(f"unknown kind {kind!r}; supported: {', '.join(sorted(KINDS))}")
            targets.append((kind, args.get("namespace") or "default", name))
        a = self.agent
        results = []
        with a.lock:
            for kind, ns, name in targets:
                gone = a.store.delete(f"resources/{kind}/{ns}/{name}")
                results.append({"kind": kind, "namespace": ns, "name": name,
                                "action": "deleted" if gone else "not found"})
            a.reconcile()
        return {"results": results}

    def op_get(self, args: dict) -> dict:
        kind = args.get("kind")
        if kind not in (None, "all") and kind not in KINDS:
            raise UserError(f"unknown kind {kind!r}; supported: {', '.join(sorted(KINDS))}")
        prefix = "resources" if kind in (None, "all") else f"resources/{kind}"
        items = []
        for key, body in self.agent.store.list(prefix).items():
            _, k, ns, name = key.split("/")
            items.append({"kind": k, "apiVersion": body.get("apiVersion"), "namespace": ns, "name": name,
                          "body": body})
        return {"items": items}

    def op_service_list(self, args: dict) -> dict:
        return {"items": [v.to_dict() for v in self.agent.services]}

    # ---- endpoints and identities ----------------------------------------------------------------

    def op_endpoint_add(self, args: dict) -> dict:
        labels = args.get("labels") or {}
        if not isinstance(labels, dict):
            raise UserError("labels must be a mapping")
        return self.agent.endpoint_add(
            args["name"], labels, args.get("namespace") or "default", args.get("serviceaccount") or "default",
            args.get("netns"), args.get("ip"),
        )

    def op_endpoint_list(self, args: dict) -> dict:
        return {"items": [self.agent._endpoint_view(r) for r in self.agent._local_records()]}

    def op_endpoint_get(self, args: dict) -> dict:
        return self.agent._endpoint_view(self.agent._find_local(args.get("name", "")))

    def op_endpoint_delete(self, args: dict) -> dict:
        return self.agent.endpoint_delete(args.get("name", ""))

    def op_identity_list(self, args: dict) -> dict:
        items = [{"id": i, "labels": {lbl: ""}, "reserved": True} for i, lbl in sorted(ids.RESERVED.items())]
        items += [{"id": i, "labels": lbls, "reserved": False}
                  for i, lbls in sorted(self.agent.identities.all().items())]
        return {"items": items}

    # ---- flows -----------------------------------------------------------------------------------

    def op_flows(self, args: dict, send) -> dict:
        flt = FlowFilter.from_args(args.get("filters") or {})
        if args.get("since_s"):
            flt = _with_since(flt, time.time_ns() - int(float(args["since_s"]) * 1e9))
        last = args.get("last")
        follow = bool(args.get("follow"))
        # Subscribe before replaying history so nothing falls between the two; the flows that
        # arrived in between come first on the subscription and are skipped once.
        sub = self.agent.flows.subscribe() if follow else None
        try:
            replayed = self.agent.flows.query(flt, int(last) if last else None)
            for flow in replayed:
                send({"flow": flow})
            already = {id(f) for f in replayed}
            while sub is not None and not self.agent.stopping.is_set():
                item = sub.get(0.5)
                if item is None:
                    continue
                if id(item) in already:
                    continue
                already = set()  # past the overlap: everything from here on is new
                if "lost" in item:
                    send(item)
                elif flt.matches(item):
                    send({"flow": item})
        finally:
            if sub is not None:
                sub.unsubscribe()
        return {"lost_events": self.agent.datapath.lost_events()}

    # ---- policy trace and raw maps ---------------------------------------------------------------

    def op_policy_trace(self, args: dict) -> dict:
        a = self.agent
        proto_name = str(args.get("protocol") or "TCP").upper()
        if proto_name not in PROTO_NUMBERS:
            raise UserError(f"protocol {proto_name!r}; supported: TCP, UDP, ICMP, SCTP")
        dport = int(args.get("dport") or 0)
        if not 0 <= dport <= 65535:
            raise UserError(f"port {dport} is out of range 0-65535")
        src = self._trace_side(args.get("from_labels") or {}, args.get("from_namespace"), "--from-label")
        dst = self._trace_side(args.get("to_labels") or {}, args.get("to_namespace"), "--to-label")
        kernel = a.sync.read_kernel(endpoints=False)  # the maps as the kernel holds them right now
        steps = []
        proto = PROTO_NUMBERS[proto_name]
        port = 8 if proto_name == "ICMP" and not dport else dport
        for direction, here, peer in ((EGRESS, src, dst), (INGRESS, dst, src)):
            rec = here["endpoint"]
            if rec is None:
                continue
            ifindex = a.ifindex.get(rec.name)
            blob = a.datapath.read_endpoint(ifindex) if ifindex is not None else None
            if blob is None:
                continue
            info = maps.EndpointInfoC.from_buffer_copy(blob)
            enforcement = {
                (rec.ep_id, d): Enforcement(
                    enforced=bool(info.flags & maps.EP_F_ENFORCE[d]), audit=bool(info.flags & maps.EP_F_AUDIT[d]),
                    rule_id=info.deny_rule_ingress if d == INGRESS else info.deny_rule_egress)
                for d in (INGRESS, EGRESS)
            }
            v = lookup(kernel.policy, enforcement, rec.ep_id, direction, peer["identity"], proto, port)
            rule = a.rules.get(v.rule_id)
            steps.append({
                "direction": DIRECTION_NAMES[direction], "endpoint": rec.name, "identity": rec.identity,
                "peer_identity": peer["identity"], "verdict": v.verdict, "rule_id": v.rule_id,
                "rule": rule.describe() if rule else ("no policy selects the endpoint" if not v.rule_id else "?"),
                "match": v.match,
            })
        if not steps:
            raise UserError("neither side is an endpoint of this node: nothing here decides this traffic")
        verdicts = [s["verdict"] for s in steps]
        final = "DENIED" if "DENIED" in verdicts else ("AUDIT" if "AUDIT" in verdicts else "ALLOWED")
        return {"verdict": final, "steps": steps}

    def _trace_side(self, labels: dict, namespace: str | None, flag: str) -> dict:
        """The endpoint (if local) and identity that carry ``labels`` (and namespace, if given)."""
        a = self.agent
        for rec in a._local_records():
            sec = security_labels(rec.labels, rec.namespace, rec.serviceaccount)
            if all(sec.get(k) == v for k, v in labels.items()) and namespace in (None, rec.namespace):
                return {"endpoint": rec, "identity": rec.identity}
        for ident, lbls in a.identities.all().items():
            if all(lbls.get(k) == v for k, v in labels.items()) and namespace in (
                None, lbls.get("io.kubernetes.pod.namespace")
            ):
                return {"endpoint": None, "identity": ident}
        if labels.get("reserved") in ("world", "host", "remote-node"):
            return {"endpoint": None, "identity": {"world": ids.WORLD, "host": ids.HOST,
                                                    "remote-node": ids.REMOTE_NODE}[labels["reserved"]]}
        raise UserError(f"{flag}: no endpoint or identity has the labels {labels} (see `meshagent identity list`)")

    def op_bpf_ct_list(self, args: dict) -> dict:
        now = clock.jiffies()
        items = []
        for k, v in self.agent.datapath.table("ct_map").items():
            items.append({
                "endpoint": k.ep_id, "direction": DIRECTION_NAMES.get(k.dir, k.dir),
                "proto": PROTO_NAMES.get(k.proto, k.proto),
                "source": f"{maps.be32_to_ip(k.saddr)}:{k.sport}",
                "destination": f"{maps.be32_to_ip(k.daddr)}:{k.dport}",
                "packets": v.packets_fwd + v.packets_rev, "bytes": v.bytes_fwd + v.bytes_rev,
                "rule_id": v.rule_id, "remote_identity": v.remote_identity, "revision": v.revision,
                "flags": v.flags, "idle_s": round(clock.seconds_since(v.last_seen, now), 1),
            })
        return {"items": items}

    def op_bpf_fastpath_list(self, args: dict) -> dict:
        """The sockets on the socket fast path now (bpf/lib/sockmap.h), with their state."""
        redirect = self.agent.redirect
        state = {(s["local"], s["remote"]): s for s in redirect.fastpath()["sockets"]}
        items = []
        for lip, lport, rip, rport in sorted(redirect.fastpath_sockets()):
            local, remote = f"{lip}:{lport}", f"{rip}:{rport}"
            s = state.get((local, remote), {})
            items.append({"local": local, "remote": remote,
                          "path": s.get("path", "tcp (no state)"),
                          "policy_revision": s.get("revision", "-")})
        return {"items": items}

    def op_bpf_ipcache_list(self, args: dict) -> dict:
        kernel = self.agent.sync.read_kernel(endpoints=False)
        return {"items": [{"prefix": p, "identity": i} for p, i in sorted(kernel.ipcache.items())]}

    def op_bpf_policy_list(self, args: dict) -> dict:
        kernel = self.agent.sync.read_kernel(endpoints=False)
        names = {r.ep_id: r.name for r in self.agent._local_records()}
        items = []
        for key, entry in sorted(kernel.policy.items()):
            rule = self.agent.rules.get(entry.rule_id)
            ports = "any" if key.proto == 0 or key.port_prefix == 0 else (
                str(key.port) if key.port_prefix == 16 else
                f"{key.port}-{key.port + (1 << (16 - key.port_prefix)) - 1}")
            items.append({
                "endpoint": names.get(key.ep_id, key.ep_id), "direction": DIRECTION_NAMES[key.direction],
                "identity": "any" if key.identity == 0 else key.identity,
                "proto": "any" if key.proto == 0 else PROTO_NAMES.get(key.proto, key.proto), "ports": ports,
                "action": entry.action.name.lower(), "audit": entry.audit, "rule_id": entry.rule_id,
                "rule": rule.describe() if rule else "",
            })
        return {"items": items}


def _with_since(flt: FlowFilter, since_ns: int) -> FlowFilter:
    import dataclasses

    return dataclasses.replace(flt, since_ns=since_ns)
