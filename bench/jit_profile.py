"""Where a BPF program's time goes, source line by source line.

``perf record -e cpu-clock`` samples the CPU the program runs on; a sample inside the
program's JITed code is mapped to the last line-info record at or before its address
(lb.kernel.progs.prog_jited_lines), whose instruction is found in the translated dump
(``bpftool prog dump xlated id N linum``) under its source line. Divided by the packets
sent while sampling, that gives ns per packet per source line. A stalled load is charged
to itself (the sample lands on the instruction that waits), so a cache or TLB miss shows
as the line that reads the memory.
"""

from __future__ import annotations

import bisect
import collections
import re
import subprocess
from typing import Any

from lb.kernel.progs import prog_info, prog_jited_lines

_SRC = re.compile(r"^; (?P<text>.*?) \[file:(?P<file>[^ ]*) line_num:(?P<line>\d+)")
_INSN = re.compile(r"^\s*(\d+):")


def xlated_sources(prog_id: int) -> dict[int, tuple[str, str]]:
    """BPF instruction index -> (file:line, source text) of the line it belongs to."""
    out = subprocess.run(["bpftool", "prog", "dump", "xlated", "id", str(prog_id), "linum"],
                         capture_output=True, text=True, check=True).stdout
    src: dict[int, tuple[str, str]] = {}
    cur = ("?", "")
    for line in out.splitlines():
        m = _SRC.match(line)
        if m:
            cur = (f"{m['file'].rsplit('/', 1)[-1]}:{m['line']}", m["text"].strip())
            continue
        m = _INSN.match(line)
        if m:
            src[int(m.group(1))] = cur
    return src


def line_profile(perf_data: str, prog_fd: int, packets: int, sample_hz: int,
                 top: int = 25) -> dict[str, Any] | None:
    """ns per packet of program ``prog_fd`` in total and by source line (the ``top``
    costliest), from ``perf_data`` sampled at ``sample_hz`` while ``packets`` went
    through it. None when the program has no line info or no sample."""
    info = prog_info(prog_fd)
    lines = prog_jited_lines(prog_fd)
    if not lines or not packets:
        return None
    # the kernel names a JITed program bpf_prog_<tag>_<name>: samples are matched by the
    # name and then by address (another program of the same name lies elsewhere)
    addrs = [a for a, _ in lines]
    src = xlated_sources(int(info["id"]))
    out = subprocess.run(["perf", "script", "-i", perf_data, "-F", "ip,sym"],
                         capture_output=True, text=True, check=True).stdout
    symbol = f"_{info['name']}"
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    total = 0
    lo, hi = addrs[0], addrs[0] + int(info["jited_bytes"])
    for line in out.splitlines():
        parts = line.split()
        if len(parts) < 2 or not parts[1].startswith("bpf_prog_") or not parts[1].endswith(symbol):
            continue
        ip = int(parts[0], 16)
        if not lo <= ip < hi:
            continue
        total += 1
        k = bisect.bisect_right(addrs, ip) - 1
        counts[src.get(lines[k][1], ("?", ""))] += 1
    if not total:
        return None
    ns = 1e9 / sample_hz / packets
    return {"program": info["name"], "samples": total, "ns_per_packet": total * ns,
            "lines": [{"line": where, "source": text, "ns": n * ns, "share": n / total}
                      for (where, text), n in counts.most_common(top)]}


__all__ = ["line_profile", "xlated_sources"]
