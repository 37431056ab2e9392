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
                        conn_table_size=1 << 18, percpu_maps=True, max_reruns=0,
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
def test_part_d_conn_table_layouts(xb) -> None:
    (r,) = bx.part_d(xb, [6], [1000])
    for k in ("no_common_lru", "percpu_maps"):
        assert r[k]["lru_hit_ratio"] == 1.0 and r[k]["mpps"] > 0
    assert r["percpu_over_no_common"] > 0
    # the per-CPU layout really is one LRU_HASH per CPU; each cell leaves the tables empty
    assert len(xb.bal_pcm.conn_table_fds()) == xb.bal_pcm.ncpus
    for bal in (xb.bal, xb.bal_pcm):
        assert len(bal.conn_table_entries()[0]) == 0


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
    assert [p["program"] for p in prof["profiles"]] == ["stub", "lru"]
    for p in prof["profiles"]:
        assert p["kernel_mpps_under_perf"] > 0
        if p["top"] is not None:  # perf installed
            assert all(0 <= pct <= 100 for pct, _ in p["top"])


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

