"""GUE's UDP header (xdp/encap.h ``gue_sport``, ``gue_udp_csum``): Katran's source port and
the outer UDP checksum. The rest of the encapsulation is inline in :mod:`.balancer`."""

from __future__ import annotations

import numba as nb
import numpy as np

from lb import constants as C
from lb.datapath.csum import csum_fold, sum16
from lb.datapath.parsing import be16


@nb.njit(inline="always")
def gue_sport(p, src_off, family, sport, outer_v6):
    """Katran's outer UDP source port (docs/datapath.md): ``sport`` (host order, after the
    VIP's flags) XORed with two bytes of the client address at ``p[src_off:]``."""
    if not outer_v6:
        hi = (sport & 0xFF) ^ np.int64(p[src_off + 2])
        lo = (sport >> 8) ^ np.int64(p[src_off + 3])
    else:
        a = src_off + (2 if family == C.FAMILY_V4 else 12)
        hi = (sport >> 8) ^ np.int64(p[a])
        lo = (sport & 0xFF) ^ np.int64(p[a + 1])
    return (hi << 8) | lo


@nb.njit(inline="always")
def gue_udp_csum(out, ip, outer_v6, udp, inner, family):
    """The outer UDP checksum of the GUE frame in ``out`` (outer IP header at ``ip``, UDP
    header at ``udp`` with checksum 0, inner IP header at ``inner``): outer pseudo header +
    UDP header + inner IP header - inner pseudo header, as a valid inner checksum makes the
    inner L4 bytes sum to minus their pseudo header (ICMPv4: to zero). 0 for UDP over IPv4
    without a checksum, and 0xFFFF for a zero sum (RFC 768)."""
    s = sum16(out, ip + 8, 32) if outer_v6 else sum16(out, ip + 12, 8)
    ulen = be16(out, udp + 4)
    s += C.IPPROTO_UDP + ulen + sum16(out, udp, 8)
    if family == C.FAMILY_V6:
        # the addresses and the payload length are in the pseudo header too: they cancel
        nh = np.int64(out[inner + 6])
        s += sum16(out, inner, 4) + be16(out, inner + 6) + ((~nh) & 0xFFFF)
    else:
        proto = np.int64(out[inner + 9])
        if proto == C.IPPROTO_UDP and be16(out, inner + 20 + 6) == 0:
            return 0
        if proto == C.IPPROTO_ICMP:
            s += sum16(out, inner, 20)
        else:
            s += sum16(out, inner, 12) + ((~proto) & 0xFFFF) + ((~(be16(out, inner + 2) - 20)) & 0xFFFF)
    c = (~csum_fold(s)) & 0xFFFF
    return c if c != 0 else 0xFFFF
