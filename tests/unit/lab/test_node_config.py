"""lab.node_config, the writer of the lab's and the VMs' node configs: what it writes, the agent loads."""

from __future__ import annotations

import re

import pytest
import yaml

from agent import node_config as agent_config
from lab import node_config
from tests.paths import REPO


def test_node_i_is_host_10_plus_i_with_pods_in_10_100_plus_i():
    assert [node_config.node_ip(i, "192.168.56.0/24") for i in (1, 2, 3)] == [
        "192.168.56.11", "192.168.56.12", "192.168.56.13"]
    assert [node_config.node_ip(i) for i in (1, 2, 3)] == ["192.168.77.11", "192.168.77.12", "192.168.77.13"]
    assert [node_config.pod_cidr(i) for i in (1, 2, 3)] == ["10.101.0.0/24", "10.102.0.0/24", "10.103.0.0/24"]
    assert node_config.etcd_store("192.168.56.11") == "etcd://192.168.56.11:2379"
    for bad in (lambda: node_config.node_ip(0), lambda: node_config.node_ip(250), lambda: node_config.pod_cidr(156)):
        with pytest.raises(ValueError):
            bad()


def test_the_vagrantfile_numbers_nodes_as_the_writer_does():
    text = (REPO / "vagrant" / "Vagrantfile").read_text()
    prefix = re.search(r'^UNDERLAY_PREFIX = "([\d.]+)"', text, re.M).group(1)
    offset = int(re.search(r"^NODE_IP_OFFSET = (\d+)", text, re.M).group(1))
    assert offset == node_config.NODE_IP_OFFSET
    assert f"{prefix}.{offset + 2}" == node_config.node_ip(2, f"{prefix}.0/24") == "192.168.56.12"
    assert 'ip: "#{UNDERLAY_PREFIX}.#{NODE_IP_OFFSET + i}"' in text


def test_the_vm_config_loads_in_the_agent(tmp_path):
    """What vagrant/provision.sh runs in VM 2, read back by the agent's own loader."""
    path = tmp_path / "etc" / "agent.yaml"
    assert node_config.main(["write", "--index", "2", "--underlay", "192.168.56.0/24",
                             "--store", "etcd://192.168.56.11:2379", "--out", str(path)]) == 0
    cfg = agent_config.load(str(path))
    assert (cfg.node_name, cfg.node_ip, cfg.pod_cidr, cfg.store) == (
        "n2", "192.168.56.12", "10.102.0.0/24", "etcd://192.168.56.11:2379")
    assert cfg.api_socket == "/run/meshagent/n2.sock"  # the defaults: `meshagent status` in the VM finds it
    assert yaml.safe_load(path.read_text()).keys() == {"node_name", "node_ip", "pod_cidr", "store"}
    assert oct(path.stat().st_mode & 0o777) == "0o644"


def test_a_lab_config_with_every_path_loads_in_the_agent(tmp_path):
    settings = node_config.node_settings(
        "lab-n1", "192.168.77.11", "10.101.0.0/24", f"dir://{tmp_path}/store", state_dir=f"{tmp_path}/state",
        bpffs_dir="/sys/fs/bpf/meshagent-lab/lab/lab-n1", cgroup="/sys/fs/cgroup/unified/meshagent-lab-lab-lab-n1",
        api_socket="/run/meshagent/lab-n1.sock", metrics_addr="127.0.0.1:9962", policy_enforcement="always")
    node_config.write(str(tmp_path / "agent.yaml"), settings)
    cfg = agent_config.load(str(tmp_path / "agent.yaml"))
    assert cfg.bpffs_dir == settings["bpffs_dir"] and cfg.policy_enforcement == "always"
    text = (tmp_path / "agent.yaml").read_text()
    assert text.startswith("# meshagent node config") and text.index("node_name") < text.index("state_dir")


def test_store_tls_and_lease_keys_are_written_only_when_asked(tmp_path):
    plain = node_config.node_settings("n1", "192.168.77.11", "10.101.0.0/24", "etcd://192.168.77.1:2379")
    assert not any(k.startswith("store_") for k in plain)
    asked = node_config.node_settings("n1", "192.168.77.11", "10.101.0.0/24", "etcd://192.168.77.1:2379",
                                      store_ca="/p/ca.pem", store_cert="/p/n1.pem", store_key="/p/n1-key.pem",
                                      store_lease_ttl=10)
    assert {k: asked[k] for k in ("store_ca", "store_cert", "store_key", "store_lease_ttl")} == {
        "store_ca": "/p/ca.pem", "store_cert": "/p/n1.pem", "store_key": "/p/n1-key.pem", "store_lease_ttl": 10}
    node_config.write(str(tmp_path / "agent.yaml"), asked)
    if "store_ca" in agent_config._KEYS:  # the etcd backend's keys, once the agent knows them
        assert agent_config.load(str(tmp_path / "agent.yaml")).store == "etcd://192.168.77.1:2379"
    else:
        with pytest.raises(agent_config.NodeConfigError, match="unknown key 'store_ca'"):
            agent_config.load(str(tmp_path / "agent.yaml"))


def test_the_command_prints_addresses_and_refuses_a_node_without_one(capsys):
    assert node_config.main(["address", "--index", "1", "--underlay", "192.168.56.0/24"]) == 0
    assert capsys.readouterr().out == "192.168.56.11 10.101.0.0/24\n"
    with pytest.raises(SystemExit) as e:
        node_config.main(["address", "--index", "0"])
    assert e.value.code == 2
