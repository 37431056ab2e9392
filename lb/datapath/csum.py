"""Internet checksums (xdp/csum.h; RFC 1071, RFC 1624)."""

from __future__ import annotations

import numba as nb

from lb.datapath.parsing import be16


@nb.njit(inline="always")
def csum_fold(s):
    """Fold a one's-complement sum to 16 bits (not inverted)."""
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


@nb.njit(inline="always")
def sum16(buf, off, nbytes):
    """One's-complement partial sum (unfolded) of ``nbytes`` (even) bytes at ``off``."""
    s = 0
    for k in range(0, nbytes, 2):
        s += be16(buf, off + k)
    return s


@nb.njit(inline="always")
def ipv4_csum(buf, off):
    """Header checksum of the 20-byte IPv4 header at ``off`` (checksum field taken as 0)."""
    s = 0
    for i in range(0, 20, 2):
        if i != 10:
            s += be16(buf, off + i)
    return (~csum_fold(s)) & 0xFFFF


@nb.njit(inline="always")
def csum_replace16(old_csum, old_word, new_word):
    """RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m')."""
    s = ((~old_csum) & 0xFFFF) + ((~old_word) & 0xFFFF) + new_word
    return (~csum_fold(s)) & 0xFFFF


@nb.njit(inline="always")
def csum_replace16_nz(old_csum, old_word, new_word):
    """The same for a message that may sum to zero (ICMPv4): HC' = HC + m + ~m', which is
    0 only if m is, so a zero sum gets 0xFFFF where eqn. 3 gives 0x0000 (xdp/csum.h)."""
    return csum_fold(old_csum + old_word + ((~new_word) & 0xFFFF))
