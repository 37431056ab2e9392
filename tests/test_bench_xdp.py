"""The XDP benchmark machinery (bench/bench_xdp.py) in a tiny configuration, and the
optional TRex profile (bench/trex_profile.py).

The benchmark tests need root, bpf() and bcc and build network namespaces (``lbb``
+ random hex, always removed); they check that every part runs end to end and counts
what it should, not how fast anything is.
"""

from __future__ import annotations

import importlib
import ipaddress
import os

import pytest

from bench import bench_xdp as bx
from lb.pktgen import flow_tuple
from netns.ns import list_netns

CPUS = sorted(os.sched_getaffinity(0))
GEN_CPU = CPUS[0]
OTHER_CPU = CPUS[1] if len(CPUS) > 1 else CPUS[0]


# --- flow mixes (no privileges) ----------------------------------------------------------


@pytest.mark.parametrize("family,flows,n_segments,vary", [
    (4, 1, 1, "src_port"), (4, 1000, 1, "src_port"), (4, 100_000, 1, "src_addr"),
    (4, 1_000_000, 16, "src_port"), (6, 1_000_000, 1, "src_addr"),
])
def test_flow_segments(family: int, flows: int, n_segments: int, vary: str) -> None:
    segs = bx.flow_segments(family, flows)
    assert len(segs) == n_segments and {s.vary for s in segs} == {vary}
    assert sum(s.flows for s in segs) == flows
    for s in segs:  # every address the generator will use stays in the benchmarking ranges
        lo = ipaddress.ip_address(s.src)
        hi = lo + (s.flows - 1 if s.vary == "src_addr" else 0)
        net = ipaddress.ip_network("198.18.0.0/15" if family == 4 else "2001:db8::/32")
        assert lo in net and hi in net
        assert s.vary == "src_addr" or bx.SPORT0 + s.flows - 1 <= 65535


@pytest.mark.parametrize("family,flows", [(4, 1000), (4, 130_000), (6, 70_000)])
def test_userspace_frames_are_the_generators_flows(family: int, flows: int) -> None:
    """mix_frames (part c) holds exactly the flows the live generator makes (parts a/b)."""
    dst = bx.VIPS[(family, "lru")]
    frames = bx.mix_frames(family, flows, dst)
    assert frames.shape == (flows, bx.frame_size(family))
    src = slice(26, 30) if family == 4 else slice(22, 38)
    sport = slice(34, 36) if family == 4 else slice(54, 56)
    got = {(bytes(f[src]), bytes(f[sport])) for f in frames}
    assert len(got) == flows  # all distinct
    row = 0
    for seg in bx.flow_segments(family, flows):
        tmpl = bx.template(family, seg.src, dst, bx.STUB_SRC_MAC, bytes(6))
        for i in (0, seg.flows // 2, seg.flows - 1):
            addr, port = flow_tuple(tmpl, i, seg.vary)
            f = frames[row + i]
            assert bytes(f[src]) == ipaddress.ip_address(addr).packed
            assert int.from_bytes(bytes(f[sport]), "big") == port
        row += seg.flows


def test_bench_config_has_the_vips() -> None:
    cfg = bx.bench_config("02:00:00:00:00:01", 1 << 16)
    assert {(str(v.address), tuple(v.flags)) for v in cfg.vips} == {
        ("198.19.200.1", ()), ("198.19.200.2", ("lru_bypass",)),
        ("2001:db8:200::1", ()), ("2001:db8:200::2", ("lru_bypass",))}
    assert all(len(v.reals) == 100 for v in cfg.vips)


# --- the benchmark itself, tiny ------------------------------------------------------------


def _left_behind() -> set[str]:
    """Namespaces this process's benchmark beds made that still exist (another run of
    the benchmark on the machine has its own)."""
    return set(bx.NETNS_MADE) & set(list_netns())


@pytest.fixture(scope="module")
def xb():
    bench = bx.XdpBench(gen_cpu=GEN_CPU, other_cpu=OTHER_CPU, frames=20_000, reps=1,
                        conn_table_size=1 << 18, max_reruns=0,
                        load_high=1e9, warm_frames=5_000)
    yield bench
    bench.close()
    assert bx.NETNS_MADE and not _left_behind(), "a namespace of the benchmark was left behind"


def _sane(row: dict, *, lru: bool, min_hit: float = 1.0) -> None:
    for label, runs in row["runs"].items():
        for r in runs:
            assert r["packets"] > 0 and r["seconds"] > 0
            assert r["delivered"] + r["veth_dropped"] == r["packets"], label
            assert r["load_before"] and r["load_after"]
    assert row["ratio"] > 0 and row["mpps"] > 0 and row["base_mpps"] > 0
    if lru:
        assert row["lru_hit_ratio"] >= min_hit  # the warm-up pass put every flow in the table
    else:
        assert row["lru_hit_ratio"] is None


@pytest.mark.root
@pytest.mark.bpf
@pytest.mark.netns
def test_part_a_tail_call_harness(xb) -> None:
    rows = bx.part_a(xb, [4, 6], [1000], list(bx.VIP_KINDS), ["softirq"])
    assert len(rows) == 2 * 2
    for r in rows:
        _sane(r, lru=r["vip"] == "lru")
        assert r["bal_cpus"] == [GEN_CPU] == r["gen_cpus"]  # the tail call runs in the generator
        assert r["sink_cpus"] == [GEN_CPU]  # sink NAPI in softirq on the same CPU: no loss
        assert all(x["delivered"] == x["packets"] for v in r["runs"].values() for x in v)
        for runs in r["runs"]["lru" if r["vip"] == "lru" else "lru_bypass"]:
            assert runs["tx_encap"] == runs["packets"]  # every frame encapsulated
    assert rows[0]["target"] == bx.TARGETS[1000]
    assert bx.table_a(rows, GEN_CPU, OTHER_CPU).row_count == len(rows)


@pytest.mark.root
@pytest.mark.bpf
@pytest.mark.netns
def test_part_a_chunked_ipv4_mix(xb) -> None:
    """More IPv4 flows than fit the address range: template switched per segment."""
    rows = bx.part_a(xb, [4], [130_000], ["lru"], ["softirq"])
    (r,) = rows
    _sane(r, lru=True)
    assert r["runs"]["lru"][0]["packets"] >= 130_000


@pytest.mark.root
@pytest.mark.bpf
@pytest.mark.netns
def test_part_b_topology(xb) -> None:
    rows = bx.part_b(xb, [4], [1000], ["lru"], ["softirq", "threaded"])
    assert [r["mode"] for r in rows] == ["softirq", "threaded"]
    for r in rows:
        # threaded: frames lost on the way in may keep a few flows out of the warm-up
        _sane(r, lru=True, min_hit=1.0 if r["mode"] == "softirq" else 0.95)
        assert r["gen_cpus"] == [GEN_CPU]
        if r["mode"] == "softirq":  # everything on the generator's CPU, nothing lost
            assert r["bal_cpus"] == [GEN_CPU] == r["sink_cpus"]
            assert r["lost_fraction"] == 0
        elif OTHER_CPU != GEN_CPU:  # the balancer runs in B's NAPI kthread
            assert r["bal_cpus"] == [OTHER_CPU]
    assert bx.table_b(rows, OTHER_CPU).row_count == 2


@pytest.mark.root
@pytest.mark.bpf
@pytest.mark.netns
def test_part_p_profile(xb) -> None:
    prof = bx.part_p(xb, [1000], seconds=0.3)
    assert 0 < prof["helper_call"]["ns_per_helper_call"] < 1000
    reads = prof["map_read_ns"]
    assert list(reads) == [f"{mb:g}" for mb in bx.READ_LATENCY_MB]
    assert all(ns > 0 for ns in reads.values())
    # a 64 MB working set misses every cache a 0.5 MB one fits in
    assert reads["64"] > 2 * reads["0.5"], reads
    assert [p["program"] for p in prof["profiles"]] == ["stub", "lru", "stateless"]
    for p in prof["profiles"]:
        assert p["kernel_mpps_under_perf"] > 0
        assert p["top"] is not None, "no perf: scripts/setup.sh installs linux-perf"
        assert all(0 <= pct <= 100 for pct, _ in p["top"])
        if p["program"] == "stub":
            assert p["by_line"] is None  # not ours: no line profile
            continue
        lines = p["by_line"]  # the balancer by source line (bench.jit_profile)
        assert lines is not None and lines["program"] == "balancer_xdp"
        assert 0 < lines["ns_per_packet"] < 10_000
        assert 0 < sum(r["ns"] for r in lines["lines"]) <= lines["ns_per_packet"] + 1e-6
        assert any(r["line"].startswith(("main.c:", "encap.h:")) for r in lines["lines"])


def test_part_c_userspace() -> None:
    rows = bx.part_c(None, [4, 6], [1000], list(bx.VIP_KINDS), cpu=CPUS[-1], repeat=1,
                     conn_table_size=1 << 16)
    assert len(rows) == 4
    for r in rows:
        assert r["ns_per_pkt"] > 0
        assert r["lru_hit_ratio"] == (1.0 if r["vip"] == "lru" else None)
    assert os.sched_getaffinity(0) == set(CPUS)  # pinning undone


def test_command_line_writes_json(tmp_path) -> None:
    """The command line (part c only: no BPF) prints its tables and writes the JSON."""
    import json

    out = tmp_path / "xdp.json"
    assert bx.main(["--parts", "c", "--flows", "1000", "--quick", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {(r["family"], r["vip"]) for r in data["part_c"]} == {(4, "lru"), (6, "lru")}
    assert data["machine"]["cpus"] == os.cpu_count() and data["load_start"]


def test_paired_ratios() -> None:
    """Per-round ratios pair round i with round i; quartiles by the inclusive method."""
    from bench.ratios import paired_differences, paired_ratios, quartiles

    r = paired_ratios([2.0, 3.0, 8.0, 1.0, 5.0], [4.0, 3.0, 4.0, 0.0, 5.0])
    assert r["ratios"] == [0.5, 1.0, 2.0, 1.0]  # the round with a zero base is skipped
    assert (r["median"], r["q1"], r["q3"], r["n"]) == (1.0, 0.875, 1.25, 4)
    assert r["best"] == 8.0 / 5.0  # best round of a against best round of b
    assert paired_ratios([3.0], [2.0])["median"] == paired_ratios([3.0], [2.0])["q3"] == 1.5
    d = paired_differences([10.0, 12.0, 20.0], [8.0, 8.0, 8.0])
    assert d["differences"] == [2.0, 4.0, 12.0] and d["median"] == 4.0
    assert quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == (2.0, 3.0, 4.0)
    with pytest.raises(ValueError, match="unpaired"):
        paired_ratios([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        paired_ratios([1.0], [0.0])


@pytest.mark.root
@pytest.mark.bpf
@pytest.mark.netns
@pytest.mark.slow
def test_side_by_side_and_stages_write_ratios_and_charts(tmp_path) -> None:
    """Parts s and t without Katran, tiny: the JSON has per-round ratios to the stub and
    stage differences, every frame reached the sink, and both charts are written."""
    import json

    from bench import charts
    from bench import xdp_compare as xc

    out = tmp_path / "xdp.json"
    assert bx.main(["--parts", "s,t", "--flows", "1000", "--rounds", "2", "--round-frames",
                    "5000", "--max-reruns", "0", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["rounds"] == 2 and "katran" not in data
    assert data["placement_s_t"]["generator"].startswith(f"CPU {GEN_CPU}")
    assert [(r["family"], r["flows"]) for r in data["part_s"]] == [(4, 1000), (6, 1000)]
    for r in data["part_s"]:
        assert set(r["programs"]) == {"stub", "lru", "lru_bypass", *bx.STATELESS_KINDS}
        assert "to_katran" not in r["ratios"]
        for label, ratio in r["ratios"]["to_stub"].items():
            assert ratio["n"] == 2 and ratio["q1"] <= ratio["median"] <= ratio["q3"]
            assert ratio["median"] > 0 and ratio["best"] > 0
        for p in r["programs"].values():
            assert len(p["runs"]) == 2 and p["delivered_all"]
            assert p["gen_cpus"] == p["bal_cpus"] == p["sink_cpus"] == [GEN_CPU]
        assert r["programs"]["lru"]["lru_hit_ratio"] == 1.0
        assert r["programs"]["gue_lru"]["lru_hit_ratio"] == 1.0
        assert r["programs"]["stateless"]["lru_hit_ratio"] is None  # no connection table
    for r in data["part_t"]:
        assert set(r["stages"]) == set(xc.STAGES)
        assert r["added_ns"]["median"] > 0 and r["stub_ns"] > 0
        assert all(d["n"] == 2 for d in r["stages"].values())
    assert (tmp_path / "xdp_mpps.png").stat().st_size > 0
    assert (tmp_path / "xdp_stages.png").stat().st_size > 0
    # the separate entry point draws the same charts from the JSON
    (tmp_path / "again").mkdir()
    assert charts.main([str(out), "--out", str(tmp_path / "again")]) == 0
    assert {p.name for p in (tmp_path / "again").iterdir()} == {"xdp_mpps.png", "xdp_stages.png"}
    assert not _left_behind()


@pytest.mark.root
@pytest.mark.bpf
def test_side_by_side_stateless_modes_send_hop_lists(xb) -> None:
    """Part s's stateless programs: no connection table, and the VIP with a previous ring
    sends hop lists for the flows whose real changed (~1%)."""
    from bench import xdp_compare as xc

    sl = xb.stateless_balancer()
    before = sl.read_stats().counters
    rows = xc.part_s(xb, [4], [1000], rounds=1, frames=5_000)
    after = sl.read_stats().counters
    progs = rows[0]["programs"]
    assert progs["stateless"]["delivered_all"] and progs["stateless_prev"]["delivered_all"]
    assert progs["stateless"]["lru_hit_ratio"] is None
    hop = after["hoplist_sent"] - before["hoplist_sent"]
    assert 0 < hop < (after["tx_encap"] - before["tx_encap"]) / 20


@pytest.mark.root
@pytest.mark.bpf
def test_stage_variants_stop_after_their_stage(xb) -> None:
    """-DLB_STOP_AFTER_STAGE=n (part t) sends the frame back unchanged after stage n;
    the shipped program encapsulates it. Counters show how far each variant got."""
    from bench import xdp_compare as xc
    from lb.kernel.testrun import test_run

    variants = xc.stage_variants(xb)
    try:
        frame = bx.template(4, bx.SRC[4], bx.VIPS[(4, "lru")], bx.STUB_SRC_MAC, bytes(6))
        for n, bal in variants.items():
            r = test_run(bal.prog_fd, frame)
            assert r.action == 3 and r.output == frame, n  # XDP_TX, not encapsulated
            c = bal.read_stats().counters
            assert c["tx_encap"] == 1  # the outcome the variants count
            assert c["lru_miss"] == (1 if n >= 3 else 0), n  # stage 3 looked the flow up
        assert len(test_run(xb.bal.prog_fd, frame).output) == len(frame) + 20  # IPIP
    finally:
        for bal in variants.values():
            bal.close()


KATRAN_ENV = "LB_BENCH_KATRAN"


@pytest.mark.root
@pytest.mark.bpf
@pytest.mark.netns
@pytest.mark.slow
@pytest.mark.external("a Katran source tree ($LB_BENCH_KATRAN)")
@pytest.mark.skipif(not os.environ.get(KATRAN_ENV),
                    reason=f"no Katran source tree: set {KATRAN_ENV} to a Katran checkout or git "
                           "dir to build and measure Katran's balancer")
def test_katran_side_by_side(xb) -> None:
    """Katran's balancer (a tree or git dir named by $LB_BENCH_KATRAN) built, loaded and
    measured beside ours; its pin directory is gone afterwards."""
    src = os.environ[KATRAN_ENV]
    from bench import xdp_compare as xc
    from bench.katran import load_katran
    from lb.datapath_tables import compile_tables

    tables = compile_tables(bx.bench_config("02:00:00:00:00:01", xb.conn_table_size))
    katran, info = load_katran(src, tables, "02:00:00:00:00:01", xb.conn_table_size)
    try:
        assert info["revision"] and katran.prog_info()["name"].startswith("balancer_ingres")
        rows = xc.part_s(xb, [4, 6], [1000], rounds=2, frames=5_000, katran=katran)
        budget = xc.part_k(xb, [4], [1000], rounds=2, frames=100_000, katran=katran)
    finally:
        katran.close()
    (b,) = budget  # part (k): every program's own ns per packet, and the harness's
    assert b["packets"] == {"katran": 200_000, "ours": 200_000, "ours stateless": 200_000}
    assert b["harness_ns"] > 0
    assert b["programs"]["katran"]["program_ns"] > 0 and b["programs"]["katran"]["map_helpers_ns"] > 0
    assert b["programs"]["ours"]["ns"] > 0 and b["programs"]["ours stateless"]["ns"] > 0
    assert b["needed_ns"]["1.25x"] < b["programs"]["katran"]["ns"]
    assert not os.path.exists(katran.pin_dir)
    for r in rows:
        k = r["programs"]["katran"]
        assert k["lru_hit_ratio"] == 1.0 and k["bal_cpus"] == [GEN_CPU] and k["delivered_all"]
        assert r["programs"]["katran_lru_bypass"]["lru_hit_ratio"] is None
        assert set(r["ratios"]["to_katran"]) == {"stub", "katran_lru_bypass", "lru", "lru_bypass",
                                                 *bx.STATELESS_KINDS}


# --- the TRex profile ------------------------------------------------------------------------


def test_trex_profile_imports_without_trex() -> None:
    """The profile module imports whether or not TRex's library is there, and says which."""
    tp = importlib.import_module("bench.trex_profile")
    try:
        importlib.import_module("trex_stl_lib.api")
        present = True
    except ImportError:
        present = False
    assert tp.HAVE_TREX is present
    if not present:
        print("trex_stl_lib is not installed: bench/trex_profile.py imports; streams not built")
        with pytest.raises(RuntimeError, match="trex_stl_lib"):
            tp.build_stream(tp.flow_mix())
    # the flow mixes themselves are plain Python
    m = tp.flow_mix(4, "tcp", 1_000_000)
    assert (m.addresses, m.ports, m.addresses * m.ports) == (16, 62_500, 1_000_000)
    m6 = tp.flow_mix(6, "udp", 100_000, "lru_bypass")
    assert m6.addresses * m6.ports == 100_000 and m6.dst == "2001:db8:200::2"
    assert tp.flow_mix(4, "tcp", 1).ports == 1
    with pytest.raises(ValueError):
        tp.flow_mix(6, "tcp", 10, size=64)  # IPv6 TCP needs 74 bytes


@pytest.mark.external("TRex's trex_stl_lib")
def test_trex_profile_builds_streams() -> None:
    tp = importlib.import_module("bench.trex_profile")
    if not tp.HAVE_TREX:
        pytest.skip("trex_stl_lib is not installed (it ships with TRex): profile imported, "
                    "streams not built")
    prof = tp.register()
    for family in (4, 6):
        for proto in ("tcp", "udp"):
            for flows in (1, 1000, 1_000_000):
                size = 74 if (family, proto) == (6, "tcp") else 64
                streams = prof.get_streams(tunables=["--family", str(family), "--proto", proto,
                                                     "--flows", str(flows), "--size", str(size)])
                assert len(streams) == 1
    # older TRex: -t values as keyword arguments
    assert len(prof.get_streams(family=6, flows=100000, proto="udp")) == 1

