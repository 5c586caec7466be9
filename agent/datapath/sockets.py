"""Connect-time service load balancing: load, pin and attach bpf/redirect.c; write its maps.

The socket hooks are attached at the cgroup-v2 root so that they see every process of an endpoint
however it was started (SPEC §5); they act only on sockets created in a network namespace listed in
`endpoint_netns` (bpf/lib/netns.h), so other nodes' endpoints and the rest of the machine are left
alone. Maps and their update protocol: bpf/lib/lb.h.

Which attached programs are ours: those using this node's pinned `endpoint_netns` map. A restarted
agent finds its predecessor's programs that way (even if a crash left them without a pin) and
replaces them in place with BPF_F_REPLACE, so there is no moment without translation and no
stacking of old and new copies.

IPv4 only, from sockets of either family: AF_INET6 sockets using IPv4-mapped addresses
(::ffff:VIP) go through the sock6_* programs. Sockets of the node's own namespace are translated
only if the agent registers that namespace too.

Use (the agent's side):

    dp = SocketDatapath("/sys/fs/bpf/meshagent/n1")
    dp.load()                       # compile, re-open pinned maps, adopt the services they hold
    dp.attach()                     # at the cgroup v2 root, replacing a predecessor's copies
    dp.set_endpoint_netns(netns_cookie("/run/netns/web-1"), ep_id=3, identity=1003)
    # lb_services / lb_backends are written by agent.reconcile.ServiceTable (bpf/lib/lb.h's protocol)
    dp.set_proxy("10.200.0.1", 15001)  # LB_F_L7 services go to the L7 processor from now on
    ...

L7 services (LB_F_L7, TCP): once set_proxy() named the processor, connect() goes there; the
processor finds the original VIP:port and the client's identity in the pinned `l7_origdst` map
(userspace_l7/origdst.py), filed by the sock_ops program. Datapath.set_proxy (bpf/policy.c)
must name the same address so the endpoint's egress policy lets the redirect through.
    dp.set_fastpath(True, node_netns=current_netns_cookie(), pod_cidr="10.200.0.0/24")
    dp.detach()                     # teardown only; an agent that stops leaves them attached

Socket fast path (bpf/lib/sockmap.h): sock_ops adds both ends of an established local connection
to the pinned `fastpath_socks` sockhash, and fastpath_msg (attached to that map, not to a cgroup)
hands their bytes to each other. set_fastpath() turns it on for new connections.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import ipaddress
import os
import socket
from dataclasses import dataclass
from functools import cache

from agent.datapath.btf import member_offset
from agent.datapath.build import (
    DatapathError,
    bpf_cflags,
    cgroup2_root,
    check_kernel_headers,
    ensure_bpffs,
    import_bcc,
)
from agent.datapath.libbpf import AttachOpts, ProgInfo, libbpf, map_info
from agent.datapath.maps import (
    SOCKET_LAYOUTS,
    EndpointNetnsC,
    FastpathConfigC,
    Lb4BackendC,
    Lb4BackendKeyC,
    Lb4KeyC,
    LbConfigC,
    SockKeyC,
    be32_to_ip,
    check_layout,
    ip_to_be32,
)
from agent.datapath.source import program_source

CGROUP_ROOT = cgroup2_root()  # the cgroup v2 root where the socket hooks attach

# Program -> attach type (enum bpf_attach_type, uapi/linux/bpf.h; the values bcc.BPFAttachType has).
PROGRAMS = {
    "sock4_connect": 10,      # BPF_CGROUP_INET4_CONNECT
    "sock4_sendmsg": 14,      # BPF_CGROUP_UDP4_SENDMSG
    "sock4_recvmsg": 19,      # BPF_CGROUP_UDP4_RECVMSG
    "sock4_getpeername": 29,  # BPF_CGROUP_INET4_GETPEERNAME
    "sock6_connect": 11,      # BPF_CGROUP_INET6_CONNECT      (IPv4-mapped addresses only)
    "sock6_sendmsg": 15,      # BPF_CGROUP_UDP6_SENDMSG
    "sock6_recvmsg": 20,      # BPF_CGROUP_UDP6_RECVMSG
    "sock6_getpeername": 30,  # BPF_CGROUP_INET6_GETPEERNAME
    "sock_ops": 3,            # BPF_CGROUP_SOCK_OPS           (L7 redirects' origins, the fast path)
    "sock_release": 34,       # BPF_CGROUP_INET_SOCK_RELEASE  (a closed socket's DNS redirect, lib/dns.h)
}
# Attached to the fastpath_socks map rather than to a cgroup.
FASTPATH_PROGRAM = "fastpath_msg"
BPF_SK_MSG_VERDICT = 7
BPF_CGROUP_SOCK_OPS = 3
BPF_CGROUP_INET_SOCK_RELEASE = 34
BPF_F_ALLOW_MULTI = 0x2
BPF_F_REPLACE = 0x4

MAP_SIZES = {
    "ENDPOINT_NETNS_MAP_SIZE": 4096,
    "LB_SERVICE_MAP_SIZE": 16384,
    "LB_BACKEND_MAP_SIZE": 262144,
    "LB_REVNAT_MAP_SIZE": 262144,
    "L7_PENDING_MAP_SIZE": 65536,
    "L7_ORIGDST_MAP_SIZE": 65536,
    "FASTPATH_MAP_SIZE": 65536,  # sockets on the fast path
    "FASTPATH_FLOW_MAP_SIZE": 131072,  # their state (LRU)
    "DNS_ORIGDST_MAP_SIZE": 65536,  # open sockets whose DNS query went to the proxy (LRU; lib/dns.h)
}
PINNED_MAPS = ("endpoint_netns", "lb_services", "lb_backends", "lb_revnat", "lb_config", "l7_pending",
               "l7_origdst", "fastpath_socks", "fastpath_flows", "fastpath_config", "fastpath_metrics", "dns_origdst")

LB_F_L7 = 0x1  # bpf/lib/lb.h: TCP: redirect to the L7 processor (balanced as L4 until set_proxy())
MAX_BACKENDS = 0xFFFF  # backend_count is a u16

SO_NETNS_COOKIE = 71
CLONE_NEWNET = 0x40000000

PROTOCOLS = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}


FP_CFG_ENABLED = 0x1  # bpf/lib/sockmap.h
FP_FLOW_TCP_FOR_GOOD = 0x1  # retired: older builds' sockets that stay on TCP
FP_FLOW_ON_TCP = 0x2
FP_FLOW_NODE_SIDE = 0x4  # bpf/lib/fastpath_flows.h
# fastpath_msg outcomes, in the order of their FP_* index (bpf/lib/sockmap.h).
FASTPATH_OUTCOMES = ("redirected", "pass_no_peer", "pass_policy_changed", "pass_queue_full",
                     "pass_fallen_back", "pass_no_state")


def _flow_path(flags: int, revision: int, current: int, loopback: bool) -> str:
    """Which path the socket's next send takes, as far as its own state says (bpf/redirect.c
    fastpath_msg; its peer's state counts too)."""
    if flags & FP_FLOW_TCP_FOR_GOOD:
        return "tcp"
    if revision != current and not loopback and not flags & FP_FLOW_NODE_SIDE:
        return "tcp (until TC re-checks policy)"
    return "tcp (until the peer catches up)" if flags & FP_FLOW_ON_TCP else "redirect"


ServiceKey = tuple[str, int, int]  # (VIP, port, IP protocol number)
LbBackend = tuple[str, int]  # (address, port)


@dataclass(frozen=True)
class ServiceState:
    """One service as the kernel maps hold it."""

    service_id: int
    flags: int
    backends: tuple[LbBackend | None, ...]  # in slot order; None: a slot below the count is missing


# ---- encodings ---------------------------------------------------------------------------------


def normalize_key(key: tuple) -> ServiceKey:
    """(vip, port, proto) with proto a number or "tcp"/"udp"; raises ValueError on bad input."""
    vip, port, proto = key
    if isinstance(proto, str):
        if proto.lower() not in PROTOCOLS:
            raise ValueError(f"service {vip}:{port}: protocol {proto!r} is not TCP or UDP")
        proto = PROTOCOLS[proto.lower()]
    if proto not in PROTOCOLS.values():
        raise ValueError(f"service {vip}:{port}: protocol {proto} is not TCP (6) or UDP (17)")
    return str(ipaddress.IPv4Address(vip)), _port(port, f"service {vip}"), proto


def _port(port: int, what: str) -> int:
    if not isinstance(port, int) or not 0 < port <= 0xFFFF:
        raise ValueError(f"{what}: port {port!r} is not in 1..65535")
    return port


def normalize_backend(backend: tuple) -> LbBackend:
    ip, port = backend
    return str(ipaddress.IPv4Address(ip)), _port(port, f"backend {ip}")


def service_key_to_c(key: ServiceKey) -> Lb4KeyC:
    vip, port, proto = normalize_key(key)
    return Lb4KeyC(vip=ip_to_be32(vip), port=socket.htons(port), proto=proto)


def service_key_from_c(c) -> ServiceKey:
    return be32_to_ip(c.vip), socket.ntohs(c.port), c.proto


def backend_to_c(backend: LbBackend) -> Lb4BackendC:
    ip, port = normalize_backend(backend)
    return Lb4BackendC(ip=ip_to_be32(ip), port=socket.htons(port))


def backend_from_c(c) -> LbBackend:
    return be32_to_ip(c.ip), socket.ntohs(c.port)


# ---- network namespace cookies -----------------------------------------------------------------


def netns_cookie(netns_path: str) -> int:
    """The kernel's cookie of the network namespace at ``netns_path`` (bpf_get_netns_cookie).

    Read with getsockopt(SO_NETNS_COOKIE) on a socket made inside that namespace, in a forked child
    that setns()es there and sends the value back through a pipe: the agent's own threads never
    change namespace.
    """
    if not os.path.exists(netns_path):
        raise DatapathError(f"network namespace {netns_path} does not exist")
    libc = _libc()  # resolved before fork: the child of a threaded process must not run the loader
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: setns, one socket, one write, then _exit
        code = 1
        try:
            os.close(rfd)
            nsfd = os.open(netns_path, os.O_RDONLY)
            if libc.setns(nsfd, CLONE_NEWNET) != 0:
                raise OSError(ct.get_errno(), os.strerror(ct.get_errno()))
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                value = s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8)
            os.write(wfd, b"K" + value)
            code = 0
        except BaseException as e:  # noqa: BLE001 - report anything to the parent
            with contextlib.suppress(Exception):
                os.write(wfd, b"E" + str(e).encode()[:500])
        finally:
            os._exit(code)
    os.close(wfd)
    try:
        data = b""
        while chunk := os.read(rfd, 1024):
            data += chunk
    finally:
        os.close(rfd)
        os.waitpid(pid, 0)
    if data[:1] == b"K" and len(data) == 9:
        return int.from_bytes(data[1:], "little")
    raise DatapathError(f"cannot read the cookie of network namespace {netns_path}: "
                        f"{data[1:].decode(errors='replace') or 'the helper process failed'}")


@cache
def _libc() -> ct.CDLL:
    libc = ct.CDLL(None, use_errno=True)
    libc.setns.argtypes = [ct.c_int, ct.c_int]
    return libc


def current_netns_cookie() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")


def _check(ret: int, what: str) -> int:
    """libbpf 1.x returns -errno on failure."""
    if ret < 0:
        raise DatapathError(f"{what}: {os.strerror(-ret)}")
    return ret


def _prog_info(fd: int) -> tuple[int, list[int]]:
    """(program id, ids of the maps it uses)."""
    info, size = ProgInfo(), ct.c_uint32(ct.sizeof(ProgInfo))
    _check(libbpf().bpf_obj_get_info_by_fd(fd, ct.byref(info), ct.byref(size)), "bpf_obj_get_info_by_fd")
    ids = (ct.c_uint32 * max(info.nr_map_ids, 1))()
    again = ProgInfo(nr_map_ids=info.nr_map_ids, map_ids=ct.addressof(ids))
    size = ct.c_uint32(ct.sizeof(ProgInfo))
    _check(libbpf().bpf_obj_get_info_by_fd(fd, ct.byref(again), ct.byref(size)), "bpf_obj_get_info_by_fd")
    return info.id, list(ids[: min(info.nr_map_ids, again.nr_map_ids)])


def _map_id(fd: int) -> int:
    return map_info(fd).id


def _attached_ids(cgroup_fd: int, attach_type: int) -> list[int]:
    """Programs attached directly at the cgroup (not inherited) for one hook."""
    lib = libbpf()
    for size in (64, 1024, 65536):
        ids, cnt, flags = (ct.c_uint32 * size)(), ct.c_uint32(size), ct.c_uint32(0)
        ret = lib.bpf_prog_query(cgroup_fd, attach_type, 0, ct.byref(flags), ids, ct.byref(cnt))
        if ret == 0:
            return list(ids[: cnt.value])
        if ret != -28:  # ENOSPC: more programs than room
            _check(ret, "bpf_prog_query")
    raise DatapathError("bpf_prog_query: too many programs attached")


@contextlib.contextmanager
def _prog_fd_by_id(prog_id: int):
    fd = libbpf().bpf_prog_get_fd_by_id(prog_id)
    if fd < 0:
        yield None  # gone meanwhile
        return
    try:
        yield fd
    finally:
        os.close(fd)


def _owned_ids(cgroup_fd: int, attach_type: int, map_id: int) -> list[int]:
    """Attached programs that use the map with ``map_id``: this node's programs."""
    owned = []
    for prog_id in _attached_ids(cgroup_fd, attach_type):
        with _prog_fd_by_id(prog_id) as fd:
            if fd is not None and map_id in _prog_info(fd)[1]:
                owned.append(prog_id)
    return owned


def _open_cgroup(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise DatapathError(f"cannot open cgroup {path}: {e.strerror} (is cgroup v2 mounted there?)") from None


def fastpath_kernel_cflags() -> list[str]:
    """The kernel struct offsets bpf/lib/sockmap.h reads (see there), from the running kernel's BTF.
    Without them the fast path cannot bound a receiver's queue: it is then refused at set_fastpath."""
    offsets = {
        "FP_SK_USER_DATA_OFF": member_offset("sock", "sk_user_data"),
        "FP_PSOCK_MSG_TOT_LEN_OFF": member_offset("sk_psock", "msg_tot_len"),
        "FP_TCP_WRITE_SEQ_OFF": member_offset("tcp_sock", "write_seq"),
        "FP_TCP_COPIED_SEQ_OFF": member_offset("tcp_sock", "copied_seq"),
    }
    flags = [f"-D{name}={offset or 0}" for name, offset in offsets.items()]
    return [*flags, "-DFP_UNSUPPORTED=1"] if None in offsets.values() else flags


def fastpath_supported() -> bool:
    return "-DFP_UNSUPPORTED=1" not in fastpath_kernel_cflags()


# ---- the datapath ------------------------------------------------------------------------------


class SocketDatapath:
    """The node's socket-level service programs and their maps."""

    def __init__(self, bpffs_dir: str, map_sizes: dict[str, int] | None = None):
        self.bpffs_dir = bpffs_dir
        self.map_sizes = {**MAP_SIZES, **(map_sizes or {})}
        self.bpf = None
        self.functions: dict[str, object] = {}
        self.fastpath_msg = None

    # ---- loading -------------------------------------------------------------------------------

    def cflags(self) -> list[str]:
        return [*bpf_cflags(self.bpffs_dir, self.map_sizes), *fastpath_kernel_cflags()]

    def load(self) -> None:
        """Compile and load the programs (maps are created or re-opened from their pins), check the
        struct layouts, and adopt the services the maps already hold. Attaches nothing."""
        check_kernel_headers()
        ensure_bpffs(self.bpffs_dir)
        BPF = import_bcc()
        try:
            self.bpf = BPF(text=program_source("redirect"), cflags=self.cflags())
            for name, attach_type in PROGRAMS.items():
                if attach_type == BPF_CGROUP_SOCK_OPS:
                    self.functions[name] = self.bpf.load_func(name, BPF.SOCK_OPS)
                elif attach_type == BPF_CGROUP_INET_SOCK_RELEASE:
                    self.functions[name] = self.bpf.load_func(name, BPF.CGROUP_SOCK, attach_type=attach_type)
                else:
                    self.functions[name] = self.bpf.load_func(name, BPF.CGROUP_SOCK_ADDR, attach_type=attach_type)
            self.fastpath_msg = self.bpf.load_func(FASTPATH_PROGRAM, BPF.SK_MSG)
        except Exception as e:  # BCC raises bare Exception for compile and verifier failures
            raise DatapathError(f"cannot load bpf/redirect.c: {e}") from None
        for ours, table, side in SOCKET_LAYOUTS.values():
            theirs = getattr(self.bpf[table], side)
            # A per-CPU map's leaf is an array of one value per CPU.
            check_layout(ours, theirs._type_ if issubclass(theirs, ct.Array) else theirs)
        self._read_services(cleanup=True)  # slots a crash mid-write left unreachable

    def table(self, name: str):
        return self.bpf[name]

    def _map_id(self) -> int:
        """Id of this node's endpoint_netns map (every program uses it): what marks a program as ours."""
        if self.bpf is not None:
            return _map_id(self.bpf["endpoint_netns"].map_fd)
        path = os.path.join(self.bpffs_dir, "endpoint_netns")
        fd = libbpf().bpf_obj_get(path.encode())
        if fd < 0:
            return 0
        try:
            return _map_id(fd)
        finally:
            os.close(fd)

    # ---- attaching -----------------------------------------------------------------------------

    def attach(self, cgroup_root: str = CGROUP_ROOT) -> None:
        """Attach every program at ``cgroup_root``, replacing this node's previous copies.

        Idempotent. A previous copy (found by the map it uses, see the module doc) is swapped for the
        new program with BPF_F_REPLACE: one atomic change of the cgroup's program array, so no
        connect() in between runs untranslated. Extra copies (left by a crash between attaching and
        pinning) are detached after. Then the programs are pinned as prog_<name>.
        """
        if not self.functions:
            raise DatapathError("attach() before load()")
        lib = libbpf()
        map_id = self._map_id()
        # Before sock_ops can add a socket: a socket takes the map's sk_msg program when it is
        # added. Attaching replaces a predecessor's program; sockets already in the map keep theirs.
        _check(lib.bpf_prog_attach(self.fastpath_msg.fd, self.fastpath_socks_fd(), BPF_SK_MSG_VERDICT, 0),
               "cannot attach fastpath_msg to the fastpath_socks map")
        cg = _open_cgroup(cgroup_root)
        try:
            for name, attach_type in PROGRAMS.items():
                fd = self.functions[name].fd
                new_id = _prog_info(fd)[0]
                owned = _owned_ids(cg, attach_type, map_id)
                if new_id in owned:
                    owned.remove(new_id)
                elif owned:
                    with _prog_fd_by_id(owned[0]) as old_fd:
                        opts = AttachOpts(sz=ct.sizeof(AttachOpts), flags=BPF_F_ALLOW_MULTI | BPF_F_REPLACE,
                                           replace_prog_fd=old_fd if old_fd is not None else -1)
                        ret = lib.bpf_prog_attach_opts(fd, cg, attach_type, ct.byref(opts))
                    if ret < 0:
                        # Not replaced (the old one vanished meanwhile, say): attach alongside and
                        # detach every old copy below, after the new one is in. No gap either way.
                        self._attach_multi(fd, cg, attach_type, name, cgroup_root)
                    else:
                        owned.pop(0)
                else:
                    self._attach_multi(fd, cg, attach_type, name, cgroup_root)
                for stale in owned:
                    with _prog_fd_by_id(stale) as old_fd:
                        if old_fd is not None:
                            lib.bpf_prog_detach2(old_fd, cg, attach_type)
        finally:
            os.close(cg)
        for name, fn in self.functions.items():
            self._pin_program(fn.fd, os.path.join(self.bpffs_dir, f"prog_{name}"))

    @staticmethod
    def _attach_multi(fd: int, cg: int, attach_type: int, name: str, cgroup_root: str) -> None:
        opts = AttachOpts(sz=ct.sizeof(AttachOpts), flags=BPF_F_ALLOW_MULTI, replace_prog_fd=0)
        _check(libbpf().bpf_prog_attach_opts(fd, cg, attach_type, ct.byref(opts)),
               f"cannot attach {name} at {cgroup_root}")

    def _pin_program(self, fd: int, path: str) -> None:
        if os.path.exists(path):
            os.unlink(path)  # the new program replaces the pin; the old one is detached already
        _check(libbpf().bpf_obj_pin(fd, path.encode()), f"cannot pin program at {path}")

    def detach(self, cgroup_root: str = CGROUP_ROOT) -> None:
        """Detach this node's programs from ``cgroup_root`` and remove their pins. Works without
        load() (for teardown): the programs are found through the pinned endpoint_netns map."""
        lib = libbpf()
        map_id = self._map_id()
        pinned: dict[str, int] = {}  # also what the pins name, should the map pin be gone
        for name in PROGRAMS:
            fd = lib.bpf_obj_get(os.path.join(self.bpffs_dir, f"prog_{name}").encode())
            if fd >= 0:
                try:
                    pinned[name] = _prog_info(fd)[0]
                finally:
                    os.close(fd)
        if os.path.isdir(cgroup_root):
            cg = _open_cgroup(cgroup_root)
            try:
                for name, attach_type in PROGRAMS.items():
                    ids = set(_owned_ids(cg, attach_type, map_id)) if map_id else set()
                    if name in pinned and pinned[name] in _attached_ids(cg, attach_type):
                        ids.add(pinned[name])
                    for prog_id in ids:
                        with _prog_fd_by_id(prog_id) as fd:
                            if fd is not None:
                                lib.bpf_prog_detach2(fd, cg, attach_type)
            finally:
                os.close(cg)
        for name in PROGRAMS:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.bpffs_dir, f"prog_{name}"))

    def attached(self, cgroup_root: str = CGROUP_ROOT) -> dict[str, list[int]]:
        """Program ids of this node attached at ``cgroup_root``, per program."""
        map_id = self._map_id()
        cg = _open_cgroup(cgroup_root)
        try:
            return {name: _owned_ids(cg, t, map_id) if map_id else [] for name, t in PROGRAMS.items()}
        finally:
            os.close(cg)

    def fastpath_socks_fd(self) -> int:
        """The sockhash's fd: BCC 0.26 has no Table class for sockhash maps, so ask libbcc directly."""
        from bcc.libbcc import lib as libbcc

        fd = libbcc.bpf_table_fd(self.bpf.module, b"fastpath_socks")
        if fd < 0:
            raise DatapathError("bpf/redirect.c has no fastpath_socks map")
        return fd

    # ---- endpoints -----------------------------------------------------------------------------

    netns_cookie = staticmethod(netns_cookie)

    def set_endpoint_netns(self, cookie: int, ep_id: int, identity: int) -> None:
        table = self.bpf["endpoint_netns"]
        table[table.Key(cookie)] = EndpointNetnsC(ep_id=ep_id, identity=identity)

    def remove_endpoint_netns(self, cookie: int) -> None:
        table = self.bpf["endpoint_netns"]
        with contextlib.suppress(KeyError):
            del table[table.Key(cookie)]

    def endpoint_netns(self) -> dict[int, tuple[int, int]]:
        """cookie -> (ep_id, identity)."""
        return {k.value: (v.ep_id, v.identity) for k, v in self.bpf["endpoint_netns"].items()}

    # ---- the L7 processor ----------------------------------------------------------------------

    def set_proxy(self, ip: str | None, port: int = 0) -> None:
        """Send connections to LB_F_L7 (TCP) services to ``ip``:``port``, the node's L7 processor.
        ``None`` (or "0.0.0.0"): no processor, L7 services are balanced as L4 ones."""
        if ip is None or ipaddress.IPv4Address(ip) == ipaddress.IPv4Address(0):
            value = LbConfigC()
        else:
            value = LbConfigC(proxy_ip=ip_to_be32(str(ipaddress.IPv4Address(ip))),
                              proxy_port=socket.htons(_port(port, f"L7 processor {ip}")))
        self.bpf["lb_config"][0] = value

    def proxy(self) -> tuple[str, int] | None:
        cfg = self.bpf["lb_config"][0]
        return (be32_to_ip(cfg.proxy_ip), socket.ntohs(cfg.proxy_port)) if cfg.proxy_ip else None

    def dns_origdst_entries(self) -> dict[int, tuple[str, int]]:
        """socket cookie -> (resolver address, port) a redirected DNS query was sent to (lib/dns.h)."""
        return {k.value: (be32_to_ip(v.addr), socket.ntohs(v.port)) for k, v in self.bpf["dns_origdst"].items()}

    def l7_origdst_entries(self) -> dict[tuple[str, int], tuple[str, int, int, int]]:
        """(client ip, client port) -> (VIP, port, identity, ep_id) not yet taken by the processor."""
        return {(be32_to_ip(k.ip), socket.ntohs(k.port)): (be32_to_ip(v.vip), socket.ntohs(v.port), v.identity,
                                                           v.ep_id)
                for k, v in self.bpf["l7_origdst"].items()}

    # ---- the socket fast path (bpf/lib/sockmap.h) ------------------------------------------------

    def set_fastpath(self, enabled: bool, node_netns: int = 0, pod_cidr: str = "0.0.0.0/32") -> None:
        """Turn the fast path on or off for connections established from now on. ``node_netns``: the
        cookie of the node's own namespace (the L7 processor's); ``pod_cidr``: addresses eligible
        besides loopback. Connections already on it stay on it until they close."""
        if enabled and not fastpath_supported():
            raise DatapathError("socket_fastpath needs a kernel whose BTF (/sys/kernel/btf/vmlinux) has "
                                "sk_psock.msg_tot_len to bound a receiver's queue; "
                                "set socket_fastpath: false in the node config")
        net = ipaddress.IPv4Network(pod_cidr)
        self.bpf["fastpath_config"][0] = FastpathConfigC(
            node_netns=node_netns, pod_net=ip_to_be32(str(net.network_address)),
            pod_mask=ip_to_be32(str(net.netmask)), flags=FP_CFG_ENABLED if enabled else 0)

    def fastpath_config(self) -> tuple[bool, int, str]:
        """(enabled, node netns cookie, pod CIDR) as the fastpath_config map holds them."""
        cfg = self.bpf["fastpath_config"][0]
        net = ipaddress.IPv4Network(f"{be32_to_ip(cfg.pod_net)}/{be32_to_ip(cfg.pod_mask)}", strict=False)
        return bool(cfg.flags & FP_CFG_ENABLED), int(cfg.node_netns), str(net)

    def fastpath_summary(self) -> dict:
        """Is the fast path on, and its per-outcome counters (messages, bytes; summed over CPUs)."""
        counters = {}
        table = self.bpf["fastpath_metrics"]
        for i, outcome in enumerate(FASTPATH_OUTCOMES):
            per_cpu = table[table.Key(i)]
            counters[outcome] = {"messages": sum(c.messages for c in per_cpu), "bytes": sum(c.bytes for c in per_cpu)}
        return {"enabled": bool(self.bpf["fastpath_config"][0].flags & FP_CFG_ENABLED), "counters": counters}

    def fastpath_sockets(self) -> list[tuple[str, int, str, int]]:
        """(local ip, port, remote ip, port) of every socket in the sockhash right now."""
        fd, lib = self.fastpath_socks_fd(), libbpf()
        out, key, prev = [], SockKeyC(), None
        while lib.bpf_map_get_next_key(fd, ct.byref(prev) if prev is not None else None, ct.byref(key)) == 0:
            out.append((be32_to_ip(key.local_ip), key.local_port, be32_to_ip(key.remote_ip), key.remote_port))
            prev = SockKeyC.from_buffer_copy(key)
        return out

    def fastpath(self) -> dict:
        """fastpath_summary() plus the sockets' state (fastpath_flows; closed sockets linger until the
        LRU evicts them)."""
        config = self.bpf["config_map"][0]
        return {
            **self.fastpath_summary(),
            "sockets": [
                {"local": f"{be32_to_ip(k.local_ip)}:{k.local_port}",
                 "remote": f"{be32_to_ip(k.remote_ip)}:{k.remote_port}", "netns": k.netns,
                 "revision": v.revision,
                 "path": _flow_path(v.flags, v.revision, config.policy_revision, bool(k.netns))}
                for k, v in self.bpf["fastpath_flows"].items()
            ],
        }

    # ---- services ------------------------------------------------------------------------------

    def list_services(self) -> dict[ServiceKey, list[LbBackend]]:
        """What the kernel maps hold: (VIP, port, proto) -> backends in slot order."""
        return {k: [b for b in s.backends if b is not None] for k, s in self._read_services().items()}

    def services(self) -> dict[ServiceKey, ServiceState]:
        """What the kernel maps hold, with service ids and flags."""
        return self._read_services()

    def _read_services(self, cleanup: bool = False) -> dict[ServiceKey, ServiceState]:
        """Read lb_services / lb_backends back. With ``cleanup``, delete backend slots no service
        reaches (left by an agent that stopped in the middle of a sync)."""
        slots: dict[int, dict[int, LbBackend]] = {}
        be_table = self.bpf["lb_backends"]
        for k, v in be_table.items():
            slots.setdefault(k.service_id, {})[k.slot] = backend_from_c(v)
        out: dict[ServiceKey, ServiceState] = {}
        reachable: set[tuple[int, int]] = set()
        for k, v in self.bpf["lb_services"].items():
            have = slots.get(v.service_id, {})
            backends = tuple(have.get(i) for i in range(v.backend_count))
            out[service_key_from_c(k)] = ServiceState(v.service_id, v.flags, backends)
            reachable.update((v.service_id, i) for i in range(v.backend_count))
        if cleanup:
            for sid, by_slot in slots.items():
                for slot in by_slot:
                    if (sid, slot) not in reachable:
                        with contextlib.suppress(KeyError):
                            del be_table[Lb4BackendKeyC(service_id=sid, slot=slot)]
        return out

    def revnat_entries(self) -> dict[tuple[int, LbBackend], tuple[str, int]]:
        """(socket cookie, backend) -> (VIP, port), for debugging and tests."""
        return {(k.cookie, backend_from_c(k)): (be32_to_ip(v.vip), socket.ntohs(v.port))
                for k, v in self.bpf["lb_revnat"].items()}
