"""Naive pure-Python Maglev V1/V2 rings: the reference the numba builder is checked against.

Written straight from /work/shared/KATRAN_COMPAT.md ("Maglev permutation") with Python
ints, sharing no code with :mod:`lb.maglev` or :mod:`lb.hashing` (its own murmur), so a
bug in one is not silently repeated in the other. Slow on purpose: clarity over speed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

M32 = (1 << 32) - 1
M64 = (1 << 64) - 1


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & M64


def _fmix(k: int) -> int:
    k ^= k >> 33
    k = (k * 0xFF51AFD7ED558CCD) & M64
    k ^= k >> 33
    k = (k * 0xC4CEB9FE1A85EC53) & M64
    return k ^ (k >> 33)


def murmur_ref(a: int, b: int, seed: int) -> int:
    """One MurmurHash3_x64_128 block over two u64, halves summed (Katran)."""
    c1, c2 = 0x87C37B91114253D5, 0x4CF5AD432745937F
    h1 = h2 = seed
    h1 ^= (_rotl((a * c1) & M64, 31) * c2) & M64
    h1 = (_rotl(h1, 27) + h2) & M64
    h1 = (h1 * 5 + 0x52DCE729) & M64
    h2 ^= (_rotl((b * c2) & M64, 33) * c1) & M64
    h2 = (_rotl(h2, 31) + h1) & M64
    h2 = (h2 * 5 + 0x38495AB5) & M64
    h1 ^= 16
    h2 ^= 16
    h1 = (h1 + h2) & M64
    h2 = (h2 + h1) & M64
    return (_fmix(h1) + _fmix(h2)) & M64


def preferences(h: int, m: int) -> Iterator[int]:
    """An endpoint's slot preferences, j = 0, 1, ... (u32 wrap before the modulo)."""
    offset = murmur_ref(h, 42, 0) % m
    skip = murmur_ref(h, 2718281828, 2307) % (m - 1) + 1
    j = 0
    while True:
        yield ((offset + j * skip) & M32) % m
        j = (j + 1) & M32  # Katran's next[] is a u32


def ring_ref(endpoints: Sequence[tuple[int, int, int]], m: int, version: int) -> list[int]:
    """Ring of ``m`` real ids from (hash, weight, id) triples; version 1 or 2."""
    # Ascending endpoint hash; the id breaks ties so input order never matters.
    eps = sorted(((h, w, i) for h, w, i in endpoints if w > 0), key=lambda e: (e[0], e[2]))
    if not eps:
        return [0] * m
    if len(eps) == 1:
        return [eps[0][2]] * m
    ring: list[int | None] = [None] * m
    prefs = [preferences(h, m) for h, _, _ in eps]
    filled = 0

    def place(i: int) -> bool:
        """Endpoint i takes its next free preferred slot; True when the ring is full."""
        nonlocal filled
        slot = next(prefs[i])
        while ring[slot] is not None:
            slot = next(prefs[i])
        ring[slot] = eps[i][2]
        filled += 1
        return filled == m

    if version == 1:
        first = True
        while True:
            for i, (_, w, _) in enumerate(eps):
                for _ in range(w if first else 1):
                    if place(i):
                        return ring  # type: ignore[return-value]
            first = False
    if version == 2:
        wmax = max(w for _, w, _ in eps)
        cum = [0] * len(eps)
        while True:
            for i, (_, w, _) in enumerate(eps):
                cum[i] = (cum[i] + w) & M32  # u32, as in Katran
                if cum[i] >= wmax:
                    cum[i] -= wmax
                    if place(i):
                        return ring  # type: ignore[return-value]
    raise ValueError(f"unknown Maglev version {version}")
