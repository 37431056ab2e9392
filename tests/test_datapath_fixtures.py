"""Every golden fixture through the userspace datapath, each against its own table set
(the XDP run is in test_differential)."""

from __future__ import annotations

import ipaddress

import numpy as np
import pytest
from fixtures import (
    FIXTURE_SETS,
    QUIC_INITIAL,
    QUIC_VIP4,
    RING4,
    Fixture,
    quic_cid,
    quic_long,
    quic_short,
    udp_frame,
)
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
    return dp.process_frames([fx.frame], now=2)


def test_every_row_of_the_table_is_covered() -> None:
    assert {fx.row for _, fx in CASES} == set(range(1, 22))


@pytest.mark.parametrize(("tables", "fx"), CASES, ids=[f"{name}-row{fx.row}-{fx.description}" for name, fx in CASES])
def test_fixture(tables: str, fx: Fixture) -> None:
    t = TABLES[tables]
    r = run_fixture(t, fx)
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
    if fx.real:
        rid = t.real_ids[ipaddress.ip_address(fx.real)]
        assert r.real_stats[rid].tolist() == [1, len(fx.frame)]
    else:
        assert not np.any(r.real_stats)  # rows 20/21 count no real
    if fx.row >= 15:
        assert int(r.vip_stats[:, 0].sum()) == 1 and int(r.vip_stats[:, 1].sum()) == len(fx.frame)
    else:
        assert not np.any(r.vip_stats)


def test_quic_routed_entry_times() -> None:
    """The atime of what a QUIC-routed packet writes into the connection table (userspace
    only: the XDP clock cannot be set). A new entry counts from the routed packet; an
    entry it takes over keeps its atime, as Katran's update does (balancer.bpf.c
    check_and_update_real_index_in_lru), so the UDP timeout runs from the flow's last
    connection-table use."""
    t, timeout = TABLES["main"], C.LRU_UDP_TIMEOUT_NS
    routed = udp_frame(QUIC_VIP4, quic_short(quic_cid(1, 1000)))
    init = udp_frame(QUIC_VIP4, quic_long(QUIC_INITIAL, quic_cid(1, 1000)))
    no_id = udp_frame(QUIC_VIP4, quic_short(quic_cid(1, 0)))

    def real(dp: UserspaceDatapath, frame: bytes, now: int) -> str:
        return str(t.real_address(int(dp.process_frames([frame], now=now).real_ids[0])))

    dp = UserspaceDatapath(t)
    assert real(dp, routed, 1) == "198.19.1.2"  # new entry, atime 1
    assert real(dp, no_id, 1 + timeout) == "198.19.1.2"  # just in time: a hit
    dp = UserspaceDatapath(t)
    assert real(dp, init, 1) == RING4  # the ring's real, atime 1
    assert real(dp, routed, timeout) == "198.19.1.2"  # taken over, atime still 1
    assert real(dp, no_id, timeout + 2) == RING4  # expired: hashed again
