"""The second-chance step at a real, as a pure function (the decap program's, xdp/decap.c).

A stateless VIP's packets reach a real as GUE variant 0 with a hop list (docs/datapath.md,
"Hop list (stateless VIPs)"): hops[0] is the real the balancer chose, hops[1..] the reals older rings chose
for the same flow, next_hop the one to try after this real. A real that receives a TCP
segment without SYN for a connection it does not have sends the packet on to the next
hop instead of answering it with a reset; the real that has the connection delivers it.

    second_chance(frame, has_local_socket) -> Decision(action, output, counter)

``frame`` is an Ethernet frame as the decap program's XDP entry sees it (one VLAN tag
allowed); ``has_local_socket`` says whether the host has a TCP socket for the inner
4-tuple other than a listener (established or another connected state, SYN-RECV,
TIME-WAIT), which is what the program asks the kernel (bpf_skc_lookup_tcp). Actions:

    "deliver"  decapsulated: output = the frame with the outer headers removed and the
               ethertype naming the inner family (what the kernel receives)
    "forward"  sent back out of the interface it came in on: output = the rewritten frame
    "drop"     dropped and counted
    "other"    no hop list (or outer headers the decap program rejects or passes on its
               own): the decap program's general rules apply; output = frame

``counter`` names the decap_stats slot the frame bumps (lb.constants.DECAP_STATS), None
for "other". The allow-list of outer destinations (DecapProgram.set_allowed_destinations)
is applied before any of this and is not modelled.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from lb.constants import (
    ETH_HLEN,
    ETH_P_8021AD,
    ETH_P_8021Q,
    ETH_P_IP,
    ETH_P_IPV6,
    GUE_DEFAULT_PORT,
    GUE_HLEN,
    GUE_HOPLIST_HLEN,
    GUE_HOPLIST_TYPE,
    GUE_MAX_HOPS,
    IP_MF,
    IP_OFFSET_MASK,
    IPPROTO_IPIP,
    IPPROTO_IPV6,
    IPPROTO_TCP,
    IPPROTO_UDP,
    TCP_FLAG_SYN,
    UDP_HLEN,
    VLAN_HLEN,
)

TCP_HLEN = 20

DELIVER, FORWARD, DROP, OTHER = "deliver", "forward", "drop", "other"


@dataclass(frozen=True)
class Decision:
    """What the decap program does with one frame."""

    action: str  # DELIVER | FORWARD | DROP | OTHER
    output: bytes  # the frame as it leaves the program (DROP: the input, unchanged)
    counter: str | None  # decap_stats slot bumped, None for OTHER


@dataclass(frozen=True)
class _Parsed:
    l2_len: int
    outer_v6: bool
    ip_len: int  # outer IP header
    udp_off: int  # frame offset of the UDP header
    gue_len: int  # GUE header + optional fields
    inner_off: int
    inner_v6: bool


def _csum_update(check: int, changes: list[tuple[int, int]]) -> int:
    """RFC 1624 eqn. 3 over several 16-bit words: ~(~HC + sum(~m + m')), folded as the
    C code folds (the same bytes whatever the host's byte order)."""
    s = ~check & 0xFFFF
    for old, new in changes:
        s += (~old & 0xFFFF) + new
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _words(b: bytes) -> list[int]:
    return list(struct.unpack(f"!{len(b) // 2}H", b))


def _parse_outer(frame: bytes, gue_port: int) -> _Parsed | None:
    """The outer Ethernet / IP / UDP / GUE v0 headers, checked as xdp/decap.h checks them;
    None if the frame is not a well-formed GUE variant 0 data packet."""
    n = len(frame)
    if n < ETH_HLEN:
        return None
    l2_len = ETH_HLEN
    (etype,) = struct.unpack_from("!H", frame, 12)
    if etype in (ETH_P_8021Q, ETH_P_8021AD):
        if n < ETH_HLEN + VLAN_HLEN:
            return None
        (etype,) = struct.unpack_from("!H", frame, 16)
        l2_len += VLAN_HLEN
    l3 = l2_len
    if etype == ETH_P_IP:
        if n < l3 + 20 or frame[l3] >> 4 != 4 or frame[l3] & 0xF < 5:
            return None
        ip_len = (frame[l3] & 0xF) * 4
        (tot_len, frag) = struct.unpack_from("!H2xH", frame, l3 + 2)
        if frame[l3 + 9] != IPPROTO_UDP or frag & (IP_MF | IP_OFFSET_MASK):
            return None
        l3_room = tot_len
        if tot_len < ip_len or tot_len + l2_len > n:
            return None
        outer_v6 = False
    elif etype == ETH_P_IPV6:
        if n < l3 + 40 or frame[l3] >> 4 != 6 or frame[l3 + 6] != IPPROTO_UDP:
            return None
        ip_len = 40
        (plen,) = struct.unpack_from("!H", frame, l3 + 4)
        l3_room = plen + ip_len
        if plen == 0 or l3_room + l2_len > n:
            return None
        outer_v6 = True
    else:
        return None
    udp = l3 + ip_len
    if n < udp + UDP_HLEN:
        return None
    (dport, ulen) = struct.unpack_from("!2xHH", frame, udp)
    if dport != gue_port or ulen < UDP_HLEN or ulen > l3_room - ip_len:
        return None
    gue = udp + UDP_HLEN
    room = ulen - UDP_HLEN
    if room < GUE_HLEN or frame[gue] >> 6 != 0 or frame[gue] & 0x20:
        return None  # variant 1 (no hop list possible), control message, reserved, short
    gue_len = GUE_HLEN + (frame[gue] & 0x1F) * 4
    if gue_len > room or frame[gue + 1] not in (IPPROTO_IPIP, IPPROTO_IPV6):
        return None
    return _Parsed(l2_len, outer_v6, ip_len, udp, gue_len, gue + gue_len,
                   frame[gue + 1] == IPPROTO_IPV6)


def _inner_ok(frame: bytes, p: _Parsed, room: int) -> bool:
    """xdp/decap.h decap_check_inner: the inner IP header fits what the outer carries."""
    i = p.inner_off
    if p.inner_v6:
        if room < 40 or len(frame) < i + 40 or frame[i] >> 4 != 6:
            return False
        return struct.unpack_from("!H", frame, i + 4)[0] + 40 <= room
    if room < 20 or len(frame) < i + 20 or frame[i] >> 4 != 4 or frame[i] & 0xF < 5:
        return False
    (tot_len,) = struct.unpack_from("!H", frame, i + 2)
    return (frame[i] & 0xF) * 4 <= tot_len <= room


def _tcp_non_syn(frame: bytes, p: _Parsed) -> bool:
    """The inner packet is a TCP segment without SYN, not a fragment, header inside it,
    no IPv6 extension header: the only packets a socket is looked up for."""
    i = p.inner_off
    if p.inner_v6:
        if frame[i + 6] != IPPROTO_TCP or struct.unpack_from("!H", frame, i + 4)[0] < TCP_HLEN:
            return False
        th = i + 40
    else:
        (tot_len, frag) = struct.unpack_from("!H2xH", frame, i + 2)
        ihl = (frame[i] & 0xF) * 4
        if frame[i + 9] != IPPROTO_TCP or frag & (IP_MF | IP_OFFSET_MASK) or tot_len < ihl + TCP_HLEN:
            return False
        th = i + ihl
    return len(frame) >= th + TCP_HLEN and not frame[th + 13] & TCP_FLAG_SYN


def _decapsulated(frame: bytes, p: _Parsed) -> bytes:
    etype = ETH_P_IPV6 if p.inner_v6 else ETH_P_IP
    return frame[:p.l2_len - 2] + struct.pack("!H", etype) + frame[p.inner_off:]


def _forwarded(frame: bytes, p: _Parsed, next_hop: int, hop_count: int) -> Decision:
    out = bytearray(frame)
    l3 = p.l2_len
    hl = p.udp_off + UDP_HLEN + GUE_HLEN
    alen = 16 if p.outer_v6 else 4
    hop = bytes(frame[hl + GUE_HOPLIST_HLEN + next_hop * alen:][:alen])
    daddr_off = l3 + (24 if p.outer_v6 else 16)
    old_daddr = bytes(frame[daddr_off:daddr_off + alen])
    ttl_off = l3 + (7 if p.outer_v6 else 8)
    if frame[ttl_off] <= 1:
        return Decision(DROP, frame, "hoplist_ttl_expired")
    changes = list(zip(_words(old_daddr), _words(hop)))
    changes.append(((next_hop << 8) | hop_count, ((next_hop + 1) << 8) | hop_count))
    (ucheck,) = struct.unpack_from("!H", frame, p.udp_off + 6)
    if ucheck:  # zero: no checksum, stays so; a computed zero is sent as 0xffff
        struct.pack_into("!H", out, p.udp_off + 6, _csum_update(ucheck, changes) or 0xFFFF)
    out[ttl_off] -= 1
    if not p.outer_v6:
        ip_changes = list(zip(_words(old_daddr), _words(hop)))
        ip_changes.append(((frame[ttl_off] << 8) | frame[ttl_off + 1],
                           (out[ttl_off] << 8) | out[ttl_off + 1]))
        (icheck,) = struct.unpack_from("!H", frame, l3 + 10)
        struct.pack_into("!H", out, l3 + 10, _csum_update(icheck, ip_changes))
    out[daddr_off:daddr_off + alen] = hop
    out[hl + 2] = next_hop + 1
    out[0:6], out[6:12] = frame[6:12], frame[0:6]
    return Decision(FORWARD, bytes(out), "hoplist_forwarded")


def second_chance(frame: bytes, has_local_socket: bool, *,
                  gue_port: int = GUE_DEFAULT_PORT) -> Decision:
    """What the decap program does with ``frame`` (module docstring): decision table in
    docs/datapath.md, "Second chance"."""
    frame = bytes(frame)
    p = _parse_outer(frame, gue_port)
    priv = p.udp_off + UDP_HLEN + GUE_HLEN if p else 0
    priv_len = p.gue_len - GUE_HLEN if p else 0
    if p is None or priv_len < 2 or struct.unpack_from("!H", frame, priv)[0] != GUE_HOPLIST_TYPE:
        return Decision(OTHER, frame, None)
    if priv_len < GUE_HOPLIST_HLEN:
        return Decision(DROP, frame, "hoplist_malformed")
    next_hop, hop_count = frame[priv + 2], frame[priv + 3]
    alen = 16 if p.outer_v6 else 4
    if not 1 <= hop_count <= GUE_MAX_HOPS or next_hop > hop_count \
            or priv_len != GUE_HOPLIST_HLEN + hop_count * alen:
        return Decision(DROP, frame, "hoplist_malformed")
    (ulen,) = struct.unpack_from("!H", frame, p.udp_off + 4)
    if not _inner_ok(frame, p, ulen - UDP_HLEN - p.gue_len):
        return Decision(DROP, frame, "dropped_malformed")
    if not _tcp_non_syn(frame, p) or has_local_socket:
        return Decision(DELIVER, _decapsulated(frame, p), "hoplist_delivered")
    if next_hop >= hop_count:
        return Decision(DELIVER, _decapsulated(frame, p), "hoplist_last_resort")
    return _forwarded(frame, p, next_hop, hop_count)
