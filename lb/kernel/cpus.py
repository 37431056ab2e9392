"""How many CPUs the kernel sizes per-CPU values for."""

from __future__ import annotations

from pathlib import Path


def possible_cpus() -> int:
    """Number of possible CPUs: the length of every per-CPU value the kernel returns."""
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n += (int(hi) if hi else int(lo)) - int(lo) + 1
    return n
