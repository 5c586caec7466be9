import pytest

from agent.endpoint import EndpointRecord
from agent.services import (
    ServiceBackend,
    ServiceError,
    ServiceView,
    allocate_vip,
    backends_for,
    hosts_file,
    service_ports,
)

SVC = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "default"},
       "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}, {"port": 53,
                                                                                        "protocol": "UDP"}]}}


def ep(name, labels, ns="default", ip="10.0.0.2"):
    return EndpointRecord(name=name, node="n1", namespace=ns, serviceaccount="default", labels=labels, ip=ip,
                          ep_id=1, identity=300, netns=f"/run/netns/{name}", netns_owned=True, ifname="lxc0",
                          peer_ifname="eth0", cgroup="/x")


def test_vip_is_stable_and_avoids_taken():
    a = allocate_vip("default", "web", "10.96.0.0/16", {})
    assert a == allocate_vip("default", "web", "10.96.0.0/16", {})
    assert allocate_vip("default", "web", "10.96.0.0/16", {a: "default/web"}) == a
    b = allocate_vip("default", "web", "10.96.0.0/16", {a: "other/svc"})
    assert b != a


def test_vip_exhaustion():
    with pytest.raises(ServiceError):
        allocate_vip("default", "web", "10.96.0.0/30", {"10.96.0.1": "a/b", "10.96.0.2": "c/d"})


def test_ports_and_backends():
    ports = service_ports(SVC)
    assert [(p.port, p.target_port, p.protocol) for p in ports] == [(80, 8080, "tcp"), (53, 53, "udp")]
    eps = [ep("w1", {"app": "web"}, ip="10.0.0.3"), ep("w2", {"app": "web"}, ns="other"),
           ep("db", {"app": "db"})]
    assert backends_for(SVC, eps) == (ServiceBackend("w1", "10.0.0.3", "n1"),)


def test_hosts_file_short_names_only_in_own_namespace():
    svc = ServiceView("web", "default", "10.96.0.10", (), ())
    assert "10.96.0.10\tweb web.default" in hosts_file([svc], "default")
    text = hosts_file([svc], "other")
    assert "\tweb " not in text and "web.default.svc.cluster.local" in text


@pytest.mark.parametrize("port, proto, redirected", [
    ({"port": 80}, "", True),  # unnamed: Istio would sniff; the processor takes it as HTTP/1.1
    ({"port": 80, "name": "http-web"}, "HTTP", True),
    ({"port": 80, "name": "web"}, "", True),
    ({"port": 3306, "name": "mysql"}, "MYSQL", False),
    ({"port": 9000, "name": "tcp-raw"}, "TCP", False),
    ({"port": 443, "name": "https"}, "HTTPS", False),
    ({"port": 50051, "name": "grpc-api"}, "GRPC", False),  # HTTP/2: the processor speaks HTTP/1.1
    ({"port": 80, "name": "tcp-x", "appProtocol": "http"}, "HTTP", True),  # appProtocol wins
    ({"port": 80, "appProtocol": "kubernetes.io/h2c"}, "HTTP2", False),
    ({"port": 5432, "appProtocol": "postgresql"}, "TCP", False),  # unknown: opaque TCP
])
def test_port_protocol_selection_keeps_non_http_ports_at_l4(port, proto, redirected):
    """Istio's protocol selection: a Service with L7 config sends only its HTTP ports to the processor."""
    body = {**SVC, "spec": {"selector": {"app": "web"}, "ports": [port]}}
    (p,) = service_ports(body)
    assert p.app_protocol == proto
    view = ServiceView("web", "default", "10.96.0.5", (p,), (), l7=True)
    assert (view.redirected_ports() == (p,)) == redirected
    assert view.mode() == ("L7" if redirected else "L4")
