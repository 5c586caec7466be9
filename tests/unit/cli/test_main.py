"""The meshagent CLI against a fake agent: which ops and args each command sends, what it prints,
and its exit codes (0 ok, 1 operational error in one line, 2 usage error).

The fake agent is a threaded Unix-socket server speaking agent/client.py's protocol: it records
every request and answers from a table of canned replies.
"""

from __future__ import annotations

import json
import os
import shutil
import socketserver
import tempfile
import threading

import pytest
import yaml
from click.testing import CliRunner

from cli.main import Target, cli


class FakeAgent:
    def __init__(self, path: str):
        self.path = path
        self.requests: list[dict] = []
        self.replies: dict[str, dict] = {}
        agent = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                req = json.loads(self.rfile.readline())
                agent.requests.append(req)
                reply = agent.replies.get(req["op"], {"result": {}})
                for item in reply.get("items", []):
                    self._send({"item": item})
                if "error" in reply:
                    self._send({"ok": False, "error": reply["error"]})
                else:
                    self._send({"ok": True, "result": reply["result"]})

            def _send(self, msg):
                self.wfile.write(json.dumps(msg).encode() + b"\n")

        class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            daemon_threads = True

        self.server = Server(path, Handler)
        threading.Thread(target=self.server.serve_forever, args=(0.01,), daemon=True).start()

    def reply(self, op: str, result=None, error: str | None = None, items=()) -> None:
        self.replies[op] = {"result": result, "items": list(items)} | ({"error": error} if error else {})

    @property
    def ops(self) -> list[str]:
        return [r["op"] for r in self.requests]

    def args(self, op: str) -> dict:
        return next(r["args"] for r in self.requests if r["op"] == op)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def agent():
    tmp = tempfile.mkdtemp(prefix="ma-cli-", dir="/tmp")  # short: AF_UNIX paths max out at 108 bytes
    fake = FakeAgent(os.path.join(tmp, "agent.sock"))
    yield fake
    fake.close()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_node_env(monkeypatch, tmp_path):
    monkeypatch.delenv("MESHAGENT_NODE", raising=False)
    monkeypatch.delenv("MESHAGENT_CONFIG", raising=False)
    monkeypatch.setattr("agent.node_config.DEFAULT_CONFIG_PATH", str(tmp_path / "no-such-agent.yaml"))


def run(agent: FakeAgent | None, *args: str, socket: str | None = None):
    path = socket or (agent.path if agent else "/nonexistent/meshagent.sock")
    return CliRunner().invoke(cli, ["--socket", path, *args], prog_name="meshagent")


def assert_one_line_error(result, code: int = 1) -> None:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr


STATUS = {
    "node": "n1", "ready": True, "version": "0.1.0",
    "programs": [{"name": "from_container", "attached": True}, {"name": "to_container", "attached": True}],
    "endpoints": 2, "policies": 3, "policy_revision": 7, "lost_events": 0,
    "bpffs_dir": "/sys/fs/bpf/meshagent/n1", "store": "dir:///var/lib/meshagent/store",
    "api_socket": "/run/meshagent/n1.sock", "policy_enforcement": "default",
}

ENDPOINT = {
    "name": "web-1", "namespace": "default", "serviceaccount": "default", "ip": "10.200.0.12",
    "identity": 23456, "labels": {"app": "web"}, "ep_id": 3, "netns": "/run/netns/web-1",
    "ifname": "lxc1234", "cgroup": "/nonexistent/cgroup/ep-web-1", "node": "n1",
}


# ---- status and errors ---------------------------------------------------------------------------


def test_status_ready_prints_table_and_exits_0(agent):
    agent.reply("status", STATUS)
    result = run(agent, "status")
    assert result.exit_code == 0, result.output
    assert agent.requests == [{"op": "status", "args": {}}]
    assert "Node:" in result.stdout and "n1" in result.stdout
    assert "revision 7" in result.stdout


def test_status_shows_l7_processor_and_fast_path(agent):
    fastpath = {"enabled": True, "counters": {
        "redirected": {"messages": 31, "bytes": 3 << 20}, "pass_no_peer": {"messages": 2, "bytes": 10},
        "pass_fallen_back": {"messages": 9, "bytes": 90}}}
    agent.reply("status", STATUS | {"socket_fastpath": fastpath,
                                    "l7_processor": {"pid": 42, "restarts": 1, "listen": "10.200.0.1:15001",
                                                     "workers": 2}})
    out = run(agent, "status").stdout
    assert "pid 42 on 10.200.0.1:15001, 2 workers, 1 restarts" in out
    assert "enabled, 3.0 MiB redirected in 31 messages, 2 fell back to TCP" in out
    agent.reply("status", STATUS | {"socket_fastpath": {"enabled": False, "counters": {}}})
    assert "disabled (socket_fastpath: false)" in run(agent, "status").stdout


def test_status_not_ready_exits_1(agent):
    agent.reply("status", STATUS | {"ready": False})
    result = run(agent, "status", "-o", "json")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["ready"] is False
    assert "not ready" in result.stderr


def test_status_yaml(agent):
    agent.reply("status", STATUS)
    result = run(agent, "status", "-o", "yaml")
    assert result.exit_code == 0
    assert yaml.safe_load(result.stdout) == STATUS


def test_no_agent_is_one_line_exit_1():
    result = run(None, "status")
    assert_one_line_error(result)
    assert "no agent answers" in result.stderr


def test_agent_error_is_one_line_exit_1(agent):
    agent.reply("endpoint_delete", error="unknown endpoint 'nope' on node n1 (known: none)")
    result = run(agent, "endpoint", "delete", "nope")
    assert_one_line_error(result)
    assert "unknown endpoint 'nope'" in result.stderr


def test_unknown_command_is_usage_error():
    result = CliRunner().invoke(cli, ["frobnicate"])
    assert result.exit_code == 2


@pytest.mark.parametrize("argv", [["--help"], ["flows", "--help"], ["endpoint", "add", "--help"],
                                  ["bpf", "ct", "list", "--help"], ["policy", "trace", "--help"]])
def test_help_has_examples(argv):
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == 0
    assert "Examples:" in result.output


def test_version():
    result = CliRunner().invoke(cli, ["version"])
    assert result.exit_code == 0
    assert result.stdout.startswith("meshagent ")


# ---- which socket ---------------------------------------------------------------------------------


def test_socket_from_node_name():
    assert Target(node="n7").socket_path() == "/run/meshagent/n7.sock"


def test_socket_from_config_file(agent, tmp_path):
    cfg = tmp_path / "node.yaml"
    cfg.write_text(f"node_name: n9\napi_socket: {agent.path}\n")
    agent.reply("status", STATUS)
    result = CliRunner().invoke(cli, ["--config", str(cfg), "status"])
    assert result.exit_code == 0, result.output
    assert agent.ops == ["status"]


def test_node_envvar_picks_socket(monkeypatch):
    monkeypatch.setenv("MESHAGENT_NODE", "envnode")
    result = CliRunner().invoke(cli, ["status"])
    assert result.exit_code == 1
    assert "/run/meshagent/envnode.sock" in result.stderr


# ---- apply / delete / get -----------------------------------------------------------------------

CNP = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: allow-web
spec:
  endpointSelector:
    matchLabels:
      app: web
  ingress:
  - fromEndpoints:
    - matchLabels:
        app: client
"""

SVC = """\
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  selector:
    app: web
  ports:
  - port: 80
"""


@pytest.fixture
def resources():
    mod = pytest.importorskip("agent.resources")
    if not hasattr(mod, "load_paths"):
        pytest.skip("agent.resources.load_paths is not written yet")
    return mod


def test_apply_sends_documents_and_prints_kubectl_lines(agent, resources, tmp_path):
    path = tmp_path / "web.yaml"
    path.write_text(CNP + "---\n" + SVC)
    agent.reply("apply", {"results": [
        {"kind": "CiliumNetworkPolicy", "namespace": "default", "name": "allow-web", "action": "created"},
        {"kind": "Service", "namespace": "default", "name": "web", "action": "unchanged"},
    ]})
    result = run(agent, "apply", "-f", str(path))
    assert result.exit_code == 0, result.output
    docs = agent.args("apply")["documents"]
    assert [d["body"]["kind"] for d in docs] == ["CiliumNetworkPolicy", "Service"]
    assert all(isinstance(d["where"], str) and d["where"] for d in docs)
    assert result.stdout.splitlines() == [
        "ciliumnetworkpolicy.cilium.io/allow-web created",
        "service/web unchanged",
    ]


@pytest.mark.parametrize("text", [
    "kind: [unclosed\n",  # malformed YAML
    CNP.replace("kind: CiliumNetworkPolicy", "kind: NoSuchKind"),  # unknown kind
    CNP.replace("  ingress:", "  bogusField: 1\n  ingress:"),  # unknown field
])
def test_apply_bad_file_fails_before_asking_the_agent(agent, resources, tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = run(agent, "apply", "-f", str(path))
    assert_one_line_error(result)
    assert agent.requests == []


def test_apply_prints_warnings_on_stderr_and_exits_0(agent, resources, tmp_path):
    path = tmp_path / "web.yaml"
    path.write_text(CNP)
    agent.reply("apply", {"results": [
        {"kind": "CiliumNetworkPolicy", "namespace": "default", "name": "allow-web", "action": "created"},
    ], "warnings": ["CiliumNetworkPolicy default/allow-web: namespace default has no endpoints on node n1 yet; "
                    "the policy applies to endpoints created there later"]})
    result = run(agent, "apply", "-f", str(path))
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == ["ciliumnetworkpolicy.cilium.io/allow-web created"]
    assert result.stderr.splitlines() == [
        "Warning: CiliumNetworkPolicy default/allow-web: namespace default has no endpoints on node n1 yet; "
        "the policy applies to endpoints created there later"]


BOMB = CNP + "  egress: &a [{toEntities: [world]}, {toEntities: [host]}]\n" + "".join(
    f"  egressDeny{i}: &b{i} [" + ", ".join([f"*{'a' if i == 0 else f'b{i - 1}'}"] * 10) + "]\n" for i in range(12))


@pytest.mark.parametrize("args,env,text,needle", [
    (["--max-bytes", "1KiB"], {}, CNP + "#" * 2000 + "\n",
     "the file is larger than 1 KiB, the most one apply may carry; to raise the limit, use --max-bytes or "
     "MESHAGENT_APPLY_MAX_BYTES"),
    ([], {"MESHAGENT_APPLY_MAX_BYTES": "1KiB"}, CNP + "#" * 2000 + "\n", "larger than 1 KiB"),
    (["--max-document-bytes", "100"], {}, CNP,
     "), the most one document may be; to raise the limit, use --max-document-bytes or "
     "MESHAGENT_APPLY_MAX_DOCUMENT_BYTES"),
    ([], {"MESHAGENT_APPLY_MAX_DOCUMENT_BYTES": "100"}, CNP,
     "document 1: the document is larger than 100 bytes as JSON with its aliases expanded (by line "),
    ([], {}, BOMB, "document 1: excessive aliasing at line"),
])
@pytest.mark.parametrize("command", ["apply", "delete"])
def test_limits_refuse_before_asking_the_agent(agent, resources, tmp_path, monkeypatch, command, args, env,
                                               text, needle):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    path = tmp_path / "big.yaml"
    path.write_text(text)
    result = run(agent, command, "-f", str(path), *args)
    assert_one_line_error(result)
    assert needle in result.stderr
    assert agent.requests == []


def test_raising_a_limit_lets_the_file_through(agent, resources, tmp_path, monkeypatch):
    monkeypatch.setenv("MESHAGENT_APPLY_MAX_BYTES", "1KiB")
    path = tmp_path / "big.yaml"
    path.write_text(CNP + "#" * 2000 + "\n")
    agent.reply("apply", {"results": [], "warnings": []})
    result = run(agent, "apply", "-f", str(path), "--max-bytes", "3KiB")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""


@pytest.mark.parametrize("size", ["lots", "0", "-1", "8XiB"])
def test_a_bad_size_is_a_usage_error(size):
    result = CliRunner().invoke(cli, ["apply", "-f", "x.yaml", "--max-bytes", size])
    assert result.exit_code == 2 and "--max-bytes" in result.output


def test_the_cli_defaults_are_the_limits_of_agent_resources(resources):
    from cli.main import MAX_BYTES_DEFAULT, MAX_DOCUMENT_BYTES_DEFAULT

    assert resources.parse_size(MAX_BYTES_DEFAULT) == resources.MAX_BYTES
    assert resources.parse_size(MAX_DOCUMENT_BYTES_DEFAULT) == resources.MAX_DOCUMENT_BYTES


def test_apply_missing_file_is_exit_1(agent, resources, tmp_path):
    result = run(agent, "apply", "-f", str(tmp_path / "nope.yaml"))
    assert_one_line_error(result)
    assert agent.requests == []


def test_apply_needs_a_file():
    assert CliRunner().invoke(cli, ["apply"]).exit_code == 2


def test_delete_by_file(agent, resources, tmp_path):
    path = tmp_path / "web.yaml"
    path.write_text(CNP)
    agent.reply("delete", {"results": [
        {"kind": "CiliumNetworkPolicy", "namespace": "default", "name": "allow-web", "action": "deleted"},
    ]})
    result = run(agent, "delete", "-f", str(path))
    assert result.exit_code == 0, result.output
    assert agent.args("delete")["documents"][0]["body"]["metadata"]["name"] == "allow-web"
    assert result.stdout.strip() == "ciliumnetworkpolicy.cilium.io/allow-web deleted"


def test_delete_by_kind_and_name(agent):
    agent.reply("delete", {"results": [
        {"kind": "VirtualService", "namespace": "shop", "name": "reviews", "action": "deleted"},
    ]})
    result = run(agent, "delete", "vs", "reviews", "-n", "shop")
    assert result.exit_code == 0, result.output
    assert agent.args("delete") == {"kind": "VirtualService", "namespace": "shop", "name": "reviews"}
    assert result.stdout.strip() == "virtualservice.networking.istio.io/reviews deleted"


def test_delete_not_found_exits_1_unless_ignored(agent):
    agent.reply("delete", {"results": [
        {"kind": "Service", "namespace": "default", "name": "web", "action": "not found"},
    ]})
    result = run(agent, "delete", "svc", "web")
    assert_one_line_error(result)
    assert "service/web not found" in result.stderr
    assert run(agent, "delete", "svc", "web", "--ignore-not-found").exit_code == 0


@pytest.mark.parametrize("argv", [["delete"], ["delete", "svc"], ["delete", "bogus", "x"],
                                  ["delete", "all", "x"], ["delete", "svc", "web", "-f", "x.yaml"]])
def test_delete_usage_errors(agent, argv):
    result = run(agent, *argv)
    assert result.exit_code == 2, result.output
    assert agent.requests == []


ITEMS = [
    {"kind": "Service", "apiVersion": "v1", "namespace": "default", "name": "web",
     "body": yaml.safe_load(SVC)},
    {"kind": "Service", "apiVersion": "v1", "namespace": "shop", "name": "cart",
     "body": yaml.safe_load(SVC.replace("name: web", "name: cart\n  namespace: shop"))},
]


@pytest.mark.parametrize("alias", ["svc", "service", "services", "Service"])
def test_get_maps_aliases_to_kind(agent, alias):
    agent.reply("get", {"items": ITEMS})
    result = run(agent, "get", alias)
    assert result.exit_code == 0, result.output
    assert agent.args("get") == {"kind": "Service"}
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAMESPACE", "NAME", "APIVERSION"]
    assert lines[1].split() == ["default", "web", "v1"]


@pytest.mark.parametrize("alias,kind", [
    ("cnp", "CiliumNetworkPolicy"), ("netpol", "NetworkPolicy"), ("vs", "VirtualService"),
    ("dr", "DestinationRule"), ("pa", "PeerAuthentication"), ("ap", "AuthorizationPolicy"),
    ("se", "ServiceEntry"), ("serviceentries", "ServiceEntry"), ("all", "all"),
])
def test_get_kinds(agent, alias, kind):
    agent.reply("get", {"items": []})
    assert run(agent, "get", alias).exit_code == 0
    assert agent.args("get") == {"kind": kind}


def test_get_unknown_kind_is_usage_error(agent):
    result = run(agent, "get", "pods")
    assert result.exit_code == 2
    assert "ciliumnetworkpolicy" in result.stderr
    assert agent.requests == []


def test_get_yaml_is_multi_doc_of_bodies(agent):
    agent.reply("get", {"items": ITEMS})
    result = run(agent, "get", "svc", "-o", "yaml")
    assert result.exit_code == 0
    assert list(yaml.safe_load_all(result.stdout)) == [i["body"] for i in ITEMS]


def test_get_yaml_round_trips_through_apply(agent, resources, tmp_path):
    agent.reply("get", {"items": ITEMS})
    dump = tmp_path / "dump.yaml"
    dump.write_text(run(agent, "get", "all", "-o", "yaml").stdout)
    agent.reply("apply", {"results": []})
    assert run(agent, "apply", "-f", str(dump)).exit_code == 0
    assert [d["body"] for d in agent.args("apply")["documents"]] == [i["body"] for i in ITEMS]


def test_get_by_name_and_namespace(agent):
    agent.reply("get", {"items": ITEMS})
    result = run(agent, "get", "svc", "cart", "-n", "shop", "-o", "json")
    assert result.exit_code == 0
    assert json.loads(result.stdout) == ITEMS[1]["body"]
    missing = run(agent, "get", "svc", "cart", "-n", "default")
    assert_one_line_error(missing)


# ---- endpoints, identities, exec ----------------------------------------------------------------


def test_endpoint_add_sends_labels_and_prints_ip_and_identity(agent):
    agent.reply("endpoint_add", ENDPOINT)
    result = run(agent, "endpoint", "add", "web-1", "--labels", "app=web,tier=fe", "--ip", "10.200.0.12")
    assert result.exit_code == 0, result.output
    assert agent.args("endpoint_add") == {
        "name": "web-1", "labels": {"app": "web", "tier": "fe"}, "namespace": "default",
        "serviceaccount": "default", "netns": None, "ip": "10.200.0.12", "ports": [],
    }
    header, row = result.stdout.splitlines()
    assert {"NAME", "IP", "IDENTITY"} <= set(header.split())
    assert "10.200.0.12" in row.split() and "23456" in row.split()


def test_endpoint_add_options(agent):
    agent.reply("endpoint_add", ENDPOINT)
    result = run(agent, "endpoint", "add", "db", "--labels", "app=db", "--namespace", "shop",
                 "--serviceaccount", "db", "--netns", "/run/netns/db", "-o", "json")
    assert result.exit_code == 0, result.output
    args = agent.args("endpoint_add")
    assert (args["namespace"], args["serviceaccount"], args["netns"]) == ("shop", "db", "/run/netns/db")
    assert json.loads(result.stdout) == ENDPOINT


def test_endpoint_add_named_ports(agent):
    agent.reply("endpoint_add", {**ENDPOINT, "ports": [{"name": "http", "port": 8080, "protocol": "TCP"},
                                                       {"name": "dns", "port": 53, "protocol": "UDP"}]})
    result = run(agent, "endpoint", "add", "web-1", "--labels", "app=web", "--port", "http=8080",
                 "--port", "dns=53/udp")
    assert result.exit_code == 0, result.output
    assert agent.args("endpoint_add")["ports"] == [{"name": "http", "port": 8080, "protocol": "TCP"},
                                                   {"name": "dns", "port": 53, "protocol": "UDP"}]
    header, row = result.stdout.splitlines()
    assert header.split()[-1] == "PORTS" and row.split()[-1] == "http=8080/TCP,dns=53/UDP"


@pytest.mark.parametrize("argv", [
    ["--labels", "app"], ["--labels", "=web"], ["--labels", "app=we b"], ["--labels", ""],
    ["--labels", "app=web", "--ip", "10.200.0.300"], ["--labels", "app=web", "--ip", "web"], [],
])
def test_endpoint_add_bad_input_is_usage_error(agent, argv):
    result = run(agent, "endpoint", "add", "web-1", *argv)
    assert result.exit_code == 2, result.output
    assert agent.requests == []


@pytest.mark.parametrize(("ports", "message"), [
    (["http"], "write NAME=PORT[/PROTO]"),
    (["Http=80"], "port name 'Http' is invalid"),
    (["http=0"], "0 is not a port number 1-65535"),
    (["http=65536"], "65536 is not a port number 1-65535"),
    (["http=80/icmp"], "protocol 'icmp' is not one of TCP, UDP, SCTP"),
    (["http=80", "http=81"], "port name http is given twice"),
    (["http=80", "web=80/TCP"], "port 80/TCP is given twice, as http and web"),
])
def test_endpoint_add_bad_port_is_usage_error(agent, ports, message):
    argv = [arg for p in ports for arg in ("--port", p)]
    result = run(agent, "endpoint", "add", "web-1", "--labels", "app=web", *argv)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "'--port'" in result.stderr
    assert agent.requests == []


def test_endpoint_list_table_json_yaml(agent):
    agent.reply("endpoint_list", {"items": [ENDPOINT]})
    table = run(agent, "endpoint", "list")
    assert table.exit_code == 0
    assert table.stdout.splitlines()[0].split()[:5] == ["ID", "NAME", "NAMESPACE", "IP", "IDENTITY"]
    assert "app=web" in table.stdout
    assert json.loads(run(agent, "endpoint", "list", "-o", "json").stdout) == [ENDPOINT]
    assert yaml.safe_load(run(agent, "endpoint", "list", "-o", "yaml").stdout) == [ENDPOINT]
    assert run(agent, "endpoint", "list", "-o", "xml").exit_code == 2


def test_endpoint_delete(agent):
    agent.reply("endpoint_delete", {"deleted": "web-1"})
    result = run(agent, "endpoint", "delete", "web-1")
    assert result.exit_code == 0
    assert agent.args("endpoint_delete") == {"name": "web-1"}
    assert "web-1" in result.stdout


def test_exec_joins_cgroup_and_execs_in_named_netns(agent, monkeypatch, tmp_path):
    cgroup = tmp_path / "ep-web-1"
    cgroup.mkdir()
    agent.reply("endpoint_get", ENDPOINT | {"cgroup": str(cgroup)})
    calls = []

    def fake_execvp(file, argv):
        calls.append((file, argv))
        raise SystemExit(7)  # exec never returns; the command's exit code becomes ours

    monkeypatch.setattr(os, "execvp", fake_execvp)
    result = run(agent, "exec", "web-1", "--", "curl", "-s", "http://web/")
    assert result.exit_code == 7
    assert agent.args("endpoint_get") == {"name": "web-1"}
    # A named namespace goes through `ip netns exec`, which also mounts /etc/netns/web-1/hosts.
    assert calls == [("ip", ["ip", "netns", "exec", "web-1", "curl", "-s", "http://web/"])]
    assert (cgroup / "cgroup.procs").read_text() == str(os.getpid())


def test_exec_without_double_dash_and_missing_cgroup(agent, monkeypatch):
    agent.reply("endpoint_get", ENDPOINT | {"netns": "/proc/4242/ns/net"})  # cgroup missing: skipped
    calls = []

    def fake_execvp(file, argv):
        calls.append(argv)
        raise SystemExit(0)

    monkeypatch.setattr(os, "execvp", fake_execvp)
    result = run(agent, "exec", "web-1", "ping", "-c1", "10.0.0.1")
    assert result.exit_code == 0, result.output
    assert calls == [["nsenter", "--net=/proc/4242/ns/net", "--", "ping", "-c1", "10.0.0.1"]]


def test_exec_needs_a_command(agent):
    assert run(agent, "exec", "web-1").exit_code == 2
    assert run(agent, "exec", "web-1", "--").exit_code == 2
    assert agent.requests == []


def test_exec_unknown_endpoint_is_exit_1(agent):
    agent.reply("endpoint_get", error="unknown endpoint 'x' on node n1 (known: web-1)")
    assert_one_line_error(run(agent, "exec", "x", "--", "true"))


def test_identity_list(agent):
    agent.reply("identity_list", {"items": [
        {"id": 2, "labels": {"reserved:world": ""}, "reserved": True},
        {"id": 23456, "labels": {"app": "web", "io.kubernetes.pod.namespace": "default"}, "reserved": False},
    ]})
    result = run(agent, "identity", "list")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["ID", "LABELS"]
    assert lines[1].split() == ["2", "reserved:world"]
    assert lines[2].split() == ["23456", "app=web,io.kubernetes.pod.namespace=default"]


# ---- flows ---------------------------------------------------------------------------------------

FLOW = {
    "time": "2024-11-25T20:01:02.123456789Z", "verdict": "FORWARDED", "Type": "L3_L4",
    "event_type": "flow-new", "traffic_direction": "INGRESS", "is_reply": False, "node_name": "n1",
    "IP": {"source": "10.200.0.11", "destination": "10.200.0.12", "ipVersion": "IPv4"},
    "l4": {"TCP": {"source_port": 34567, "destination_port": 80, "flags": {"SYN": True}}},
    "source": {"identity": 12345, "labels": ["k8s:app=client"], "namespace": "default", "pod_name": "client"},
    "destination": {"identity": 23456, "labels": ["k8s:app=web"], "namespace": "default",
                    "pod_name": "web-1"},
}


def test_flows_sends_filters(agent):
    agent.reply("flows", {"lost_events": 0}, items=[{"flow": FLOW}])
    result = run(agent, "flows", "--last", "5", "--since", "5m", "--from-label", "app=client,tier=fe",
                 "--to-label", "k8s:app=web", "--to-label", "reserved:world", "--from-ip", "10.200.0.11",
                 "--to-ip", "10.200.0.0/24",
                 "--port", "80", "--protocol", "TCP", "--verdict", "dropped", "--type", "l4")
    assert result.exit_code == 0, result.output
    assert agent.args("flows") == {
        "last": 5, "since_s": 300.0, "follow": False,
        "filters": {
            "from_label": ["app=client", "tier=fe"], "to_label": ["k8s:app=web", "reserved:world"],
            "from_ip": "10.200.0.11", "to_ip": "10.200.0.0/24", "port": 80, "protocol": "tcp",
            "verdict": "DROPPED", "type": "l4",
        },
    }


def test_flows_defaults(agent):
    agent.reply("flows", {"lost_events": 0})
    assert run(agent, "flows").exit_code == 0
    assert agent.args("flows") == {
        "last": None, "since_s": None, "follow": False,
        "filters": {"from_label": [], "to_label": [], "from_ip": None, "to_ip": None, "port": None,
                    "protocol": None, "verdict": None, "type": None},
    }


def test_flows_table_line(agent):
    agent.reply("flows", {"lost_events": 0}, items=[{"flow": FLOW}])
    result = run(agent, "flows")
    assert result.exit_code == 0
    (line,) = result.stdout.splitlines()
    assert "default/client:34567 (ID:12345) -> default/web-1:80 (ID:23456)" in line
    assert line.endswith("to-endpoint FORWARDED (TCP Flags: SYN)")


def test_flows_json_is_one_unchanged_object_a_line(agent):
    second = FLOW | {"verdict": "DROPPED", "drop_reason_desc": "POLICY_DENIED"}
    agent.reply("flows", {"lost_events": 0}, items=[{"flow": FLOW}, {"flow": second}])
    result = run(agent, "flows", "-o", "json")
    assert result.exit_code == 0
    assert [json.loads(line) for line in result.stdout.splitlines()] == [FLOW, second]


def test_flows_lost_events_warn_on_stderr(agent):
    agent.reply("flows", {"lost_events": 12}, items=[{"lost": {"count": 3}}, {"flow": FLOW}])
    result = run(agent, "flows", "-o", "json")
    assert result.exit_code == 0
    assert len(result.stdout.splitlines()) == 1
    warnings = result.stderr.splitlines()
    assert len(warnings) == 2
    assert "3 flow events were lost" in warnings[0] and "12 flow events were lost" in warnings[1]


def test_flows_follow(agent):
    agent.reply("flows", {"lost_events": 0}, items=[{"flow": FLOW}])
    result = run(agent, "flows", "--follow")
    assert result.exit_code == 0
    assert agent.args("flows")["follow"] is True


@pytest.mark.parametrize("argv", [
    ["--from-ip", "10.0.0.256"], ["--to-ip", "nope"], ["--since", "5 minutes"], ["--since", "0s"],
    ["--since", "-5m"], ["--from-label", "app"], ["--to-label", "a b=c"], ["--from-label", "app=web,"],
    ["--from-label", "k8s:app=we b"], ["--to-ip", "10.0.0.0/33"], ["--port", "0"],
    ["--port", "70000"], ["--port", "http"], ["--protocol", "sctp"], ["--verdict", "ALLOWED"],
    ["--type", "l3"], ["--last", "0"], ["-o", "yaml"],
])
def test_flows_bad_filters_are_usage_errors(agent, argv):
    result = run(agent, "flows", *argv)
    assert result.exit_code == 2, result.output
    assert agent.requests == []


# ---- policy trace, bpf, teardown ----------------------------------------------------------------

TRACE = {"verdict": "DENIED", "steps": [
    {"direction": "egress", "endpoint": "client", "identity": 12345, "peer_identity": 23456,
     "verdict": "ALLOWED", "rule_id": 0, "rule": "no policy selects the endpoint", "match": "none"},
    {"direction": "ingress", "endpoint": "web-1", "identity": 23456, "peer_identity": 12345,
     "verdict": "DENIED", "rule_id": 4, "rule": "CiliumNetworkPolicy default/deny-all default-deny",
     "match": "none"},
]}


def test_policy_trace(agent):
    agent.reply("policy_trace", TRACE)
    result = run(agent, "policy", "trace", "--from-label", "app=client", "--to-label", "app=web",
                 "--to-label", "tier=fe", "--to-namespace", "shop", "--dport", "80/tcp")
    assert result.exit_code == 0, result.output  # whatever the verdict
    assert agent.args("policy_trace") == {
        "from_labels": {"app": "client"}, "to_labels": {"app": "web", "tier": "fe"},
        "from_namespace": None, "to_namespace": "shop", "dport": 80, "protocol": "TCP",
    }
    assert result.stdout.splitlines()[-1] == "Final verdict: DENIED"
    assert "default/deny-all" in result.stdout


@pytest.mark.parametrize("dport,port,proto", [("53/udp", 53, "UDP"), ("443", 443, "TCP"),
                                              ("icmp", 0, "ICMP"), ("8/ICMP", 8, "ICMP")])
def test_policy_trace_dport_forms(agent, dport, port, proto):
    agent.reply("policy_trace", TRACE)
    result = run(agent, "policy", "trace", "--from-label", "a=b", "--to-label", "c=d", "--dport", dport)
    assert result.exit_code == 0, result.output
    assert (agent.args("policy_trace")["dport"], agent.args("policy_trace")["protocol"]) == (port, proto)


def test_policy_trace_by_address(agent):
    agent.reply("policy_trace", TRACE)
    result = run(agent, "policy", "trace", "--from-label", "app=client", "--to-ip", "192.0.2.10", "--dport", "443")
    assert result.exit_code == 0, result.output
    args = agent.args("policy_trace")
    assert (args["from_labels"], args["to_labels"], args["to_ip"], "from_ip" in args) == (
        {"app": "client"}, {}, "192.0.2.10", False)


def test_policy_trace_names_the_ipblock_that_matched_the_address(agent):
    step = {**TRACE["steps"][0], "verdict": "ALLOWED", "rule_id": 7,
            "rule": "NetworkPolicy default/out spec.egress[0].to[0].ipBlock (allow)",
            "by_address": {"address": "10.200.0.9", "prefix": "10.0.0.0/8"}}
    agent.reply("policy_trace", {"verdict": "ALLOWED", "steps": [step]})
    result = run(agent, "policy", "trace", "--from-label", "app=client", "--to-label", "app=web", "--dport", "80")
    assert "spec.egress[0].to[0].ipBlock (allow), peer address 10.200.0.9 in 10.0.0.0/8" in result.stdout


@pytest.mark.parametrize("argv", [
    ["--from-label", "a=b", "--to-label", "c=d", "--dport", "80/sctp"],
    ["--from-label", "a=b", "--to-ip", "10.0.0.300", "--dport", "80"],
    ["--from-label", "a=b", "--from-ip", "10.0.0.1", "--to-label", "c=d", "--dport", "80"],
    ["--from-label", "a=b", "--dport", "80"],
    ["--from-label", "a=b", "--to-ip", "10.0.0.1", "--to-namespace", "x", "--dport", "80"],
    ["--from-label", "a=b", "--to-label", "c=d", "--dport", "0/tcp"],
    ["--from-label", "a=b", "--to-label", "c=d", "--dport", "99999"],
    ["--from-label", "a", "--to-label", "c=d", "--dport", "80"],
    ["--to-label", "c=d", "--dport", "80"],
])
def test_policy_trace_usage_errors(agent, argv):
    assert run(agent, "policy", "trace", *argv).exit_code == 2
    assert agent.requests == []


@pytest.mark.parametrize("group,op", [("ct", "bpf_ct_list"), ("ipcache", "bpf_ipcache_list"),
                                      ("ipblock", "bpf_ipblock_list"), ("policy", "bpf_policy_list"),
                                      ("fastpath", "bpf_fastpath_list")])
def test_bpf_lists_use_first_item_keys_as_columns(agent, group, op):
    items = [{"prefix": "10.200.0.12/32", "identity": 23456}, {"prefix": "0.0.0.0/0", "identity": 2}]
    agent.reply(op, {"items": items})
    result = run(agent, "bpf", group, "list")
    assert result.exit_code == 0, result.output
    assert agent.ops == [op]
    assert result.stdout.splitlines() == [
        "PREFIX           IDENTITY",
        "10.200.0.12/32   23456",
        "0.0.0.0/0        2",
    ]
    assert json.loads(run(agent, "bpf", group, "list", "-o", "json").stdout) == items


def test_service_list(agent):
    agent.reply("service_list", {"items": [{"name": "web", "vip": "10.96.0.10", "ports": [80]}]})
    result = run(agent, "service", "list")
    assert result.exit_code == 0
    assert result.stdout.splitlines()[1].split() == ["web", "10.96.0.10", "80"]


def test_bpf_dump_prints_source():
    result = CliRunner().invoke(cli, ["bpf", "dump"])
    assert result.exit_code == 0, result.output
    assert "#include \"lib/" not in result.stdout and len(result.stdout) > 100


def test_bpf_dump_unknown_program_is_exit_1():
    assert_one_line_error(CliRunner().invoke(cli, ["bpf", "dump", "nosuchprogram"]))


def test_teardown_prints_lines(monkeypatch, tmp_path):
    import agent.node

    cfg_file = tmp_path / "node.yaml"
    cfg_file.write_text("node_name: n5\n")
    seen = {}

    def fake_teardown(cfg, endpoints=False):
        seen.update(node=cfg.node_name, endpoints=endpoints)
        return ["detached from_container from lxc1", "removed /sys/fs/bpf/meshagent/n5"]

    monkeypatch.setattr(agent.node, "teardown", fake_teardown)
    result = CliRunner().invoke(cli, ["teardown", "--config", str(cfg_file), "--endpoints"])
    assert result.exit_code == 0, result.output
    assert seen == {"node": "n5", "endpoints": True}
    assert result.stdout.splitlines() == [
        "detached from_container from lxc1", "removed /sys/fs/bpf/meshagent/n5",
    ]


def test_teardown_uses_node_defaults(monkeypatch):
    import agent.node

    seen = {}
    monkeypatch.setattr(agent.node, "teardown", lambda cfg, endpoints=False: seen.update(cfg=cfg) or [])
    result = CliRunner().invoke(cli, ["--node", "n6", "teardown"])
    assert result.exit_code == 0, result.output
    assert seen["cfg"].node_name == "n6" and seen["cfg"].api_socket == "/run/meshagent/n6.sock"


def test_teardown_bad_config_is_exit_1(tmp_path):
    bad = tmp_path / "node.yaml"
    bad.write_text("nope: 1\n")
    assert_one_line_error(CliRunner().invoke(cli, ["teardown", "--config", str(bad)]))


def test_agent_command_runs_the_daemon(monkeypatch):
    import agent.daemon

    seen = []
    monkeypatch.setattr(agent.daemon, "run_agent", lambda path: seen.append(path) or 3)
    result = CliRunner().invoke(cli, ["agent", "--config", "/etc/meshagent/n1.yaml"])
    assert result.exit_code == 3
    assert seen == ["/etc/meshagent/n1.yaml"]


def test_teardown_refused_while_agent_runs_is_exit_1(monkeypatch):
    import agent.node

    def refuse(cfg, endpoints=False):
        raise agent.node.NodeError("another agent (pid 42) is already running for node n1; stop it first")

    monkeypatch.setattr(agent.node, "teardown", refuse)
    result = CliRunner().invoke(cli, ["teardown"])
    assert_one_line_error(result)
    assert "pid 42" in result.stderr


def test_a_bug_is_not_hidden(agent):
    agent.reply("endpoint_list", {"items": "not a list of dicts"})
    result = run(agent, "endpoint", "list")
    assert result.exit_code == 1 and result.exception is not None  # a traceback for a bug, not "Error:"


def test_flows_protocol_dns(agent):
    agent.reply("flows", {"lost_events": 0})
    assert run(agent, "flows", "--protocol", "DNS").exit_code == 0
    assert agent.args("flows")["filters"]["protocol"] == "dns"
