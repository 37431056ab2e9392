"""Parts (s) and (t) of bench/bench_xdp.py: programs side by side in interleaved rounds.

(s) side by side: the no-balancer stub, Katran's balancer (``--katran DIR``, see
    bench/katran.py: its VIP flag LRU bypass as a second program) and the project's
    balancer in each mode (default LRU VIP, lru_bypass VIP; and on a second balancer with
    encap gue, which stateless VIPs need: a default LRU VIP, a stateless VIP, and a
    stateless VIP with a previous ring, ~1% of its flows sent with a hop list) in harness
    (a) (generator -> tail call -> program -> XDP_TX -> veth -> sink, sink NAPI in
    softirq: generator, program and sink on --gen-cpu). Short runs
    (--round-frames, 300k) of every program one after the other make a round; after a
    warm-up pass that fills the connection tables, --rounds (15) rounds are measured.
    Reported per program: median and best Mpps (frames / the kernel's run time), and
    its per-round ratios to the stub and to Katran (bench/ratios.py: median, IQR, the
    ratio of the best rounds).

(t) stage costs: variants of the project's balancer compiled with
    -DLB_STOP_AFTER_STAGE=n (xdp/balancer.c) end each frame with XDP_TX after stage n,
    measured in the same rounds as the stub and the full program; a stage's cost is
    the per-round difference of ns/packet between two variants (median, IQR):
    parse = stage 1 - stub, VIP lookup = 2 - 1, connection table = 3 - 2 (LRU VIP,
    every lookup a hit), ring = 4 - 2 on the lru_bypass VIP (hash, ring and real
    lookups), encap = full - 3 (LRU VIP: the rest, encapsulation and counters).
    "parse" also holds the balancer's entry and exit (two counter updates) minus the
    stub's output stage.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from bench import bench_xdp as bx
from bench.budget import program_budget
from bench.katran import KatranBalancer, load_katran
from bench.ratios import paired_differences, paired_ratios
from lb.datapath_tables import compile_tables

SIDE_FLOWS = (1_000, 10_000, 100_000, 1_000_000)
STAGE_FLOWS = (1_000, 100_000)
ROUNDS = 15
ROUND_FRAMES = 300_000
LABELS = {"stub": "no balancer", "katran": "Katran", "katran_lru_bypass": "Katran lru_bypass",
          "lru": "ours (default)", "lru_bypass": "ours lru_bypass", "gue_lru": "ours GUE (default)",
          "stateless": "ours stateless", "stateless_prev": "ours stateless, previous ring"}
STAGES = ("parse", "vip_lookup", "conn_table", "ring", "encap")
# stage -> (program, base program) of part t
STAGE_PAIRS = {"parse": ("s1", "stub"), "vip_lookup": ("s2", "s1"), "conn_table": ("s3", "s2"),
               "ring": ("s4_bypass", "s2_bypass"), "encap": ("full", "s3")}
SMALL_CONN_TABLE = 1 << 12  # variants that never touch the connection table


def vip_num(family: int, kind: str) -> int:
    """The VIP number of VIPS[(family, kind)]: bench_config lists the VIPs in that order."""
    return list(bx.VIPS).index((family, kind))


def placement(gen_cpu: int) -> dict[str, str]:
    """Where parts (s) and (t) run: everything on the generator's CPU."""
    return {"generator": f"CPU {gen_cpu} (pinned thread)",
            "program": f"CPU {gen_cpu} (tail call from the generator)",
            "sink": f"CPU {gen_cpu} (veth NAPI in softirq)"}


def _ns(runs: Sequence[bx.RunResult]) -> list[float]:
    return [1e3 / r.kernel_mpps for r in runs]


def _program_summary(label: str, runs: Sequence[bx.RunResult]) -> dict[str, Any]:
    kern = [r.kernel_mpps for r in runs]
    hits = sum(r.lru_hit for r in runs)
    looked = hits + sum(r.lru_miss for r in runs)
    bal_cpus = sorted({c for r in runs for c in r.bal_cpus})
    gen_cpus = sorted({c for r in runs for c in r.gen_cpus})
    return {"name": LABELS.get(label, label), "median_mpps": statistics.median(kern),
            "best_mpps": max(kern), "wall_median_mpps": statistics.median(r.mpps for r in runs),
            "lru_hit_ratio": hits / looked if looked else None,
            "gen_cpus": gen_cpus, "sink_cpus": sorted({c for r in runs for c in r.sink_cpus}),
            # the stub and Katran have no counter of ours: they run in the generator's tail call
            "bal_cpus": bal_cpus or gen_cpus,
            "bal_cpus_from": "balancer rx counter" if bal_cpus else "generator (tail call)",
            "delivered_all": all(r.delivered == r.packets for r in runs),
            "runs": [r.as_dict() for r in runs]}


def side_programs(xb: bx.XdpBench, stub_fd: int, family: int,
                  katran: KatranBalancer | None) -> list[bx.Program]:
    lru, bypass = bx.VIPS[(family, "lru")], bx.VIPS[(family, "lru_bypass")]
    progs = [bx.Program("stub", stub_fd, lru)]
    if katran is not None:
        progs += [bx.Program("katran", katran.prog_fd, lru),
                  bx.Program("katran_lru_bypass", katran.prog_fd, bypass)]
    progs += [bx.Program("lru", xb.bal.prog_fd, lru, xb.bal, True),
              bx.Program("lru_bypass", xb.bal.prog_fd, bypass, xb.bal)]
    # stateless VIPs need encap gue: a second balancer, with a GUE default VIP beside them
    sl = xb.stateless_balancer()
    progs += [bx.Program(k, sl.prog_fd, bx.STATELESS_VIPS[(family, k)], sl, k == "gue_lru")
              for k in bx.STATELESS_KINDS]
    return progs


def katran_check(xb: bx.XdpBench, bed: bx.Bed, katran: KatranBalancer, prog: bx.Program,
                 family: int, flows: int, count: int) -> dict[str, Any]:
    """One more run of a Katran program after the rounds (its LRU as they left it), read
    through Katran's own counters: the CPUs it ran on and its connection-table hit
    ratio (None for the LRU-bypass VIP)."""
    kind = "lru" if prog.dst == bx.VIPS[(family, "lru")] else "lru_bypass"
    num = vip_num(family, kind)
    f0, m0 = katran.vip_frames(num), katran.lru_misses()
    xb.run_once(bed, prog, family, flows, count)
    frames, misses = katran.vip_frames(num) - f0, katran.lru_misses() - m0
    total = int(frames.sum())
    return {"bal_cpus": [c for c, n in enumerate(frames) if n], "bal_cpus_from": "Katran's VIP counter",
            "lru_hit_ratio": (1 - misses / total if total else None) if kind == "lru" else None}


def side_row(cell: dict[str, Any], progs: Sequence[bx.Program], family: int, flows: int,
             rounds: int, frames: int) -> dict[str, Any]:
    runs = cell["runs"]
    programs = {p.label: _program_summary(p.label, runs[p.label]) for p in progs}
    row: dict[str, Any] = {"part": "s", "family": family, "flows": flows,
                           "frame_bytes": bx.frame_size(family), "rounds": rounds,
                           "frames_per_round": max(frames, flows), "metric": "kernel",
                           "programs": programs, "ratios": {}, "ratios_wall": {},
                           "load_before": cell["load_before"], "load_after": cell["load_after"],
                           "load_high": cell["load_high"], "reruns": cell["reruns"]}
    for base in ("stub", "katran"):
        if base not in runs:
            continue
        for key, get in (("ratios", lambda r: r.kernel_mpps), ("ratios_wall", lambda r: r.mpps)):
            b = [get(r) for r in runs[base]]
            row[key][f"to_{base}"] = {p.label: paired_ratios([get(r) for r in runs[p.label]], b)
                                      for p in progs if p.label != base}
    return row


def _fmt_ratio(r: dict[str, Any]) -> str:
    return f"x{r['median']:.2f} [{r['q1']:.2f}-{r['q3']:.2f}] best x{r['best']:.2f}"


def part_s(xb: bx.XdpBench, families: Sequence[int], flow_counts: Sequence[int],
           rounds: int = ROUNDS, frames: int = ROUND_FRAMES,
           katran: KatranBalancer | None = None) -> list[dict[str, Any]]:
    """(s) the stub, Katran (if given) and our modes in the same interleaved rounds."""
    rows = []
    with bx.Bed(xb.gen, False, xb.gen_cpu, xb.other_cpu) as bed:
        xb.set_gateway(bed.gateway_mac)
        if katran is not None:
            katran.set_gateway(bed.gateway_mac)
        stub_fd = xb.gen.configure_tx_stub(bed.b.mac_bytes)
        bed.set_mode("softirq")
        for family in families:
            for flows in flow_counts:
                progs = side_programs(xb, stub_fd, family, katran)
                if katran is not None:
                    katran.fresh_lrus()  # a fresh map per cell, as ours gets
                cell = xb.cell(bed, progs, family, flows, reps=rounds, count=frames)
                row = side_row(cell, progs, family, flows, rounds, frames)
                for p in progs:
                    if p.label.startswith("katran"):
                        row["programs"][p.label].update(
                            katran_check(xb, bed, katran, p, family, flows, row["frames_per_round"]))
                rows.append(row)
                _print_side(xb, row)
        xb.gen.detach_tail_call()
    return rows


def _print_side(xb: bx.XdpBench, row: dict[str, Any]) -> None:
    parts = []
    for label, s in row["programs"].items():
        text = f"{label} {s['median_mpps']:.2f} (best {s['best_mpps']:.2f})"
        for base in ("stub", "katran"):
            r = row["ratios"].get(f"to_{base}", {}).get(label)
            if r:
                text += f" {_fmt_ratio(r)} of {base}"
        parts.append(text)
    xb.console.print(f"  (s) v{row['family']} {row['flows']:>9,} flows, {row['rounds']} rounds: "
                     + "; ".join(parts) + f"; load {bx._load(row)}")


def table_s(rows: list[dict[str, Any]], gen_cpu: int) -> Table:
    t = Table(title="(s) side by side, interleaved rounds; generator, program and sink on CPU "
                    f"{gen_cpu}. Mpps: frames / the kernel's run time, median (best); ratios "
                    "per round: median [IQR]")
    for col in ("fam", "flows", "program", "Mpps", "best", "of no balancer", "of Katran",
                "LRU hit", "gen CPU", "prog CPU", "sink CPU", "load 1m"):
        t.add_column(col, justify="right", no_wrap=True)
    for r in rows:
        for label, s in r["programs"].items():
            to = {b: r["ratios"].get(f"to_{b}", {}).get(label) for b in ("stub", "katran")}
            t.add_row(f"v{r['family']}", f"{r['flows']:,}", s["name"], bx._f(s["median_mpps"]),
                      bx._f(s["best_mpps"]),
                      *(f"{x['median']:.2f} [{x['q1']:.2f}-{x['q3']:.2f}]" if x else "-"
                        for x in to.values()),
                      bx._f(s["lru_hit_ratio"], "{:.4f}"), bx._cpus(s["gen_cpus"]),
                      bx._cpus(s["bal_cpus"]), bx._cpus(s["sink_cpus"]), bx._load(r))
    return t


# ---------------------------------------------------------------------------------------
# (k) the per-packet budget, program by program (bench/budget.py)


def part_k(xb: bx.XdpBench, families: Sequence[int], flow_counts: Sequence[int], rounds: int,
           frames: int, katran: KatranBalancer) -> list[dict[str, Any]]:
    """(k) ns per packet of Katran's program (and its map helpers), ours (default and
    stateless VIPs) and the harness, from one perf record over interleaved rounds."""
    rows = []
    with bx.Bed(xb.gen, False, xb.gen_cpu, xb.other_cpu) as bed:
        xb.set_gateway(bed.gateway_mac)
        katran.set_gateway(bed.gateway_mac)
        xb.gen.configure_tx_stub(bed.b.mac_bytes)
        bed.set_mode("softirq")
        sl = xb.stateless_balancer()
        for family in families:
            for flows in flow_counts:
                lru = bx.VIPS[(family, "lru")]
                progs = [bx.Program("katran", katran.prog_fd, lru),
                         bx.Program("ours", xb.bal.prog_fd, lru, xb.bal, True),
                         bx.Program("ours stateless", sl.prog_fd, bx.STATELESS_VIPS[(family, "stateless")], sl)]
                katran.fresh_lrus()
                xb.warm(bed, progs, family, flows)
                row = program_budget(xb, bed, progs, family, flows, rounds, max(frames, flows))
                for p in progs:
                    if p.uses_lru:
                        p.bal.clear_conn_table()
                rows.append(row)
                pr = row["programs"]
                xb.console.print(
                    f"  (k) v{family} {flows:>9,} flows, ns per packet: harness {row['harness_ns']:.0f}, "
                    f"Katran {pr['katran']['ns']:.0f} (program {pr['katran']['program_ns']:.0f} + map "
                    f"helpers {pr['katran']['map_helpers_ns']:.0f}), ours {pr['ours']['ns']:.0f}, ours "
                    f"stateless {pr['ours stateless']['ns']:.0f}; ours would need " + ", ".join(
                        f"{v:.0f} for {k}" for k, v in row["needed_ns"].items()))
        xb.gen.detach_tail_call()
    return rows


# ---------------------------------------------------------------------------------------
# (t) stage costs


def stage_variants(xb: bx.XdpBench) -> dict[int, Any]:
    """The balancer compiled to stop after stage 1..4 (xdp/balancer.c)."""
    from lb.bpf_loader import XdpBalancer

    out: dict[int, Any] = {}
    try:
        for n in range(1, 5):
            size = xb.conn_table_size if n == 3 else SMALL_CONN_TABLE
            tables = compile_tables(bx.bench_config("02:00:00:00:00:01", size))
            out[n] = XdpBalancer.from_tables(tables, extra_cflags=[f"-DLB_STOP_AFTER_STAGE={n}"])
    except BaseException:
        for b in out.values():
            b.close()
        raise
    return out


def part_t(xb: bx.XdpBench, families: Sequence[int], flow_counts: Sequence[int],
           rounds: int = ROUNDS, frames: int = ROUND_FRAMES) -> list[dict[str, Any]]:
    """(t) what each stage of the balancer costs per packet (ns), paired rounds."""
    rows = []
    variants = stage_variants(xb)
    try:
        with bx.Bed(xb.gen, False, xb.gen_cpu, xb.other_cpu) as bed:
            for n, b in variants.items():
                b.load_tables(compile_tables(bx.bench_config(bed.gateway_mac, b.conn_table_size)))
            xb.set_gateway(bed.gateway_mac)
            stub_fd = xb.gen.configure_tx_stub(bed.b.mac_bytes)
            bed.set_mode("softirq")
            for family in families:
                lru, bypass = bx.VIPS[(family, "lru")], bx.VIPS[(family, "lru_bypass")]
                for flows in flow_counts:
                    v = variants
                    progs = [bx.Program("stub", stub_fd, lru),
                             bx.Program("s1", v[1].prog_fd, lru, v[1]),
                             bx.Program("s2", v[2].prog_fd, lru, v[2]),
                             bx.Program("s3", v[3].prog_fd, lru, v[3], True),
                             bx.Program("s2_bypass", v[2].prog_fd, bypass, v[2]),
                             bx.Program("s4_bypass", v[4].prog_fd, bypass, v[4]),
                             bx.Program("full", xb.bal.prog_fd, lru, xb.bal, True)]
                    cell = xb.cell(bed, progs, family, flows, reps=rounds, count=frames)
                    ns = {p.label: _ns(cell["runs"][p.label]) for p in progs}
                    row = {"part": "t", "family": family, "flows": flows,
                           "frame_bytes": bx.frame_size(family), "rounds": rounds,
                           "stages": {s: paired_differences(ns[a], ns[b])
                                      for s, (a, b) in STAGE_PAIRS.items()},
                           "stub_ns": statistics.median(ns["stub"]),
                           "added_ns": paired_differences(ns["full"], ns["stub"]),
                           "programs": {p.label: _program_summary(p.label, cell["runs"][p.label])
                                        for p in progs},
                           "load_before": cell["load_before"], "load_after": cell["load_after"],
                           "load_high": cell["load_high"], "reruns": cell["reruns"]}
                    rows.append(row)
                    xb.console.print(
                        f"  (t) v{family} {flows:>9,} flows: stub {row['stub_ns']:.0f} ns, " + ", ".join(
                            f"{s} {d['median']:+.1f} [{d['q1']:+.1f}..{d['q3']:+.1f}]"
                            for s, d in row["stages"].items())
                        + f" ns; full - stub {row['added_ns']['median']:.0f} ns; load {bx._load(row)}")
            xb.gen.detach_tail_call()
    finally:
        for b in variants.values():
            b.close()
    return rows


def table_t(rows: list[dict[str, Any]], gen_cpu: int) -> Table:
    t = Table(title=f"(t) ns per packet by stage (variants stopping after each stage), CPU "
                    f"{gen_cpu}; median of per-round differences [IQR]")
    for col in ("fam", "flows", "no-bal ns", *STAGES, "full - no-bal", "load 1m"):
        t.add_column(col, justify="right", no_wrap=True)
    for r in rows:
        t.add_row(f"v{r['family']}", f"{r['flows']:,}", f"{r['stub_ns']:.0f}",
                  *(f"{r['stages'][s]['median']:.1f} [{r['stages'][s]['q1']:.0f}..{r['stages'][s]['q3']:.0f}]"
                    for s in STAGES),
                  f"{r['added_ns']['median']:.0f}", bx._load(r))
    return t


def run_compare_parts(xb: bx.XdpBench, parts: set[str], flow_counts: Sequence[int], rounds: int,
                      round_frames: int, katran_src: Path | None,
                      data: dict[str, Any]) -> tuple[list, list]:
    """Parts (s) (with Katran's balancer loaded from ``katran_src`` when given; its
    build facts go into ``data["katran"]``), (k) (with Katran: ``data["part_k"]``) and
    (t)."""
    rows_s: list[dict[str, Any]] = []
    rows_t: list[dict[str, Any]] = []
    if "s" in parts:
        katran = None
        if katran_src is not None:
            tables = compile_tables(bx.bench_config("02:00:00:00:00:01", xb.conn_table_size))
            katran, info = load_katran(katran_src, tables, "02:00:00:00:00:01", xb.conn_table_size)
            data["katran"] = {**info, "prog": katran.prog_info(), "pin_dir": katran.pin_dir,
                              "lru_entries_per_cpu": xb.conn_table_size}
            xb.console.print(f"Katran {info['revision']} from {info['source']}: "
                             f"{data['katran']['prog']}, maps pinned in {katran.pin_dir}")
        try:
            rows_s = part_s(xb, bx.FAMILIES, flow_counts, rounds, round_frames, katran)
            if "k" in parts and katran is not None:
                data["part_k"] = part_k(xb, bx.FAMILIES, flow_counts, rounds, round_frames, katran)
        finally:
            if katran is not None:
                katran.close()
        xb.console.print(table_s(rows_s, xb.gen_cpu))
    if "t" in parts:
        if rows_s:
            xb.fresh_balancers()
        stage_flows = [f for f in flow_counts if f in STAGE_FLOWS] or list(flow_counts[:1])
        rows_t = part_t(xb, bx.FAMILIES, stage_flows, rounds, round_frames)
        xb.console.print(table_t(rows_t, xb.gen_cpu))
    return rows_s, rows_t


__all__ = ["run_compare_parts", "part_k", "part_s", "part_t", "table_s", "table_t", "placement", "side_row"]
