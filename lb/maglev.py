"""Katran-compatible Maglev rings, V1 ("maglev") and V2 ("maglev_v2").

The algorithm is Katran's (/work/shared/KATRAN_COMPAT.md, "Maglev permutation"); every
detail below (sort order, seeds, the u32 wrap, the u32 counters) feeds which real a flow
lands on and MUST NOT change. The numba core keeps one (offset, skip, next j) per
endpoint, so a build costs about M*ln(M) probes instead of M*N scans. Slot value 0 means
"no real" (real ids start at 1).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from functools import lru_cache

import numba
import numpy as np

from lb.constants import RING_SIZE
from lb.hashing import Address, endpoint_hash, murmur

MAGLEV_V1 = 1
MAGLEV_V2 = 2
HASH_FUNCTIONS = {"maglev": MAGLEV_V1, "maglev_v2": MAGLEV_V2}

# Katran's permutation seeds (kHashSeed0..3): offset = murmur(h, 42, 0),
# skip = murmur(h, 2718281828, 2307).
_OFFSET_B, _OFFSET_SEED = np.uint64(42), np.uint64(0)
_SKIP_B, _SKIP_SEED = np.uint64(2718281828), np.uint64(2307)
_U32 = np.uint64(0xFFFFFFFF)
_ONE = np.uint64(1)
MAX_RING_SIZE = 0xFFFFFFFF  # ring positions and Katran's next[] are u32


@numba.njit(cache=True)
def _permutations(hashes: np.ndarray, m: np.uint64) -> tuple[np.ndarray, np.ndarray]:
    """Per endpoint (offset, skip) of its preference list, both < m."""
    n = hashes.shape[0]
    offset = np.empty(n, np.uint64)
    skip = np.empty(n, np.uint64)
    for i in range(n):
        offset[i] = murmur(hashes[i], _OFFSET_B, _OFFSET_SEED) % m
        skip[i] = murmur(hashes[i], _SKIP_B, _SKIP_SEED) % (m - _ONE) + _ONE
    return offset, skip


@numba.njit(cache=True, inline="always")
def _place(ring, m, offset, skip, nxt, i, real_id) -> None:  # type: ignore[no-untyped-def]
    """Endpoint i takes the next free slot of its preference list."""
    j = nxt[i]
    while True:
        # Katran computes offset + j*skip in u32 and only then reduces mod m.
        slot = ((offset[i] + j * skip[i]) & _U32) % m
        j = (j + _ONE) & _U32
        if ring[slot] == 0:
            break
    ring[slot] = real_id
    nxt[i] = j


@numba.njit(cache=True)
def _build_ring(
    hashes: np.ndarray, weights: np.ndarray, ids: np.ndarray, ring_size: int, version: int
) -> np.ndarray:
    """Numba core: endpoints already filtered (weight > 0), sorted, ids != 0, ring_size > n."""
    n = hashes.shape[0]
    ring = np.zeros(ring_size, np.uint32)
    if n == 0:
        return ring
    if n == 1:
        ring[:] = ids[0]
        return ring
    m = np.uint64(ring_size)
    offset, skip = _permutations(hashes, m)
    nxt = np.zeros(n, np.uint64)
    runs = 0
    if version == 1:
        # First round: endpoint i places weight[i] slots; then one per endpoint per round.
        for i in range(n):
            for _ in range(weights[i]):
                _place(ring, m, offset, skip, nxt, i, ids[i])
                runs += 1
                if runs == ring_size:
                    return ring
        while True:
            for i in range(n):
                _place(ring, m, offset, skip, nxt, i, ids[i])
                runs += 1
                if runs == ring_size:
                    return ring
    else:
        # Proportional weights: a u32 credit per endpoint, spent max(w) per slot.
        wmax = np.uint64(weights.max())
        cum = np.zeros(n, np.uint64)
        while True:
            for i in range(n):
                cum[i] = (cum[i] + np.uint64(weights[i])) & _U32
                if cum[i] >= wmax:
                    cum[i] -= wmax
                    _place(ring, m, offset, skip, nxt, i, ids[i])
                    runs += 1
                    if runs == ring_size:
                        return ring
    return ring  # unreachable: both loops return once the ring is full


# --- validation and the Python API -----------------------------------------------------


@lru_cache(maxsize=64)
def is_prime(n: int) -> bool:
    """Trial division; ring sizes are checked once per configuration."""
    if n < 2:
        return False
    if n < 4:
        return True
    if n % 2 == 0 or n % 3 == 0:
        return False
    f = 5
    while f * f <= n:
        if n % f == 0 or n % (f + 2) == 0:
            return False
        f += 6
    return True


def _as_uint(values: object, dtype: type[np.unsignedinteger], name: str) -> np.ndarray:
    """1-D array of non-negative integers that fit ``dtype``, else ValueError."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional")
    if arr.size == 0:
        return arr.astype(dtype)
    if arr.dtype.kind not in "iu" and not (
        arr.dtype == object and all(isinstance(v, (int, np.integer)) for v in arr.tolist())
    ):
        raise ValueError(f"{name} must be integers, got {arr.dtype}")
    if int(arr.min()) < 0 or int(arr.max()) > np.iinfo(dtype).max:
        raise ValueError(f"{name} must be in [0, {np.iinfo(dtype).max}]")
    return arr.astype(dtype)


def _check_ring_size(ring_size: object, n_endpoints: int) -> int:
    if isinstance(ring_size, bool) or not isinstance(ring_size, (int, np.integer)):
        raise ValueError(f"ring_size must be an int, got {type(ring_size).__name__}")
    m = int(ring_size)
    if not 2 <= m <= MAX_RING_SIZE or not is_prime(m):
        raise ValueError(f"ring_size must be a prime in [2, {MAX_RING_SIZE}], got {m}")
    if m <= n_endpoints:
        raise ValueError(f"ring_size {m} must exceed the number of endpoints ({n_endpoints})")
    return m


def build_ring(
    hashes: np.ndarray, weights: np.ndarray, ids: np.ndarray, ring_size: int, version: int
) -> np.ndarray:
    """Katran Maglev ring (uint32[ring_size] of real ids, 0 = no real).

    ``hashes`` (u64 endpoint hashes), ``weights`` (u32) and ``ids`` (u32 real ids, each
    != 0 and distinct) are parallel arrays in any order. Weight-0 endpoints are left out;
    the rest are sorted by (hash, id), so the result does not depend on input order.
    ``version`` is 1 (maglev) or 2 (maglev_v2).
    """
    h = _as_uint(hashes, np.uint64, "hashes")
    w = _as_uint(weights, np.uint32, "weights")
    r = _as_uint(ids, np.uint32, "ids")
    if not h.shape == w.shape == r.shape:
        raise ValueError(f"hashes, weights, ids differ in length: {h.size}, {w.size}, {r.size}")
    if version not in (MAGLEV_V1, MAGLEV_V2):
        raise ValueError(f"version must be 1 (maglev) or 2 (maglev_v2), got {version!r}")
    if r.size and r.min() == 0:
        raise ValueError("real id 0 is reserved for 'no real'")
    if np.unique(r).size != r.size:
        raise ValueError("real ids must be distinct")
    keep = w > 0
    h, w, r = h[keep], w[keep], r[keep]
    m = _check_ring_size(ring_size, int(h.size))
    order = np.lexsort((r, h))  # by hash, then id (ties only on equal hashes)
    return _build_ring(h[order], w[order], r[order], m, int(version))


def ring_for(
    reals: Sequence[tuple[Address, int, int]],
    ring_size: int = RING_SIZE,
    hash: str = "maglev_v2",  # noqa: A002 - Katran's config name for this option
) -> np.ndarray:
    """Ring for ``(address, weight, real_id)`` triples, ``hash`` a name in HASH_FUNCTIONS."""
    if hash not in HASH_FUNCTIONS:
        raise ValueError(f"hash must be one of {sorted(HASH_FUNCTIONS)}, got {hash!r}")
    seen: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    hashes, weights, ids = [], [], []
    for address, weight, real_id in reals:
        ip = ipaddress.ip_address(address)  # ValueError on a bad address
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # same endpoint, same hash
        if ip in seen:
            raise ValueError(f"duplicate real address {ip}")
        seen.add(ip)
        hashes.append(endpoint_hash(ip))
        weights.append(weight)
        ids.append(real_id)
    return build_ring(
        np.array(hashes, dtype=np.uint64),
        _as_uint(weights, np.uint32, "weights") if weights else np.zeros(0, np.uint32),
        _as_uint(ids, np.uint32, "ids") if ids else np.zeros(0, np.uint32),
        ring_size,
        HASH_FUNCTIONS[hash],
    )
