"""The reconciler: minimal writes, a safe order, all-or-nothing application; and the
controller's change path on top of it (validation, rollback, restart)."""

from __future__ import annotations

import numpy as np
import pytest
from control_helpers import check_live_consistency, make_config, real_addr, tables_for, vip_dict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from control.datapaths import MemoryPort, UserspacePort
from control.errors import Conflict, DatapathFailure, Invalid, NotFound, PersistFailure, PreconditionFailed
from control.ids import EMPTY
from control.plane import open_plane
from control.reconcile import (
    ApplyError,
    DeleteVip,
    DeleteVipAddr,
    PutVip,
    PutVipAddr,
    ResetCounters,
    RollbackError,
    WriteCtl,
    WriteReal,
    WriteRing,
    apply,
    plan,
)
from control.store import Store
from control.tables import EMPTY_REAL, Sizes
from lb.config import ConfigError, parse_config
from lb.datapath_tables import compile_tables

K0 = ("198.18.100.1", 80, "tcp")
K1 = ("198.18.100.2", 80, "tcp")


def port_for(cfg):
    return MemoryPort(Sizes.of(cfg.settings))


def contents(port: MemoryPort):
    return (dict(port.vips), set(port.addrs), port.reals.tobytes(), port.ctl,
            {t: dict(e) for t, e in port.routing.items()}, port.rings.copy(), port.down_words())


def same_contents(a, b) -> bool:
    return a[:5] == b[:5] and np.array_equal(a[5], b[5]) and a[6] == b[6]


# --- plan / apply -------------------------------------------------------------------------------


def test_apply_then_nothing_left_to_do() -> None:
    cfg = make_config([vip_dict(0, [0, 1, (2, 3)]), vip_dict(1, [2, 3], protocol="udp"),
                       vip_dict(2, [4], v6=True)], ring_size=1009)
    desired, _ = tables_for(cfg)
    port = port_for(cfg)
    p = plan(port, desired)
    s = p.summary()
    assert s["vips_put"] == 3 and s["vip_addrs_put"] == 3 and s["reals"] == 5 and s["ctl"] == 1
    assert s["ring_slots"] == 3 * 1009 and s["counter_resets"] == 3 + 5
    apply(p, port)
    assert plan(port, desired).empty
    # exactly what compile_tables would have loaded
    want = compile_tables(cfg)
    got = port.to_datapath_tables()
    assert np.array_equal(got.rings, want.rings)
    assert got.reals.tobytes() == want.reals.tobytes()
    def records(arr):
        raw = arr.tobytes()
        return sorted(raw[i * 20:(i + 1) * 20] for i in range(len(arr)))

    assert records(got.vip_keys) == records(want.vip_keys)
    assert records(got.vip_metas) == records(want.vip_metas)


def test_weight_change_writes_only_the_slots_that_change() -> None:
    cfg = make_config([vip_dict(0, [0, 1, 2, 3]), vip_dict(1, [0, 1])], ring_size=65537)
    desired, ids = tables_for(cfg)
    port = port_for(cfg)
    apply(plan(port, desired), port)
    old_ring = port.ring(0)

    cfg2 = make_config([vip_dict(0, [0, 1, (2, 3), 3]), vip_dict(1, [0, 1])], ring_size=65537)
    desired2, _ = tables_for(cfg2, ids, prev=desired)
    assert desired2.rings[1] is desired.rings[1]  # untouched ring reused, not rebuilt
    p = plan(port, desired2, ring_nums=[0])
    assert len(p.ops) == 1 and isinstance(p.ops[0], WriteRing)
    op = p.ops[0]
    expected = np.flatnonzero(old_ring != desired2.rings[0])
    assert np.array_equal(op.slots, expected) and 0 < op.slots.size < 65537 // 2
    assert np.array_equal(op.old, old_ring[expected])
    apply(p, port)
    assert np.array_equal(port.ring(0), desired2.rings[0])
    assert plan(port, desired2).empty


def test_add_and_delete_vip_write_only_what_changes() -> None:
    cfg = make_config([vip_dict(0, [0, 1])])
    desired, ids = tables_for(cfg)
    port = port_for(cfg)
    apply(plan(port, desired), port)

    cfg2 = make_config([vip_dict(0, [0, 1]), vip_dict(1, [1, 2])])
    d2, ids2 = tables_for(cfg2, ids, prev=desired)
    p = plan(port, d2, ring_nums=[1])
    kinds = [type(op) for op in p.ops]
    # new real 2 (its counters reset first), VIP 1's ring, its address, its counters, the VIP
    assert kinds == [ResetCounters, WriteReal, WriteRing, PutVipAddr, ResetCounters, PutVip]
    assert p.ops[1].real_id == ids2.reals[real_addr(2)] == 3
    apply(p, port)

    cfg3 = make_config([vip_dict(1, [1, 2])])
    d3, ids3 = tables_for(cfg3, ids2, prev=d2)
    p = plan(port, d3, ring_nums=[])
    kinds = [type(op) for op in p.ops]
    # VIP 0 goes, its address goes, real 0 (used only by VIP 0) is cleared, last
    assert kinds == [DeleteVip, DeleteVipAddr, WriteReal]
    assert p.ops[2].real_id == 1 and p.ops[2].new == EMPTY_REAL
    apply(p, port)
    assert ids3.vips[K1] == 1 and ids3.reals[real_addr(1)] == 2  # numbers kept
    assert plan(port, d3).empty


def test_ctl_and_local_flag_changes() -> None:
    cfg = make_config([vip_dict(0, [0, 1])])
    desired, ids = tables_for(cfg)
    port = port_for(cfg)
    apply(plan(port, desired), port)
    cfg2 = make_config([vip_dict(0, [0, 1])], gateway_mac="00:00:5e:00:53:02", local_addresses=[real_addr(1)])
    d2, _ = tables_for(cfg2, ids, prev=desired)
    p = plan(port, d2, ring_nums=[])
    assert [type(op) for op in p.ops] == [WriteReal, WriteCtl]  # same address: no counter reset
    apply(p, port)
    assert port.reals[2]["flags"] == 1


def test_a_failed_write_undoes_the_others() -> None:
    """Failing at every single write of a plan that touches every table (VIPs, reals,
    rings, ctl: mtu, every routing map: adds, changes, deletes, and the down set) leaves
    the datapath as it was."""
    hc = {"type": "tcp"}
    cfg = make_config([vip_dict(0, [0, 1, 2], healthcheck=hc), vip_dict(3, [0, 1], v6=True)],
                      quic_servers=[{"id": 7, "real": real_addr(0)}, {"id": 8, "real": real_addr(1)}],
                      source_routes=[{"prefix": "198.18.64.0/24", "real": real_addr(0)},
                                     {"prefix": "2001:db8:9::/48", "real": real_addr(0, True)}])
    desired, ids = tables_for(cfg, down=[(K0, real_addr(2))])
    port = port_for(cfg)
    apply(plan(port, desired), port)
    before = contents(port)
    assert before[6]
    cfg2 = make_config([vip_dict(0, [0, (1, 4), 2], healthcheck=hc), vip_dict(1, [3]), vip_dict(2, [4]), vip_dict(3, [1], v6=True)],
                       mtu=1500,
                       quic_servers=[{"id": 7, "real": real_addr(2)}, {"id": 9, "real": real_addr(3)}],
                       source_routes=[{"prefix": "198.18.64.0/24", "real": real_addr(4)},
                                      {"prefix": "198.18.0.0/15", "real": real_addr(1)},
                                      {"prefix": "2001:db8:9::/48", "real": real_addr(1, True)}])
    d2, _ = tables_for(cfg2, ids, down=[(K0, real_addr(0))])  # real 2 comes up: one word, both ways
    p = plan(port, d2)
    kinds = {type(op).__name__ for op in p.ops}
    assert {"PutEntry", "DeleteEntry", "WriteCtl", "PutVip", "WriteReal", "WriteRing", "WriteDownWord"} <= kinds
    assert p.summary()["quic_servers"] == 3 and p.summary()["src_routes_v4"] == 2
    assert p.summary()["src_routes_v6"] == 1
    assert len(p.ops) > 8
    for k in range(len(p.ops)):
        port.fail = (lambda n: (lambda op, c=[0]: c.__setitem__(0, c[0] + 1) or c[0] == n))(k + 1)
        with pytest.raises(ApplyError, match="undone"):
            apply(p, port)
        port.fail = None
        assert same_contents(contents(port), before), f"failure at write {k + 1} left a change"


def test_rollback_failure_is_reported() -> None:
    cfg = make_config([vip_dict(0, [0, 1])])
    desired, _ = tables_for(cfg)
    port = port_for(cfg)
    port.fail = lambda op: isinstance(op, (PutVip, DeleteVipAddr))  # the VIP put, and its undo
    with pytest.raises(RollbackError, match="rollback failed"):
        apply(plan(port, desired), port)


@st.composite
def transitions(draw):
    """Configs in a row, each with the (VIP, real) pairs its health checks hold down."""
    def one():
        vips, down = [], []
        for i in draw(st.lists(st.integers(0, 5), unique=True, max_size=5)):
            reals = draw(st.lists(st.tuples(st.integers(0, 9), st.integers(0, 3)), max_size=5,
                                  unique_by=lambda t: t[0]))
            checked = draw(st.integers(0, 3)) > 0
            vips.append(vip_dict(i, reals, **({"healthcheck": {"type": "tcp"}} if checked else {})))
            key = (vips[-1]["address"], 80, "tcp")
            down += [(key, real_addr(j)) for j, _ in reals if checked and draw(st.booleans())]
        return make_config(vips), down

    return [one() for _ in range(draw(st.integers(2, 5)))]


class CheckingPort(MemoryPort):
    """Checks after every single write that a packet could not trip over the tables."""

    def apply(self, op):
        super().apply(op)
        problems = check_live_consistency(self)
        assert not problems, f"after {type(op).__name__}: {problems}"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(transitions())
def test_every_intermediate_state_is_consistent(configs) -> None:
    port = CheckingPort(Sizes.of(configs[0][0].settings))
    ids, prev = EMPTY, None
    for cfg, down in configs:
        desired, ids = tables_for(cfg, ids, prev=prev, down=down)
        apply(plan(port, desired), port)
        assert plan(port, desired).empty
        prev = desired


# --- the controller -----------------------------------------------------------------------------


def controller(cfg, port=None, store=None):
    return open_plane(port or port_for(cfg), store, cfg)


def test_controller_changes_and_numbers() -> None:
    c = controller(make_config([vip_dict(0, [0, 1]), vip_dict(1, [1, 2])]))
    assert c.core.generation == 1
    key, res = c.commands.create_vip(vip_dict(2, [5]))
    assert res.generation == 2 and c.core.state.ids.vips[key] == 2
    c.commands.delete_vip(K0)
    key3, _ = c.commands.create_vip(vip_dict(3, [0]))
    assert c.core.state.ids.vips[key3] == 0  # the freed number
    assert c.core.state.ids.reals[real_addr(0)] == 5  # real 0 was freed with VIP 0: a fresh id, not 1
    c.commands.update_real(K1, real_addr(1), {"weight": 0})
    assert c.views.vip_view(K1)["reals"][0]["effective_weight"] == 0
    assert plan(c.core.port, c.core.tables).empty


def test_controller_validation_names_fields() -> None:
    c = controller(make_config([vip_dict(0, [0])]))
    with pytest.raises(Invalid) as e:
        c.commands.create_vip({"address": "198.18.100.9", "port": 70000, "protocol": "tcp", "reals": [{"adress": "x"}]})
    assert dict(e.value.problems) == {"port": "must be 0..65535 (got 70000)",
                                      "reals[0].adress": "unknown key; did you mean 'address'?",
                                      "reals[0].address": "required"}
    with pytest.raises(Invalid) as e:
        c.commands.add_real(K0, {"address": real_addr(3), "weight": -1})
    assert e.value.problems == [("weight", "must be >= 0 (got -1)")]
    with pytest.raises(Invalid) as e:
        c.commands.update_vip(K0, {"healthcheck": {"type": "tcp", "interval": 0}})
    assert e.value.problems[0][0] == "healthcheck.interval"
    with pytest.raises(Invalid) as e:
        c.commands.update_vip(K0, {"port": 81})
    assert e.value.problems[0][0] == "port"
    with pytest.raises(Conflict):
        c.commands.create_vip(vip_dict(0, []))
    with pytest.raises(Conflict):
        c.commands.add_real(K0, {"address": real_addr(0)})
    with pytest.raises(NotFound):
        c.commands.remove_real(K0, real_addr(9))
    with pytest.raises(NotFound):
        c.commands.delete_vip(K1)
    with pytest.raises(PreconditionFailed):
        c.commands.delete_vip(K0, if_match=7)
    with pytest.raises(Invalid) as e:  # health check on a port-0 VIP needs a port
        c.commands.create_vip(vip_dict(4, [1], port=0, healthcheck={"type": "tcp"}))
    assert e.value.problems == [("healthcheck.port", "required: the VIP's port is 0 (any port)")]
    assert c.core.generation == 1 and c.core.counters["changes_failed"] == 10


def test_controller_limits_are_conflicts() -> None:
    c = controller(make_config([vip_dict(i, []) for i in range(8)]))
    with pytest.raises(Conflict, match="max_vips"):
        c.commands.create_vip(vip_dict(8, []))
    c2 = controller(make_config([vip_dict(0, list(range(31)))], ring_size=37))  # max_reals 32: ids 1..31
    with pytest.raises(Conflict, match="distinct real"):
        c2.commands.create_vip(vip_dict(1, [40]))
    c2.commands.create_vip(vip_dict(1, [3]))  # a real already in use is no new id


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.fixed_dictionaries({
    "i": st.integers(0, 9), "port": st.sampled_from([0, 80, 70000]),
    "reals": st.lists(st.tuples(st.integers(0, 40), st.integers(-1, 3)), max_size=4),
    "v6": st.booleans(), "real_v6": st.booleans(), "flags": st.sampled_from([[], ["local"], ["bogus"]]),
}), max_size=10))
def test_incremental_validation_agrees_with_parse_config(bodies) -> None:
    """Creating VIPs one by one accepts a VIP exactly when parse_config accepts the whole
    config with it (the controller checks one VIP plus cross-VIP limits, not everything again)."""
    base = {"gateway_mac": "00:00:5e:00:53:01", "ring_size": 13, "max_vips": 4, "max_reals": 8,
            "conn_table_size": 64}
    c = open_plane(MemoryPort(Sizes(13, 4, 8, 64)), None, parse_config({"settings": base}))
    accepted: list[dict] = []
    for b in bodies:
        body = vip_dict(b["i"], [], port=b["port"], v6=b["v6"], flags=b["flags"])
        body["reals"] = [{"address": real_addr(j, b["real_v6"]), "weight": w} for j, w in b["reals"]]
        try:
            parse_config({"settings": base, "vips": [*accepted, body]})
            whole_ok = True
        except ConfigError:
            whole_ok = False
        try:
            c.commands.create_vip(body)
            ok = True
        except (Invalid, Conflict):
            ok = False
        assert ok == whole_ok, body
        if ok:
            accepted.append(body)


def test_datapath_failure_changes_nothing() -> None:
    cfg = make_config([vip_dict(0, [0, 1])])
    port = port_for(cfg)
    c = controller(cfg, port)
    before, state = contents(port), c.core.state
    port.fail = lambda op: isinstance(op, PutVip)
    with pytest.raises(DatapathFailure) as e:
        c.commands.create_vip(vip_dict(1, [2, 3]))
    assert e.value.status == 503
    assert c.core.state is state and same_contents(contents(port), before) and not c.core.dirty
    port.fail = None
    c.commands.create_vip(vip_dict(1, [2, 3]))  # and the next attempt works
    assert c.core.generation == 2


def test_keep_reconciled_repairs_a_dirty_datapath() -> None:
    """The daemon's loop (Runtime.keep_reconciled): a datapath left dirty (a rollback that
    failed) is reconciled fully at the next tick; a failing reconcile is retried."""
    import asyncio

    cfg = make_config([vip_dict(0, [0, 1])])
    port = port_for(cfg)
    c = controller(cfg, port)
    want = contents(port)
    port.fail = lambda op: isinstance(op, PutVip)
    with pytest.raises(DatapathFailure):
        c.commands.create_vip(vip_dict(1, [2]))
    c.core.dirty = True  # as after a rollback that could not be completed
    port.vips.clear()  # and the datapath lost its VIP entries meanwhile

    async def run() -> None:
        stop = asyncio.Event()
        task = asyncio.ensure_future(c.runtime.keep_reconciled(stop, period=0.01))
        await asyncio.sleep(0.1)
        assert c.core.dirty  # every reconcile fails while the port does
        port.fail = None
        while c.core.dirty:
            await asyncio.sleep(0.01)
        stop.set()
        await asyncio.wait_for(task, 5)

    asyncio.run(run())
    assert same_contents(contents(port), want) and c.core.generation == 1


def test_persist_failure_undoes_the_writes(tmp_path, monkeypatch) -> None:
    cfg = make_config([vip_dict(0, [0, 1])])
    port = port_for(cfg)
    store = Store(tmp_path)
    c = controller(cfg, port, store)
    before = contents(port)
    saved = store.state_path.read_bytes()

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store, "save", full)
    with pytest.raises(PersistFailure, match="No space"):
        c.commands.update_real(K0, real_addr(0), {"weight": 9})
    assert same_contents(contents(port), before) and c.core.generation == 1
    assert store.state_path.read_bytes() == saved


def test_restart_reconciles_with_minimal_writes(tmp_path) -> None:
    cfg = make_config([vip_dict(0, [0, 1, 2]), vip_dict(1, [2, 3])], ring_size=1009, mtu=1400,
                      quic_servers=[{"id": 1025, "real": real_addr(0)}],
                      source_routes=[{"prefix": "198.18.64.0/24", "real": real_addr(3)}])
    port = port_for(cfg)
    c = controller(cfg, port, Store(tmp_path))
    c.commands.update_real(K0, real_addr(1), {"weight": 3})
    c.commands.update_real(K1, real_addr(2), {"drain": True})
    c.commands.add_routing("quic_servers", {"id": 0x30000, "real": real_addr(2)})
    c.commands.replace_routing("source_routes", [{"prefix": "198.18.64.0/24", "real": real_addr(1)},
                                        {"prefix": "198.18.128.0/17", "real": real_addr(2)}])
    assert [len(port.routing[t]) for t in ("quic_servers", "src_routes_v4", "src_routes_v6")] == [2, 2, 0]
    # the daemon dies; the datapath (pinned maps) stays. A new one adopts it: no writes.
    c2 = open_plane(port, Store(tmp_path), cfg)
    assert c2.core.generation == 5 and sum(c2.core.last_reconcile["writes"].values()) == 0
    assert [q["id"] for q in c2.views.routing_view("quic_servers")] == [1025, 0x30000]
    assert c2.views.vip_view(K1)["reals"][0]["drained"]
    # drift while down (someone wrote two slots): exactly those are put back
    port.rings[0, :2] = 0
    c3 = open_plane(port, Store(tmp_path), cfg)
    w = c3.core.last_reconcile["writes"]
    assert w["ring_slots"] == 2 and w["rings"] == 1
    assert sum(w.values()) == 3


def test_a_fresh_datapath_gets_everything(tmp_path) -> None:
    cfg = make_config([vip_dict(0, [0, 1])])
    c = controller(cfg, port_for(cfg), Store(tmp_path))
    c.commands.create_vip(vip_dict(1, [1, 2]))
    fresh = port_for(cfg)  # e.g. after a reboot: empty maps
    c2 = open_plane(fresh, Store(tmp_path), cfg)
    w = c2.core.last_reconcile["writes"]
    assert w["vips_put"] == 2 and w["reals"] == 3 and w["ring_slots"] == 2 * 13
    assert plan(fresh, c2.core.tables).empty


def test_userspace_port_follows_changes() -> None:
    cfg = make_config([vip_dict(0, [0, 1])])
    port = UserspacePort(Sizes.of(cfg.settings))
    c = controller(cfg, port)
    from control.flows import FlowQuery, flow_frame

    frame = flow_frame(FlowQuery(src="198.18.0.9", dst="198.18.100.1", sport=1000, dport=80, protocol="tcp"))
    r = port.dp.process_frames([frame], now=0)
    first = int(r.real_ids[0])
    assert first in (1, 2)
    other = real_addr(0) if first == 2 else real_addr(1)
    gone = real_addr(first - 1)
    c.commands.update_real(K0, gone, {"drain": True})
    syn = port.dp.process_frames([frame], now=1)  # a SYN re-hashes: the drained real gets no new flow
    assert c.core.state.ids.reals[other] == int(syn.real_ids[0])
    assert port.read_stats().vip[0, 0] == 2


def test_a_full_vip_table_can_be_replaced() -> None:
    """8 VIPs (max_vips) replaced by 8 others in one change: the maps, which hold at most
    max_vips entries as the kernel's hash maps do, never need more."""
    a = make_config([vip_dict(i, [i]) for i in range(8)])
    b = make_config([vip_dict(i, [i], v6=True) for i in range(8)])
    desired, ids = tables_for(a)
    port = CheckingPort(Sizes.of(a.settings))
    apply(plan(port, desired), port)
    d2, ids2 = tables_for(b, ids, prev=desired)
    p = plan(port, d2)
    kinds = [type(op).__name__ for op in p.ops]
    assert kinds.index("PutVip") > max(i for i, k in enumerate(kinds) if k in ("DeleteVip", "DeleteVipAddr"))
    apply(p, port)
    assert plan(port, d2).empty and ids2.vips == {v.key: i for i, v in enumerate(b.vips)}


def test_fault_hook_sleeps_half_way_through_a_ring_write(monkeypatch, caplog) -> None:
    """LB_FAULT_RING_WRITE_DELAY (test-only, tests/test_faults_daemon_kill.py): the first
    half of a ring write's slots is in place while the port sleeps; the rest follows."""
    import control.datapaths as dps

    monkeypatch.setenv(dps.FAULT_RING_WRITE_DELAY, "0.25")
    port = MemoryPort(Sizes(ring_size=13, max_vips=8, max_reals=32, conn_table_size=64))
    assert port.ring_write_delay == 0.25
    seen: list[tuple[float, np.ndarray]] = []
    monkeypatch.setattr(dps.time, "sleep", lambda s: seen.append((s, port.ring(0))))
    slots = np.arange(1, 11, dtype=np.int64)
    with caplog.at_level("WARNING", logger="lb.datapath"):
        port.apply(WriteRing(0, slots, np.full(10, 7, dtype=np.uint32), np.zeros(10, dtype=np.uint32)))
    assert len(seen) == 1 and seen[0][0] == 0.25
    assert list(seen[0][1][1:11]) == [7] * 5 + [0] * 5  # half written during the sleep
    assert list(port.ring(0)[1:11]) == [7] * 10
    assert "ring 0 half written (memory, 5 of 10 slots)" in caplog.text
    monkeypatch.delenv(dps.FAULT_RING_WRITE_DELAY)
    assert MemoryPort(port.sizes).ring_write_delay == 0.0  # unset: no delay, no sleep
    for bad in ("soon", "-1"):
        monkeypatch.setenv(dps.FAULT_RING_WRITE_DELAY, bad)
        with pytest.raises(ValueError, match=dps.FAULT_RING_WRITE_DELAY):
            MemoryPort(port.sizes)
