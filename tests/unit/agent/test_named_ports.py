"""An endpoint's named ports (agent/named_ports.py): the flag, the list, the stored records."""

from __future__ import annotations

import pytest

from agent.errors import UserError
from agent.named_ports import (
    NamedPort,
    PortSpecError,
    check_ports,
    parse_port_spec,
    policy_port_name,
    port_name_problem,
    ports_of,
    ports_text,
)


@pytest.mark.parametrize(("text", "port"), [
    ("http=8080", NamedPort("http", 8080, "TCP")),
    ("dns=53/UDP", NamedPort("dns", 53, "UDP")),
    ("dns=53/udp", NamedPort("dns", 53, "UDP")),
    ("serve-81-sctp=81/SCTP", NamedPort("serve-81-sctp", 81, "SCTP")),
    ("a=65535", NamedPort("a", 65535, "TCP")),
])
def test_parse_port_spec(text, port):
    assert parse_port_spec(text) == port


@pytest.mark.parametrize(("text", "message"), [
    ("http", "'http': write NAME=PORT[/PROTO], e.g. http=8080 or dns=53/UDP"),
    ("http=", "'http=': '' is not a port number 1-65535"),
    ("http=web", "'http=web': 'web' is not a port number 1-65535"),
    ("http=-1", "is not a port number 1-65535"),
    ("http=0", "port http: 0 is not a port number 1-65535"),
    ("http=65536", "port http: 65536 is not a port number 1-65535"),
    ("http=99999999999999", "is not a port number 1-65535"),
    ("http=80/ICMP", "port http: protocol 'ICMP' is not one of TCP, UDP, SCTP"),
    ("HTTP=80", "port name 'HTTP' is invalid: a port name has only a-z, 0-9 and '-'"),
    ("80=80", "port name '80' is invalid: a port name needs at least one letter (a-z)"),
    ("a-very-long-name=80", "a port name has 1-15 characters"),
    ("web--http=80", "a port name has no '--' and no '-' at either end"),
    ("-web=80", "a port name has no '--' and no '-' at either end"),
    ("=80", "port name '' is invalid"),
    ("web_http=80", "a port name has only a-z, 0-9 and '-'"),
])
def test_parse_port_spec_refuses(text, message):
    with pytest.raises(PortSpecError) as err:
        parse_port_spec(text)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert isinstance(err.value, UserError)  # the API answers it as the request's fault


def test_check_ports_takes_records_and_normalizes():
    assert check_ports([{"name": "http", "port": 80}, {"name": "dns", "port": 53, "protocol": "udp"}]) == [
        NamedPort("http", 80, "TCP"), NamedPort("dns", 53, "UDP")]
    assert check_ports([]) == []


@pytest.mark.parametrize(("items", "message"), [
    ([NamedPort("http", 80), NamedPort("http", 81)], "port name http is given twice (http=80/TCP and http=81/TCP)"),
    ([NamedPort("http", 80), NamedPort("web", 80)], "port 80/TCP is given twice, as http and web"),
    ([{"name": "http", "port": "80"}], "port http: '80' is not a port number 1-65535"),
    ([{"name": "http", "port": True}], "port http: True is not a port number"),
    ([{"name": "http", "port": 80, "hostPort": 80}], "port 'http': unknown field 'hostPort'"),
    ([{"port": 80}], "port name None is invalid: a port name is a string"),
    ([{"name": "x" * 5000, "port": 80}], "port name 'xxxxxxxx"),
])
def test_check_ports_refuses(items, message):
    with pytest.raises(PortSpecError) as err:
        check_ports(items)
    assert message in str(err.value) and len(str(err.value)) < 200


def test_same_number_on_two_protocols_is_two_ports():
    assert len(check_ports([NamedPort("dns", 53, "UDP"), NamedPort("dns-tcp", 53, "TCP")])) == 2


def test_stored_records_read_leniently():
    assert ports_of(None) == ()  # a record made before endpoints had ports
    assert ports_of([{"name": "http", "port": 80, "protocol": "TCP"}, {"name": "BAD", "port": 1}, "junk"]) == (
        NamedPort("http", 80, "TCP"),)
    text = ports_text([{"name": "http", "port": 80}, {"name": "metrics", "port": 9090}])
    assert text == "http=80/TCP,metrics=9090/TCP"
    assert ports_text([]) == "-"


def test_policy_port_name():
    assert policy_port_name("80") is None
    assert policy_port_name("http") == "http"
    assert policy_port_name("HTTP", ignore_case=True) == "http"
    with pytest.raises(ValueError, match="'HTTP' is neither a port number nor a port name"):
        policy_port_name("HTTP")
    assert port_name_problem("serve-80-tcp") is None
