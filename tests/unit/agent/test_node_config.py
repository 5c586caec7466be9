import pytest

from agent.node_config import NodeConfigError, from_dict, load


def test_defaults():
    cfg = from_dict({"node_name": "n1"})
    assert cfg.pod_cidr == "10.200.0.0/24" and cfg.api_socket == "/run/meshagent/n1.sock"
    assert cfg.bpffs_dir == "/sys/fs/bpf/meshagent/n1" and cfg.l7_ports.mtls == 15008
    assert cfg.socket_fastpath is True and from_dict({"socket_fastpath": False}).socket_fastpath is False
    assert cfg.l7_workers == 1 and from_dict({"l7_workers": 4}).l7_workers == 4


def test_store_keys():
    cfg = from_dict({"node_name": "n1"})
    assert (cfg.store_ca, cfg.store_cert, cfg.store_key, cfg.store_lease_ttl) == (None, None, None, 30)
    cfg = from_dict({"store": "etcd://192.168.77.1:2379", "store_ca": "/etc/meshagent/etcd/ca.pem",
                     "store_cert": "/etc/meshagent/etcd/n1.pem", "store_key": "/etc/meshagent/etcd/n1-key.pem",
                     "store_lease_ttl": 5})
    assert cfg.store_ca == "/etc/meshagent/etcd/ca.pem" and cfg.store_key.endswith("n1-key.pem")
    assert cfg.store_lease_ttl == 5
    assert from_dict({"store": "etcd://e", "store_ca": "/ca.pem"}).store_cert is None  # server check only
    assert from_dict({"store_lease_ttl": None}).store_lease_ttl == 30


def test_dns_keys():
    cfg = from_dict({"node_name": "n1"})
    assert (cfg.dns_proxy, cfg.dns_proxy_port, cfg.dns_upstreams, cfg.tofqdns_min_ttl) == (True, 15053, (), 3600)
    cfg = from_dict({"dns_proxy": False, "dns_proxy_port": 5300, "tofqdns_min_ttl": 0,
                     "dns_upstreams": ["10.0.0.2", "10.0.0.3:5353", "[fd00::1]:53", "fd00::2"]})
    assert (cfg.dns_proxy, cfg.dns_proxy_port, cfg.tofqdns_min_ttl) == (False, 5300, 0)
    assert cfg.dns_upstreams == ("10.0.0.2", "10.0.0.3:5353", "[fd00::1]:53", "fd00::2")
    assert from_dict({"dns_upstreams": "10.0.0.9"}).dns_upstreams == ("10.0.0.9",), "one resolver without a list"
    assert from_dict({"dns_upstreams": None, "tofqdns_min_ttl": None}).tofqdns_min_ttl == 3600


def test_l7_processor_bounds():
    cfg = from_dict({"node_name": "n1"})
    assert cfg.l7_max_connections_per_endpoint == 0  # a share of the processor's descriptors
    assert (cfg.l7_request_headers_timeout, cfg.l7_request_timeout) == (10.0, 30.0)
    cfg = from_dict({"l7_max_connections_per_endpoint": 500, "l7_request_headers_timeout": 5,
                     "l7_request_timeout": 12.5})
    assert cfg.l7_max_connections_per_endpoint == 500
    assert (cfg.l7_request_headers_timeout, cfg.l7_request_timeout) == (5.0, 12.5)


@pytest.mark.parametrize("raw,needle", [
    ({"pod_cidrr": "10.0.0.0/24"}, "pod_cidrr"),
    ({"pod_cidr": "10.0.0.1/24"}, "pod_cidr"),
    ({"pod_cidr": "not-a-cidr"}, "pod_cidr"),
    ({"policy_enforcement": "sometimes"}, "policy_enforcement"),
    ({"store": "redis://x"}, "store"),
    ({"metrics_addr": "9962"}, "metrics_addr"),
    ({"l7_metrics_addr": "127.0.0.1"}, "l7_metrics_addr"),
    ({"l7_metrics_addr": "127.0.0.1:65535", "l7_workers": 2}, "room for 2 ports"),
    ({"state_dir": "relative/dir"}, "state_dir"),
    ({"l7_ports": {"outbound": 70000}}, "l7_ports"),
    ({"node_ip": "1.2.3"}, "node_ip"),
    ({"pod_cidr": 5}, "pod_cidr"),
    ({"socket_fastpath": "on"}, "socket_fastpath"),
    ({"l7_workers": 0}, "l7_workers"),
    ({"l7_workers": 65}, "l7_workers"),
    ({"l7_workers": "2"}, "l7_workers"),
    ({"l7_workers": True}, "l7_workers"),
    ({"l7_max_connections_per_endpoint": -1}, "l7_max_connections_per_endpoint"),
    ({"l7_max_connections_per_endpoint": "10"}, "l7_max_connections_per_endpoint"),
    ({"l7_request_timeout": 0}, "l7_request_timeout"),
    ({"l7_request_timeout": "30s"}, "l7_request_timeout"),
    ({"l7_request_headers_timeout": True}, "l7_request_headers_timeout"),
    ({"l7_request_headers_timeout": 40}, "longer than l7_request_timeout"),
    ({"store": "etcd://e:2379", "store_ca": "ca.pem"}, "store_ca 'ca.pem' must be an absolute path"),
    ({"store": "etcd://e:2379", "store_key": 5, "store_cert": "/c.pem"}, "store_key 5 must be an absolute path"),
    ({"store": "etcd://e:2379", "store_cert": "/c.pem"}, "store_cert and store_key go together"),
    ({"store": "etcd://e:2379", "store_key": "/k.pem"}, "store_cert and store_key go together"),
    ({"store_ca": "/ca.pem"}, "store_ca is set but store 'dir:///var/lib/meshagent/store' is not etcd://"),
    ({"store_lease_ttl": 2}, "store_lease_ttl 2 must be a whole number of seconds from 3 to 86400"),
    ({"store_lease_ttl": 86401}, "store_lease_ttl"),
    ({"store_lease_ttl": 30.5}, "store_lease_ttl"),
    ({"store_lease_ttl": "30"}, "store_lease_ttl"),
    ({"store_lease_ttl": True}, "store_lease_ttl"),
    ({"dns_proxy": "on"}, "dns_proxy must be a bool"),
    ({"dns_proxy_port": 0}, "dns_proxy_port 0 is not a port number"),
    ({"dns_proxy_port": 70000}, "dns_proxy_port"),
    ({"dns_proxy_port": "53"}, "dns_proxy_port"),
    ({"dns_proxy_port": True}, "dns_proxy_port"),
    ({"dns_proxy_port": 15001}, "dns_proxy_port 15001 is also l7_ports.outbound"),
    ({"dns_proxy_port": 16000, "l7_ports": {"inbound": 16000}}, "is also l7_ports.inbound"),
    ({"dns_upstreams": ["dns.google"]}, "dns_upstreams: 'dns.google' is not an IP address"),
    ({"dns_upstreams": ["10.0.0.1:0"]}, "the port must be a number from 1 to 65535"),
    ({"dns_upstreams": ["10.0.0.1:x"]}, "dns_upstreams"),
    ({"dns_upstreams": ["[::1"]}, "dns_upstreams"),
    ({"dns_upstreams": {"a": 1}}, "dns_upstreams must be a list"),
    ({"dns_upstreams": ["10.0.0.1"] * 9}, "at most 8"),
    ({"tofqdns_min_ttl": -1}, "tofqdns_min_ttl -1 must be a whole number of seconds from 0 to 86400"),
    ({"tofqdns_min_ttl": 86401}, "tofqdns_min_ttl"),
    ({"tofqdns_min_ttl": 1.5}, "tofqdns_min_ttl"),
    ({"tofqdns_min_ttl": "60"}, "tofqdns_min_ttl"),
])
def test_bad_config(raw, needle):
    with pytest.raises(NodeConfigError) as e:
        from_dict({"node_name": "n1", **raw}, "agent.yaml")
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_load_file_errors(tmp_path):
    with pytest.raises(NodeConfigError, match="cannot read"):
        load(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("node_name: [x\n")
    with pytest.raises(NodeConfigError, match="malformed YAML"):
        load(str(bad))
