"""`meshagent apply` input: every kind parses as users write it, every mistake is one clear line."""

from __future__ import annotations

import re

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.resources import (
    KINDS,
    Resource,
    ResourceError,
    load_paths,
    parse_documents,
    parse_duration,
    validate,
)

# --- valid documents, as upstream docs write them ----------------------------------------------------

SERVICE = """
apiVersion: v1
kind: Service
metadata:
  name: reviews
  namespace: bookinfo
  labels:
    app: reviews
    service: reviews
spec:
  selector:
    app: reviews
  ports:
  - name: http
    port: 9080
    targetPort: 9080
    protocol: TCP
  - name: metrics
    port: 15090
    targetPort: "15090"
"""

HEADLESS_SERVICE = """
apiVersion: v1
kind: Service
metadata: {name: db}
spec:
  type: ClusterIP
  clusterIP: None
  selector: {app: db}
"""

CNP = """
apiVersion: "cilium.io/v2"
kind: CiliumNetworkPolicy
metadata:
  name: "l4-rule"
  namespace: shop
  annotations:
    meshagent.io/audit: "true"
    owner: team-a
spec:
  description: "L4 policy to restrict access to app backend"
  endpointSelector:
    matchLabels:
      app: myService
  ingress:
  - fromEndpoints:
    - matchLabels:
        app: frontend
    toPorts:
    - ports:
      - port: "80"
        protocol: TCP
  - fromEntities: [host, remote-node]
  - fromCIDRSet:
    - cidr: 10.0.0.0/8
      except: [10.96.0.0/12]
    toPorts:
    - ports: [{port: "8080"}]
  - icmps:
    - fields:
      - type: 8
        family: IPv4
      - type: EchoReply
  egress:
  - toEndpoints:
    - matchExpressions:
      - {key: app, operator: In, values: [db, cache]}
      - {key: io.kubernetes.pod.namespace, operator: Exists}
    toPorts:
    - ports:
      - port: "5432"
        endPort: 5440
        protocol: TCP
  - toCIDR: [192.0.2.0/24]
  - toEntities: [world]
    toPorts: [{ports: [{port: 53, protocol: UDP}]}]
  ingressDeny:
  - fromEndpoints: [{matchLabels: {role: attacker}}]
  egressDeny:
  - toCIDR: [203.0.113.0/24]
    toPorts: [{ports: [{port: "443", protocol: ANY}]}]
"""

CNP_SPECS = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: two-rules}
specs:
- endpointSelector: {}
  ingress: [{fromEndpoints: [{}]}]
- endpointSelector: {matchLabels: {app: web}}
  egress: [{toEntities: [cluster]}]
"""

NETWORK_POLICY = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: test-network-policy
  namespace: default
spec:
  podSelector:
    matchLabels:
      role: db
  policyTypes:
  - Ingress
  - Egress
  ingress:
  - from:
    - ipBlock:
        cidr: 172.17.0.0/16
        except:
        - 172.17.1.0/24
    - namespaceSelector:
        matchLabels:
          project: myproject
      podSelector:
        matchLabels:
          role: frontend
    ports:
    - protocol: TCP
      port: 6379
  egress:
  - to:
    - ipBlock:
        cidr: 10.0.0.0/24
    ports:
    - protocol: TCP
      port: 32000
      endPort: 32768
"""

VIRTUAL_SERVICE = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews-route
spec:
  hosts:
  - reviews.prod.svc.cluster.local
  gateways: [mesh]
  exportTo: ["."]
  http:
  - name: "reviews-v2-routes"
    match:
    - uri:
        prefix: "/wpcatalog"
    - uri:
        regex: "^/consumer(catalog|list)$"
      headers:
        end-user:
          exact: jason
        x-canary: {}
      method:
        exact: GET
      ignoreUriCase: true
      queryParams:
        debug: {exact: "1"}
    rewrite:
      uri: "/newcatalog"
    route:
    - destination:
        host: reviews.prod.svc.cluster.local
        subset: v2
  - name: "reviews-v1-route"
    route:
    - destination:
        host: reviews.prod.svc.cluster.local
        subset: v1
      weight: 75
    - destination:
        host: reviews.prod.svc.cluster.local
        subset: v3
        port:
          number: 9080
      weight: 25
      headers:
        response:
          set: {x-version: v3}
          remove: [x-internal]
    timeout: 10s
    retries:
      attempts: 3
      perTryTimeout: 250ms
      retryOn: gateway-error,connect-failure,refused-stream,503
    fault:
      delay:
        percentage:
          value: 0.1
        fixedDelay: 1.5s
      abort:
        percentage: {value: 0.1}
        httpStatus: 400
    mirror:
      host: reviews-mirror
    mirrorPercentage:
      value: 50.0
    headers:
      request:
        add: {x-request-source: mesh}
"""

DESTINATION_RULE = """
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata:
  name: bookinfo-ratings
spec:
  host: ratings.prod.svc.cluster.local
  trafficPolicy:
    loadBalancer:
      simple: LEAST_REQUEST
    connectionPool:
      tcp:
        maxConnections: 100
        connectTimeout: 30ms
      http:
        http1MaxPendingRequests: 1024
        http2MaxRequests: 1024
        maxRequestsPerConnection: 10
        maxRetries: 3
        idleTimeout: 1h
    outlierDetection:
      consecutive5xxErrors: 7
      consecutiveGatewayErrors: 5
      interval: 5m
      baseEjectionTime: 15m
      maxEjectionPercent: 100
      minHealthPercent: 0
    tls:
      mode: ISTIO_MUTUAL
  subsets:
  - name: testversion
    labels:
      version: v3
    trafficPolicy:
      loadBalancer:
        simple: ROUND_ROBIN
  - name: v1
    labels: {version: v1}
"""

PEER_AUTHENTICATION = """
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata:
  name: finance
  namespace: foo
spec:
  selector:
    matchLabels:
      app: finance
  mtls:
    mode: STRICT
  portLevelMtls:
    8080:
      mode: DISABLE
"""

AUTHORIZATION_POLICY = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: httpbin
  namespace: foo
spec:
  selector:
    matchLabels:
      app: httpbin
      version: v1
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/sleep"]
    - source:
        namespaces: ["dev"]
    to:
    - operation:
        methods: ["GET"]
    when:
    - key: request.headers[x-token]
      values: ["abc*"]
  - from:
    - source:
        ipBlocks: ["10.1.2.3", "10.2.0.0/16"]
        notNamespaces: ["test"]
    to:
    - operation:
        ports: ["8080"]
        paths: ["/api/*"]
        notMethods: ["DELETE"]
"""

DENY_ALL = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-nothing, namespace: foo}
spec: {}
"""

SERVICE_ENTRY = """
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata:
  name: external-svc-https
spec:
  hosts:
  - api.dropboxapi.com
  - www.googleapis.com
  location: MESH_EXTERNAL
  ports:
  - number: 443
    name: https
    protocol: HTTPS
  resolution: DNS
"""

SERVICE_ENTRY_STATIC = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: external-svc-mongocluster
spec:
  hosts:
  - mymongodb.somedomain
  addresses:
  - 192.192.192.0/24
  ports:
  - number: 27018
    name: mongodb
    protocol: TCP
  location: MESH_INTERNAL
  resolution: STATIC
  endpoints:
  - address: 2.2.2.2
  - address: 3.3.3.3
    ports: {mongodb: 27019}
    labels: {zone: b}
  exportTo: ["*"]
"""

VALID = {
    "Service": SERVICE,
    "HeadlessService": HEADLESS_SERVICE,
    "CiliumNetworkPolicy": CNP,
    "CiliumNetworkPolicySpecs": CNP_SPECS,
    "NetworkPolicy": NETWORK_POLICY,
    "VirtualService": VIRTUAL_SERVICE,
    "DestinationRule": DESTINATION_RULE,
    "PeerAuthentication": PEER_AUTHENTICATION,
    "AuthorizationPolicy": AUTHORIZATION_POLICY,
    "DenyAll": DENY_ALL,
    "ServiceEntry": SERVICE_ENTRY,
    "ServiceEntryStatic": SERVICE_ENTRY_STATIC,
}


def one(text: str) -> Resource:
    (r,) = parse_documents(text, "test.yaml")
    return r


def error(text: str, source: str = "test.yaml") -> str:
    with pytest.raises(ResourceError) as info:
        parse_documents(text, source)
    message = str(info.value)
    assert "\n" not in message and message == message.strip(), message
    assert message.startswith(f"{source}: "), message
    return message


def edit(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


@pytest.mark.parametrize("name", list(VALID))
def test_valid_examples_of_every_kind(name):
    r = one(VALID[name])
    assert r.kind in KINDS
    assert r.api_version in KINDS[r.kind]
    assert r.body == yaml.safe_load(VALID[name])  # kept as written, nothing normalised


def test_every_kind_and_version_is_covered():
    assert set(KINDS) == {
        "Service", "CiliumNetworkPolicy", "NetworkPolicy", "VirtualService", "DestinationRule",
        "ServiceEntry", "PeerAuthentication", "AuthorizationPolicy", "Namespace",
    }
    assert KINDS["VirtualService"] == (
        "networking.istio.io/v1", "networking.istio.io/v1beta1", "networking.istio.io/v1alpha3")
    assert KINDS["AuthorizationPolicy"] == ("security.istio.io/v1", "security.istio.io/v1beta1")
    for kind, versions in KINDS.items():
        for version in versions:
            doc = yaml.safe_load(DENY_ALL) if kind == "AuthorizationPolicy" else None
            if doc is not None:
                doc["apiVersion"] = version
                assert validate(doc, "x").api_version == version


def test_resource_fields():
    r = one(CNP)
    assert (r.api_version, r.kind, r.namespace, r.name) == ("cilium.io/v2", "CiliumNetworkPolicy", "shop", "l4-rule")
    assert r.key == ("CiliumNetworkPolicy", "shop", "l4-rule")
    assert r.annotations == {"meshagent.io/audit": "true", "owner": "team-a"}
    assert r.audit is True
    assert r.where == "test.yaml: document 1"
    s = one(SERVICE_ENTRY)
    assert s.namespace == "default" and s.annotations == {} and s.audit is False
    assert hash(r) == hash(one(CNP))  # usable in sets, keyed by identity not body


def test_multi_document_file_skips_empty_documents_and_counts_them():
    text = "# leading comment\n---\n" + SERVICE + "---\n---\n# only a comment\n---\n" + CNP + "\n---\n"
    resources = parse_documents(text, "all.yaml")
    assert [r.kind for r in resources] == ["Service", "CiliumNetworkPolicy"]
    bad = text.replace("app: frontend", "app: 'front end'")
    assert error(bad, "all.yaml").startswith("all.yaml: document 4 (CiliumNetworkPolicy shop/l4-rule): ")


def test_empty_text_is_no_resources():
    assert parse_documents("", "x.yaml") == []
    assert parse_documents("# nothing\n---\n", "x.yaml") == []


def test_directory_reads_yaml_files_in_name_order(tmp_path):
    (tmp_path / "b.yaml").write_text(CNP)
    (tmp_path / "a.yml").write_text(SERVICE + "---\n" + DESTINATION_RULE)
    (tmp_path / "notes.txt").write_text("not: yaml: at all: [")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.yaml").write_text(VIRTUAL_SERVICE)  # not recursive
    resources = load_paths([str(tmp_path)])
    assert [r.kind for r in resources] == ["Service", "DestinationRule", "CiliumNetworkPolicy"]
    assert resources[2].where == f"{tmp_path}/b.yaml: document 1"


def test_files_and_directories_mixed(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.yaml").write_text(SERVICE)
    (tmp_path / "y.yaml").write_text(PEER_AUTHENTICATION)
    resources = load_paths([str(tmp_path / "d"), str(tmp_path / "y.yaml"), str(tmp_path / "d" / "x.yaml")])
    assert [r.kind for r in resources] == ["Service", "PeerAuthentication"]  # x.yaml named twice: read once
    assert load_paths([str(tmp_path / "d"), str(tmp_path / "y.yaml")]) == resources
    (tmp_path / "empty").mkdir()
    assert load_paths([str(tmp_path / "empty")]) == []


def test_missing_path(tmp_path):
    with pytest.raises(ResourceError, match=r"nope\.yaml: no such file or directory$"):
        load_paths([str(tmp_path / "nope.yaml")])


def test_apply_is_atomic_first_error_wins(tmp_path):
    (tmp_path / "1-good.yaml").write_text(SERVICE)
    (tmp_path / "2-bad.yaml").write_text(edit(CNP, "fromEntities", "fromEntitys"))
    with pytest.raises(ResourceError, match=r"2-bad\.yaml: document 1 .*spec\.ingress\[1\]\.fromEntitys"):
        load_paths([str(tmp_path)])


def test_not_utf8(tmp_path):
    (tmp_path / "x.yaml").write_bytes(b"kind: \xff\xfe\n")
    with pytest.raises(ResourceError, match="not UTF-8"):
        load_paths([str(tmp_path / "x.yaml")])


# --- bad input: one line each, naming the document, the field path and what is supported -------------

GOOD_CNP = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: allow-web, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {role: frontend}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
"""


def test_unknown_field_message_is_exactly_as_documented():
    text = SERVICE + "---\n" + edit(GOOD_CNP, "fromEndpoints", "fromEndpoint")
    assert error(text, "policies.yaml") == (
        "policies.yaml: document 2 (CiliumNetworkPolicy default/allow-web): spec.ingress[0].fromEndpoint: "
        "unknown field; supported: fromEndpoints, fromCIDR, fromCIDRSet, fromEntities, toPorts, icmps"
    )


def test_malformed_yaml():
    msg = error("apiVersion: v1\nkind: [unclosed\nmetadata: {name: x}\n", "policies.yaml")
    assert re.fullmatch(r"policies\.yaml: malformed YAML at line \d+, column \d+: .+", msg), msg
    msg = error("a: 1\n  b: 2\n")
    assert msg.startswith("test.yaml: malformed YAML at line 2, column 4: "), msg


@pytest.mark.parametrize("text,needle", [
    ("kind: Service\nkind: Service\n", "duplicate key 'kind'"),  # PyYAML would keep the last silently
    ("a: 2024-13-45\n", "invalid value"),  # PyYAML raises ValueError for an impossible date
    ("a: !!int x\n", "invalid value"),
    ("a: !!python/object:os.system x\n", "could not determine a constructor"),
    ("a: \x00\n", "unacceptable character #x0000"),
    ("[" * 5000, "malformed YAML"),
])
def test_malformed_yaml_edge_cases(text, needle):
    msg = error(text)
    assert "malformed YAML" in msg and needle in msg, msg


SVC_BASE = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  ports: [{port: 80}]\n"


@pytest.mark.parametrize("text,expected", [
    # documents
    ("- just\n- a list\n", "document 1: expected a mapping with apiVersion, kind, metadata and spec, got a list"),
    ("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n",
     "document 1 (Pod default/p): kind: 'Pod' is not supported; supported: Service, CiliumNetworkPolicy, "
     "NetworkPolicy, VirtualService, DestinationRule, ServiceEntry, PeerAuthentication, AuthorizationPolicy"),
    ("apiVersion: v1\nmetadata: {name: p}\n",
     "document 1 (default/p): kind: required field missing; supported: Service,"),
    (edit(GOOD_CNP, "cilium.io/v2", "cilium.io/v1"),
     "(CiliumNetworkPolicy default/allow-web): apiVersion: 'cilium.io/v1' is not supported for "
     "CiliumNetworkPolicy; supported: cilium.io/v2"),
    (edit(GOOD_CNP, "apiVersion: cilium.io/v2\n", ""), "apiVersion: required field missing"),
    (edit(GOOD_CNP, "name: allow-web, ", ""), "(CiliumNetworkPolicy): metadata.name: required field missing"),
    (edit(GOOD_CNP, "name: allow-web", "name: Allow_Web"), "metadata.name: 'Allow_Web' is not a valid name"),
    (edit(SVC_BASE, "name: web", "name: 1web"), "metadata.name: '1web' is not a valid Service name"),
    (edit(GOOD_CNP, "namespace: default", "namespace: default, uid: abc"),
     "metadata.uid: set by the cluster, not by users; remove it"),
    (SVC_BASE + "status: {loadBalancer: {}}\n", "status: status is set by the cluster"),
    (edit(GOOD_CNP, "spec:", "spek:"), "spek: unknown field; supported: apiVersion, kind, metadata, spec, specs"),
    (edit(SVC_BASE, "spec:\n  ports: [{port: 80}]\n", ""), "spec: required field missing"),
    (edit(SVC_BASE, "{name: web}", "{name: web, annotations: {meshagent.io/audit: 'true'}}"),
     "metadata.annotations[meshagent.io/audit]: unknown meshagent annotation; supported: none for this kind"),
    (edit(GOOD_CNP, "namespace: default", "annotations: {meshagent.io/audit: yes}"),
     "metadata.annotations[meshagent.io/audit]: expected a string, got boolean true (quote it"),
    (edit(GOOD_CNP, "namespace: default", "annotations: {meshagent.io/audit: 'on'}"),
     "'on': write 'true' or 'false'"),
    # types
    (edit(GOOD_CNP, "ingress:\n  - fromEndpoints", "ingress:\n    fromEndpoints"),
     "spec.ingress: expected a list, got a mapping"),
    (edit(GOOD_CNP, "{matchLabels: {app: web}}", "web"), "spec.endpointSelector: expected a mapping, got string 'web'"),
    (edit(GOOD_CNP, "{app: web}", "{app: 1}"),
     "spec.endpointSelector.matchLabels[app]: expected a label value, got integer 1 (quote it"),
    (edit(SVC_BASE, "port: 80", "port: '80'"), "spec.ports[0].port: expected a port number, got string '80'"),
    (edit(SVC_BASE, "ports: [{port: 80}]", "ports:"), "spec.ports: expected a list, got null"),
    # CIDRs
    (edit(GOOD_CNP, "fromEndpoints: [{matchLabels: {role: frontend}}]", "fromCIDR: [300.1.1.0/24]"),
     "spec.ingress[0].fromCIDR[0]: '300.1.1.0/24' is not a valid IPv4 CIDR"),
    (edit(GOOD_CNP, "fromEndpoints: [{matchLabels: {role: frontend}}]", "fromCIDR: [10.0.0.1/8]"),
     "spec.ingress[0].fromCIDR[0]: 10.0.0.1/8 has host bits set; did you mean 10.0.0.0/8?"),
    (edit(GOOD_CNP, "fromEndpoints: [{matchLabels: {role: frontend}}]", "fromCIDR: [10.0.0.1]"),
     "'10.0.0.1' is not a CIDR: write ADDRESS/PREFIX"),
    (edit(GOOD_CNP, "fromEndpoints: [{matchLabels: {role: frontend}}]", "fromCIDR: ['fd00::/8']"),
     "IPv6 is not supported"),
    (edit(GOOD_CNP, "fromEndpoints: [{matchLabels: {role: frontend}}]",
          "fromCIDRSet: [{cidr: 10.0.0.0/16, except: [10.1.0.0/24]}]"),
     "spec.ingress[0].fromCIDRSet[0].except[0]: 10.1.0.0/24 is not inside cidr 10.0.0.0/16"),
    # ports
    (edit(GOOD_CNP, 'port: "80"', 'port: "0"'), "spec.ingress[0].toPorts[0].ports[0].port: port 0 is out of range"),
    (edit(GOOD_CNP, 'port: "80"', "port: 70000"), "port 70000 is out of range 1-65535"),
    (edit(GOOD_CNP, 'port: "80"', "port: http, endPort: 90"),
     "spec.ingress[0].toPorts[0].ports[0].endPort: endPort needs a numeric port: the named port 'http' cannot start"),
    (edit(GOOD_CNP, 'port: "80"', "port: http--web"),
     "spec.ingress[0].toPorts[0].ports[0].port: 'http--web' is neither a port number nor a port name "
     "(a port name has no '--' and no '-' at either end)"),
    (edit(GOOD_CNP, 'port: "80"', "port: a-very-long-port-name"),
     "'a-very-long-port-name' is neither a port number nor a port name (a port name has 1-15 characters)"),
    (edit(GOOD_CNP, 'port: "80"', 'port: "9000", endPort: 8000'),
     "spec.ingress[0].toPorts[0].ports[0].endPort: endPort 8000 is lower than port 9000"),
    (edit(GOOD_CNP, 'port: "80"', "endPort: 8000"), "endPort needs port"),
    (edit(GOOD_CNP, "protocol: TCP", "protocol: tcp"),
     "spec.ingress[0].toPorts[0].ports[0].protocol: unknown value 'tcp'; supported: TCP, UDP, SCTP, ICMP, ANY"),
    # selectors and labels
    (edit(GOOD_CNP, "{matchLabels: {role: frontend}}", "{matchExpressions: [{key: role, operator: Inn, values: [a]}]}"),
     "spec.ingress[0].fromEndpoints[0].matchExpressions[0].operator: unknown value 'Inn'; "
     "supported: In, NotIn, Exists, DoesNotExist"),
    (edit(GOOD_CNP, "{matchLabels: {role: frontend}}", "{matchExpressions: [{key: role, operator: In}]}"),
     "spec.ingress[0].fromEndpoints[0]: matchExpressions[0]: operator In needs a non-empty values list"),
    (edit(GOOD_CNP, "role: frontend", "role: 'bad value!'"),
     "spec.ingress[0].fromEndpoints[0].matchLabels[role]: invalid label value 'bad value!'"),
    (edit(GOOD_CNP, "role: frontend", "'k8s:role': frontend"),
     "invalid label key 'k8s:role': label source prefixes such as k8s: are not supported"),
    (edit(GOOD_CNP, "role: frontend", "'reserved:host': ''"), "use fromEntities/toEntities"),
    (edit(GOOD_CNP, "role: frontend", 'role: "web\\n"'), "contains a line break"),
    # CiliumNetworkPolicy specifics
    (edit(GOOD_CNP, '[{ports: [{port: "80", protocol: TCP}]}]',
          '[{ports: [{port: "80", protocol: TCP}], rules: {http: [{method: GET}]}}]'),
     "spec.ingress[0].toPorts[0].rules: L7 rules in CiliumNetworkPolicy are not supported; "
     "use an Istio AuthorizationPolicy"),
    (edit(GOOD_CNP, "ingress:", "ingressDeny:").replace('protocol: TCP}]', 'protocol: TCP}], rules: {}'),
     "spec.ingressDeny[0].toPorts[0].rules: L7 rules in CiliumNetworkPolicy are not supported"),
    (edit(GOOD_CNP, "ingress:", "egress:").replace("fromEndpoints", "toFQDNs"),
     "spec.egress[0].toFQDNs[0].matchLabels: unknown field; supported: matchName, matchPattern"),
    (edit(GOOD_CNP, "    toPorts", "    fromEntities: [world]\n    toPorts"),
     "spec.ingress[0].fromEntities: fromEndpoints and fromEntities cannot be combined in one rule"),
    (edit(GOOD_CNP, "fromEndpoints: [{matchLabels: {role: frontend}}]", "fromEntities: [internet]"),
     "spec.ingress[0].fromEntities[0]: unknown value 'internet'; supported: world, cluster, host"),
    (edit(GOOD_CNP, "    toPorts", "    icmps: [{fields: [{type: 8}]}]\n    toPorts"),
     "icmps cannot be combined with toPorts"),
    (edit(GOOD_CNP, "toPorts: [{ports: [{port: \"80\", protocol: TCP}]}]", "icmps: [{fields: [{type: Ping}]}]"),
     "spec.ingress[0].icmps[0].fields[0].type: unknown ICMP type 'Ping'"),
    (edit(GOOD_CNP, "  endpointSelector: {matchLabels: {app: web}}\n", ""),
     "spec.endpointSelector: required field missing"),
    (edit(GOOD_CNP, "spec:", "specs: []\nx:").replace("x:\n", "spec:\n"), "specs: must not be empty"),
    # NetworkPolicy
    (edit(NETWORK_POLICY, "    - namespaceSelector:", "      namespaceSelector:"),
     "spec.ingress[0].from[0].ipBlock: ipBlock cannot be combined with podSelector or namespaceSelector"),
    (edit(NETWORK_POLICY, "port: 6379", "port: Redis"),
     "spec.ingress[0].ports[0].port: 'Redis' is neither a port number nor a port name (a port name has only a-z"),
    (edit(NETWORK_POLICY, "port: 32000", "port: redis"),
     "spec.egress[0].ports[0].endPort: endPort needs a numeric port: the named port 'redis' cannot start a range"),
    (edit(NETWORK_POLICY, "endPort: 32768", "endPort: 31000"),
     "spec.egress[0].ports[0].endPort: endPort 31000 is lower"),
    (edit(NETWORK_POLICY, "  - Egress", "  - egress"), "spec.policyTypes[1]: unknown value 'egress'"),
    (edit(NETWORK_POLICY, "        - 172.17.1.0/24", "        - 10.0.0.0/24"), "is not inside cidr 172.17.0.0/16"),
    (edit(NETWORK_POLICY, "  podSelector:\n    matchLabels:\n      role: db\n", ""),
     "spec.podSelector: required field missing"),
    # Service
    (edit(SERVICE, "protocol: TCP", "protocol: HTTP"), "spec.ports[0].protocol: unknown value 'HTTP'"),
    (edit(SERVICE, "  - name: metrics\n    port", "  - port"),
     "spec.ports[1].name: required when a Service has more than one port"),
    (edit(HEADLESS_SERVICE, "type: ClusterIP", "type: NodePort"),
     "spec.type: 'NodePort' is not supported; supported: ClusterIP"),
    (edit(HEADLESS_SERVICE, "clusterIP: None", "clusterIP: 10.96.0.300"), "'10.96.0.300' is not a valid IPv4 address"),
    (edit(SERVICE, 'targetPort: "15090"', "targetPort: metrics"), "spec.ports[1].targetPort: named ports are not"),
    # VirtualService
    (edit(VIRTUAL_SERVICE, "timeout: 10s", "timeout: 10"), "spec.http[1].timeout: expected a duration such as 1s"),
    (edit(VIRTUAL_SERVICE, "timeout: 10s", "timeout: 10sec"),
     "spec.http[1].timeout: '10sec' is not a duration: write e.g. 250ms, 1.5s, 1m or 1h"),
    (edit(VIRTUAL_SERVICE, "timeout: 10s", "timeout: 0s"), "duration must be at least 1ms"),
    (edit(VIRTUAL_SERVICE, "weight: 25", "weight: 20"),
     "spec.http[1].route: weights add up to 95; with more than one destination they must add up to 100"),
    (edit(VIRTUAL_SERVICE, "weight: 25", "weight: 125"), "spec.http[1].route[1].weight: 125 is out of range 0-100"),
    (edit(VIRTUAL_SERVICE, 'regex: "^/consumer(catalog|list)$"', 'regex: "^/consumer(catalog"'),
     "spec.http[0].match[1].uri.regex: invalid regular expression '^/consumer(catalog'"),
    (edit(VIRTUAL_SERVICE, 'prefix: "/wpcatalog"', 'prefix: "/wpcatalog"\n        exact: /x'),
     "spec.http[0].match[0].uri: set exactly one of exact, prefix, regex (got exact, prefix)"),
    (edit(VIRTUAL_SERVICE, "rewrite:", "redirect:"),
     "spec.http[0]: set exactly one of route, redirect, directResponse (got route, redirect)"),
    (VIRTUAL_SERVICE + "  tcp: [{route: [{destination: {host: x}}]}]\n",
     "spec.tcp: TCP routes are not supported; supported: hosts, gateways, http, exportTo"),
    (edit(VIRTUAL_SERVICE, "gateways: [mesh]", "gateways: [istio-system/ingress]"),
     "spec.gateways[0]: unknown value 'istio-system/ingress'; supported: mesh"),
    (edit(VIRTUAL_SERVICE, "retryOn: gateway-error", "retryOn: 5xxx,gateway-error"),
     "spec.http[1].retries.retryOn: retry condition '5xxx' is not supported"),
    (edit(VIRTUAL_SERVICE, "httpStatus: 400", "httpStatus: 600"), "spec.http[1].fault.abort.httpStatus: 600 is out of"),
    (edit(VIRTUAL_SERVICE, "value: 50.0", "value: 150"), "spec.http[1].mirrorPercentage.value: 150 is out of range"),
    (edit(VIRTUAL_SERVICE, "value: 50.0", "value: .nan"), "spec.http[1].mirrorPercentage.value: nan is out of range"),
    (edit(VIRTUAL_SERVICE, "end-user:", "end user:"), "spec.http[0].match[1].headers['end user']: 'end user' is not a"),
    (edit(VIRTUAL_SERVICE, "remove: [x-internal]", "remove: [Host]"), "use rewrite.authority"),
    (edit(VIRTUAL_SERVICE, "host: reviews-mirror", "host: '*.mirror'"), "a destination host cannot be a wildcard"),
    # DestinationRule
    (edit(DESTINATION_RULE, "simple: LEAST_REQUEST", "simple: LEAST_CONN"),
     "spec.trafficPolicy.loadBalancer.simple: 'LEAST_CONN' is not supported; "
     "supported: ROUND_ROBIN, LEAST_REQUEST, RANDOM, PASSTHROUGH"),
    (edit(DESTINATION_RULE, "mode: ISTIO_MUTUAL", "mode: MUTUAL"), "spec.trafficPolicy.tls.mode: 'MUTUAL' is not"),
    (edit(DESTINATION_RULE, "interval: 5m", "interval: -5m"), "'-5m' is not a duration"),
    (edit(DESTINATION_RULE, "maxEjectionPercent: 100", "maxEjectionPercent: 101"), "101 is out of range 0-100"),
    (edit(DESTINATION_RULE, "name: v1", "name: testversion"), "spec.subsets[1].name: 'testversion' is used twice"),
    (edit(DESTINATION_RULE, "    labels: {version: v1}\n", ""), "spec.subsets[1].labels: required field missing"),
    # PeerAuthentication
    (edit(PEER_AUTHENTICATION, "mode: STRICT", "mode: strict"),
     "spec.mtls.mode: unknown value 'strict'; supported: STRICT, PERMISSIVE, DISABLE, UNSET"),
    (edit(PEER_AUTHENTICATION, "8080:", "0:"), "spec.portLevelMtls[0]: port 0 is out of range"),
    (edit(PEER_AUTHENTICATION, "  selector:\n    matchLabels:\n      app: finance\n", ""),
     "spec.portLevelMtls: portLevelMtls needs selector"),
    # AuthorizationPolicy
    (edit(AUTHORIZATION_POLICY, "action: ALLOW", "action: AUDIT"),
     "spec.action: 'AUDIT' is not supported; supported: ALLOW, DENY"),
    (edit(AUTHORIZATION_POLICY, '["10.1.2.3", ', '["10.1.2.3/8", '),
     "spec.rules[1].from[0].source.ipBlocks[0]: 10.1.2.3/8 has host bits set"),
    (edit(AUTHORIZATION_POLICY, 'ports: ["8080"]', 'ports: ["http"]'), "named ports are not supported"),
    (edit(AUTHORIZATION_POLICY, "values:", "vals:"), "spec.rules[0].when[0].vals: unknown field; supported: key,"),
    (edit(AUTHORIZATION_POLICY, "key: request.headers[x-token]", "key: request.auth.claims[iss]"),
     "spec.rules[0].when[0].key: 'request.auth.claims[iss]' needs JWT authentication"),
    (edit(AUTHORIZATION_POLICY, "principals:", "requestPrincipals:"), "request principals need JWT"),
    # ServiceEntry
    (edit(SERVICE_ENTRY, "protocol: HTTPS", "protocol: TLS"), "spec.ports[0].protocol: 'TLS' is not supported"),
    (edit(SERVICE_ENTRY, "location: MESH_EXTERNAL", "location: EXTERNAL"), "spec.location: unknown value 'EXTERNAL'"),
    (edit(SERVICE_ENTRY, "    name: https\n", ""), "spec.ports[0].name: required field missing"),
    (edit(SERVICE_ENTRY_STATIC, "address: 2.2.2.2", "address: db.example.com"),
     "spec.endpoints[0].address: with resolution STATIC an endpoint address must be an IPv4 address"),
    (edit(SERVICE_ENTRY_STATIC, "192.192.192.0/24", "192.192.192.192/24"), "has host bits set"),
])
def test_bad_input(text, expected):
    assert expected in error(text)


def test_policy_ports_may_be_names():
    """Kubernetes and Cilium resolve a port name per endpoint; elsewhere (Service targetPort,
    AuthorizationPolicy ports) names stay refused, above."""
    one(edit(GOOD_CNP, 'port: "80"', "port: serve-80-tcp"))
    one(edit(GOOD_CNP, 'port: "80"', "port: HTTP"))  # Cilium compares names in any case
    one(edit(NETWORK_POLICY, "port: 6379", "port: redis"))


def test_duplicate_resource_in_one_apply(tmp_path):
    assert error(SERVICE + "---\n" + SERVICE) == (
        "test.yaml: document 2 (Service bookinfo/reviews): the same resource appears twice in one apply; "
        "first in test.yaml: document 1"
    )
    (tmp_path / "a.yaml").write_text(GOOD_CNP)
    (tmp_path / "b.yaml").write_text(GOOD_CNP.replace("namespace: default", "namespace: default"))
    with pytest.raises(ResourceError, match=r"b\.yaml: document 1 .*appears twice.* first in .*a\.yaml"):
        load_paths([str(tmp_path)])
    # Same name in another namespace or of another kind is another resource.
    other_ns = GOOD_CNP.replace("namespace: default", "namespace: prod")
    assert len(parse_documents(GOOD_CNP + "---\n" + other_ns, "x.yaml")) == 2


def test_helpers_shared_with_downstream():
    assert parse_duration("1m30s") == 90.0
    assert parse_duration("250ms") == 0.25
    with pytest.raises(ValueError):
        parse_duration("1d")


# --- fuzzing: whatever comes in, the only exception is a one-line ResourceError ----------------------


def _only_resource_errors(text: str) -> None:
    try:
        parse_documents(text, "fuzz.yaml")
    except ResourceError as e:
        assert "\n" not in str(e)


YAMLISH = st.lists(st.sampled_from([
    "apiVersion: ", "kind: ", "metadata:", "spec:", "name: x", "\n", "  ", "- ", ": ", "[", "]", "{", "}",
    ",", "'", '"', "&a ", "*a", "<<: *a", "!!int ", "!!binary ", "!!set ", "? ", "|", ">", "---\n", "#",
    "2001-13-45", "0x1F", "1e999", ".nan", "~", "null", "yes", "Service", "v1", "cilium.io/v2",
    "CiliumNetworkPolicy", "\t", "\x00", "é", "\\u0000",
]), max_size=40).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(), YAMLISH))
def test_fuzz_text(text):
    _only_resource_errors(text)


SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.sampled_from(["80", "http", "10.0.0.0/8", "10.0.0.1/8", "1s", "TCP", "In", "", "*", "mesh"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.one_of(st.text(max_size=10), st.integers()), inner, max_size=3),
    ),
    max_leaves=10,
)


def _paths(value, prefix=()):
    """Every path into a loaded document, as tuples of keys and indexes."""
    yield prefix
    if isinstance(value, dict):
        for k, item in value.items():
            yield from _paths(item, (*prefix, k))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _paths(item, (*prefix, i))


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(list(VALID.values())), st.data())
def test_fuzz_mutated_documents(text, data):
    """Take a valid document, change one place in it, and feed it back: valid or ResourceError."""
    doc = yaml.safe_load(text)
    paths = list(_paths(doc))
    path = data.draw(st.sampled_from(paths[1:]))
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    action = data.draw(st.sampled_from(["replace", "delete", "add"]))
    if action == "replace":
        parent[path[-1]] = data.draw(VALUES)
    elif action == "delete":
        del parent[path[-1]]
    elif isinstance(parent, dict):
        parent[data.draw(st.text(max_size=10))] = data.draw(VALUES)
    else:
        parent.append(data.draw(VALUES))
    _only_resource_errors(yaml.safe_dump(doc))
    try:
        validate(doc, "fuzz")  # and straight from Python objects, without YAML in between
    except ResourceError as e:
        assert "\n" not in str(e)
