"""Hypothesis strategies for frames: valid flows to the fixture VIPs, mutations of the
golden fixtures (truncated, bytes flipped, length/IHL fields rewritten), random bytes."""

from __future__ import annotations

import struct

from fixtures import (
    FIXTURE_CONFIG,
    FIXTURE_SETS,
    FIXTURES,
    GUE_CONFIG,
    STATELESS_CONFIG,
    LB_MAC,
    MTU_CONFIG,
    MTU_V6_VIP_WITH_V4_REAL,
    QUIC_ID_GONE,
    QUIC_ID_UNKNOWN,
    QUIC_SERVERS,
    ROUTER_MAC,
    V6_LOCAL_VIP_WITH_V4_LOCAL_REAL,
    V6_VIP_WITH_V4_REAL,
    quic_cid,
)
from hypothesis import strategies as st

from lb.checksum import internet_checksum

SEEDS = [fx.frame for fx in FIXTURES] + [s for fx in FIXTURES for s in fx.setup]
VIPS = [(v["address"], v["port"], v["protocol"]) for v in FIXTURE_CONFIG["vips"]] + [
    (extra[0], extra[1], "tcp") for extra in (V6_VIP_WITH_V4_REAL, V6_LOCAL_VIP_WITH_V4_LOCAL_REAL)
]
# the GUE and IPIP+mtu table sets: their VIPs and seeds for big frames around the MTU
MTU_VIPS = {
    "gue": [(v["address"], v["port"], v["protocol"]) for v in GUE_CONFIG["vips"]],
    "mtu": [(v["address"], v["port"], v["protocol"]) for v in MTU_CONFIG["vips"]]
    + [(MTU_V6_VIP_WITH_V4_REAL[0], MTU_V6_VIP_WITH_V4_REAL[1], "tcp")],
    "stateless": [(v["address"], v["port"], v["protocol"]) for v in STATELESS_CONFIG["vips"]],
}
MTU_SEEDS = {name: [fx.frame for fx in FIXTURE_SETS[name][1]] + [s for fx in FIXTURE_SETS[name][1] for s in fx.setup]
             for name in MTU_VIPS}
QUIC_VIPS = [(v["address"], v["port"], v["protocol"]) for v in FIXTURE_CONFIG["vips"] if "quic" in v.get("flags", [])]
_MACS = bytes.fromhex(LB_MAC.replace(":", "")) + bytes.fromhex(ROUTER_MAC.replace(":", ""))


def _addr(text: str) -> bytes:
    import ipaddress

    return ipaddress.ip_address(text).packed


def _vip_dst(draw, vip: str) -> bytes:
    """A destination for ``vip``: its address; for a CIDR VIP, an address inside the
    prefix (its first, last or any) or, sometimes, just outside it."""
    import ipaddress

    if "/" not in vip:
        return _addr(vip)
    net = ipaddress.ip_network(vip)
    host = draw(st.sampled_from([0, net.num_addresses - 1]) | st.integers(0, net.num_addresses - 1))
    addr = int(net.network_address) + host
    if draw(st.integers(0, 4)) == 0:
        addr ^= 1 << (net.max_prefixlen - net.prefixlen)  # the last prefix bit: outside
    return addr.to_bytes(net.max_prefixlen // 8, "big")


@st.composite
def quic_payload(draw) -> bytes:
    """A UDP payload for a QUIC VIP: short or long header (or any first byte), a DCID
    carrying a configured, unknown, gone, zero or random server id in any CID layout, any
    DCID length byte, cut anywhere."""
    known = [q["id"] for q in QUIC_SERVERS]
    server_id = draw(st.sampled_from(known) | st.sampled_from([QUIC_ID_UNKNOWN, QUIC_ID_GONE, 0])
                     | st.sampled_from(known) | st.integers(0, 0xFFFFFFFF))
    version = draw(st.integers(0, 3))
    width = {0: 32, 1: 16, 2: 24, 3: 32}[version]
    dcid = quic_cid(version, server_id & ((1 << width) - 1), 20)
    kind = draw(st.sampled_from(["short", "long", "any"]))
    if kind == "short":
        b0 = draw(st.integers(0, 0x7F))
    elif kind == "long":
        b0 = 0x80 | draw(st.integers(0, 0x7F))
    else:
        b0 = draw(st.integers(0, 255))
    if b0 & 0x80:
        dcid_len = draw(st.sampled_from([7, 8, 20]) | st.integers(0, 255))
        payload = bytes([b0]) + draw(st.binary(min_size=4, max_size=4)) + bytes([dcid_len]) + dcid
    else:
        payload = bytes([b0]) + dcid
    payload += draw(st.binary(max_size=16))
    if draw(st.integers(0, 3)) == 0:
        payload = payload[: draw(st.integers(0, 16))]  # around the 9 / 14 byte minimums
    return payload


def _client(draw, v6: bool) -> bytes:
    """A client address inside and outside the fixtures' source-route prefixes (nested
    /16 and /24, /48 and /64, one whose real is gone)."""
    if v6:
        net = draw(st.sampled_from([b"\xff\xff\x00\x00", b"\xff\xff\x00\x01", b"\xff\xff", b"\xee\xee"]))
        return b"\x20\x01\x0d\xb8" + net + draw(st.binary(min_size=12 - len(net), max_size=12 - len(net)))
    net = draw(st.sampled_from([b"\xc6\x12\x00", b"\xc6\x12\x05", b"\xc6\x12", b"\xc6\x13"]))
    return net + draw(st.binary(min_size=4 - len(net), max_size=4 - len(net)))


def _with_l4_checksum(l4: bytes, pnum: int, src: bytes, dst: bytes) -> bytes:
    """``l4`` with its checksum filled in (TCP, UDP and ICMPv6 over the pseudo header)."""
    off = {6: 16, 17: 6}.get(pnum, 2)
    start = 0 if pnum == 1 else sum(struct.unpack(f"!{len(src + dst) // 2}H", src + dst)) + pnum + len(l4)
    c = internet_checksum(l4[:off] + b"\0\0" + l4[off + 2:], start)
    if pnum == 17 and c == 0:
        c = 0xFFFF
    return l4[:off] + struct.pack("!H", c) + l4[off + 2:]


# QUIC flows come from few clients and ports, so a list of frames holds several packets of
# one flow (routed ones writing the connection table, then others reading it)
_QUIC_SPORTS = [50000, 50001]


@st.composite
def valid_flow_frame(draw, vips: list[tuple[str, int, str]] = VIPS, big: bool = False) -> bytes:
    """A well-formed TCP/UDP/ICMP frame to one of ``vips``' addresses (sometimes another
    port), IPv4 or IPv6 as the VIP, optionally 802.1Q-tagged, with Ethernet padding
    sometimes, its L4 checksum right or 0; QUIC VIPs get QUIC payloads, often from one of
    a few flows. ``big``: often 1150-1480 bytes of payload more, around any MTU the
    fixtures set."""
    vip, port, proto = draw(st.sampled_from(vips))
    dst = _vip_dst(draw, vip)
    v6 = len(dst) == 16
    quic = (vip, port, proto) in QUIC_VIPS
    src = _client(draw, v6)
    if quic and draw(st.booleans()):
        src = (b"\x20\x01\x0d\xb8" + bytes(11) + b"\x07") if v6 else b"\xc6\x12\x00\x07"
    l4kind = draw(st.sampled_from([proto, proto, proto, "udp", "tcp", "icmp"]))
    sport = draw(st.sampled_from(_QUIC_SPORTS) if quic and draw(st.booleans()) else st.integers(0, 65535))
    dport = port if draw(st.booleans()) or port == 0 and draw(st.booleans()) else draw(st.integers(0, 65535))
    if quic and draw(st.integers(0, 3)):
        payload = draw(quic_payload())
    else:
        payload = draw(st.binary(max_size=64))
    if big and draw(st.booleans()):
        payload += bytes(draw(st.integers(1150, 1480)))
    if l4kind == "tcp":
        flags = draw(st.sampled_from([0x02, 0x10, 0x18, 0x12, 0x11, 0x04, 0x02 | 0x10]))
        l4 = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 0x50, flags, 8192, 0, 0) + payload
        pnum = 6
    elif l4kind == "udp":
        l4 = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
        pnum = 17
    else:
        itype = draw(st.sampled_from([8, 0, 3, 13] if not v6 else [128, 129, 1, 2, 135]))
        l4 = bytes([itype, draw(st.integers(0, 15)), 0, 0, 0, 0, 0, 0]) + payload
        pnum = 58 if v6 else 1
    if draw(st.booleans()):
        l4 = _with_l4_checksum(l4, pnum, src, dst)
    if v6:
        tc, hlim = draw(st.integers(0, 255)), draw(st.integers(1, 255))
        ip = struct.pack("!IHBB", (6 << 28) | (tc << 20), len(l4), pnum, hlim) + src + dst
        et = b"\x86\xdd"
    else:
        hdr = struct.pack("!BBHHHBBH4s4s", 0x45, draw(st.integers(0, 255)), 20 + len(l4), 0,
                          draw(st.sampled_from([0, 0x4000])), draw(st.integers(1, 255)), pnum, 0, src, dst)
        ip = hdr[:10] + struct.pack("!H", internet_checksum(hdr)) + hdr[12:]
        et = b"\x08\x00"
    ip += l4
    l2 = _MACS + (b"\x81\x00" + struct.pack("!H", draw(st.integers(0, 0xFFFF))) if draw(st.booleans()) else b"") + et
    frame = l2 + ip
    if draw(st.integers(0, 9)) == 0:
        frame += bytes(draw(st.integers(1, 30)))
    return frame


@st.composite
def mutated_frame(draw, seeds=SEEDS) -> bytes:
    """A golden-fixture frame truncated, with bytes flipped, or with header fields rewritten."""
    f = bytearray(draw(st.sampled_from(seeds)))
    kind = draw(st.sampled_from(["truncate", "flip", "field", "extend"]))
    if kind == "truncate":
        return bytes(f[: draw(st.integers(0, len(f)))])
    if kind == "flip":
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(f) - 1))
            f[i] = draw(st.integers(0, 255))
        return bytes(f)
    if kind == "field":
        # version/IHL, TOS, lengths, frag bits, protocol, ICMP type/code, inner headers
        offs = [12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 23, 34, 35, 42, 43, 54, 55, 62, 63,
                47, 48, 49, 67, 68]  # and QUIC: v4/v6 DCID length, DCID bytes
        for off in draw(st.lists(st.sampled_from(offs), min_size=1, max_size=4)):
            if off < len(f):
                f[off] = draw(st.integers(0, 255))
        return bytes(f)
    return bytes(f) + draw(st.binary(min_size=1, max_size=64))


any_frame = st.one_of(
    valid_flow_frame(), valid_flow_frame(), mutated_frame(), mutated_frame(),
    st.binary(min_size=0, max_size=120), valid_flow_frame(QUIC_VIPS),
)


def mtu_frame(name: str) -> st.SearchStrategy[bytes]:
    """Frames for the table set ``name`` of :data:`MTU_VIPS` (GUE and/or mtu): flows to its
    VIPs, many around the MTU with DF on and off, and its fixtures mutated."""
    return st.one_of(valid_flow_frame(MTU_VIPS[name], big=True), valid_flow_frame(MTU_VIPS[name], big=True),
                     mutated_frame(MTU_SEEDS[name]))
