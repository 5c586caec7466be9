"""Config builders shared by the L7 unit tests."""

from __future__ import annotations

from typing import Any

from userspace_l7.http1 import Request
from userspace_l7.snapshot import L7Config


def vs(name: str, hosts: list[str], http: list[dict[str, Any]], namespace: str = "default") -> dict[str, Any]:
    return {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": name, "namespace": namespace}, "spec": {"hosts": hosts, "http": http}}


def dr(name: str, host: str, subsets: list[dict[str, Any]] | None = None, policy: dict | None = None,
       namespace: str = "default") -> dict[str, Any]:
    spec: dict[str, Any] = {"host": host}
    if subsets:
        spec["subsets"] = subsets
    if policy:
        spec["trafficPolicy"] = policy
    return {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


SERVICES = [
    {"name": "reviews", "namespace": "default", "vip": "10.96.0.10",
     "ports": [{"port": 9080, "target_port": 9080}],
     "backends": [
         {"ip": "10.200.0.1", "labels": {"app": "reviews", "version": "v1"}},
         {"ip": "10.200.0.2", "labels": {"app": "reviews", "version": "v2"}},
         {"ip": "10.200.0.3", "labels": {"app": "reviews", "version": "v3"}},
     ]},
    {"name": "ratings", "namespace": "default", "vip": "10.96.0.11",
     "ports": [{"port": 80, "target_port": 8080}],
     "backends": [{"ip": "10.200.0.9", "labels": {"app": "ratings"}}]},
]

SUBSETS = [{"name": n, "labels": {"version": n}} for n in ("v1", "v2", "v3")]


def config(vss: list[dict] = (), drs: list[dict] = (), services: list[dict] = SERVICES) -> L7Config:
    return L7Config.from_dict({"services": list(services), "virtual_services": list(vss),
                               "destination_rules": list(drs)})


def req(target: str = "/", method: str = "GET", headers: dict[str, str] | None = None,
        host: str = "reviews") -> Request:
    hs = [("host", host)] + [(k.lower(), v) for k, v in (headers or {}).items()]
    return Request(method, target, hs, "1.1", True, host)
