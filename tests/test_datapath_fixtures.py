"""Every golden fixture through the userspace datapath, each against its own table set
(the XDP run is in test_differential)."""

from __future__ import annotations

import ipaddress

import numpy as np
import pytest
from fixtures import FIXTURE_SETS, Fixture
from scapy.layers.l2 import Ether

from lb import constants as C
from lb.datapath import UserspaceDatapath

ACTIONS = {"TX": C.XDP_TX, "PASS": C.XDP_PASS, "DROP": C.XDP_DROP}
TABLES = {name: make() for name, (make, _) in FIXTURE_SETS.items()}
CASES = [(name, fx) for name, (_, fxs) in FIXTURE_SETS.items() for fx in fxs]


def run_fixture(tables, fx: Fixture):
    dp = UserspaceDatapath(tables)
    if fx.setup:
        dp.process_frames(list(fx.setup), now=1)
    if fx.reload:
        tables = TABLES[fx.reload]
        dp.load_tables(tables)
    return dp.process_frames([fx.frame], now=2)


def test_every_row_of_the_table_is_covered() -> None:
    assert {fx.row for _, fx in CASES} == set(range(1, 22))


@pytest.mark.parametrize(("tables", "fx"), CASES, ids=[f"{name}-row{fx.row}-{fx.description}" for name, fx in CASES])
def test_fixture(tables: str, fx: Fixture) -> None:
    t = TABLES[tables]
    r = run_fixture(t, fx)
    t = TABLES[fx.reload or tables]
    got = r.output(0)
    assert C.ACTION_NAMES[int(r.actions[0])] == fx.action
    if fx.output is not None:
        if got != fx.output:
            pytest.fail(
                f"output differs\n got: {got.hex()}\nwant: {fx.output.hex()}\n"
                f"got:  {Ether(got).summary()}\nwant: {Ether(fx.output).summary()}"
            )
    deltas = {name: int(r.stats[i]) for i, name in enumerate(C.STATS) if r.stats[i]}
    assert deltas == fx.counters
    real = t.real_address(int(r.real_ids[0]))
    assert (str(real) if real else None) == fx.real
    # a connection-table miss that ends with a real counts on that real, whatever the row
    misses = fx.counters.get("lru_miss", 0) if "drop_no_real" not in fx.counters else 0
    if fx.real:
        rid = t.real_ids[ipaddress.ip_address(fx.real)]
        assert r.real_stats[rid].tolist() == [1, len(fx.frame), misses]
    else:
        assert not np.any(r.real_stats[:, :C.REAL_STAT_LRU_MISS])  # rows 20/21 count no real
        assert int(r.real_stats[:, C.REAL_STAT_LRU_MISS].sum()) == misses
    if fx.row >= 15:
        assert int(r.vip_stats[:, 0].sum()) == 1 and int(r.vip_stats[:, 1].sum()) == len(fx.frame)
    else:
        assert not np.any(r.vip_stats)
