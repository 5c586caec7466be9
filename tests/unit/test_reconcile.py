"""The reconcile path without a kernel: computed endpoint tables, and MapSync's writes against a
fake datapath that holds the maps in dicts."""

from __future__ import annotations

from types import SimpleNamespace

from agent.datapath import maps
from agent.endpoint import EndpointRecord
from agent.reconcile import DesiredState, MapSync, compute


def record(name: str, ep_id: int, identity: int, ip: str) -> EndpointRecord:
    return EndpointRecord(name=name, node="n1", namespace="default", serviceaccount="default",
                          labels={"app": name}, ip=ip, ep_id=ep_id, identity=identity, netns=f"/run/netns/{name}",
                          netns_owned=True, ifname=f"lxc{name}", peer_ifname="eth0", cgroup="")


def desired(*local: tuple[EndpointRecord, int]) -> DesiredState:
    return DesiredState(local_endpoints=list(local), all_endpoints=[r for r, _ in local],
                        identities={r.identity: r.labels for r, _ in local}, policies=[],
                        local_node_ips=["10.200.0.1"], remote_node_ips=[], mode="default", cidr_identities={})


class FakeTable:
    """A BCC table as MapSync uses it: ctypes keys, compared by their bytes."""

    def __init__(self):
        self.entries: dict[bytes, tuple[object, object]] = {}

    def items(self):
        return list(self.entries.values())

    def __setitem__(self, key, value):
        self.entries[bytes(key)] = (key, value)

    def __delitem__(self, key):
        del self.entries[bytes(key)]


class FakeDatapath:
    def __init__(self):
        self.tables = {"ipcache": FakeTable(), "policy_map": FakeTable(),
                       "config_map": {0: SimpleNamespace(policy_revision=0)}}
        self.endpoints: dict[int, bytes] = {}
        self.by_id: dict[int, bytes] = {}

    def table(self, name):
        return self.tables[name]

    def read_endpoints(self):
        return dict(self.endpoints)

    def read_endpoints_by_id(self):
        return dict(self.by_id)

    def write_endpoint(self, ifindex, info):
        self.endpoints[ifindex] = bytes(info)

    def delete_endpoint(self, ifindex):
        self.endpoints.pop(ifindex, None)

    def write_endpoint_by_id(self, ep_id, info):
        self.by_id[ep_id] = bytes(info)

    def delete_endpoint_by_id(self, ep_id):
        self.by_id.pop(ep_id, None)


def test_endpoints_are_computed_by_ifindex_and_by_ep_id():
    """The L7 processor's marks name a client by ep_id: the by-id table holds the very entry the
    ifindex table holds, so a client's identity and egress flags are the same either way."""
    web, db = record("web", 3, 1001, "10.200.0.5"), record("db", 4, 1002, "10.200.0.6")
    contents, _ = compute(desired((web, 17), (db, 18)))
    assert contents.endpoints_by_id == {3: contents.endpoints[17], 4: contents.endpoints[18]}
    info = maps.EndpointInfoC.from_buffer_copy(contents.endpoints_by_id[4])
    assert (info.ep_id, info.identity) == (4, 1002)


def test_sync_writes_and_removes_the_by_id_entries():
    dp = FakeDatapath()
    sync = MapSync(dp)
    web, db = record("web", 3, 1001, "10.200.0.5"), record("db", 4, 1002, "10.200.0.6")
    sync.sync(compute(desired((web, 17), (db, 18)))[0])
    assert set(dp.by_id) == {3, 4} and dp.by_id[3] == dp.endpoints[17]
    revision = dp.tables["config_map"][0].policy_revision
    assert revision > 0, "tracked proxied flows re-check the client's side too"

    sync.sync(compute(desired((web, 17)))[0])  # db left
    assert set(dp.by_id) == {3} and set(dp.endpoints) == {17}
    assert dp.tables["config_map"][0].policy_revision == revision + 1

    # A restarted agent adopts what the maps hold and writes nothing when nothing changed.
    again = MapSync(dp)
    stats = again.sync(compute(desired((web, 17)))[0])
    assert not stats.changed
