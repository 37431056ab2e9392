"""Random and mutated frames through the userspace datapath: it never raises, every frame
lands in exactly one outcome counter, and nothing is sent that was not for a VIP address."""

from __future__ import annotations

import ipaddress

import numpy as np
import pytest
from fixtures import FIXTURE_SETS, FIXTURES, fixture_tables
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import MTU_VIPS, any_frame, mtu_frame, mutated_frame, valid_flow_frame

from lb import constants as C
from lb.datapath import UserspaceDatapath
from lb.simulate import ip_destination

TABLES = fixture_tables()
DP = UserspaceDatapath(TABLES)


class VipAddresses:
    """The VIP addresses of a table set: exact ones, and every address inside a CIDR VIP's
    prefix (``ip in vips``)."""

    def __init__(self, tables) -> None:
        def ip(k) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
            return ipaddress.ip_address(bytes(k["addr"][: 4 if k["family"] == C.FAMILY_V4 else 16]))

        self.exact = {ip(k) for k in tables.vip_addr_keys}
        self.prefixes = [ipaddress.ip_network((ip(k), int(k["prefixlen"]) - C.VIP_LPM_KEY_HEAD_BITS))
                         for k in tables.vip_prefix_addr_keys]

    def __contains__(self, addr) -> bool:
        return addr in self.exact or any(addr.version == n.version and addr in n for n in self.prefixes)


def vip_addresses(tables) -> VipAddresses:
    return VipAddresses(tables)


VIP_ADDRESSES = vip_addresses(TABLES)
OUTCOMES = [i for i, n in enumerate(C.STATS) if n.split("_")[0] in ("tx", "pass", "drop")]
# output lengths with GUE and the MTU check: IPIP or GUE outer headers (a hop list too), or an ICMP
# too-big reply (L2 of 14 or 18 bytes + 156 / 304)
MTU_OVERHEADS = (0, 20, 40, 28, 48) + tuple(  # and stateless VIPs' GUE with a hop list of n reals
    ip + C.UDP_HLEN + C.GUE_HLEN + C.GUE_HOPLIST_HLEN + n * alen
    for ip, alen in ((C.ENCAP_IPV4_OVERHEAD, 4), (C.ENCAP_IPV6_OVERHEAD, 16)) for n in range(2, C.GUE_MAX_HOPS + 1))
TOO_BIG_LENS = {l2 + size for l2 in (14, 18) for size in (156, 304)}


def check_batch(frames: list[bytes], dp: UserspaceDatapath = DP, vips: VipAddresses = VIP_ADDRESSES,
                overheads: tuple[int, ...] = (0, 20, 40), reply_lens: set = frozenset()) -> None:
    r = dp.process_frames(frames, now=10**9)
    outcomes = r.stats[OUTCOMES]
    assert int(r.stats[C.STAT_RX_PACKETS]) == len(frames)
    assert int(outcomes.sum()) == len(frames), "every frame has exactly one outcome"
    for i, f in enumerate(frames):
        action = int(r.actions[i])
        assert action in (C.XDP_DROP, C.XDP_PASS, C.XDP_TX)
        if action == C.XDP_PASS:
            assert r.output(i) == f, "a passed frame is unmodified"
        if action == C.XDP_TX:
            assert ip_destination(f) in vips, "TX only for frames to a VIP address"
            assert r.out_lens[i] - len(f) in overheads or r.out_lens[i] in reply_lens


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


@pytest.mark.parametrize("table_set", sorted(MTU_VIPS))
def test_mtu_table_sets(table_set: str) -> None:
    """GUE / IPIP with mtu: frames around the MTU and mutated fixtures of that set."""
    tables = FIXTURE_SETS[table_set][0]()
    dp, vips = UserspaceDatapath(tables), vip_addresses(tables)

    @settings(max_examples=300, deadline=None)
    @given(st.lists(mtu_frame(table_set), min_size=1, max_size=16))
    def run(frames: list[bytes]) -> None:
        check_batch(frames, dp, vips, MTU_OVERHEADS, TOO_BIG_LENS)

    run()
    fxs = FIXTURE_SETS[table_set][1]
    check_batch([fx.frame[:n] for fx in fxs for n in range(0, len(fx.frame) + 1, 7)], dp, vips,
                MTU_OVERHEADS, TOO_BIG_LENS)


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


def test_generators_reach_quic_and_source_routing() -> None:
    """The differential test's frames (any_frame) exercise every outcome of real
    selection steps 0 and 2, not just the fallbacks."""
    dp = UserspaceDatapath(TABLES)

    @settings(max_examples=300, deadline=None, derandomize=True, database=None)
    @given(st.lists(any_frame, min_size=16, max_size=16))
    def run(frames: list[bytes]) -> None:
        dp.process_frames(frames, now=10**9)

    run()
    counts = dp.stats_dict()
    reached = {n: counts[n] for n in ("quic_routed", "quic_fallback", "quic_unknown", "src_routed")}
    assert all(reached.values()), reached
