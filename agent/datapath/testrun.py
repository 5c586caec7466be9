"""BPF_PROG_TEST_RUN through libbpf's bpf_prog_test_run_opts (BCC has no Python wrapper).

Runs a loaded program on a packet we give it, without a network: datapath tests check verdicts
and map side effects with it, and `make bench` reads the kernel's own per-run time from it.
"""

from __future__ import annotations

import ctypes as ct
import os
from dataclasses import dataclass

from agent.datapath.libbpf import TestRunOpts, libbpf


# The leading fields of struct __sk_buff up to ifindex (uapi/linux/bpf.h): len, pkt_type, mark,
# queue_mapping, protocol, vlan_present, vlan_tci, vlan_proto, priority, ingress_ifindex, ifindex.
class _SkbCtx(ct.Structure):
    _fields_ = [(name, ct.c_uint32) for name in (
        "len", "pkt_type", "mark", "queue_mapping", "protocol", "vlan_present", "vlan_tci", "vlan_proto",
        "priority", "ingress_ifindex", "ifindex")]


@dataclass(frozen=True)
class RunResult:
    retval: int
    duration_ns: int  # the kernel's average per repetition


def run_skb(prog_fd: int, packet: bytes, ifindex: int = 1, repeat: int = 1, mark: int = 0) -> RunResult:
    """Run a TC program on ``packet`` (an Ethernet frame) as if it arrived on ``ifindex`` with
    skb->mark ``mark``."""
    fn = libbpf().bpf_prog_test_run_opts
    data = ct.create_string_buffer(packet, len(packet))
    out = ct.create_string_buffer(len(packet) + 256)
    ctx = _SkbCtx(ifindex=ifindex, mark=mark)
    opts = TestRunOpts(
        sz=ct.sizeof(TestRunOpts), data_in=ct.cast(data, ct.c_void_p), data_out=ct.cast(out, ct.c_void_p),
        data_size_in=len(packet), data_size_out=len(out), ctx_in=ct.addressof(ctx),
        ctx_size_in=ct.sizeof(ctx), repeat=repeat,
    )
    err = fn(prog_fd, ct.byref(opts))
    if err != 0:
        raise OSError(-err if err < 0 else ct.get_errno(), f"BPF_PROG_TEST_RUN failed: {os.strerror(abs(err))}")
    return RunResult(retval=opts.retval, duration_ns=opts.duration)
