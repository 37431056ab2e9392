"""The XDP program against the userspace datapath: same action, same output bytes, same
counter updates, on every golden fixture and on 100,000+ hypothesis-generated frames.

Both start from identical tables: each fixture's own table set (:data:`fixtures.FIXTURE_SETS`;
random frames run against the main set and, sized around the MTU, the GUE and IPIP+mtu
sets). The XDP program runs
through BPF_PROG_TEST_RUN. A mismatch prints the frame as hex and a scapy one-liner.
Frames shorter than 14 bytes are not compared: the kernel refuses them for a test run (a
driver never delivers them), and the userspace handling of them is covered by
test_datapath_fuzz.py.
"""

from __future__ import annotations

import copy
import ipaddress
import os

import numpy as np
import pytest
from fixtures import (
    FIXTURE_SETS,
    G_BYPASS,
    G_KEEP,
    G_MIG,
    G_MIG_UP,
    G_SRC,
    G_TCP,
    G_UDP,
    G_UDP_UP,
    SRC_VIP4,
    Fixture,
    tcp4,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import MTU_VIPS, any_frame, mtu_frame

from lb import constants as C
from lb.datapath import UserspaceDatapath
from lb.pktgen import build_frame

pytestmark = [pytest.mark.bpf, pytest.mark.root]

EXAMPLES = 3000
MTU_EXAMPLES = 250  # per GUE / IPIP+mtu table set
FRAMES_PER_EXAMPLE = 64
FRAMES_COMPARED = [0]  # filled by the hypothesis tests, checked by the last test


@pytest.fixture(scope="module", autouse=True)
def one_cpu():
    """Every test run on one CPU: the flood guard counts new connections per CPU, and the
    userspace datapath is one CPU's."""
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})
    yield
    os.sched_setaffinity(0, cpus)


@pytest.fixture(scope="module")
def balancers():
    """Table set name -> (XdpBalancer, tables), each loaded on first use."""
    from lb.bpf_loader import XdpBalancer

    loaded: dict = {}

    def get(name: str):
        if name not in loaded:
            tables = FIXTURE_SETS[name][0]()
            loaded[name] = (XdpBalancer.from_tables(tables), tables)
        return loaded[name]

    yield get
    for bal, _ in loaded.values():
        bal.close()


@pytest.fixture(scope="module")
def xdp(balancers):
    return balancers("main")[0]


@pytest.fixture(scope="module")
def tables(balancers):
    return balancers("main")[1]


def _explain(frame: bytes, what: str, user, kern) -> str:
    return (f"{what} differs\n userspace: {user!r}\n       xdp: {kern!r}\n"
            f" frame: {frame.hex()}\n rebuild: Ether(bytes.fromhex('{frame.hex()}'))")


def _run_both(xdp, dp: UserspaceDatapath, frames: list[bytes]):
    """Run ``frames`` in order through both; compare per frame and the counter deltas.
    Returns the userspace result."""
    from lb.kernel.testrun import test_run

    before = xdp.read_stats()
    r = dp.process_frames(frames, now=1)
    for i, f in enumerate(frames):
        action, out, _ = test_run(xdp.prog_fd, f)
        u_action = int(r.actions[i])
        if action != u_action:
            pytest.fail(_explain(f, f"action of frame {i}", C.ACTION_NAMES[u_action], C.ACTION_NAMES.get(action)))
        if action in (C.XDP_TX, C.XDP_PASS) and out != r.output(i):
            pytest.fail(_explain(f, f"output of frame {i}", r.output(i).hex(), out.hex()))
    after = xdp.read_stats()
    k_stats = {n: after.counters[n] - before.counters[n] for n in C.STATS}
    u_stats = {n: int(r.stats[j]) for j, n in enumerate(C.STATS)}
    if k_stats != u_stats:
        diff = {n: (u_stats[n], k_stats[n]) for n in C.STATS if u_stats[n] != k_stats[n]}
        pytest.fail(f"counters differ (userspace, xdp): {diff}\n frames: {[f.hex() for f in frames]}")
    k_vip = (after.vip.astype(np.int64) - before.vip.astype(np.int64))
    k_real = (after.real.astype(np.int64) - before.real.astype(np.int64))
    assert np.array_equal(k_vip, r.vip_stats), "per-VIP counters differ"
    assert np.array_equal(k_real, r.real_stats), "per-real counters differ"
    return r


_TABLES: dict = {}


def _tables(name: str):
    """The tables of table set ``name`` (built once)."""
    if name not in _TABLES:
        _TABLES[name] = FIXTURE_SETS[name][0]()
    return _TABLES[name]


# Frames under 14 bytes can't be test-run (see the module docstring).
XDP_FIXTURES = [(name, fx) for name, (_, fxs) in FIXTURE_SETS.items() for fx in fxs
                if len(fx.frame) >= C.ETH_HLEN]


@pytest.mark.parametrize(("table_set", "fx"), XDP_FIXTURES,
                         ids=[f"{name}-row{fx.row}-{fx.description}" for name, fx in XDP_FIXTURES])
def test_fixture_through_xdp(balancers, table_set: str, fx: Fixture) -> None:
    """Each golden fixture through XDP: the expected output, counters, and userspace's."""
    from lb.kernel.testrun import test_run

    xdp, tables = balancers(table_set)
    reloaded = _tables(fx.reload) if fx.reload else None
    try:
        xdp.clear_conn_table()
        for s in fx.setup:
            test_run(xdp.prog_fd, s)
        if reloaded is not None:
            xdp.load_tables(reloaded)
        before = xdp.read_stats().counters
        action, out, _ = test_run(xdp.prog_fd, fx.frame)
        after = xdp.read_stats().counters
        assert C.ACTION_NAMES[action] == fx.action
        if fx.output is not None:
            assert out == fx.output, _explain(fx.frame, "output vs golden", fx.output.hex(), out.hex())
        assert {n: after[n] - before[n] for n in C.STATS if after[n] != before[n]} == fx.counters
        # and the same again, compared with the userspace datapath in lockstep
        xdp.clear_conn_table()
        if reloaded is None:
            _run_both(xdp, UserspaceDatapath(tables), list(fx.setup) + [fx.frame])
            return
        xdp.load_tables(tables)
        dp = UserspaceDatapath(tables)
        if fx.setup:
            _run_both(xdp, dp, list(fx.setup))
        xdp.load_tables(reloaded)
        dp.load_tables(reloaded)
        _run_both(xdp, dp, [fx.frame])
    finally:
        if reloaded is not None:
            xdp.load_tables(tables)


def test_connection_table_wins_over_a_changed_source_route(xdp, tables) -> None:
    """A src_routing flow keeps its real when its route moves (tables reloaded in place,
    connection tables kept); a SYN re-hashes and takes the new route. Both datapaths."""
    syn, ack = tcp4(dst=SRC_VIP4), tcp4(dst=SRC_VIP4, tcp_flags="A")
    old, new = (tables.real_ids[ipaddress.ip_address(a)] for a in ("198.19.1.3", "198.19.1.2"))
    moved = copy.copy(tables)
    moved.src_routes_v4 = tables.src_routes_v4.copy()
    moved.src_routes_v4["real_id"][moved.src_routes_v4["real_id"] == old] = new
    xdp.clear_conn_table()
    dp = UserspaceDatapath(tables)
    try:
        assert _run_both(xdp, dp, [syn]).real_ids.tolist() == [old]
        xdp.load_tables(moved)
        dp.load_tables(moved)
        r = _run_both(xdp, dp, [ack, syn])
        assert r.real_ids.tolist() == [old, new]
        assert [int(r.stats[C.STAT_INDEX[n]]) for n in ("lru_hit", "lru_miss", "src_routed")] == [1, 1, 1]
    finally:
        xdp.load_tables(tables)


def test_cidr_vips_are_skipped_while_ctl_says_there_are_none(xdp, tables) -> None:
    """ctl.cidr_vips gates the prefix lookups (the control plane sets it with the first
    CIDR VIP): cleared, a frame inside a prefix is not ours, in both datapaths; set, it is."""
    inside = tcp4(dst="198.18.64.1")
    off = copy.copy(tables)
    off.ctl = tables.ctl.copy()
    off.ctl[0]["cidr_vips"] = 0
    assert int(tables.ctl[0]["cidr_vips"]) == 1
    xdp.clear_conn_table()
    try:
        xdp.load_tables(off)
        r = _run_both(xdp, UserspaceDatapath(off), [inside])
        assert int(r.actions[0]) == C.XDP_PASS and int(r.stats[C.STAT_INDEX["pass_not_vip"]]) == 1
    finally:
        xdp.load_tables(tables)
    r = _run_both(xdp, UserspaceDatapath(tables), [inside])
    assert int(r.actions[0]) == C.XDP_TX and int(r.stats[C.STAT_INDEX["vip_prefix_matched"]]) == 1


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=False)
@given(st.lists(any_frame, min_size=FRAMES_PER_EXAMPLE - 20, max_size=FRAMES_PER_EXAMPLE))
def test_random_frames_agree(xdp_and_tables, frames: list[bytes]) -> None:
    _compare_fresh(*xdp_and_tables, frames)


def _compare_fresh(xdp, tables, frames: list[bytes]) -> None:
    """``frames`` (the test-runnable ones) through both datapaths from empty connection
    tables; counted in FRAMES_COMPARED."""
    frames = [f for f in frames if len(f) >= C.ETH_HLEN]
    if not frames:
        return
    xdp.clear_conn_table()
    _run_both(xdp, UserspaceDatapath(tables), frames)
    FRAMES_COMPARED[0] += len(frames)


@pytest.fixture(scope="module")
def xdp_and_tables(xdp, tables):
    return xdp, tables


@pytest.mark.parametrize("table_set", sorted(MTU_VIPS))
def test_random_frames_around_the_mtu_agree(balancers, table_set: str) -> None:
    """GUE and IPIP with mtu: flows sized around the MTU (DF on and off) and mutated
    fixtures of that table set."""
    xdp, tables = balancers(table_set)

    @settings(max_examples=MTU_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(mtu_frame(table_set), min_size=FRAMES_PER_EXAMPLE - 20, max_size=FRAMES_PER_EXAMPLE))
    def run(frames: list[bytes]) -> None:
        _compare_fresh(xdp, tables, frames)

    before = xdp.read_stats().counters
    run()
    after = xdp.read_stats().counters
    # the frames did reach both sides of the MTU check
    for name in ("tx_icmp_too_big", "drop_too_big", "tx_encap") + (("hoplist_sent",) if table_set == "stateless" else ()):
        assert after[name] - before[name] > 100, name


GUARD_VIPS = [(G_TCP, 80, "tcp"), (G_SRC, 80, "tcp"), (G_BYPASS, 80, "tcp"), (G_UDP, 53, "udp"),
              (G_MIG, 80, "tcp"), (G_KEEP, 80, "tcp"), (G_UDP_UP, 53, "udp"), (G_MIG_UP, 80, "tcp")]
guard_frame = st.builds(
    lambda vip, src, sport, flags: build_frame(4, vip[2], 64, src=src, dst=vip[0], sport=sport, dport=vip[1],
                                               tcp_flags=flags),
    st.sampled_from(GUARD_VIPS), st.sampled_from(["198.18.0.10", "198.19.77.1"]), st.integers(1000, 1007),
    st.sampled_from([0x02, 0x10, 0x12, 0x18, 0x04]))


def test_random_flows_under_the_flood_guard_and_a_down_real_agree(balancers) -> None:
    """Flows to the guard VIPs (max_conn_rate 3: most frames are over it), then the
    reload that takes G_DOWN down for some of its VIPs (up for G_UDP_UP, G_MIG_UP) and more
    of the same flows: both datapaths in lockstep, every counter equal (flood_new_conns,
    down_real_migrated, src_routed, ...)."""
    xdp, tables = balancers("guard")
    down = _tables("guard_down")
    totals = dict.fromkeys(("flood_new_conns", "down_real_migrated", "src_routed", "lru_hit"), 0)

    @settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(guard_frame, min_size=4, max_size=30), st.lists(guard_frame, min_size=1, max_size=30))
    def run(before: list[bytes], after: list[bytes]) -> None:
        xdp.load_tables(tables)
        xdp.clear_conn_table()
        dp = UserspaceDatapath(tables)
        r1 = _run_both(xdp, dp, before)
        xdp.load_tables(down)
        dp.load_tables(down)
        r2 = _run_both(xdp, dp, after)
        for name in totals:
            totals[name] += int(r1.stats[C.STAT_INDEX[name]] + r2.stats[C.STAT_INDEX[name]])

    try:
        run()
    finally:
        xdp.load_tables(tables)
    assert all(totals.values()), totals  # every path was taken


def test_at_least_100k_frames_were_compared() -> None:
    """Runs after the hypothesis test (file order): the brief asks for 100,000 per run."""
    assert FRAMES_COMPARED[0] >= 100_000, FRAMES_COMPARED[0]
