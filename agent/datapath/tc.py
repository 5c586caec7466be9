"""Compile, load, pin and attach the TC policy programs; hand out the node's maps.

Maps are declared pinned in the C (BPF_TABLE_PINNED), so a restarted agent that compiles the same
source gets the very maps the running programs use, and replacing the TC filters in place
(`replace-filter` at a fixed priority) swaps programs without a moment of no enforcement.
"""

from __future__ import annotations

import ctypes as ct
import errno
import ipaddress
import os
import socket
from collections.abc import Callable

from agent.datapath import maps
from agent.datapath.build import DatapathError, bpf_cflags, check_kernel_headers, ensure_bpffs, import_bcc
from agent.datapath.libbpf import libbpf, map_info
from agent.datapath.source import program_source

PROGRAMS = {"from_container": "ingress", "to_container": "egress"}  # program -> clsact hook
TC_PARENT = {"ingress": "ffff:fff2", "egress": "ffff:fff3"}
TC_PRIO = 1  # one filter per hook, always this priority, so replace-filter swaps it in place

MAP_SIZES = {
    "CT_MAP_SIZE": 262144,
    "POLICY_MAP_SIZE": 262144,
    "IPCACHE_MAP_SIZE": 65536,
    "ENDPOINT_MAP_SIZE": 4096,
}
ENDPOINT_ARRAY_SIZE = 65536  # bpf/lib/common.h: endpoints at lower ifindexes live in an array


class TcDatapath:
    """The node's loaded policy programs and their maps."""

    def __init__(self, bpffs_dir: str, map_sizes: dict[str, int] | None = None):
        self.bpffs_dir = bpffs_dir
        self.map_sizes = {**MAP_SIZES, **(map_sizes or {})}
        self.bpf = None
        self.functions: dict[str, object] = {}

    # ---- loading -------------------------------------------------------------------------------

    def cflags(self) -> list[str]:
        return bpf_cflags(self.bpffs_dir, self.map_sizes)

    def load(self) -> None:
        check_kernel_headers()
        ensure_bpffs(self.bpffs_dir)
        BPF = import_bcc()
        revision = self._retire_old_config_pin()
        try:
            self.bpf = BPF(text=program_source("policy"), cflags=self.cflags())
            for name in PROGRAMS:
                self.functions[name] = self.bpf.load_func(name, BPF.SCHED_CLS)
        except Exception as e:  # BCC raises bare Exception for compile and verifier failures
            raise DatapathError(f"cannot load bpf/policy.c: {e}") from None
        for ours, table, side in maps.LAYOUTS.values():
            maps.check_layout(ours, getattr(self.bpf[table], side))
        for ours, side in ((maps.IpcacheKeyC, "Key"), (maps.IpcacheEntryC, "Leaf")):
            maps.check_layout(ours, getattr(self.bpf["ipblock_cidrs"], side))  # the ipcache's structs
        if revision is not None:
            self.bpf["config_map"][0] = maps.DatapathConfigC(policy_revision=revision)
        for name, fn in self.functions.items():
            self._pin_program(fn.fd, os.path.join(self.bpffs_dir, f"prog_{name}"))

    def _retire_old_config_pin(self) -> int | None:
        """A pinned config map of another layout (an agent upgraded over its predecessor's pins;
        datapath_config grew from 8 to 12 bytes) cannot be reused: the new programs would fail the
        verifier. Unpin it (the running programs keep it until they are replaced) so BCC creates a
        new one, and return its policy_revision to carry over; None if there is nothing to retire."""
        path = os.path.join(self.bpffs_dir, "config")
        if not os.path.exists(path):
            return None
        lib = libbpf()
        fd = lib.bpf_obj_get(path.encode())
        if fd < 0:
            return None
        try:
            try:
                value_size = map_info(fd).value_size
            except OSError:
                return None
            if value_size == ct.sizeof(maps.DatapathConfigC) or value_size < 4:
                return None
            key, value = ct.c_uint32(0), ct.create_string_buffer(value_size)
            revision = 0
            if lib.bpf_map_lookup_elem(fd, ct.byref(key), value) == 0:
                revision = int.from_bytes(value.raw[:4], "little")
            os.unlink(path)
            return revision
        finally:
            os.close(fd)

    def _pin_program(self, fd: int, path: str) -> None:
        if os.path.exists(path):
            os.unlink(path)  # the new program replaces the pin; the old one lives while attached
        ret = libbpf().bpf_obj_pin(fd, path.encode())
        if ret < 0:
            raise DatapathError(f"cannot pin program at {path}: {os.strerror(-ret)}")

    def table(self, name: str):
        return self.bpf[name]

    # ---- the global config (bpf/lib/common.h datapath_config) ----------------------------------

    def set_proxy(self, ip: str | None, port: int = 0) -> None:
        """Name the node's L7 processor (``ip``:``port``, where the socket hooks send L7 services):
        a new TCP flow from an endpoint to it is admitted as a redirect whatever the endpoint's
        egress policy. ``None`` (or "0.0.0.0") removes it. Leaves policy_revision as it is."""
        if ip is None or ipaddress.IPv4Address(ip) == ipaddress.IPv4Address(0):
            ip_be, port_be = 0, 0
        else:
            if not isinstance(port, int) or not 0 < port <= 0xFFFF:
                raise ValueError(f"proxy port {port!r} is not in 1..65535")
            ip_be, port_be = maps.ip_to_be32(str(ipaddress.IPv4Address(ip))), socket.htons(port)
        table = self.bpf["config_map"]
        cfg = table[0]
        cfg.proxy_ip, cfg.proxy_port = ip_be, port_be
        table[0] = cfg

    def set_dns_port(self, port: int) -> None:
        """Turn the DNS redirect on (the node's DNS proxy at the processor's address, ``port``, UDP
        and TCP) or off (0). The socket hooks send every DNS query of an endpoint there and TC lets
        it through (bpf/lib/dns.h, bpf/policy.c is_dns_redirect). Leaves the other fields alone."""
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 0xFFFF:
            raise ValueError(f"DNS proxy port {port!r} is not in 0..65535 (0: off)")
        table = self.bpf["config_map"]
        cfg = table[0]
        cfg.dns_port = socket.htons(port)
        table[0] = cfg

    def dns_port(self) -> int:
        """The DNS proxy's port as the datapath holds it; 0: no DNS redirect."""
        return socket.ntohs(self.bpf["config_map"][0].dns_port)

    def policy_revision(self) -> int:
        return int(self.bpf["config_map"][0].policy_revision)

    def bump_policy_revision(self) -> None:
        """Make every tracked flow re-check policy at its next packet (agent.reconcile.Sync only)."""
        table = self.bpf["config_map"]
        cfg = table[0]  # keep the element's other fields (the L7 processor's address)
        cfg.policy_revision = (cfg.policy_revision + 1) & 0xFFFFFFFF
        table[0] = cfg

    def proxy(self) -> tuple[str, int] | None:
        """The L7 processor's address as the datapath holds it, or None."""
        cfg = self.bpf["config_map"][0]
        return (maps.be32_to_ip(cfg.proxy_ip), socket.ntohs(cfg.proxy_port)) if cfg.proxy_ip else None

    # ---- the endpoint table: an array by ifindex, a hash beyond it (bpf/lib/common.h) -----------

    def read_endpoints(self) -> dict[int, bytes]:
        out = {}
        array = self.bpf["endpoints"]
        for idx in range(ENDPOINT_ARRAY_SIZE):
            info = array[idx]
            if info.ep_id:
                out[idx] = bytes(info)
        for k, v in self.bpf["endpoints_hi"].items():
            out[int(k.value)] = bytes(v)
        return out

    def read_endpoint(self, ifindex: int) -> bytes | None:
        if ifindex < ENDPOINT_ARRAY_SIZE:
            info = self.bpf["endpoints"][ifindex]
            return bytes(info) if info.ep_id else None
        table = self.bpf["endpoints_hi"]
        try:
            return bytes(table[table.Key(ifindex)])
        except KeyError:
            return None

    def write_endpoint(self, ifindex: int, info: maps.EndpointInfoC) -> None:
        if ifindex < ENDPOINT_ARRAY_SIZE:
            self.bpf["endpoints"][ifindex] = info
        else:
            table = self.bpf["endpoints_hi"]
            table[table.Key(ifindex)] = info

    def delete_endpoint(self, ifindex: int) -> None:
        if ifindex < ENDPOINT_ARRAY_SIZE:
            self.bpf["endpoints"][ifindex] = maps.EndpointInfoC()  # ep_id 0: empty slot
            return
        table = self.bpf["endpoints_hi"]
        try:
            del table[table.Key(ifindex)]
        except KeyError:
            pass

    # ---- the same entries by ep_id (bpf/lib/common.h endpoints_by_id) ---------------------------
    # The L7 processor's upstream packets name their client endpoint by ep_id (its mark); the
    # datapath finds that client's identity and egress policy here.

    def read_endpoints_by_id(self) -> dict[int, bytes]:
        return {int(k.value): bytes(v) for k, v in self.bpf["endpoints_by_id"].items()}

    def write_endpoint_by_id(self, ep_id: int, info: maps.EndpointInfoC) -> None:
        table = self.bpf["endpoints_by_id"]
        table[table.Key(ep_id)] = info

    def delete_endpoint_by_id(self, ep_id: int) -> None:
        table = self.bpf["endpoints_by_id"]
        try:
            del table[table.Key(ep_id)]
        except KeyError:
            pass

    # ---- attaching -----------------------------------------------------------------------------

    def attach(self, ifindex: int) -> None:
        """Attach both programs to a host-side veth (creating its clsact qdisc)."""
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        with IPRoute() as ipr:
            try:
                ipr.tc("add", "clsact", ifindex)
            except NetlinkError as e:
                if e.code != errno.EEXIST:
                    raise
            for name, hook in PROGRAMS.items():
                ipr.tc(
                    "replace-filter", "bpf", ifindex, ":1", fd=self.functions[name].fd, name=name,
                    parent=TC_PARENT[hook], classid=1, direct_action=True, prio=TC_PRIO,
                )

    # ---- events --------------------------------------------------------------------------------

    def open_events(self, callback: Callable[[maps.FlowEventC], None]) -> None:
        size = ct.sizeof(maps.FlowEventC)

        def on_event(_ctx, data, length):
            if length >= size:
                callback(ct.cast(data, ct.POINTER(maps.FlowEventC)).contents)

        self.bpf["events"].open_ring_buffer(on_event)

    def poll_events(self, timeout_ms: int) -> None:
        """Wait up to timeout_ms for a wakeup, then read what is ready."""
        self.bpf.ring_buffer_poll(timeout_ms)

    def drain_events(self) -> None:
        """Read every event in the ring now, whether or not the datapath asked for a wakeup."""
        self.bpf.ring_buffer_consume()

    def lost_events(self) -> int:
        return sum(int(v) for v in self.bpf["lost_events"][0])

    def metrics(self) -> dict[tuple[int, int], tuple[int, int]]:
        """(reason, direction) -> (packets, bytes), summed over CPUs, non-zero only."""
        out = {}
        table = self.bpf["metrics_map"]
        for idx in range(512):
            per_cpu = table[idx]
            packets = sum(v.packets for v in per_cpu)
            if packets:
                out[(idx >> 1, idx & 1)] = (packets, sum(v.bytes for v in per_cpu))
        return out
