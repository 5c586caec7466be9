"""libbpf through ctypes: the calls BCC has no Python wrapper for, set up in one place.

The library is the libbpf that libbcc itself links (libbpf.so.1, 1.x: failed calls return -errno),
so the L7 processor can use it without importing BCC. Struct prefixes are those of libbpf 1.1's
headers; the kernel accepts a shorter struct than its own (the `sz`/size argument says how long).
"""

from __future__ import annotations

import ctypes as ct
import os
from functools import cache


class DatapathCallError(OSError):
    """A libbpf call failed; the message names the call, ``errno`` the reason."""


class AttachOpts(ct.Structure):  # struct bpf_prog_attach_opts
    _fields_ = [("sz", ct.c_size_t), ("flags", ct.c_uint32), ("replace_prog_fd", ct.c_int)]


class ProgInfo(ct.Structure):  # the leading fields of struct bpf_prog_info
    _fields_ = [
        ("type", ct.c_uint32), ("id", ct.c_uint32), ("tag", ct.c_uint8 * 8),
        ("jited_prog_len", ct.c_uint32), ("xlated_prog_len", ct.c_uint32),
        ("jited_prog_insns", ct.c_uint64), ("xlated_prog_insns", ct.c_uint64),
        ("load_time", ct.c_uint64), ("created_by_uid", ct.c_uint32), ("nr_map_ids", ct.c_uint32),
        ("map_ids", ct.c_uint64), ("name", ct.c_char * 16),
    ]


class MapInfo(ct.Structure):  # the leading fields of struct bpf_map_info
    _fields_ = [("type", ct.c_uint32), ("id", ct.c_uint32), ("key_size", ct.c_uint32),
                ("value_size", ct.c_uint32), ("max_entries", ct.c_uint32), ("map_flags", ct.c_uint32)]


class TestRunOpts(ct.Structure):  # struct bpf_test_run_opts
    _fields_ = [
        ("sz", ct.c_size_t),
        ("data_in", ct.c_void_p),
        ("data_out", ct.c_void_p),
        ("data_size_in", ct.c_uint32),
        ("data_size_out", ct.c_uint32),
        ("ctx_in", ct.c_void_p),
        ("ctx_out", ct.c_void_p),
        ("ctx_size_in", ct.c_uint32),
        ("ctx_size_out", ct.c_uint32),
        ("retval", ct.c_uint32),
        ("repeat", ct.c_int),
        ("duration", ct.c_uint32),
        ("flags", ct.c_uint32),
        ("cpu", ct.c_uint32),
        ("batch_size", ct.c_uint32),
    ]


@cache
def libbpf() -> ct.CDLL:
    lib = ct.CDLL("libbpf.so.1", use_errno=True)
    lib.bpf_prog_attach_opts.argtypes = [ct.c_int, ct.c_int, ct.c_int, ct.POINTER(AttachOpts)]
    lib.bpf_prog_detach2.argtypes = [ct.c_int, ct.c_int, ct.c_int]
    lib.bpf_prog_attach.argtypes = [ct.c_int, ct.c_int, ct.c_int, ct.c_uint]
    lib.bpf_prog_query.argtypes = [ct.c_int, ct.c_int, ct.c_uint32, ct.POINTER(ct.c_uint32),
                                   ct.POINTER(ct.c_uint32), ct.POINTER(ct.c_uint32)]
    lib.bpf_prog_get_fd_by_id.argtypes = [ct.c_uint32]
    lib.bpf_prog_test_run_opts.argtypes = [ct.c_int, ct.POINTER(TestRunOpts)]
    lib.bpf_obj_get_info_by_fd.argtypes = [ct.c_int, ct.c_void_p, ct.POINTER(ct.c_uint32)]
    lib.bpf_obj_get.argtypes = [ct.c_char_p]
    lib.bpf_obj_pin.argtypes = [ct.c_int, ct.c_char_p]
    lib.bpf_map_get_next_key.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p]
    lib.bpf_map_lookup_elem.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p]
    lib.bpf_map_lookup_and_delete_elem.argtypes = [ct.c_int, ct.c_void_p, ct.c_void_p]
    lib.bpf_map_delete_elem.argtypes = [ct.c_int, ct.c_void_p]
    return lib


def check(ret: int, what: str) -> int:
    """``ret`` of a libbpf 1.x call, or DatapathCallError naming ``what`` (-errno on failure)."""
    if ret < 0:
        raise DatapathCallError(-ret, f"{what}: {os.strerror(-ret)}")
    return ret


def map_info(fd: int) -> MapInfo:
    info, size = MapInfo(), ct.c_uint32(ct.sizeof(MapInfo))
    check(libbpf().bpf_obj_get_info_by_fd(fd, ct.byref(info), ct.byref(size)), "bpf_obj_get_info_by_fd")
    return info
