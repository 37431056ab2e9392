"""Time one Maglev ring build (M = RING_SIZE) for 10, 100, 1000 reals: numba vs naive.

Run: ``.venv/bin/python -m bench.bench_maglev [--json PATH]``. The process pins itself
to one CPU (the last one it may use) so runs compare; the numba builder is timed after a
warm-up call, best and median of ``--runs``; the pure-Python reference of
``lb.maglev_reference`` best and median of ``--ref-runs``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numba
import numpy as np
from rich.console import Console
from rich.table import Table

from bench.common import cpu_model
from lb.constants import RING_SIZE
from lb.hashing import endpoint_hash
from lb.maglev import HASH_FUNCTIONS, build_ring
from lb.maglev_reference import ring_ref

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "maglev.json"
SIZES = (10, 100, 1000)


def pin_one_cpu() -> int:
    """Pin this process to the last CPU it may run on; returns that CPU."""
    cpu = max(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    return cpu




def timings(fn: Callable[[], object], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def reals(n: int, seed: int = 0) -> tuple[list[str], np.ndarray, np.ndarray]:
    """n addresses (half IPv4, half IPv6), weights 1..100, ids 1..n."""
    rng = np.random.default_rng(seed)
    addrs = [f"10.{i >> 8 & 255}.{i & 255}.1" if i % 2 else f"fc00::{i:x}" for i in range(n)]
    return addrs, rng.integers(1, 101, n).astype(np.uint32), np.arange(1, n + 1, dtype=np.uint32)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write results")
    ap.add_argument("--runs", type=int, default=20, help="numba runs per case")
    ap.add_argument("--ref-runs", type=int, default=3, help="reference runs per case")
    args = ap.parse_args(argv)

    cpu = pin_one_cpu()
    console = Console(width=max(110, shutil.get_terminal_size().columns))  # never truncate
    console.print(f"CPU: {cpu_model()}; pinned to CPU {cpu} (sched_setaffinity)")
    t0 = time.perf_counter()
    build_ring(np.array([1, 2], np.uint64), np.ones(2, np.uint32), np.array([1, 2], np.uint32), 13, 2)
    first_call_ms = (time.perf_counter() - t0) * 1e3
    console.print(f"first build_ring call (JIT compile or cache load): {first_call_ms:.0f} ms")

    rows = []
    for n in SIZES:
        addrs, weights, ids = reals(n)
        t0 = time.perf_counter()
        hashes = np.array([endpoint_hash(a) for a in addrs], np.uint64)
        hash_ms = (time.perf_counter() - t0) * 1e3
        triples = list(zip(hashes.tolist(), weights.tolist(), ids.tolist(), strict=True))
        for name, version in HASH_FUNCTIONS.items():
            ring = build_ring(hashes, weights, ids, RING_SIZE, version)  # warm-up
            fast = timings(lambda: build_ring(hashes, weights, ids, RING_SIZE, version), args.runs)
            slow = timings(lambda: ring_ref(triples, RING_SIZE, version), args.ref_runs)
            assert ring.tolist() == ring_ref(triples, RING_SIZE, version)
            rows.append({
                "reals": n,
                "hash": name,
                "numba_best_ms": min(fast) * 1e3,
                "numba_median_ms": statistics.median(fast) * 1e3,
                "reference_best_ms": min(slow) * 1e3,
                "reference_median_ms": statistics.median(slow) * 1e3,
                "speedup_median": statistics.median(slow) / statistics.median(fast),
                "endpoint_hash_ms": hash_ms,
            })  # fmt: skip

    table = Table(title=f"Maglev ring build, M = {RING_SIZE}")
    for col in ("reals", "hash", "numba best", "numba median", "naive best", "naive median",
                "speedup", "endpoint hashes"):  # fmt: skip
        table.add_column(col, justify="right", no_wrap=True)
    for r in rows:
        table.add_row(
            str(r["reals"]), r["hash"],
            f"{r['numba_best_ms']:.2f} ms", f"{r['numba_median_ms']:.2f} ms",
            f"{r['reference_best_ms']:.0f} ms", f"{r['reference_median_ms']:.0f} ms",
            f"{r['speedup_median']:.0f}x", f"{r['endpoint_hash_ms']:.1f} ms",
        )  # fmt: skip
    console.print(table)

    result = {
        "benchmark": "maglev_ring_build",
        "ring_size": RING_SIZE,
        "cpu_model": cpu_model(),
        "pinned_cpu": cpu,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "numba_runs": args.runs,
        "reference_runs": args.ref_runs,
        "first_call_ms": first_call_ms,
        "results": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
