"""PNG charts from bench/bench_xdp.py's JSON (matplotlib, Agg backend).

* ``xdp_mpps.png`` (part s): median Mpps against flow count for the no-balancer stub,
  Katran (when it ran) and ours in each mode, IPv4 and IPv6 panels; bars span the
  interquartile range of the rounds.
* ``xdp_stages.png`` (part t): ns per packet by stage (parse, VIP lookup, connection
  table, ring, encap), stacked, for the LRU path (connection-table hit) and the
  lru_bypass path (ring), per family and flow count.

Run: ``python -m bench.charts bench/results/xdp.json [--out DIR]`` (bench_xdp writes
them itself, beside its JSON).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.ratios import quartiles

STAGE_COLOURS = {"parse": "#4c72b0", "vip_lookup": "#55a868", "conn_table": "#c44e52",
                 "ring": "#8172b2", "encap": "#ccb974"}
STAGE_NAMES = {"parse": "parse", "vip_lookup": "VIP lookup", "conn_table": "connection table",
               "ring": "ring", "encap": "encap"}
PATHS = {"LRU VIP (hit)": ("parse", "vip_lookup", "conn_table", "encap"),
         "lru_bypass VIP": ("parse", "vip_lookup", "ring", "encap")}
# program -> (colour, line style, marker)
STYLES = {"stub": ("black", "--", "o"), "katran": ("#d62728", "-", "s"),
          "katran_lru_bypass": ("#ff7f0e", ":", "D"), "lru": ("#1f77b4", "-", "^"),
          "lru_bypass": ("#17becf", ":", "v"), "percpu_maps": ("#2ca02c", "-.", "P")}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _flows_label(n: int) -> str:
    return f"{n // 1_000_000}M" if n >= 1_000_000 and n % 1_000_000 == 0 else (
        f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n))


def mpps_chart(rows: list[dict[str, Any]], path: Path) -> Path:
    """Median Mpps (IQR bars) against flow count, one panel per family."""
    plt = _pyplot()
    families = sorted({r["family"] for r in rows})
    fig, axes = plt.subplots(1, len(families), figsize=(6.5 * len(families), 4.8), squeeze=False,
                             sharey=True)
    for ax, family in zip(axes[0], families):
        fam_rows = sorted((r for r in rows if r["family"] == family), key=lambda r: r["flows"])
        labels = list(dict.fromkeys(lbl for r in fam_rows for lbl in r["programs"]))
        for i, label in enumerate(labels):
            # programs side by side around each flow count, so equal values stay visible
            shift = 1 + 0.04 * (i - (len(labels) - 1) / 2)
            xs, med, lo, hi, name = [], [], [], [], label
            for r in fam_rows:
                p = r["programs"].get(label)
                if p is None:
                    continue
                q1, q2, q3 = quartiles([x["kernel_mpps"] for x in p["runs"]])
                xs.append(r["flows"] * shift)
                med.append(q2)
                lo.append(q2 - q1)
                hi.append(q3 - q2)
                name = p["name"]
            colour, style, marker = STYLES.get(label, (None, "-", "o"))
            ax.errorbar(xs, med, yerr=[lo, hi], label=name, color=colour, linestyle=style,
                        marker=marker, capsize=3)
        flows = [r["flows"] for r in fam_rows]
        ax.set_xscale("log")
        ax.set_xticks(flows, [_flows_label(f) for f in flows])
        ax.minorticks_off()
        ax.set_xlim(min(flows) / 1.6, max(flows) * 1.6)
        ax.set_xlabel("flows")
        ax.set_title(f"IPv{family}, {fam_rows[0]['frame_bytes']}-byte TCP frames")
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
    axes[0][0].set_ylabel("Mpps (median of rounds, IQR bars)")
    handles: dict[str, Any] = {}
    for ax in axes[0]:
        for h, lbl in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lbl, h)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=len(handles), fontsize=8)
    r0 = rows[0]
    fig.suptitle(f"XDP, one CPU (generator, program, sink): {r0['rounds']} interleaved rounds "
                 f"of {r0['frames_per_round']:,}+ frames; Mpps = frames / kernel run time",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def stage_chart(rows: list[dict[str, Any]], path: Path) -> Path:
    """Stacked ns per packet by stage, one bar per (family, flows, path)."""
    plt = _pyplot()
    bars = [(r, name, stages) for r in sorted(rows, key=lambda r: (r["family"], r["flows"]))
            for name, stages in PATHS.items()]
    fig, ax = plt.subplots(figsize=(max(7.0, 1.3 * len(bars)), 5.0))
    for i, (r, name, stages) in enumerate(bars):
        bottom = 0.0
        for s in stages:
            ns = max(0.0, r["stages"][s]["median"])  # a stage within noise can come out < 0
            ax.bar(i, ns, bottom=bottom, color=STAGE_COLOURS[s], edgecolor="white")
            if ns >= 8:
                ax.text(i, bottom + ns / 2, f"{ns:.0f}", ha="center", va="center", fontsize=7,
                        color="white")
            bottom += ns
        ax.text(i, bottom + 1, f"{bottom:.0f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(bars)), [f"IPv{r['family']} {_flows_label(r['flows'])}\n{name}"
                                     for r, name, _ in bars], fontsize=8)
    ax.set_ylabel("ns per packet (median of per-round differences)")
    stub = ", ".join(f"IPv{r['family']} {_flows_label(r['flows'])} {r['stub_ns']:.0f}" for r in rows)
    ax.set_title("Balancer cost by stage: variants stopping after each stage, paired rounds\n"
                 f"(harness without balancer, ns/packet: {stub})", fontsize=9)
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=STAGE_COLOURS[s], label=STAGE_NAMES[s]) for s in STAGE_COLOURS],
              fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_charts(data: dict[str, Any], out_dir: Path) -> list[Path]:
    """The charts ``data`` (bench_xdp's JSON) has the parts for, written into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if data.get("part_s"):
        written.append(mpps_chart(data["part_s"], out_dir / "xdp_mpps.png"))
    if data.get("part_t"):
        written.append(stage_chart(data["part_t"], out_dir / "xdp_stages.png"))
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", type=Path, help="bench_xdp's JSON")
    ap.add_argument("--out", type=Path, default=None, help="where the PNG files go (default: beside the JSON)")
    args = ap.parse_args(argv)
    written = write_charts(json.loads(args.json.read_text()), args.out or args.json.parent)
    for p in written:
        print(f"wrote {p}")
    if not written:
        print(f"{args.json} has no part s or t: no chart")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
