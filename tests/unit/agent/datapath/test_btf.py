"""agent/datapath/btf.py: member offsets from `bpftool btf dump ... format raw`, without a kernel."""

import subprocess

from agent.datapath import btf

RAW = """[1] INT 'unsigned int' size=4 bits_offset=0 nr_bits=32 encoding=(none)
[2] STRUCT 'sock' size=784 vlen=3
\t'__sk_common' type_id=3 bits_offset=0
\t'sk_user_data' type_id=108 bits_offset=5248
\t'sk_flags_bit' type_id=1 bits_offset=5251 bitfield_size=1
[3] STRUCT 'sk_psock' size=696 vlen=1
\t'msg_tot_len' type_id=35 bits_offset=3296
[4] STRUCT 'sock' size=8 vlen=1
\t'sk_user_data' type_id=108 bits_offset=0
[5] UNION '(anon)' size=8 vlen=1
\t'sk_user_data' type_id=108 bits_offset=64
"""


def test_offsets_come_from_the_first_struct_of_that_name(monkeypatch):
    monkeypatch.setattr(btf.subprocess, "run", lambda *a, **kw: subprocess.CompletedProcess(a, 0, RAW, ""))
    btf._struct_members.cache_clear()
    try:
        assert btf.member_offset("sock", "sk_user_data") == 656
        assert btf.member_offset("sk_psock", "msg_tot_len") == 412
        assert btf.member_offset("sock", "sk_flags_bit") is None  # a bitfield has no byte offset
        assert btf.member_offset("sk_psock", "nope") is None
        assert btf.member_offset("nope", "x") is None
    finally:
        btf._struct_members.cache_clear()


def test_no_bpftool_means_no_offsets(monkeypatch):
    def fail(*a, **kw):
        raise FileNotFoundError("bpftool")

    monkeypatch.setattr(btf.subprocess, "run", fail)
    btf._struct_members.cache_clear()
    try:
        assert btf.member_offset("sock", "sk_user_data") is None
    finally:
        btf._struct_members.cache_clear()
