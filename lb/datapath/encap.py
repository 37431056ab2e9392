"""Encapsulation towards a real (xdp/encap.h; docs/datapath.md, "Outputs"): IPv4-in-IPv4,
IPv4-in-IPv6 or IPv6-in-IPv6 with Katran's outer source addresses, or GUE (variant 1:
outer IP + UDP + the inner packet, any family in any family)."""

from __future__ import annotations

import numba as nb

from lb import constants as C
from lb.datapath.csum import ipv4_csum
from lb.datapath.parsing import be16, copy, zero


@nb.njit(inline="always")
def encapsulate(p, n, out, l3, vlan, family, pkt_len, tos, fsrc_off, sport, rfam, raddr, real_id,
                gw_mac, gue, gue_port, gue_src_v4, gue_src_v6):
    """Rows 18 and 19: write ``out`` = L2 to ``gw_mac`` + outer IP (+ UDP with ``gue``)
    to the real ``raddr[real_id]`` of family ``rfam`` + the input from its IP header on;
    return its length. ``fsrc_off``: the client address in ``p``; ``sport``: the flow's
    source port; the rest is maps.Ctl."""
    ulen = C.UDP_HLEN if gue else 0
    copy(out, 0, gw_mac, 0, 6)
    copy(out, 6, p, 0, 6)
    if vlan:
        copy(out, 12, p, 12, 4)
    o = l3
    if rfam == C.FAMILY_V4:
        out[l3 - 2] = C.ETH_P_IP >> 8
        out[l3 - 1] = C.ETH_P_IP & 0xFF
        tot = pkt_len + C.ENCAP_IPV4_OVERHEAD + ulen
        out[o] = 0x45
        out[o + 1] = tos
        out[o + 2] = tot >> 8
        out[o + 3] = tot & 0xFF
        zero(out, o + 4, 4)
        out[o + 8] = C.DEFAULT_TTL
        if gue:
            out[o + 9] = C.IPPROTO_UDP
            copy(out, o + 12, gue_src_v4, 0, 4)
        else:
            # Katran's outer source 172.16.(c2 ^ (sport & 0xff)).(c3 ^ (sport >> 8))
            out[o + 9] = C.IPPROTO_IPIP
            out[o + 12] = C.IPIP_V4_PREFIX0
            out[o + 13] = C.IPIP_V4_PREFIX1
            out[o + 14] = p[fsrc_off + 2] ^ (sport & 0xFF)
            out[o + 15] = p[fsrc_off + 3] ^ (sport >> 8)
        for k in range(4):
            out[o + 16 + k] = raddr[real_id, k]
        c = ipv4_csum(out, o)
        out[o + 10] = c >> 8
        out[o + 11] = c & 0xFF
        o += C.ENCAP_IPV4_OVERHEAD
    else:
        out[l3 - 2] = C.ETH_P_IPV6 >> 8
        out[l3 - 1] = C.ETH_P_IPV6 & 0xFF
        out[o] = 0x60 | (tos >> 4)
        out[o + 1] = (tos & 0xF) << 4
        out[o + 2] = 0
        out[o + 3] = 0
        plen = pkt_len + ulen
        out[o + 4] = plen >> 8
        out[o + 5] = plen & 0xFF
        out[o + 7] = C.DEFAULT_TTL
        if gue:
            out[o + 6] = C.IPPROTO_UDP
            copy(out, o + 8, gue_src_v6, 0, 16)
        else:
            # Katran's outer source 0100::s0^(sport>>8) s1^(sport&0xff) s2 s3
            out[o + 6] = C.IPPROTO_IPIP if family == C.FAMILY_V4 else C.IPPROTO_IPV6
            out[o + 8] = C.IPIP_V6_PREFIX0
            out[o + 9] = C.IPIP_V6_PREFIX1
            zero(out, o + 10, 10)
            last4 = fsrc_off if family == C.FAMILY_V4 else fsrc_off + 12
            out[o + 20] = p[last4] ^ (sport >> 8)
            out[o + 21] = p[last4 + 1] ^ (sport & 0xFF)
            out[o + 22] = p[last4 + 2]
            out[o + 23] = p[last4 + 3]
        for k in range(16):
            out[o + 24 + k] = raddr[real_id, k]
        o += C.ENCAP_IPV6_OVERHEAD
    if gue:
        # UDP: source port varies with the client, checksum 0 (RFC 6935)
        a = fsrc_off + (2 if family == C.FAMILY_V4 else 14)
        gsport = C.GUE_SPORT_BASE | ((be16(p, a) ^ sport) & C.GUE_SPORT_MASK)
        ulen_field = pkt_len + C.UDP_HLEN
        out[o] = gsport >> 8
        out[o + 1] = gsport & 0xFF
        out[o + 2] = gue_port >> 8
        out[o + 3] = gue_port & 0xFF
        out[o + 4] = ulen_field >> 8
        out[o + 5] = ulen_field & 0xFF
        out[o + 6] = 0
        out[o + 7] = 0
        o += C.UDP_HLEN
    rest = n - l3
    copy(out, o, p, l3, rest)
    return o + rest
