"""Random and mutated frames through the userspace datapath: it never raises, every frame
lands in exactly one outcome counter, and nothing is sent that was not for a VIP address."""

from __future__ import annotations

import ipaddress

import numpy as np
from fixtures import FIXTURES, fixture_tables
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import any_frame, mutated_frame, valid_flow_frame

from lb import constants as C
from lb.datapath import UserspaceDatapath
from lb.simulate import ip_destination

TABLES = fixture_tables()
DP = UserspaceDatapath(TABLES)
VIP_ADDRESSES = {
    ipaddress.ip_address(bytes(k["addr"][: 4 if k["family"] == C.FAMILY_V4 else 16]))
    for k in TABLES.vip_addr_keys
}
OUTCOMES = [i for i, n in enumerate(C.STATS) if n.split("_")[0] in ("tx", "pass", "drop")]


def check_batch(frames: list[bytes]) -> None:
    r = DP.process_frames(frames, now=10**9)
    outcomes = r.stats[OUTCOMES]
    assert int(r.stats[C.STAT_RX_PACKETS]) == len(frames)
    assert int(outcomes.sum()) == len(frames), "every frame has exactly one outcome"
    for i, f in enumerate(frames):
        action = int(r.actions[i])
        assert action in (C.XDP_DROP, C.XDP_PASS, C.XDP_TX)
        if action == C.XDP_PASS:
            assert r.output(i) == f, "a passed frame is unmodified"
        if action == C.XDP_TX:
            assert ip_destination(f) in VIP_ADDRESSES, "TX only for frames to a VIP address"
            assert r.out_lens[i] in (len(f), len(f) + 20, len(f) + 40)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(min_size=0, max_size=200), min_size=1, max_size=16))
def test_random_bytes(frames: list[bytes]) -> None:
    check_batch(frames)


@settings(max_examples=1500, deadline=None)
@given(st.lists(mutated_frame(), min_size=1, max_size=8))
def test_mutated_fixtures(frames: list[bytes]) -> None:
    check_batch(frames)


@settings(max_examples=500, deadline=None)
@given(st.lists(valid_flow_frame(), min_size=1, max_size=16))
def test_valid_flows(frames: list[bytes]) -> None:
    check_batch(frames)


@settings(max_examples=300, deadline=None)
@given(st.lists(any_frame, min_size=1, max_size=16))
def test_any_frames(frames: list[bytes]) -> None:
    check_batch(frames)


def test_every_truncation_of_every_fixture() -> None:
    frames = [fx.frame[:n] for fx in FIXTURES for n in range(len(fx.frame) + 1)]
    check_batch(frames)


def test_lengths_are_checked() -> None:
    buf = np.zeros((1, 10), dtype=np.uint8)
    try:
        DP.process(buf, np.array([11]), now=0)
    except ValueError:
        return
    raise AssertionError("a length beyond the buffer must be refused")
