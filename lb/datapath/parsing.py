"""Reading the frame (xdp/parsing.h): big-endian fields, addresses as table words, the
inner header of an ICMP error, and byte copies that make no array views.

Every helper is ``inline="always"``: numba pastes it into the batch loop, so the loop
still compiles to one function (a call per helper would cost more than its work).
"""

from __future__ import annotations

import numba as nb
import numpy as np

from lb import constants as C


@nb.njit(inline="always")
def be16(p, off):
    """The big-endian 16-bit field at ``p[off]``."""
    return (np.int64(p[off]) << 8) | np.int64(p[off + 1])


@nb.njit(inline="always")
def le64(p, off):
    """The 8 bytes at ``p[off]`` read little-endian."""
    v = np.uint64(0)
    for i in range(8):
        v |= np.uint64(p[off + i]) << np.uint64(8 * i)
    return v


@nb.njit(inline="always")
def addr_words(p, off, family):
    """(lo, hi) 64-bit words of a 16-byte table address read from the wire."""
    if family == C.FAMILY_V4:
        lo = np.uint64(0)
        for i in range(4):
            lo |= np.uint64(p[off + i]) << np.uint64(8 * i)
        return lo, np.uint64(0)
    return le64(p, off), le64(p, off + 8)


@nb.njit(inline="always")
def copy(dst, doff, src, soff, n):
    """dst[doff:doff+n] = src[soff:soff+n], without making array views (~14 ns each)."""
    for k in range(n):
        dst[doff + k] = src[soff + k]


@nb.njit(inline="always")
def zero(dst, doff, n):
    """dst[doff:doff+n] = 0."""
    for k in range(n):
        dst[doff + k] = 0


@nb.njit(inline="always")
def icmp_inner(p, l4, pend, family):
    """The flow inside an ICMP error at ``l4`` (row 12): (inner protocol, offset of the
    client address = inner dst, offset of the VIP address = inner src, offset of the inner
    L4 header); protocol -1 when the inner header is truncated or not IPv4 without
    options / IPv6."""
    inner = l4 + 8
    if family == C.FAMILY_V4:
        if inner + 24 > pend or (p[inner] >> 4) != 4 or (p[inner] & 0xF) != 5:
            return -1, 0, 0, 0
        return np.int64(p[inner + 9]), inner + 16, inner + 12, inner + 20
    if inner + 44 > pend or (p[inner] >> 4) != 6:
        return -1, 0, 0, 0
    return np.int64(p[inner + 6]), inner + 24, inner + 8, inner + 40
