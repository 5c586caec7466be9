"""Byte layouts and key encodings of the service load-balancing maps (bpf/lib/lb.h, netns.h),
without a kernel."""

import ctypes as ct
import re
import socket

import pytest

from agent.datapath import maps, sockets
from agent.datapath.maps import DatapathLayoutError, check_layout
from agent.reconcile import ServiceTable, Sync, lb_table
from tests.paths import BPF


def _struct_body(struct: str) -> tuple[str, int]:
    for header in (BPF / "lib").glob("*.h"):
        m = re.search(rf"struct {struct} \{{(.*?)\}};\s*/\* (\d+) bytes \*/", header.read_text(), re.S)
        if m:
            return m.group(1), int(m.group(2))
    raise AssertionError(f"struct {struct} has no layout comment")


@pytest.mark.parametrize("struct", sorted(maps.SOCKET_LAYOUTS))
def test_sizes_match_layout_comments(struct):
    assert ct.sizeof(maps.SOCKET_LAYOUTS[struct][0]) == _struct_body(struct)[1]


@pytest.mark.parametrize("struct", sorted(maps.SOCKET_LAYOUTS))
def test_offsets_match_layout_comments(struct):
    """Every field's `/* N: ... */` comment gives its offset in our ctypes copy, in the same order."""
    body, _ = _struct_body(struct)
    documented = re.findall(r"\b(\w+)(?:\[\d+\])?;\s*/\*\s*(\d+)", body)
    ours = [(name, getattr(maps.SOCKET_LAYOUTS[struct][0], name).offset)
            for name, *_ in maps.SOCKET_LAYOUTS[struct][0]._fields_]
    assert [(n, int(o)) for n, o in documented] == ours


def test_check_layout_detects_drift():
    class Other(ct.Structure):
        _fields_ = [("vip", ct.c_uint32), ("port", ct.c_uint8), ("proto", ct.c_uint8), ("x", ct.c_uint16)]

    with pytest.raises(DatapathLayoutError):
        check_layout(maps.Lb4KeyC, Other)


def test_service_key_encoding():
    c = sockets.service_key_to_c(("10.96.0.10", 80, "tcp"))
    assert bytes(c) == socket.inet_aton("10.96.0.10") + (80).to_bytes(2, "big") + bytes([6, 0])
    assert sockets.service_key_from_c(c) == ("10.96.0.10", 80, socket.IPPROTO_TCP)
    assert bytes(sockets.service_key_to_c(("10.96.0.10", 53, 17)))[6] == 17


def test_backend_encoding():
    c = sockets.backend_to_c(("10.244.0.7", 8080))
    assert bytes(c) == socket.inet_aton("10.244.0.7") + (8080).to_bytes(2, "big") + b"\0\0"
    assert sockets.backend_from_c(c) == ("10.244.0.7", 8080)


def test_backend_key_slot_is_host_order():
    key = maps.Lb4BackendKeyC(service_id=3, slot=1)
    assert bytes(key) == (3).to_bytes(4, "little") + (1).to_bytes(2, "little") + b"\0\0"


def test_revnat_key_encoding():
    key = maps.Lb4RevnatKeyC(cookie=0x1122334455667788, ip=sockets.ip_to_be32("10.0.0.1"),
                                 port=socket.htons(8080))
    raw = bytes(key)
    assert raw[:8] == (0x1122334455667788).to_bytes(8, "little")
    assert raw[8:12] == socket.inet_aton("10.0.0.1") and raw[12:14] == (8080).to_bytes(2, "big")


@pytest.mark.parametrize("key", [
    ("10.96.0.300", 80, "tcp"), ("10.96.0.1", 0, "tcp"), ("10.96.0.1", 70000, "tcp"),
    ("10.96.0.1", 80, "icmp"), ("10.96.0.1", 80, 1), ("::1", 80, "tcp"),
])
def test_bad_service_keys_rejected(key):
    with pytest.raises(ValueError):
        sockets.normalize_key(key)


@pytest.mark.parametrize("backend", [("10.0.0.1", 0), ("nope", 80), ("10.0.0.1", "80")])
def test_bad_backends_rejected(backend):
    with pytest.raises(ValueError):
        sockets.normalize_backend(backend)


def test_protocol_names_and_numbers_are_one_key():
    assert sockets.normalize_key(("10.96.0.1", 53, "UDP")) == sockets.normalize_key(("10.96.0.1", 53, 17))


def test_attach_types_match_bcc():
    bcc = pytest.importorskip("bcc")
    expected = {
        "sock4_connect": bcc.BPFAttachType.CGROUP_INET4_CONNECT,
        "sock4_sendmsg": bcc.BPFAttachType.CGROUP_UDP4_SENDMSG,
        "sock4_recvmsg": bcc.BPFAttachType.CGROUP_UDP4_RECVMSG,
        "sock4_getpeername": bcc.BPFAttachType.CGROUP_INET4_GETPEERNAME,
        "sock6_connect": bcc.BPFAttachType.CGROUP_INET6_CONNECT,
        "sock6_sendmsg": bcc.BPFAttachType.CGROUP_UDP6_SENDMSG,
        "sock6_recvmsg": bcc.BPFAttachType.CGROUP_UDP6_RECVMSG,
        "sock6_getpeername": bcc.BPFAttachType.CGROUP_INET6_GETPEERNAME,
        "sock_ops": bcc.BPFAttachType.CGROUP_SOCK_OPS,
        "sock_release": bcc.BPFAttachType.CGROUP_INET_SOCK_RELEASE,
    }
    assert sockets.PROGRAMS == expected


def test_every_program_is_defined_in_redirect_c():
    text = (BPF / "redirect.c").read_text()
    for name, attach_type in sockets.PROGRAMS.items():
        ctx = {sockets.BPF_CGROUP_SOCK_OPS: "bpf_sock_ops \\*skops",
               sockets.BPF_CGROUP_INET_SOCK_RELEASE: "bpf_sock \\*sk"}.get(attach_type, "bpf_sock_addr \\*ctx")
        assert re.search(rf"^int {name}\(struct {ctx}\)", text, re.M), name


def test_l7_encodings():
    key = maps.L7ClientKeyC(ip=sockets.ip_to_be32("10.244.7.21"), port=socket.htons(40000))
    assert bytes(key) == socket.inet_aton("10.244.7.21") + (40000).to_bytes(2, "big") + b"\0\0"
    value = maps.L7OrigDstC(vip=sockets.ip_to_be32("10.96.0.10"), port=socket.htons(80), ep_id=3,
                                identity=0x123456)
    raw = bytes(value)
    assert raw[:4] == socket.inet_aton("10.96.0.10") and raw[4:6] == (80).to_bytes(2, "big")
    assert raw[6:8] == (3).to_bytes(2, "little") and raw[8:12] == (0x123456).to_bytes(4, "little")
    cfg = maps.LbConfigC(proxy_ip=sockets.ip_to_be32("10.200.0.1"), proxy_port=socket.htons(15001))
    assert bytes(cfg) == socket.inet_aton("10.200.0.1") + (15001).to_bytes(2, "big") + b"\0\0"


def test_dns_encodings():
    """dns_origdst's value as user_ip4/user_port hold an address; datapath_config's dns_port."""
    value = maps.DnsOrigDstC(addr=sockets.ip_to_be32("192.0.2.53"), port=socket.htons(53))
    assert bytes(value) == socket.inet_aton("192.0.2.53") + (53).to_bytes(2, "big") + b"\0\0"
    cfg = maps.DatapathConfigC(policy_revision=7, proxy_ip=sockets.ip_to_be32("10.200.0.1"),
                               proxy_port=socket.htons(15001), dns_port=socket.htons(15053))
    assert bytes(cfg)[8:] == (15001).to_bytes(2, "big") + (15053).to_bytes(2, "big")


def test_lb_flags_match_header():
    text = (BPF / "lib" / "lb.h").read_text()
    assert int(re.search(r"#define LB_F_L7 (0x[0-9a-f]+)", text).group(1), 16) == sockets.LB_F_L7


# ---- the reconcile path's service table against in-memory maps -------------------------------------


class FakeTable:
    """A BPF hash map as BCC's Table looks to ServiceTable; calls ``after`` after every write."""

    def __init__(self, key_t, leaf_t, after):
        self.key_t, self.leaf_t, self.after, self.data, self.writes = key_t, leaf_t, after, {}, 0

    def __setitem__(self, key, leaf):
        self.data[bytes(key)] = bytes(leaf)
        self.writes += 1
        self.after()

    def __delitem__(self, key):
        if bytes(key) not in self.data:
            raise KeyError(key)
        del self.data[bytes(key)]
        self.writes += 1
        self.after()

    def items(self):
        return [(self.key_t.from_buffer_copy(k), self.leaf_t.from_buffer_copy(v)) for k, v in self.data.items()]


class FakeMaps:
    """lb_services + lb_backends, checking after every single write what a connect() running at
    that moment relies on: every slot below a service's backend_count exists."""

    def __init__(self):
        self.services = FakeTable(maps.Lb4KeyC, maps.Lb4ServiceC, self.check)
        self.backends = FakeTable(maps.Lb4BackendKeyC, maps.Lb4BackendC, self.check)
        self.tables = {"lb_services": self.services, "lb_backends": self.backends}
        self.seen: list[dict] = []  # per write: service key -> backends a connect could pick

    def __getitem__(self, name):
        return self.tables[name]

    def check(self):
        slots = {(k.service_id, k.slot): sockets.backend_from_c(v) for k, v in self.backends.items()}
        view = {}
        for k, v in self.services.items():
            missing = [i for i in range(v.backend_count) if (v.service_id, i) not in slots]
            assert not missing, f"service {sockets.service_key_from_c(k)}: slots {missing} missing"
            view[sockets.service_key_from_c(k)] = {slots[(v.service_id, i)] for i in range(v.backend_count)}
        self.seen.append(view)


def make_dp(fake: FakeMaps | None = None) -> tuple[sockets.SocketDatapath, FakeMaps]:
    fake = fake or FakeMaps()
    dp = sockets.SocketDatapath("/nonexistent", {"LB_BACKEND_MAP_SIZE": 64, "LB_SERVICE_MAP_SIZE": 8})
    dp.bpf = fake
    dp._read_services(cleanup=True)  # what load() does after compiling
    return dp, fake


def sync(dp, services, flags=None):
    """What the agent's reconcile path does to the service maps (a fresh engine adopts the maps)."""
    Sync([ServiceTable(dp)]).apply({"lb_services": lb_table(services, flags)})


A, B, C, D = ("10.0.0.1", 80), ("10.0.0.2", 80), ("10.0.0.3", 80), ("10.0.0.4", 80)
WEB, DNS = ("10.96.0.10", 80, "tcp"), ("10.96.0.53", 53, "udp")
WEB_K, DNS_K = ("10.96.0.10", 80, 6), ("10.96.0.53", 53, 17)


@pytest.mark.parametrize("steps", [
    [{WEB: [A, B]}, {WEB: [A, B, C, D]}, {WEB: [B]}, {WEB: [C, D, A]}, {WEB: []}, {WEB: [A]}],
    [{WEB: [A], DNS: [B, C]}, {DNS: [C]}, {WEB: [D], DNS: [A, B, C]}, {}],
])
def test_sync_keeps_every_counted_slot_present(steps):
    dp, fake = make_dp()
    for services in steps:
        sync(dp, services)
        want = {sockets.normalize_key(k): v for k, v in services.items()}
        assert dp.list_services() == want
        # Nothing but the live slots is left behind.
        assert len(fake.backends.data) == sum(len(v) for v in services.values())


def test_removed_backend_is_unreachable_once_sync_returns():
    dp, fake = make_dp()
    sync(dp, {WEB: [A, B, C]})
    sync(dp, {WEB: [A, C]})
    assert fake.seen[-1][WEB_K] == {A, C}
    # While the sync ran, a connect could only ever see old or new backends.
    assert all(view.get(WEB_K, set()) <= {A, B, C} for view in fake.seen)


def test_unchanged_services_are_not_rewritten():
    dp, fake = make_dp()
    sync(dp, {WEB: [A, B], DNS: [C]})
    before = fake.services.writes + fake.backends.writes
    sync(dp, {WEB: [A, B], DNS: [C]})
    assert fake.services.writes + fake.backends.writes == before
    svc_writes, be_writes = fake.services.writes, fake.backends.writes
    sync(dp, {WEB: [A, B], DNS: [C, D]})
    assert (fake.services.writes - svc_writes, fake.backends.writes - be_writes) == (1, 1), \
        "one new slot, one count update; WEB untouched"


def test_service_ids_are_unique_and_reused():
    dp, _ = make_dp()
    sync(dp, {WEB: [A], DNS: [B]})
    ids = {k: s.service_id for k, s in dp.services().items()}
    assert sorted(ids.values()) == [1, 2]
    sync(dp, {DNS: [B]})
    sync(dp, {DNS: [B], ("10.96.0.11", 80, "tcp"): [C]})
    assert dp.services()[("10.96.0.11", 80, 6)].service_id == ids[WEB_K]
    assert dp.services()[DNS_K].service_id == ids[DNS_K]


def test_flags_are_written():
    dp, _ = make_dp()
    sync(dp, {WEB: [A]}, flags={WEB: sockets.LB_F_L7})
    assert dp.services()[WEB_K].flags == sockets.LB_F_L7
    sync(dp, {WEB: [A]})
    assert dp.services()[WEB_K].flags == 0


def test_weights_by_repetition():
    dp, _ = make_dp()
    sync(dp, {WEB: [A, A, A, B]})
    assert dp.list_services()[WEB_K] == [A, A, A, B]


@pytest.mark.parametrize("services", [
    {WEB: [A], ("10.96.0.10", 80, 6): [B]},             # the same service twice
    {WEB: [A, ("10.0.0.300", 80)]},                       # a bad backend
    {WEB: [A], ("10.96.0.1", 80, "sctp"): [A]},           # a bad protocol
    {WEB: [A] * 65},                                      # more slots than the map holds
    {(f"10.96.1.{i}", 80, "tcp"): [A] for i in range(9)},  # more services than the map holds
])
def test_bad_input_changes_nothing(services):
    dp, fake = make_dp()
    sync(dp, {DNS: [C]})
    before = (dict(fake.services.data), dict(fake.backends.data))
    with pytest.raises(ValueError):
        sync(dp, services)
    assert (fake.services.data, fake.backends.data) == before
    assert dp.list_services() == {DNS_K: [C]}


def test_adoption_reads_the_maps_and_drops_unreachable_slots():
    dp, fake = make_dp()
    sync(dp, {WEB: [A, B, C]})
    # An agent stopped mid-sync: the count was lowered, the stale slot not yet deleted.
    for k, v in fake.services.items():
        fake.services.data[bytes(k)] = bytes(maps.Lb4ServiceC(service_id=v.service_id, backend_count=2))
    fake.backends.data[bytes(maps.Lb4BackendKeyC(service_id=99, slot=0))] = bytes(sockets.backend_to_c(D))
    again, _ = make_dp(fake)
    assert again.list_services() == {WEB_K: [A, B]}
    assert len(fake.backends.data) == 2
    sync(again, {WEB: [A, B, C]})
    assert again.list_services() == {WEB_K: [A, B, C]}


def test_a_missing_slot_is_repaired():
    dp, fake = make_dp()
    sync(dp, {WEB: [A, B, C]})
    sid = dp.services()[WEB_K].service_id
    del fake.backends.data[bytes(maps.Lb4BackendKeyC(service_id=sid, slot=1))]
    again, _ = make_dp(fake)
    assert again.services()[WEB_K].backends == (A, None, C)
    sync(again, {WEB: [A, B, C]})
    assert again.list_services() == {WEB_K: [A, B, C]}


def test_fastpath_needs_every_kernel_offset(monkeypatch):
    offsets = {("sock", "sk_user_data"): 656, ("sk_psock", "msg_tot_len"): 412,
               ("tcp_sock", "write_seq"): 1576, ("tcp_sock", "copied_seq"): 1464}
    monkeypatch.setattr(sockets, "member_offset", lambda s, m: offsets.get((s, m)))
    assert sockets.fastpath_kernel_cflags() == ["-DFP_SK_USER_DATA_OFF=656", "-DFP_PSOCK_MSG_TOT_LEN_OFF=412",
                                                 "-DFP_TCP_WRITE_SEQ_OFF=1576", "-DFP_TCP_COPIED_SEQ_OFF=1464"]
    assert sockets.fastpath_supported()
    del offsets[("sk_psock", "msg_tot_len")]  # an older kernel (6.1 has none): no queue length to bound
    assert "-DFP_UNSUPPORTED=1" in sockets.fastpath_kernel_cflags()
    assert not sockets.fastpath_supported()


# ---- the DNS proxy's port in the TC datapath's global config ------------------------------------------


class FakeConfigMap:
    """config_map as BCC shows it: one element, read and written whole."""

    def __init__(self):
        self.value = maps.DatapathConfigC(policy_revision=41)

    def __getitem__(self, index):
        return maps.DatapathConfigC.from_buffer_copy(bytes(self.value))

    def __setitem__(self, index, value):
        self.value = maps.DatapathConfigC.from_buffer_copy(bytes(value))


def _tc_with_fake_config():
    from agent.datapath.tc import TcDatapath

    tc = TcDatapath("/nonexistent")
    tc.bpf = {"config_map": FakeConfigMap()}
    return tc


def test_dns_port_is_written_beside_the_proxy_and_the_revision():
    tc = _tc_with_fake_config()
    tc.set_proxy("10.200.0.1", 15001)
    tc.set_dns_port(15053)
    cfg = tc.bpf["config_map"][0]
    assert (cfg.policy_revision, tc.proxy(), tc.dns_port()) == (41, ("10.200.0.1", 15001), 15053)
    assert cfg.dns_port == socket.htons(15053), "network order, as the hooks compare it with user_port"
    tc.bump_policy_revision()
    tc.set_proxy("10.200.0.1", 15002)
    assert tc.dns_port() == 15053, "each writer keeps the other fields"
    tc.set_dns_port(0)
    assert tc.dns_port() == 0 and tc.proxy() == ("10.200.0.1", 15002)


@pytest.mark.parametrize("port", [-1, 65536, True, "53", 53.0, None])
def test_bad_dns_ports_are_refused_and_change_nothing(port):
    tc = _tc_with_fake_config()
    tc.set_dns_port(15053)
    with pytest.raises(ValueError, match="DNS proxy port .* is not in 0..65535"):
        tc.set_dns_port(port)
    assert tc.dns_port() == 15053
