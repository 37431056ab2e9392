"""Part (k) of bench_xdp: the per-packet budget, program by program.

The side-by-side ratios of part (s) compare whole paths: generator, program, veth, sink.
This part splits them. The programs run in interleaved rounds on one CPU under a single
``perf record -e cpu-clock``; each sample is charged to the program whose code it is in:
ours by the address range of its JITed image (two balancers may both be called
balancer_xdp), Katran's by its symbol plus the kernel's hash-map code it calls (its VIP
and connection-table lookups are helper calls; ours call none). Everything else on the
CPU is the harness, shared by all (bpf_xdp_adjust_head too: both programs call it once a
packet, for the same work). Divided by the packets each program got, that is ns
per packet: what Katran's program costs, what ours costs, and what the harness adds to
every ratio. From them, the cost our program would need for a target ratio r over Katran:
(harness + Katran) / r - harness.
"""

from __future__ import annotations

import collections
import os
import subprocess
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from lb.kernel.progs import prog_info, prog_jited_lines

HZ = 5000  # samples per second
# kernel functions behind Katran's map lookups (htab and LRU code, key compare)
KATRAN_HELPER_SYMBOLS = ("htab_", "lookup_nulls_elem_raw", "lookup_elem_raw", "memcmp", "bpf_lru_",
                         "__bpf_lru", "jhash")


def _ranges(progs: Sequence[Any]) -> dict[str, tuple[int, int]]:
    out = {}
    for p in progs:
        if p.bal is None:
            continue
        lines = prog_jited_lines(p.fd)
        if lines:
            start = lines[0][0]
            out[p.label] = (start, start + int(prog_info(p.fd)["jited_bytes"]))
    return out


def program_budget(xb: Any, bed: Any, progs: Sequence[Any], family: int, flows: int,
                   rounds: int, frames: int, katran_label: str = "katran") -> dict[str, Any]:
    """Interleaved rounds of ``progs`` (bench_xdp.Program; tables warm) under one perf
    record on the generator CPU; ns per packet of each program's own code and of the
    harness (median-free: totals over all rounds)."""
    ranges = _ranges(progs)
    packets: collections.Counter[str] = collections.Counter()
    with tempfile.TemporaryDirectory(prefix="lbbudget") as d:
        data = os.path.join(d, "perf.data")
        rec = subprocess.Popen(["perf", "record", "-q", "-e", "cpu-clock", "-F", str(HZ),
                                "-C", str(xb.gen_cpu), "-o", data],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(1.0)  # perf needs a moment before it samples
            t0 = time.monotonic()
            for r in range(rounds):
                k = r % len(progs)
                for p in list(progs[k:]) + list(progs[:k]):
                    n, _, _, _ = xb._generate(bed, p, family, flows, frames, tail=True)
                    packets[p.label] += n
            seconds = time.monotonic() - t0
        finally:
            rec.send_signal(2)
            rec.wait(timeout=60)
        out = subprocess.run(["perf", "script", "-i", data, "-F", "pid,ip,sym"],
                             capture_output=True, text=True, check=True).stdout
    me = os.getpid()
    samples: collections.Counter[str] = collections.Counter()
    other = 0
    for line in out.splitlines():
        parts = line.split()
        if len(parts) < 2:
            continue
        if int(parts[0]) != me:  # idle, other processes on the CPU: not the harness
            other += 1
            continue
        ip, sym = int(parts[1], 16), parts[2] if len(parts) > 2 else ""
        owner = next((label for label, (lo, hi) in ranges.items() if lo <= ip < hi), None)
        if owner is None and sym.endswith("_balancer_ingress"):
            owner = katran_label
        elif owner is None and sym.startswith(KATRAN_HELPER_SYMBOLS) and katran_label in packets:
            owner = katran_label + " (map helpers)"
        samples[owner or "harness"] += 1
    ns = 1e9 / HZ
    total = sum(packets.values())
    res: dict[str, Any] = {"family": family, "flows": flows, "rounds": rounds,
                           "frames_per_round": frames, "seconds": seconds, "packets": dict(packets),
                           "samples_other_processes": other,
                           "harness_ns": samples["harness"] * ns / total if total else None,
                           "programs": {}}
    for p in progs:
        n = packets[p.label]
        own = samples[p.label] * ns / n if n else None
        entry = {"ns": own}
        if p.label == katran_label:
            helpers = samples[katran_label + " (map helpers)"] * ns / n if n else None
            entry = {"program_ns": own, "map_helpers_ns": helpers,
                     "ns": (own or 0) + (helpers or 0)}
        res["programs"][p.label] = entry
    kat = res["programs"].get(katran_label)
    if kat and res["harness_ns"] is not None:
        h, k = res["harness_ns"], kat["ns"]
        res["needed_ns"] = {f"{r:g}x": (h + k) / r - h for r in (1.15, 1.25, 1.4)}
    return res


__all__ = ["program_budget"]
