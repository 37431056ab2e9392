"""Every golden fixture through the userspace datapath (the XDP run is in test_xdp_differential)."""

from __future__ import annotations

import ipaddress

import numpy as np
import pytest
from fixtures import FIXTURES, Fixture, fixture_tables
from scapy.layers.l2 import Ether

from lb import constants as C
from lb.datapath import UserspaceDatapath

ACTIONS = {"TX": C.XDP_TX, "PASS": C.XDP_PASS, "DROP": C.XDP_DROP}
TABLES = fixture_tables()


def run_fixture(fx: Fixture):
    dp = UserspaceDatapath(TABLES)
    if fx.setup:
        dp.process_frames(list(fx.setup), now=1)
    return dp.process_frames([fx.frame], now=2)


def test_every_row_of_the_table_is_covered() -> None:
    assert {fx.row for fx in FIXTURES} == set(range(1, 20))


@pytest.mark.parametrize("fx", FIXTURES, ids=[f"row{fx.row}-{fx.description}" for fx in FIXTURES])
def test_fixture(fx: Fixture) -> None:
    r = run_fixture(fx)
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
    real = TABLES.real_address(int(r.real_ids[0]))
    assert (str(real) if real else None) == fx.real
    if fx.real:
        rid = TABLES.real_ids[ipaddress.ip_address(fx.real)]
        assert r.real_stats[rid].tolist() == [1, len(fx.frame)]
    if fx.row >= 15:
        assert int(r.vip_stats[:, 0].sum()) == 1 and int(r.vip_stats[:, 1].sum()) == len(fx.frame)
    else:
        assert not np.any(r.vip_stats)
