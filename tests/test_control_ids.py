"""The allocator: stable VIP numbers and real ids; from scratch it is compile_tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from control_helpers import make_config, real_addr, vip_dict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from control.ids import EMPTY, AllocationError, Ids, allocate
from control.tables import build_tables
from lb.config import load_config
from lb.datapath_tables import compile_tables

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "lb.yaml"


def _alloc(cfg, prev=EMPTY):
    s = cfg.settings
    return allocate(prev, [v.key for v in cfg.vips], [r.address for v in cfg.vips for r in v.reals],
                    s.max_vips, s.max_reals)


def assert_same_tables(a, b) -> None:
    for name in ("ring_size", "max_vips", "max_reals", "conn_table_size"):
        assert getattr(a, name) == getattr(b, name), name
    for name in ("vip_keys", "vip_metas", "vip_addr_keys", "reals", "ctl", "quic_servers", "src_routes_v4",
                 "src_routes_v6", "vip_prefix_keys", "vip_prefix_metas", "vip_prefix_addr_keys"):
        assert getattr(a, name).tobytes() == getattr(b, name).tobytes(), name
    assert np.array_equal(a.rings, b.rings)
    assert a.real_ids == b.real_ids
    assert a.vip_nums == b.vip_nums


def test_fresh_allocation_is_compile_tables_on_the_example() -> None:
    cfg = load_config(EXAMPLE)
    ours = build_tables(cfg, _alloc(cfg)).to_datapath_tables()
    assert_same_tables(ours, compile_tables(cfg))


@st.composite
def configs(draw):
    n_vips = draw(st.integers(0, 6))
    vips = []
    for i in range(n_vips):
        reals = draw(st.lists(st.tuples(st.integers(0, 12), st.integers(0, 5)), max_size=6,
                              unique_by=lambda t: t[0]))
        v = vip_dict(i, reals, port=draw(st.sampled_from([0, 53, 80])),
                     protocol=draw(st.sampled_from(["tcp", "udp"])),
                     hash=draw(st.sampled_from(["maglev", "maglev_v2"])))
        if draw(st.booleans()):  # a CIDR VIP (VIPs 2k and 2k+1: nested prefixes)
            v["address"] = f"198.18.{64 + 2 * (i // 2)}.0/{23 + i % 2}"
        vips.append(v)
    return make_config(vips)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs())
def test_fresh_allocation_is_compile_tables(cfg) -> None:
    assert_same_tables(build_tables(cfg, _alloc(cfg)).to_datapath_tables(), compile_tables(cfg))


def test_numbers_survive_removal_and_addition() -> None:
    a = make_config([vip_dict(0, [0, 1]), vip_dict(1, [1, 2]), vip_dict(2, [3])])
    ids = _alloc(a)
    assert dict(ids.vips) == {("198.18.100.1", 80, "tcp"): 0, ("198.18.100.2", 80, "tcp"): 1,
                              ("198.18.100.3", 80, "tcp"): 2}
    assert dict(ids.reals) == {real_addr(0): 1, real_addr(1): 2, real_addr(2): 3, real_addr(3): 4}

    # drop the middle VIP (and with it real 2); add a new VIP with a new real up front
    b = make_config([vip_dict(5, [9]), vip_dict(0, [0, 1]), vip_dict(2, [3])])
    ids2 = _alloc(b, ids)
    assert ids2.vips[("198.18.100.1", 80, "tcp")] == 0
    assert ids2.vips[("198.18.100.3", 80, "tcp")] == 2
    assert ids2.vips[("198.18.100.6", 80, "tcp")] == 1  # the lowest free number
    assert ids2.reals[real_addr(0)] == 1 and ids2.reals[real_addr(1)] == 2 and ids2.reals[real_addr(3)] == 4
    assert ids2.reals[real_addr(9)] == 5  # a fresh id, not the freed 3
    assert ids2.retired == (3,) and ids2.next_real == 6
    ids2.check()


def test_freed_real_ids_are_reused_last_and_oldest_first() -> None:
    # max_reals 5: ids 1..4
    cfg = lambda reals: make_config([vip_dict(0, reals)], max_reals=5)  # noqa: E731
    ids = _alloc(cfg([0, 1, 2]))  # 1, 2, 3
    ids = _alloc(cfg([0, 2]), ids)  # 2 retired
    ids = _alloc(cfg([2]), ids)  # 1 retired after 2
    assert ids.retired == (2, 1)
    ids = _alloc(cfg([2, 5]), ids)  # fresh id 4 first
    assert ids.reals[real_addr(5)] == 4 and ids.retired == (2, 1)
    ids = _alloc(cfg([2, 5, 6, 7]), ids)  # then the oldest freed: 2, then 1
    assert ids.reals[real_addr(6)] == 2 and ids.reals[real_addr(7)] == 1 and ids.retired == ()
    with pytest.raises(AllocationError, match="no free real id"):
        allocate(ids, [], [real_addr(i) for i in (2, 5, 6, 7, 8)], max_vips=8, max_reals=5)


def test_vip_table_full() -> None:
    with pytest.raises(AllocationError, match="no free VIP number"):
        allocate(EMPTY, [("198.18.0.1", p, "tcp") for p in range(3)], [], max_vips=2, max_reals=4)


def test_numbers_that_no_longer_fit_are_given_again() -> None:
    prev = Ids({("198.18.0.1", 80, "tcp"): 7}, {"198.19.0.1": 9}, 10, ())
    ids = allocate(prev, [("198.18.0.1", 80, "tcp")], ["198.19.0.1"], max_vips=4, max_reals=8)
    assert ids.vips[("198.18.0.1", 80, "tcp")] == 0 and ids.reals["198.19.0.1"] < 8
    ids.check()


def test_json_round_trip_and_consistency_checks() -> None:
    ids = _alloc(make_config([vip_dict(0, [0, 1]), vip_dict(1, [1, 2], v6=False)]))
    assert Ids.from_json(ids.to_json()) == ids
    bad = ids.to_json()
    bad["reals"][1][1] = bad["reals"][0][1]
    with pytest.raises(ValueError, match="unique"):
        Ids.from_json(bad)
    bad = ids.to_json()
    bad["retired"] = [1]
    with pytest.raises(ValueError, match="overlap"):
        Ids.from_json(bad)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.integers(0, 15), max_size=8, unique=True), min_size=1, max_size=12),
       st.lists(st.lists(st.integers(0, 7), max_size=5, unique=True), min_size=1, max_size=12))
def test_allocation_sequences_keep_numbers_and_stay_consistent(real_sets, vip_sets) -> None:
    """Through any sequence of configs: a VIP/real present in two consecutive states keeps
    its number; numbers are unique and in range; no id is reused while a fresh one exists."""
    ids = EMPTY
    for reals, vips in zip(real_sets, vip_sets, strict=False):
        keys = [("198.18.100.1", 1000 + v, "tcp") for v in vips]
        addrs = [real_addr(r) for r in reals]
        new = allocate(ids, keys, addrs, max_vips=8, max_reals=12)
        new.check()
        for k in keys:
            if k in ids.vips:
                assert new.vips[k] == ids.vips[k]
            assert 0 <= new.vips[k] < 8
        for a in addrs:
            if a in ids.reals and ids.reals[a] < 12:
                assert new.reals[a] == ids.reals[a]
            if a not in ids.reals and new.reals[a] < ids.next_real:  # not a fresh id
                assert new.next_real == 12, "reused a freed id while fresh ones were left"
        assert len(set(new.vips.values())) == len(keys)
        assert len(set(new.reals.values())) == len(addrs)
        ids = new
