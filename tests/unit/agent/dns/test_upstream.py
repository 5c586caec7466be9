"""Which resolvers the proxy forwards to (agent/dns/upstream.py): config values and resolv.conf."""

from __future__ import annotations

import pytest

from agent.dns.upstream import Upstream, Upstreams, parse_upstream_address, resolv_conf_upstreams


@pytest.mark.parametrize("text,want", [
    ("10.0.0.2", Upstream("10.0.0.2", 53)), ("10.0.0.2:5353", Upstream("10.0.0.2", 5353)),
    (" 10.0.0.2 ", Upstream("10.0.0.2", 53)), ("fd00::1", Upstream("fd00::1", 53)),
    ("[fd00::1]:5353", Upstream("fd00::1", 5353)), ("[fd00::1]", Upstream("fd00::1", 53)),
])
def test_addresses(text, want):
    assert parse_upstream_address(text) == want


@pytest.mark.parametrize("text", ["", "dns.google", "10.0.0.256", "10.0.0.1:0", "10.0.0.1:65536", "10.0.0.1:x",
                                  "[fd00::1", "[fd00::1]x", "10.0.0.1:53:1"])
def test_bad_addresses(text):
    with pytest.raises(ValueError) as e:
        parse_upstream_address(text)
    assert "\n" not in str(e.value)


def test_str_round_trips():
    for up in (Upstream("10.0.0.2", 53), Upstream("fd00::1", 5353)):
        assert parse_upstream_address(str(up)) == up


def test_resolv_conf(tmp_path):
    conf = tmp_path / "resolv.conf"
    conf.write_text("# comment\nsearch example.test\nnameserver 10.0.0.2\nnameserver fe80::1%eth0\n"
                    "nameserver not-an-ip\noptions ndots:5\nnameserver 10.0.0.3 # trailing\n")
    assert resolv_conf_upstreams(str(conf)) == [Upstream("10.0.0.2"), Upstream("fe80::1"), Upstream("10.0.0.3")]


def test_resolv_conf_without_nameservers_means_localhost_as_glibc(tmp_path):
    conf = tmp_path / "resolv.conf"
    conf.write_text("search example.test\n")
    assert resolv_conf_upstreams(str(conf)) == [Upstream("127.0.0.1")]
    assert resolv_conf_upstreams(str(tmp_path / "missing")) == [Upstream("127.0.0.1")]


def test_there_must_be_an_upstream():
    with pytest.raises(ValueError):
        Upstreams([])
