"""Real selection's lookups (xdp/balancer.c ``forward``; docs/datapath.md, "The flow" and
"Real selection"): the VIP tables (exact, and CIDR VIPs by longest prefix), the QUIC
server-id table (step 0), the down set (step 1), the source-route longest-prefix match
(step 2) and the Maglev ring with Katran's flow hash.

The VIP and VIP-address tables are open-addressing hash tables of (lo, hi, tail) key
words (``used[i]`` = 0: empty); their hash is internal, never on the wire.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from lb import constants as C
from lb.datapath.jitcache import cached_njit
from lb.jhash import jhash16, jhash_2words

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B97F4A7C15
EMPTY = np.uint64(0)  # "used" marker values in the lookup tables
USED = np.uint64(1)


@nb.njit(inline="always")
def mix(h, w):
    """Multiply-xorshift mixing for table indexes. The casts keep numba from promoting a
    mix of int64 and uint64 to float64."""
    h = (np.uint64(h) ^ np.uint64(w)) * np.uint64(_GOLDEN)
    return h ^ (h >> np.uint64(29))


@nb.njit(inline="always")
def key_lookup(keys, used, mask, lo, hi, tail):
    """Index of the key (lo, hi, tail) in a hash table (maps.KeyTable), or -1."""
    h = mix(mix(mix(np.uint64(0), lo), hi), tail)
    i = np.int64(h & np.uint64(mask))
    for _ in range(mask + 1):
        if used[i] == EMPTY:
            return -1
        if keys[i, 0] == lo and keys[i, 1] == hi and keys[i, 2] == tail:
            return i
        i = (i + 1) & mask
    return -1


@cached_njit
def key_insert(keys, used, mask, lo, hi, tail):
    """Put the key (lo, hi, tail) into a table with a free slot; returns its index."""
    h = mix(mix(mix(np.uint64(0), lo), hi), tail)
    i = np.int64(h & np.uint64(mask))
    while used[i] != EMPTY:
        i = (i + 1) & mask
    keys[i, 0] = lo
    keys[i, 1] = hi
    keys[i, 2] = tail
    used[i] = USED
    return i


@nb.njit(inline="always")
def real_down_for(down_set, vip_num, real_id):
    """Whether the health checks hold real ``real_id`` down for VIP ``vip_num``: its bit in
    the down set (uint64[max_vips, down_row_words], layout.DOWN_WORD)."""
    if vip_num >= down_set.shape[0] or real_id // C.DOWN_WORD_BITS >= down_set.shape[1]:
        return False
    word = down_set[vip_num, real_id // C.DOWN_WORD_BITS]
    return ((word >> np.uint64(real_id % C.DOWN_WORD_BITS)) & np.uint64(1)) != 0


@nb.njit(inline="always")
def vip_tail(port, proto, family):
    """The third key word of a VIP: port, protocol and family."""
    return np.uint64(port) | (np.uint64(proto) << np.uint64(16)) | (np.uint64(family) << np.uint64(24))


@nb.njit(inline="always")
def prefix_lookup(keys, used, mask, gfam, glen, gmlo, gmhi, family, lo, hi, tail):
    """Index of the longest prefix holding the address (lo, hi) of ``family`` with
    ``tail`` in a CIDR VIP table (maps.PrefixVips), or -1."""
    for k in range(gfam.shape[0]):
        if gfam[k] == family:
            i = key_lookup(keys, used, mask, lo & gmlo[k], hi & gmhi[k],
                           np.uint64(tail) | (np.uint64(glen[k]) << np.uint64(32)))
            if i >= 0:
                return i
    return -1


@nb.njit(inline="always")
def bsearch(keys, lo, hi, x):
    """Index of ``x`` in the sorted ``keys[lo:hi]``, or -1."""
    while lo < hi:
        mid = (lo + hi) >> 1
        if keys[mid] < x:
            lo = mid + 1
        elif keys[mid] > x:
            hi = mid
        else:
            return mid
    return -1


@nb.njit(inline="always")
def _bsearch2(khi, klo, lo, hi, xhi, xlo):
    """As :func:`bsearch` for keys that are (khi, klo) pairs sorted lexicographically."""
    while lo < hi:
        mid = (lo + hi) >> 1
        if khi[mid] < xhi or (khi[mid] == xhi and klo[mid] < xlo):
            lo = mid + 1
        elif khi[mid] > xhi or klo[mid] > xlo:
            hi = mid
        else:
            return mid
    return -1


@nb.njit(inline="always")
def quic_real(ids, reals, server_id):
    """Step 0: the real of ``server_id`` in the server-id table (maps.QuicServers), or -1."""
    j = bsearch(ids, 0, ids.shape[0], server_id)
    return reals[j] if j >= 0 else -1


@nb.njit(inline="always")
def src_route_v4(lens, starts, keys, reals, p, off):
    """Step 2: real id of the longest prefix holding the IPv4 address at ``p[off]``, 0 if
    none (maps.SrcRoutesV4: groups of one prefix length, longest first)."""
    a = (np.int64(p[off]) << 24) | (np.int64(p[off + 1]) << 16) | (np.int64(p[off + 2]) << 8) | np.int64(p[off + 3])
    for k in range(lens.shape[0]):
        j = bsearch(keys, starts[k], starts[k + 1], a & ((_M32 << (32 - lens[k])) & _M32))
        if j >= 0:
            return reals[j]
    return 0


@nb.njit(inline="always")
def src_route_v6(lens, starts, khi, klo, reals, p, off):
    """As :func:`src_route_v4` for the IPv6 address at ``p[off]``."""
    ahi = np.uint64(0)
    alo = np.uint64(0)
    for i in range(8):
        ahi = (ahi << np.uint64(8)) | np.uint64(p[off + i])
        alo = (alo << np.uint64(8)) | np.uint64(p[off + 8 + i])
    for k in range(lens.shape[0]):
        n = lens[k]
        # mask of the top n bits of a 64-bit half (a shift by 64 is undefined: n = 0 apart)
        mhi = np.uint64(0) if n == 0 else ~((np.uint64(1) << np.uint64(64 - min(n, 64))) - np.uint64(1))
        mlo = np.uint64(0) if n <= 64 else ~((np.uint64(1) << np.uint64(128 - n)) - np.uint64(1))
        j = _bsearch2(khi, klo, starts[k], starts[k + 1], ahi & mhi, alo & mlo)
        if j >= 0:
            return reals[j]
    return 0


@nb.njit(inline="always")
def flow_hash(p, family, fsrc_off, slo, ports, dport, dport_only, ch_seed, v6_seed):
    """Katran's flow hash (maps.Rings seeds; with ``dport_only``: source 0 and sport =
    dport), for the ring slot ``hash % ring_size``."""
    if dport_only:
        hports = ((dport >> 8) | ((dport & 0xFF) << 8)) * 0x10001
        if family == C.FAMILY_V4:
            return jhash_2words(0, hports, ch_seed)
        zero = np.zeros(16, dtype=np.uint8)
        return jhash_2words(jhash16(zero, 0, v6_seed), hports, ch_seed)
    if family == C.FAMILY_V4:
        return jhash_2words(np.int64(slo), ports, ch_seed)
    return jhash_2words(jhash16(p, fsrc_off, v6_seed), ports, ch_seed)
