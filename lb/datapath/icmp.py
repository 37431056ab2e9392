"""ICMP written by the balancer (xdp/icmp.h): echo replies (row 11) and "too big"
replies to packets that would not fit ``settings.mtu`` once encapsulated (row 20).
Both write the output frame and return its length."""

from __future__ import annotations

import numba as nb
import numpy as np

from lb import constants as C
from lb.datapath.csum import (
    csum_fold,
    csum_replace16,
    csum_replace16_nz,
    ipv4_csum,
    sum16,
)
from lb.datapath.parsing import be16, copy, zero


@nb.njit(inline="always")
def echo_reply(p, n, out, l3, l4, family):
    """Row 11: the frame with MACs and IP addresses swapped, TTL / hop limit reset, the
    ICMP type turned into a reply and its checksum updated incrementally to what a full
    recomputation gives (0xFFFF for an ICMPv4 reply that sums to zero)."""
    copy(out, 0, p, 0, n)
    copy(out, 0, p, 6, 6)
    copy(out, 6, p, 0, 6)
    if family == C.FAMILY_V4:
        copy(out, l3 + 12, p, l3 + 16, 4)
        copy(out, l3 + 16, p, l3 + 12, 4)
        out[l3 + 8] = C.DEFAULT_TTL
        c = ipv4_csum(out, l3)
        out[l3 + 10] = c >> 8
        out[l3 + 11] = c & 0xFF
        new_type = C.ICMP_ECHO_REPLY
    else:
        copy(out, l3 + 8, p, l3 + 24, 16)
        copy(out, l3 + 24, p, l3 + 8, 16)
        out[l3 + 7] = C.DEFAULT_TTL
        new_type = C.ICMPV6_ECHO_REPLY
    code = np.int64(p[l4 + 1])
    out[l4] = new_type
    old_word = (np.int64(p[l4]) << 8) | code
    if family == C.FAMILY_V4:  # no pseudo header: the message may sum to zero
        c = csum_replace16_nz(be16(p, l4 + 2), old_word, (new_type << 8) | code)
    else:
        c = csum_replace16(be16(p, l4 + 2), old_word, (new_type << 8) | code)
    out[l4 + 2] = c >> 8
    out[l4 + 3] = c & 0xFF
    return n


@nb.njit(inline="always")
def too_big(p, out, l3, family, overhead, mtu):
    """Row 20: ICMP frag-needed / ICMPv6 packet-too-big back to the client, quoting the
    start of the packet; the next-hop MTU is ``mtu - overhead``."""
    copy(out, 0, p, 6, 6)
    copy(out, 6, p, 0, 6)
    copy(out, 12, p, 12, l3 - 12)  # the 802.1Q tag if any, and the same ethertype
    o = l3
    if family == C.FAMILY_V4:
        quote = C.ICMP_TOO_BIG_QUOTE_V4
        ic = o + 20
        out[o] = 0x45
        out[o + 1] = 0
        tot = 20 + 8 + quote
        out[o + 2] = tot >> 8
        out[o + 3] = tot & 0xFF
        zero(out, o + 4, 4)
        out[o + 8] = C.DEFAULT_TTL
        out[o + 9] = C.IPPROTO_ICMP
        copy(out, o + 12, p, l3 + 16, 4)
        copy(out, o + 16, p, l3 + 12, 4)
        c = ipv4_csum(out, o)
        out[o + 10] = c >> 8
        out[o + 11] = c & 0xFF
        out[ic] = C.ICMP_DEST_UNREACH
        out[ic + 1] = C.ICMP_FRAG_NEEDED
        zero(out, ic + 2, 4)
        out[ic + 6] = (mtu - overhead) >> 8
        out[ic + 7] = (mtu - overhead) & 0xFF
        copy(out, ic + 8, p, l3, quote)
        s = sum16(out, ic, 8 + quote)
    else:
        quote = C.ICMP_TOO_BIG_QUOTE_V6
        ic = o + 40
        plen = 8 + quote
        out[o] = 0x60
        zero(out, o + 1, 3)
        out[o + 4] = plen >> 8
        out[o + 5] = plen & 0xFF
        out[o + 6] = C.IPPROTO_ICMPV6
        out[o + 7] = C.DEFAULT_TTL
        copy(out, o + 8, p, l3 + 24, 16)
        copy(out, o + 24, p, l3 + 8, 16)
        out[ic] = C.ICMPV6_PKT_TOOBIG
        zero(out, ic + 1, 5)
        out[ic + 6] = (mtu - overhead) >> 8
        out[ic + 7] = (mtu - overhead) & 0xFF
        copy(out, ic + 8, p, l3, quote)
        # pseudo header: addresses, upper-layer length, next header
        s = sum16(out, o + 8, 32) + plen + C.IPPROTO_ICMPV6 + sum16(out, ic, plen)
    c = (~csum_fold(s)) & 0xFFFF
    out[ic + 2] = c >> 8
    out[ic + 3] = c & 0xFF
    return ic + 8 + quote
