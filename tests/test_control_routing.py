"""QUIC server ids, source routes and settings.mtu in the control plane: the desired
tables (health and drain rules), minimal writes and rollback, the controller's changes
(validation, conflicts, dangling entries), the API, persistence, metrics and stats."""

from __future__ import annotations

import numpy as np
import pytest
from control_helpers import check_live_consistency, make_config, problems, real_addr, tables_for, vip_dict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.api_client import ApiClient
from control.api import create_app
from control.api.models import QuicServerView, SourceRouteView
from control.datapaths import MemoryPort, Stats, UserspacePort
from control.errors import Conflict, Invalid, NotFound, PreconditionFailed
from control.ids import EMPTY
from control.plane import ControlPlane, open_plane
from control.reconcile import DeleteEntry, PutEntry, WriteCtl, apply, plan
from control.store import Store
from control.tables import (
    Sizes,
    id_record,
    quic_key_record,
    src_route_key_record,
)
from lb import constants as C
from lb import layout
from lb.config import parse_config
from lb.datapath_tables import compile_tables

K0 = ("198.18.100.1", 80, "tcp")
K1 = ("198.18.100.2", 53, "udp")
HC = {"type": "tcp", "port": 8080}
R0, R1, R2, R3 = (real_addr(i) for i in range(4))


def base_config(**over):
    """Two VIPs sharing R1; QUIC ids and routes on R0, R1, R2 (and an IPv6 route)."""
    kw = {"quic_servers": [{"id": 1025, "real": R0}, {"id": 2049, "real": R1}, {"id": 7, "real": R2}],
          "source_routes": [{"prefix": "198.18.64.0/24", "real": R0}, {"prefix": "198.18.0.0/15", "real": R1},
                            {"prefix": "2001:db8:5::/48", "real": real_addr(0, True)}]}
    kw.update(over)
    return make_config([vip_dict(0, [0, 1], healthcheck=HC),
                        vip_dict(1, [1, 2], protocol="udp", port=53, flags=["quic", "src_routing"]),
                        vip_dict(2, [0], v6=True, port=443, protocol="udp", flags=["quic"])], **kw)


def quic_map(tables_or_port) -> dict[int, int]:
    """server id -> real id, of DesiredTables or a MemoryPort."""
    entries = tables_or_port.routing["quic_servers"]
    return {int.from_bytes(k, "little"): int.from_bytes(v, "little") for k, v in entries.items()}


def routes(desired_or_port, table="src_routes_v4") -> dict[bytes, int]:
    return {k: int.from_bytes(v, "little") for k, v in desired_or_port.routing[table].items()}


# --- desired tables ---------------------------------------------------------------------------


def test_desired_routing_tables_are_compile_tables_byte_for_byte() -> None:
    cfg = base_config(mtu=1500)
    desired, ids = tables_for(cfg)
    got, want = desired.to_datapath_tables(), compile_tables(cfg)
    for name in ("quic_servers", "src_routes_v4", "src_routes_v6", "ctl"):
        assert getattr(got, name).tobytes() == getattr(want, name).tobytes(), name
    assert quic_map(desired) == {1025: ids.reals[R0], 2049: ids.reals[R1], 7: ids.reals[R2]}
    name, key = src_route_key_record("198.18.64.0/24")
    assert name == "src_routes_v4" and key == (24).to_bytes(4, "little") + bytes([198, 18, 64, 0])
    assert desired.routing["src_routes_v6"] == {src_route_key_record("2001:db8:5::/48")[1]:
                                                id_record(ids.reals[real_addr(0, True)])}


def test_a_real_down_everywhere_loses_its_entries_a_drained_one_keeps_them() -> None:
    cfg = base_config()
    _, ids = tables_for(cfg)
    # R1 serves VIP 0 (health-checked) and VIP 1 (no check): down in VIP 0 is not down everywhere
    d, _ = tables_for(cfg, ids, down=[(K0, R1)])
    assert d.routed_out == frozenset() and 2049 in quic_map(d)
    # R0 serves only VIP 0: down there is down everywhere; the others stay
    d, _ = tables_for(cfg, ids, down=[(K0, R0)])
    assert d.routed_out == {R0} and set(quic_map(d)) == {2049, 7}
    assert set(routes(d).values()) == {ids.reals[R1]} and len(d.routing["src_routes_v6"]) == 1
    # R2 only in VIP 1: give VIP 1 a check, then R2 down -> its QUIC id goes, the others stay
    cfg2 = make_config([vip_dict(0, [0, 1], healthcheck=HC),
                        vip_dict(1, [1, 2], protocol="udp", port=53, flags=["quic"], healthcheck=HC)],
                       quic_servers=[{"id": 2049, "real": R1}, {"id": 7, "real": R2}],
                       source_routes=[{"prefix": "198.18.64.0/24", "real": R2}, {"prefix": "198.18.0.0/15", "real": R1}])
    k1 = cfg2.vips[1].key
    d, ids2 = tables_for(cfg2, down=[(k1, R2)])
    assert d.routed_out == {R2} and set(quic_map(d)) == {2049} and set(routes(d).values()) == {ids2.reals[R1]}
    # drained (by the operator) keeps them: existing QUIC connections keep working
    d, _ = tables_for(cfg2, ids2, drained=[(k1, R2)])
    assert d.routed_out == frozenset() and set(quic_map(d)) == {2049, 7}
    # drained and down: down wins
    d, _ = tables_for(cfg2, ids2, drained=[(k1, R2)], down=[(k1, R2)])
    assert set(quic_map(d)) == {2049}
    # R1 down in both of its VIPs -> out
    d, _ = tables_for(cfg2, ids2, down=[(K0, R1), (k1, R1)])
    assert d.routed_out == {R1} and set(quic_map(d)) == {7}


def test_all_reals_down_fail_open_keeps_entries_drop_does_not() -> None:
    for mode, kept in (("fail_open", True), ("drop", False)):
        cfg = make_config([vip_dict(0, [0, 1], healthcheck={**HC, "on_all_down": mode})],
                          quic_servers=[{"id": 9, "real": R0}])
        d, _ = tables_for(cfg, down=[(K0, R0), (K0, R1)])
        assert (9 in quic_map(d)) is kept, mode


# --- plan / apply ----------------------------------------------------------------------------------


def test_routing_changes_write_only_the_entries_that_change() -> None:
    cfg = base_config()
    d, ids = tables_for(cfg)
    port = MemoryPort(Sizes.of(cfg.settings))
    apply(plan(port, d), port)
    assert plan(port, d).empty

    def only(cfg2, names=None):
        d2, _ = tables_for(cfg2, ids, prev=d)
        assert d2.rings is not d.rings and all(d2.rings[n] is d.rings[n] for n in d.rings)  # rings reused
        return plan(port, d2, ring_nums=[], tables=names)

    q = [{"id": 1025, "real": R0}, {"id": 2049, "real": R1}, {"id": 7, "real": R2}]
    r = [{"prefix": "198.18.64.0/24", "real": R0}, {"prefix": "198.18.0.0/15", "real": R1},
         {"prefix": "2001:db8:5::/48", "real": real_addr(0, True)}]
    p = only(base_config(quic_servers=[*q, {"id": 4096, "real": R2}]))  # one added
    assert p.ops == (PutEntry("quic_servers", quic_key_record(4096), id_record(ids.reals[R2]), None),)
    p = only(base_config(quic_servers=[q[0], {"id": 2049, "real": R2}, q[2]]))  # one changed
    assert p.ops == (PutEntry("quic_servers", quic_key_record(2049), id_record(ids.reals[R2]),
                              id_record(ids.reals[R1])),)
    p = only(base_config(source_routes=r[1:]))  # one deleted
    assert p.ops == (DeleteEntry("src_routes_v4", src_route_key_record("198.18.64.0/24")[1],
                                 id_record(ids.reals[R0])),)
    p = only(base_config(mtu=1500))  # mtu: the ctl record only
    assert [type(op) for op in p.ops] == [WriteCtl]
    assert np.frombuffer(p.ops[0].new, dtype=layout.CTL)[0]["mtu"] == 1500
    # a plan told which routing maps may differ reads only those
    p = only(base_config(quic_servers=q[:2]), names=["src_routes_v4"])
    assert p.empty


class CheckingPort(MemoryPort):
    def apply(self, op):
        super().apply(op)
        problems = check_live_consistency(self)
        assert not problems, f"after {type(op).__name__}: {problems}"


@st.composite
def routing_configs(draw):
    def one():
        vips = [vip_dict(i, draw(st.lists(st.integers(0, 7), unique=True, max_size=4)), protocol="udp",
                         flags=["quic", "src_routing"]) for i in draw(st.lists(st.integers(0, 3), unique=True,
                                                                              max_size=3))]
        reals = sorted({r["address"] for v in vips for r in v["reals"]})
        quic = [{"id": i, "real": draw(st.sampled_from(reals))}
                for i in draw(st.lists(st.integers(1, 6), unique=True, max_size=4))] if reals else []
        rts = [{"prefix": f"198.18.{n}.0/24", "real": draw(st.sampled_from(reals))}
               for n in draw(st.lists(st.integers(0, 5), unique=True, max_size=4))] if reals else []
        return make_config(vips, quic_servers=quic, source_routes=rts)

    return [one() for _ in range(draw(st.integers(2, 5)))]


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(routing_configs())
def test_no_routing_entry_ever_names_an_empty_real(configs) -> None:
    """Entries that go are deleted before their real is cleared, new ones written after
    their real: checked after every single write, over random sequences of configs."""
    port = CheckingPort(Sizes.of(configs[0].settings))
    ids, prev = EMPTY, None
    for cfg in configs:
        desired, ids = tables_for(cfg, ids, prev=prev)
        apply(plan(port, desired), port)
        assert plan(port, desired).empty
        prev = desired


def test_a_full_routing_map_is_refused_like_the_kernels() -> None:
    cfg = base_config()
    port = MemoryPort(Sizes.of(cfg.settings))
    port.routing["quic_servers"] = {i.to_bytes(4, "little"): id_record(1) for i in range(5000, 5000 + C.MAX_QUIC_SERVER_IDS)}
    d, _ = tables_for(cfg)
    # the plan deletes the stale entries first, so the new ones fit
    p = plan(port, d)
    deletes = [i for i, op in enumerate(p.ops) if isinstance(op, DeleteEntry)]
    puts = [i for i, op in enumerate(p.ops) if isinstance(op, PutEntry)]
    assert len(deletes) == C.MAX_QUIC_SERVER_IDS and len(puts) == 6 and max(deletes) < min(puts)
    apply(p, port)
    assert plan(port, d).empty


# --- the controller ------------------------------------------------------------------------------


def controller(cfg=None, port=None, store=None) -> ControlPlane:
    cfg = cfg or base_config()
    return open_plane(port or MemoryPort(Sizes.of(cfg.settings)), store, cfg)


def test_health_takes_entries_out_and_back_with_single_writes() -> None:
    c = controller()
    port = c.core.port
    rid = c.core.state.ids.reals[R0]
    route = src_route_key_record("198.18.64.0/24")[1]
    n = len(port.writes)
    c.runtime.set_health({(K0, R0): False})  # R0 serves only VIP 0: down everywhere
    assert c.core.tables.routed_out == {R0}
    assert 1025 not in quic_map(port) and route not in port.routing["src_routes_v4"]
    assert [r["active"] for r in c.views.routing_view("quic_servers")] == [False, True, True]
    assert [r["active"] for r in c.views.routing_view("source_routes")] == [False, True, True]
    entry_writes = [op for op in port.writes[n:] if isinstance(op, (PutEntry, DeleteEntry))]
    assert [type(op) for op in entry_writes] == [DeleteEntry, DeleteEntry]  # R0's id and route, nothing else
    # R1 down too: every real of VIP 0 is down and fail_open ignores health there: R0 is back;
    # R1 also serves VIP 1 (no check), so it never lost its entries
    c.runtime.set_health({(K0, R1): False})
    assert c.core.tables.routed_out == frozenset() and quic_map(port)[1025] == rid
    c.runtime.set_health({(K0, R1): True})
    assert 1025 not in quic_map(port)
    c.runtime.set_health({(K0, R0): True})
    assert quic_map(port)[1025] == rid and port.routing["src_routes_v4"][route] == id_record(rid)
    assert plan(port, c.core.tables).empty


def test_controller_routing_changes_and_refusals() -> None:
    c = controller()
    gen = c.core.generation
    key, res = c.commands.add_routing("quic_servers", {"id": 0xABCDEF, "real": R2})
    assert key == 0xABCDEF and res.writes["quic_servers"] == 1 and sum(res.writes.values()) == 1
    key, _ = c.commands.add_routing("source_routes", {"prefix": "2001:db8:7:0::/64", "real": real_addr(0, True)})
    assert key == "2001:db8:7::/64"
    with pytest.raises(Conflict) as e:
        c.commands.add_routing("quic_servers", {"id": 7, "real": R0})
    assert e.value.problems == [("id", "exists")]
    with pytest.raises(Conflict):
        c.commands.add_routing("source_routes", {"prefix": "198.18.64.0/24", "real": R1})
    bad = [
        ("quic_servers", {"id": 0, "real": R0}, "id"),
        ("quic_servers", {"id": 2**32, "real": R0}, "id"),
        ("quic_servers", {"id": "5", "real": R0}, "id"),
        ("quic_servers", {"id": 5, "real": "198.19.9.9"}, "real"),
        ("quic_servers", {"id": 5, "rael": R0}, "rael"),
        ("source_routes", {"prefix": "198.18.64.1/24", "real": R0}, "prefix"),
        ("source_routes", {"prefix": "198.18.64.0/33", "real": R0}, "prefix"),
        ("source_routes", {"prefix": "2001:db8:9::/48", "real": R0}, "real"),  # v4 real for v6 clients, ipip
    ]
    for section, body, field in bad:
        with pytest.raises(Invalid) as e:
            c.commands.add_routing(section, body)
        assert field in dict(e.value.problems), (body, e.value.problems)
    with pytest.raises(Invalid) as e:
        c.commands.replace_routing("quic_servers", [{"id": 1, "real": R0}, {"id": 1, "real": R1}])
    assert dict(e.value.problems) == {"[1].id": "duplicate of quic_servers[0] (1)"}
    with pytest.raises(Invalid):
        c.commands.replace_routing("source_routes", {"prefix": "198.18.0.0/16"})
    with pytest.raises(NotFound):
        c.commands.delete_routing("quic_servers", 99)
    with pytest.raises(PreconditionFailed):
        c.commands.delete_routing("quic_servers", 7, if_match=gen)
    assert c.core.generation == gen + 2
    c.commands.delete_routing("quic_servers", 7)
    c.commands.replace_routing("source_routes", [])
    assert c.core.port.routing["src_routes_v4"] == {} and c.core.port.routing["src_routes_v6"] == {}
    assert plan(c.core.port, c.core.tables).empty


def test_removing_the_last_use_of_a_routed_real_is_refused_naming_the_entries() -> None:
    c = controller()
    gen = c.core.generation
    c.commands.remove_real(K0, R1)  # R1 is still a real of VIP 1: its entries stay valid
    with pytest.raises(Conflict) as e:
        c.commands.remove_real(K1, R1)
    assert e.value.status == 409
    assert e.value.problems == [("quic_servers[1]", f"id 2049 -> {R1}"), ("source_routes[1]", f"198.18.0.0/15 -> {R1}")]
    assert R1 in str(e.value) and "delete those entries first" in str(e.value)
    with pytest.raises(Conflict):
        c.commands.delete_vip(K1)  # the same through deleting the VIP
    with pytest.raises(Invalid) as e:  # and through a whole config: the config's own rule
        c.commands.replace_config({**c.views.export_config()[1], "vips": []})
    assert "quic_servers[0].real" in dict(e.value.problems)
    assert c.core.generation == gen + 1
    c.commands.delete_routing("quic_servers", 2049)
    c.commands.delete_routing("source_routes", "198.18.0.0/15")
    c.commands.remove_real(K1, R1)  # now nothing points at it
    assert R1 not in c.core.state.ids.reals and plan(c.core.port, c.core.tables).empty


def test_vip_patch_sets_quic_and_src_routing_flags() -> None:
    c = controller()
    c.commands.update_vip(K1, {"flags": ["src_routing"]})
    assert c.views.vip_view(K1)["flags"] == ["src_routing"]
    meta = c.core.port.vips[c.core.tables.parts[K1].key_rec]
    assert int.from_bytes(meta[:4], "little") == C.F_SRC_ROUTING
    with pytest.raises(Invalid) as e:
        c.commands.update_vip(K0, {"flags": ["quic"]})
    assert dict(e.value.problems) == {"flags[0]": "'quic' needs protocol udp (got tcp)"}


def test_mtu_through_the_config_is_one_ctl_write() -> None:
    c = controller()
    data = c.views.export_config()[1]
    data["settings"]["mtu"] = 1400
    res = c.commands.replace_config(data)
    assert res.writes["ctl"] == 1 and sum(res.writes.values()) == 1
    assert int(np.frombuffer(c.core.port.ctl, dtype=layout.CTL)[0]["mtu"]) == 1400
    data["settings"]["mtu"] = 1000
    with pytest.raises(Invalid) as e:
        c.commands.replace_config(data)
    assert "settings.mtu" in dict(e.value.problems)


def test_state_round_trip_and_restart_adoption_with_zero_writes(tmp_path) -> None:
    cfg = base_config(mtu=1480)
    port = MemoryPort(Sizes.of(cfg.settings))
    c = controller(cfg, port, Store(tmp_path))
    c.commands.add_routing("quic_servers", {"id": 3, "real": R1})
    c.commands.add_routing("source_routes", {"prefix": "2001:db8:6::/48", "real": real_addr(0, True)})
    c.runtime.set_health({(K0, R0): True})
    saved = Store(tmp_path).load()
    assert [q.id for q in saved.config.quic_servers] == [1025, 2049, 7, 3]
    assert [r.prefix for r in saved.config.source_routes][-1] == "2001:db8:6::/48"
    assert saved.config.settings.mtu == 1480
    c2 = open_plane(port, Store(tmp_path), cfg)
    assert sum(c2.core.last_reconcile["writes"].values()) == 0 and c2.core.generation == c.core.generation
    # a routing entry that drifted while down is put back, alone
    port.routing["quic_servers"].pop(quic_key_record(3))
    c3 = open_plane(port, Store(tmp_path), cfg)
    w = c3.core.last_reconcile["writes"]
    assert w["quic_servers"] == 1 and sum(w.values()) == 1


def test_userspace_port_reloads_the_routing_tables() -> None:
    cfg = base_config()
    port = UserspacePort(Sizes.of(cfg.settings))
    c = controller(cfg, port)
    assert sorted(port.dp.maps.quic.ids.tolist()) == [7, 1025, 2049]
    c.commands.add_routing("quic_servers", {"id": 99, "real": R2})
    assert sorted(port.dp.maps.quic.ids.tolist()) == [7, 99, 1025, 2049]
    assert dict(zip(port.dp.maps.quic.ids.tolist(), port.dp.maps.quic.reals.tolist()))[99] == c.core.state.ids.reals[R2]


# --- metrics and stats: every counter ----------------------------------------------------------------


class CountingPort(MemoryPort):
    def read_stats(self) -> Stats:
        s = super().read_stats()
        return Stats({name: 1000 + i for i, name in enumerate(C.STATS)}, s.vip, s.real)


def test_every_datapath_counter_is_exported() -> None:
    from control.metrics import Metrics

    cfg = base_config()
    c = controller(cfg, CountingPort(Sizes.of(cfg.settings)))
    text = Metrics(c.core).render().decode()
    for i, name in enumerate(C.STATS):
        lines = [ln for ln in text.splitlines() if not ln.startswith("#") and ln.endswith(f" {1000 + i}.0")]
        assert len(lines) == 1, (name, lines)
    for line in ('lb_tx_packets_total{action="icmp_too_big"}', 'lb_drop_packets_total{reason="too_big"}',
                 'lb_quic_packets_total{result="routed"}', 'lb_quic_packets_total{result="fallback"}',
                 'lb_quic_packets_total{result="unknown"}', "lb_src_routed_packets_total ",
                 'lb_conn_table_lookups_total{result="hit"}', "lb_icmp_errors_forwarded_total ",
                 "lb_flood_new_conns_total ", "lb_down_real_migrated_total "):
        assert line in text, line


def test_lbctl_stats_shows_the_new_counters() -> None:
    from rich.console import Console

    from control.cli import _stats_tables

    counters = {name: 0 for name in C.STATS}
    counters.update(quic_routed=5, quic_fallback=6, quic_unknown=7, src_routed=8, tx_icmp_too_big=9, drop_too_big=10)
    console = Console(width=200, record=True)
    console.print(_stats_tables({"generation": 1, "conn_table": {"entries": 0}, "counters": counters,
                                 "vips": [], "reals": []}, None, 0))
    out = console.export_text()
    for name in ("quic_routed", "quic_fallback", "quic_unknown", "src_routed", "tx_icmp_too_big", "drop_too_big"):
        assert f"{name} " in out and str(counters[name]) in out


# --- the API --------------------------------------------------------------------------------------------


@pytest.fixture
def env():
    cfg = base_config()
    port = UserspacePort(Sizes.of(cfg.settings))
    ctl = open_plane(port, None, cfg)
    with ApiClient(create_app(ctl)) as api:
        yield api, ctl, port


def test_api_quic_servers(env) -> None:
    api, ctl, port = env
    r = api.get("/v1/quic-servers")
    assert r.status_code == 200 and r.headers["etag"] == '"1"'
    views = [QuicServerView.model_validate(x) for x in r.json()]
    assert (views[0].id, views[0].real, views[0].real_id, views[0].active) == \
        (1025, R0, ctl.core.state.ids.reals[R0], True)
    r = api.post("/v1/quic-servers", json={"id": 4096, "real": R2})
    assert r.status_code == 201 and r.headers["location"] == "/v1/quic-servers/4096" and r.headers["etag"] == '"2"'
    assert QuicServerView.model_validate(r.json()).real_id == ctl.core.state.ids.reals[R2]
    assert api.get("/v1/quic-servers/4096").json()["real"] == R2
    assert 4096 in port.dp.maps.quic.ids.tolist()
    r = api.put("/v1/quic-servers", json=[{"id": 1, "real": R1}, {"id": 2, "real": R1}], headers={"If-Match": '"2"'})
    assert r.status_code == 200 and [x["id"] for x in r.json()] == [1, 2] and r.headers["etag"] == '"3"'
    assert quic_map(port) == {1: ctl.core.state.ids.reals[R1], 2: ctl.core.state.ids.reals[R1]}
    assert api.delete("/v1/quic-servers/1").status_code == 204
    assert api.get("/v1/quic-servers/1").status_code == 404
    assert [x["id"] for x in api.get("/v1/config").json()["config"]["quic_servers"]] == [2]
    assert plan(port, ctl.core.tables).empty


def test_api_source_routes(env) -> None:
    api, ctl, port = env
    r = api.post("/v1/source-routes", json={"prefix": "2001:0db8:0007::/48", "real": real_addr(0, True)})
    assert r.status_code == 201, r.text
    v = SourceRouteView.model_validate(r.json())
    assert v.prefix == "2001:db8:7::/48" and r.headers["location"] == "/v1/source-routes/2001:db8:7::/48"
    assert api.get("/v1/source-routes/2001:db8:7::/48").json()["real"] == real_addr(0, True)
    # the prefix URL-encoded as one segment works too
    assert api.get("/v1/source-routes/198.18.64.0%2F24").json()["real"] == R0
    assert api.delete("/v1/source-routes/2001:db8:7::/48").status_code == 204
    assert api.delete("/v1/source-routes/198.18.64.0/24").status_code == 204
    assert [x["prefix"] for x in api.get("/v1/source-routes").json()] == ["198.18.0.0/15", "2001:db8:5::/48"]
    r = api.put("/v1/source-routes", json=[{"prefix": "198.18.96.0/19", "real": R2}])
    assert r.status_code == 200 and [x["prefix"] for x in r.json()] == ["198.18.96.0/19"]
    assert routes(port) == {src_route_key_record("198.18.96.0/19")[1]: ctl.core.state.ids.reals[R2]}
    assert port.routing["src_routes_v6"] == {}
    assert plan(port, ctl.core.tables).empty


def test_api_bad_inputs_and_conflicts(env) -> None:
    api, ctl, _ = env
    gen = ctl.core.generation
    cases = [
        ("post", "/v1/quic-servers", {"id": 0, "real": R0}, 422, "id"),
        ("post", "/v1/quic-servers", {"id": 5, "real": "nope"}, 422, "real"),
        ("post", "/v1/quic-servers", {"id": 5, "real": "198.19.9.9"}, 422, "real"),
        ("post", "/v1/quic-servers", {"id": 5}, 422, "real"),
        ("post", "/v1/quic-servers", {"id": 5, "real": R0, "x": 1}, 422, "x"),
        ("post", "/v1/quic-servers", [1], 422, "(body)"),
        ("post", "/v1/quic-servers", {"id": 7, "real": R0}, 409, "id"),
        ("put", "/v1/quic-servers", {"id": 7}, 422, "(body)"),
        ("put", "/v1/quic-servers", [{"id": 7, "real": R0}, {"id": 7, "real": R1}], 422, "[1].id"),
        ("put", "/v1/quic-servers", [{"id": 7, "real": R0}, {"id": "x", "real": R1}], 422, "[1].id"),
        ("get", "/v1/quic-servers/0", None, 422, "id"),
        ("get", "/v1/quic-servers/abc", None, 422, "id"),
        ("delete", "/v1/quic-servers/99", None, 404, None),
        ("post", "/v1/source-routes", {"prefix": "198.18.64.7/24", "real": R0}, 422, "prefix"),
        ("post", "/v1/source-routes", {"prefix": 5, "real": R0}, 422, "prefix"),
        ("post", "/v1/source-routes", {"prefix": "198.18.64.0/24", "real": R1}, 409, "prefix"),
        ("put", "/v1/source-routes", [{"prefix": "10.0.0.0/8", "real": R0}, {"prefix": "10.0.0.0/8", "real": R0}],
         422, "[1].prefix"),
        ("get", "/v1/source-routes/198.18.64.1/24", None, 422, "prefix"),
        ("get", "/v1/source-routes/nope/24", None, 422, "prefix"),
        ("delete", "/v1/source-routes/198.18.65.0/24", None, 404, None),
        ("delete", f"/v1/vips/198.18.100.2/53/udp/reals/{R2}", None, 409, "quic_servers[2]"),
        ("patch", "/v1/vips/198.18.100.1/80/tcp", {"flags": ["quic"]}, 422, "flags[0]"),
        ("delete", "/v1/quic-servers/7", None, 412, None),
    ]
    for method, url, body, status, field in cases:
        kw = {} if body is None else {"json": body}
        if status == 412:
            kw["headers"] = {"If-Match": f'"{gen - 1}"'}
        r = api.request(method.upper(), url, **kw)
        assert r.status_code == status, (method, url, body, r.text)
        if field is not None:
            assert field in problems(r), (method, url, r.json())
    assert ctl.core.generation == gen  # nothing else changed


def test_api_config_carries_the_routing_tables_and_mtu(env) -> None:
    api, ctl, port = env
    cfg = api.get("/v1/config").json()["config"]
    assert [q["id"] for q in cfg["quic_servers"]] == [1025, 2049, 7] and len(cfg["source_routes"]) == 3
    cfg["settings"]["mtu"] = 1500
    cfg["quic_servers"] = [{"id": 77, "real": R2}]
    cfg["source_routes"] = []
    r = api.put("/v1/config", json=cfg)
    assert r.status_code == 200, r.text
    got = r.json()["config"]
    assert got["settings"]["mtu"] == 1500 and got["quic_servers"] == [{"id": 77, "real": R2}]
    assert quic_map(port) == {77: ctl.core.state.ids.reals[R2]} and port.dp.maps.ctl.mtu == 1500
    cfg["quic_servers"] = [{"id": 77, "real": "198.19.9.9"}]
    r = api.put("/v1/config", json=cfg)
    assert r.status_code == 422 and "quic_servers[0].real" in problems(r)
    y = api.get("/v1/config", params={"format": "yaml"}).text
    assert "quic_servers:" in y and "mtu: 1500" in y


def test_api_vip_patch_flags(env) -> None:
    api, _, _ = env
    r = api.patch("/v1/vips/198.18.100.2/53/udp", json={"flags": ["quic"]})
    assert r.status_code == 200 and r.json()["flags"] == ["quic"]
    r = api.patch("/v1/vips/198.18.100.1/80/tcp", json={"flags": ["src_routing"]})
    assert r.status_code == 200 and r.json()["flags"] == ["src_routing"]


def test_the_schema_documents_the_new_bodies(env) -> None:
    api, _, _ = env
    doc = api.get("/openapi.json").json()
    put = doc["paths"]["/v1/quic-servers"]["put"]["requestBody"]["content"]["application/json"]["schema"]
    assert put == {"type": "array", "items": {"$ref": "#/components/schemas/QuicServer"}}
    schemas = doc["components"]["schemas"]
    assert set(schemas["SourceRoute"]["properties"]) == {"prefix", "real"}
    assert "quic" in schemas["Vip"]["properties"]["flags"]["items"]["enum"]
    assert {"quic_servers", "source_routes"} <= set(schemas["Config"]["properties"])


def test_parse_config_agrees_with_the_api_for_routing_bodies() -> None:
    """The API's validation of a QUIC entry is the config file's: same verdicts."""
    c = controller()
    base = c.views.export_config()[1]
    for body in ({"id": 5, "real": R0}, {"id": -1, "real": R0}, {"id": True, "real": R0}, {"id": 5, "real": "::1"}):
        try:
            parse_config({**base, "quic_servers": [*base["quic_servers"], body]})
            ok = True
        except ValueError:
            ok = False
        try:
            c.commands.add_routing("quic_servers", body)
            api_ok = True
        except (Invalid, Conflict):
            api_ok = False
        assert ok == api_ok, body


# --- XDP: the pinned maps hold exactly the desired entries ---------------------------------------------


def _read_map(bal, name: str, key_size: int) -> dict[bytes, int]:
    from lb.kernel.maps import map_keys, map_lookup

    fd = bal.map_fd(name)
    return {k: int.from_bytes(map_lookup(fd, k, 4), "little") for k in map_keys(fd, key_size)}


def _expected(ctl) -> tuple[dict[bytes, int], dict[bytes, int], dict[bytes, int]]:
    """From the desired config and ids, independently of DesiredTables' records."""
    import ipaddress

    ids, cfg = ctl.core.state.ids, ctl.core.state.config
    out = ctl.core.tables.routed_out
    quic = {q.id.to_bytes(4, "little"): ids.reals[q.real] for q in cfg.quic_servers if q.real not in out}
    v4: dict[bytes, int] = {}
    v6: dict[bytes, int] = {}
    for r in cfg.source_routes:
        if r.real in out:
            continue
        net = ipaddress.ip_network(r.prefix)
        (v4 if net.version == 4 else v6)[net.prefixlen.to_bytes(4, "little") + net.network_address.packed] = \
            ids.reals[r.real]
    return quic, v4, v6


@pytest.mark.bpf
@pytest.mark.root
def test_xdp_maps_hold_exactly_the_desired_entries_after_api_calls(tmp_path) -> None:
    from control.datapaths import XdpPort
    from lb.bpf_loader import XdpBalancer

    cfg = base_config(mtu=1500)
    s = cfg.settings
    bal = XdpBalancer(s.ring_size, s.max_vips, s.max_reals, s.conn_table_size)
    try:
        ctl = open_plane(XdpPort(bal), Store(tmp_path), cfg)

        def check() -> None:
            quic, v4, v6 = _expected(ctl)
            assert _read_map(bal, "quic_servers", 4) == quic
            assert _read_map(bal, "src_routes_v4", layout.LPM_V4_KEY.itemsize) == v4
            assert _read_map(bal, "src_routes_v6", layout.LPM_V6_KEY.itemsize) == v6

        check()
        assert len(_read_map(bal, "quic_servers", 4)) == 3
        with ApiClient(create_app(ctl)) as api:
            assert api.post("/v1/quic-servers", json={"id": 0xFFFFFFFF, "real": R2}).status_code == 201
            assert api.delete("/v1/quic-servers/2049").status_code == 204
            assert api.post("/v1/source-routes", json={"prefix": "198.18.64.128/25", "real": R2}).status_code == 201
            assert api.delete("/v1/source-routes/2001:db8:5::/48").status_code == 204
            r = api.put("/v1/source-routes", json=[{"prefix": "198.18.64.128/25", "real": R2},
                                                   {"prefix": "198.18.64.0/24", "real": R1},
                                                   {"prefix": "2001:db8:6::/47", "real": real_addr(0, True)}])
            assert r.status_code == 200, r.text
            check()
            ctl.runtime.set_health({(K0, R0): False})  # R0 down everywhere: its QUIC id leaves the map
            check()
            assert 1025 not in {int.from_bytes(k, "little") for k in _read_map(bal, "quic_servers", 4)}
            ctl.runtime.set_health({(K0, R0): True})
            check()
            assert len(_read_map(bal, "quic_servers", 4)) == 3
        ctl_rec = bal.map_fd("ctl")
        from lb.kernel.maps import map_lookup

        raw = map_lookup(ctl_rec, bytes(4), layout.CTL.itemsize)
        assert int(np.frombuffer(raw, dtype=layout.CTL)[0]["mtu"]) == 1500
        # a restart adopts the maps: nothing to write
        again = open_plane(XdpPort(bal), Store(tmp_path), cfg)
        assert sum(again.core.last_reconcile["writes"].values()) == 0, again.core.last_reconcile
    finally:
        bal.close()
