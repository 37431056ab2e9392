"""The real servers' decapsulation program (xdp/decap.c, lb/decap_loader.py).

Part 1: BPF_PROG_TEST_RUN on scapy-built frames, XDP entry and tc entry (also the tc
entry compiled for kernels without BPF_F_ADJ_ROOM_DECAP_L3_*): every tunnel kind comes
out as Ether(type=inner family) / the inner packet, byte for byte; other traffic is left
alone; broken tunnel packets are dropped; every frame bumps exactly one counter.

Part 2: end to end through two network namespaces joined by a veth pair. The "real"
namespace has the VIP on lo and the decap program on its veth (XDP, then tc); the client
namespace sends encapsulated UDP datagrams through a packet socket and gets the echo
straight back (the real answers from the VIP to the client over the veth, no tunnel), and
runs real TCP connections whose packets a small tc egress program (test-only, below)
encapsulates on their way out of the client.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import secrets
import socket
import subprocess
import threading
from dataclasses import dataclass

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6, ICMPv6EchoRequest
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.packet import Raw

from lb.constants import ETH_P_IP, ETH_P_IPV6, IPPROTO_IPIP, IPPROTO_IPV6, XDP_DROP, XDP_PASS
from lb.kernel.testrun import test_run
from lb.decap_loader import DECAP_STATS, DecapError, DecapProgram
from lb.kernel.netns import in_netns

pytestmark = [pytest.mark.bpf, pytest.mark.root]

GUE_PORT = 6080
TC_ACT_OK = 0
TC_ACT_SHOT = 2

# ---- BPF_PROG_TEST_RUN ------------------------------------------------------------------

def run_prog(prog: DecapProgram, frame: bytes) -> tuple[str, bytes]:
    """Runs the program once; returns ("pass" | "drop" | other, output frame)."""
    action, out, _ = test_run(prog.prog_fd, frame, out_size=len(frame) + 512)
    if prog.mode == "xdp":
        return {XDP_PASS: "pass", XDP_DROP: "drop"}.get(action, f"xdp:{action}"), out
    return {TC_ACT_OK: "pass", TC_ACT_SHOT: "drop"}.get(action, f"tc:{action}"), out


# ---- frames -------------------------------------------------------------------------------

MAC_BAL = "02:00:00:00:00:01"  # the balancer (or the client namespace)
MAC_REAL = "02:00:00:00:00:02"
VIP4, VIP6 = "198.18.250.1", "2001:db8:250::1"
CLIENT4, CLIENT6 = "198.18.0.1", "2001:db8::1"
REAL4, REAL6 = "198.18.0.2", "2001:db8::2"
OUTER_SRC4, OUTER_SRC6 = "172.16.104.123", "100::7a69:c0a8:101"  # Katran-style sources

# (name, outer IP version, inner IP version, counter)
KINDS = [
    ("ipip", 4, 4, "v4_in_v4"),
    ("ip6ip6", 6, 6, "v6_in_v6"),
    ("4in6", 6, 4, "v4_in_v6"),
    ("6in4", 4, 6, "v6_in_v4"),
    ("gue1-4/4", 4, 4, "gue"),
    ("gue1-6/6", 6, 6, "gue"),
    ("gue1-4/6", 4, 6, "gue"),
    ("gue1-6/4", 6, 4, "gue"),
    ("gue0-4/4", 4, 4, "gue"),
    ("gue0-6/6", 6, 6, "gue"),
    ("gue0opt-4/6", 4, 6, "gue"),
]
KIND_IDS = [k[0] for k in KINDS]


def inner_packet(version: int, payload: bytes = b"decap me", sport: int = 31337,
                 dport: int = 5353, src: str | None = None, dst: str | None = None) -> bytes:
    """A client's UDP datagram to the VIP, with a non-default TTL / TOS so any rewrite
    would show."""
    if version == 4:
        pkt = IP(src=src or CLIENT4, dst=dst or VIP4, ttl=33, tos=0x28, id=4242) / \
            UDP(sport=sport, dport=dport) / Raw(payload)
    else:
        pkt = IPv6(src=src or CLIENT6, dst=dst or VIP6, hlim=33, tc=0x28, fl=0x12345) / \
            UDP(sport=sport, dport=dport) / Raw(payload)
    return bytes(pkt)


def encapsulate(kind: str, outer_version: int, inner: bytes, *, outer_src: str | None = None,
                outer_dst: str | None = None, gue_port: int = GUE_PORT) -> bytes:
    """Outer headers (no L2) + inner, as the balancer / Katran would send them."""
    inner_v6 = inner[0] >> 4 == 6
    if kind.startswith("gue"):
        if kind.startswith("gue1"):
            gue = b""  # variant 1: the inner IP header follows UDP directly (Katran)
        elif kind.startswith("gue0opt"):
            # variant 0, C=0, Hlen=2: 8 bytes of optional fields after the 4-byte header
            gue = bytes([0x02, IPPROTO_IPV6 if inner_v6 else IPPROTO_IPIP, 0, 0]) + bytes(8)
        else:
            gue = bytes([0x00, IPPROTO_IPV6 if inner_v6 else IPPROTO_IPIP, 0, 0])
        l4 = UDP(sport=40000, dport=gue_port, chksum=0) / Raw(gue + inner)
    else:
        l4 = Raw(inner)
    proto = 17 if kind.startswith("gue") else (IPPROTO_IPV6 if inner_v6 else IPPROTO_IPIP)
    if outer_version == 4:
        outer = IP(src=outer_src or OUTER_SRC4, dst=outer_dst or REAL4, ttl=64, id=0,
                   proto=proto) / l4
    else:
        outer = IPv6(src=outer_src or OUTER_SRC6, dst=outer_dst or REAL6, hlim=64,
                     nh=proto) / l4
    return bytes(outer)


def eth(payload: bytes, ethertype: int, dst: str = MAC_REAL, src: str = MAC_BAL) -> bytes:
    return bytes(Ether(dst=dst, src=src, type=ethertype)) + payload


def tunnel_frame(kind: str, outer_v: int, inner: bytes, **kw) -> bytes:
    return eth(encapsulate(kind, outer_v, inner, **kw), ETH_P_IP if outer_v == 4 else ETH_P_IPV6)


def expected_frame(inner: bytes) -> bytes:
    return eth(inner, ETH_P_IPV6 if inner[0] >> 4 == 6 else ETH_P_IP)


def only(name: str, n: int = 1) -> dict[str, int]:
    out = dict.fromkeys(DECAP_STATS, 0)
    out[name] = n
    return out


# ---- programs (compiled once per module) -------------------------------------------------

@pytest.fixture(scope="module")
def xdp_prog():
    p = DecapProgram("xdp")
    yield p
    p.close()


@pytest.fixture(scope="module")
def tc_prog():
    p = DecapProgram("tc")
    yield p
    p.close()


@pytest.fixture(scope="module")
def tc_legacy_prog():
    """The tc entry as it runs on kernels without BPF_F_ADJ_ROOM_DECAP_L3_*."""
    p = DecapProgram("tc", extra_cflags=["-DDECAP_TC_LEGACY"])
    yield p
    p.close()


@pytest.fixture(params=["xdp", "tc", "tc-legacy"])
def prog(request):
    p = request.getfixturevalue({"xdp": "xdp_prog", "tc": "tc_prog",
                                 "tc-legacy": "tc_legacy_prog"}[request.param])
    p.set_allowed_destinations([])
    p.reset_stats()
    return p


# ---- part 1: BPF_PROG_TEST_RUN ------------------------------------------------------------

@pytest.mark.parametrize("kind,outer_v,inner_v,counter", KINDS, ids=KIND_IDS)
def test_decap_each_kind(prog, kind, outer_v, inner_v, counter):
    inner = inner_packet(inner_v)
    action, out = run_prog(prog, tunnel_frame(kind, outer_v, inner))
    assert action == "pass"
    assert out == expected_frame(inner)  # inner packet untouched: TTL, TOS, checksum
    assert prog.read_stats() == only(counter)


@pytest.mark.parametrize("inner_v", [4, 6])
def test_decap_tcp_inner_and_big_packet(prog, inner_v):
    payload = bytes(range(256)) * 5
    if inner_v == 4:
        inner = bytes(IP(src=CLIENT4, dst=VIP4, ttl=7) / TCP(sport=1234, dport=80, flags="PA") /
                      Raw(payload))
    else:
        inner = bytes(IPv6(src=CLIENT6, dst=VIP6, hlim=7) / TCP(sport=1234, dport=80, flags="PA")
                      / Raw(payload))
    outer_v = 4 if inner_v == 4 else 6
    action, out = run_prog(prog, tunnel_frame("ipip" if inner_v == 4 else "ip6ip6", outer_v,
                                              inner))
    assert action == "pass"
    assert out == expected_frame(inner)


def test_decap_keeps_vlan_tag_xdp(xdp_prog):
    xdp_prog.reset_stats()
    inner = inner_packet(6)
    outer = encapsulate("6in4", 4, inner)
    frame = bytes(Ether(dst=MAC_REAL, src=MAC_BAL) / Dot1Q(vlan=7, prio=3, type=ETH_P_IP)) + outer
    action, out = run_prog(xdp_prog, frame)
    assert action == "pass"
    assert out == bytes(Ether(dst=MAC_REAL, src=MAC_BAL) / Dot1Q(vlan=7, prio=3,
                                                                  type=ETH_P_IPV6)) + inner
    assert xdp_prog.read_stats() == only("v6_in_v4")


def test_vlan_frame_passed_by_tc(tc_prog):
    """tc sees VLAN tags already moved into skb metadata; an in-band tag is left alone."""
    tc_prog.reset_stats()
    frame = bytes(Ether(dst=MAC_REAL, src=MAC_BAL) / Dot1Q(vlan=7, type=ETH_P_IP)) + \
        encapsulate("ipip", 4, inner_packet(4))
    action, out = run_prog(tc_prog, frame)
    assert (action, out) == ("pass", frame)
    assert tc_prog.read_stats() == only("passed")


def test_ipv4_outer_options(prog):
    inner = inner_packet(4)
    outer = bytes(IP(src=OUTER_SRC4, dst=REAL4, proto=IPPROTO_IPIP,
                     options=[b"\x01\x01\x01\x00"]) / Raw(inner))
    assert outer[0] == 0x46
    action, out = run_prog(prog, eth(outer, ETH_P_IP))
    assert action == "pass"
    assert out == expected_frame(inner)
    assert prog.read_stats() == only("v4_in_v4")


def test_ethernet_padding_kept_after_inner(prog):
    """A short tunnel packet padded to 60 bytes: the inner packet is decapsulated, the
    padding stays behind it (the kernel trims to the inner length)."""
    inner = bytes(IP(src=CLIENT4, dst=VIP4, proto=253))  # 20 bytes
    frame = tunnel_frame("ipip", 4, inner)
    padded = frame + bytes(60 - len(frame))
    action, out = run_prog(prog, padded)
    assert action == "pass"
    assert out[:len(expected_frame(inner))] == expected_frame(inner)
    assert prog.read_stats() == only("v4_in_v4")


NOT_TUNNELS = {
    "udp-to-vip": lambda: eth(inner_packet(4), ETH_P_IP),
    "udp6-to-vip": lambda: eth(inner_packet(6), ETH_P_IPV6),
    "tcp": lambda: bytes(Ether(dst=MAC_REAL, src=MAC_BAL) / IP(src=CLIENT4, dst=REAL4) /
                         TCP(dport=22, flags="S")),
    "udp-other-port": lambda: bytes(Ether(dst=MAC_REAL, src=MAC_BAL) / IP(dst=REAL4) /
                                    UDP(sport=6080, dport=6081) / Raw(inner_packet(4))),
    "udp6-other-port": lambda: bytes(Ether(dst=MAC_REAL, src=MAC_BAL) / IPv6(dst=REAL6) /
                                     UDP(dport=53) / Raw(b"x" * 30)),
    "icmpv6": lambda: bytes(Ether(dst=MAC_REAL, src=MAC_BAL) / IPv6(dst=REAL6) /
                            ICMPv6EchoRequest()),
    "arp": lambda: bytes(Ether(dst="ff:ff:ff:ff:ff:ff", src=MAC_BAL) / ARP(pdst=REAL4)),
    "ipv4-version-5": lambda: eth(b"\x55" + encapsulate("ipip", 4, inner_packet(4))[1:],
                                  ETH_P_IP),
}


@pytest.mark.parametrize("name", sorted(NOT_TUNNELS))
def test_not_a_tunnel_passes_untouched(prog, name):
    frame = NOT_TUNNELS[name]()
    action, out = run_prog(prog, frame)
    assert action == "pass"
    assert out == frame
    assert prog.read_stats() == only("passed")


@pytest.mark.parametrize("tail", [b"", b"\x45", bytes(IP(dst=REAL4, proto=IPPROTO_IPIP))[:19],
                                  bytes(IPv6(dst=REAL6, nh=IPPROTO_IPV6))[:39]],
                         ids=["no-l3", "1-byte", "ipv4-hdr-cut", "ipv6-hdr-cut"])
def test_short_frames_pass_xdp(xdp_prog, tail):
    """Frames too short for their L3 header are the kernel's business (XDP only: the tc
    test run refuses frames shorter than Ethernet + a full IP header)."""
    xdp_prog.reset_stats()
    ethertype = ETH_P_IPV6 if len(tail) == 39 else ETH_P_IP
    frame = eth(tail, ethertype)
    assert run_prog(xdp_prog, frame) == ("pass", frame)
    assert xdp_prog.read_stats() == only("passed")


def _truncate_frame(kind: str, outer_v: int) -> bytes:
    """Outer header says more than the frame has."""
    return tunnel_frame(kind, outer_v, inner_packet(4 if outer_v == 4 else 6))[:-5]


def _set_outer_len(frame: bytes, outer_v: int, delta: int) -> bytes:
    """Shrinks the outer length field by -delta bytes and cuts the frame to match, so
    the outer header is consistent but the inner packet is cut."""
    b = bytearray(frame)
    if outer_v == 4:
        ip = IP(bytes(b[14:]))
        ip.len = ip.len + delta
        ip.chksum = None
        hdr = bytes(ip)[:ip.ihl * 4]
        b[14:14 + len(hdr)] = hdr
        return bytes(b[:14 + ip.len])
    plen = int.from_bytes(b[18:20], "big") + delta
    b[18:20] = plen.to_bytes(2, "big")
    return bytes(b[:14 + 40 + plen])


MALFORMED = {
    # frame shorter than the outer length field says
    "ipip-frame-cut": lambda: _truncate_frame("ipip", 4),
    "ip6ip6-frame-cut": lambda: _truncate_frame("ip6ip6", 6),
    "gue-frame-cut": lambda: _truncate_frame("gue1-4/4", 4),
    # outer header consistent, inner packet longer than what the tunnel carries
    "ipip-inner-cut": lambda: _set_outer_len(tunnel_frame("ipip", 4, inner_packet(4)), 4, -3),
    "4in6-inner-cut": lambda: _set_outer_len(tunnel_frame("4in6", 6, inner_packet(4)), 6, -3),
    "6in4-inner-hdr-cut": lambda: _set_outer_len(tunnel_frame("6in4", 4, inner_packet(6)), 4,
                                                 -(len(inner_packet(6)) - 30)),
    "ipip-no-inner": lambda: eth(bytes(IP(dst=REAL4, proto=IPPROTO_IPIP)), ETH_P_IP),
    "ip6ip6-no-inner": lambda: eth(bytes(IPv6(dst=REAL6, nh=IPPROTO_IPV6)), ETH_P_IPV6),
    # inner header of the wrong version for the outer protocol number
    "ipip-inner-is-v6": lambda: eth(bytes(IP(dst=REAL4, proto=IPPROTO_IPIP) /
                                          Raw(inner_packet(6))), ETH_P_IP),
    "ip6ip6-inner-is-v4": lambda: eth(bytes(IPv6(dst=REAL6, nh=IPPROTO_IPV6) /
                                            Raw(inner_packet(4) + bytes(30))), ETH_P_IPV6),
    # GUE: UDP length beyond the IP payload, empty payload, GUE header cut
    "gue-udp-len": lambda: eth(bytes(IP(dst=REAL4) / UDP(dport=GUE_PORT, len=200) /
                                     Raw(inner_packet(4))), ETH_P_IP),
    "gue-empty": lambda: eth(bytes(IP(dst=REAL4) / UDP(dport=GUE_PORT)), ETH_P_IP),
    "gue0-hdr-cut": lambda: eth(bytes(IP(dst=REAL4) / UDP(dport=GUE_PORT) / Raw(b"\x00\x04")),
                                ETH_P_IP),
    "gue0-options-cut": lambda: eth(bytes(IP(dst=REAL4) / UDP(dport=GUE_PORT) /
                                          Raw(b"\x1f\x04\x00\x00" + bytes(8))), ETH_P_IP),
    "gue1-inner-cut": lambda: eth(bytes(IPv6(dst=REAL6) / UDP(dport=GUE_PORT) /
                                        Raw(inner_packet(6)[:50])), ETH_P_IPV6),
    "ip6-jumbo-len0": lambda: _set_outer_len(tunnel_frame("ip6ip6", 6, inner_packet(6)), 6,
                                             -len(inner_packet(6))) + inner_packet(6),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_tunnel_dropped(prog, name):
    frame = MALFORMED[name]()
    action, _ = run_prog(prog, frame)
    assert action == "drop"
    assert prog.read_stats() == only("dropped_malformed")


UNSUPPORTED = {
    "gue-control": b"\x20\x00\x00\x00" + inner_packet(4),
    "gue0-proto-udp": b"\x00\x11\x00\x00" + inner_packet(4),
    "gue-variant2": b"\x80\x04\x00\x00" + inner_packet(4),
    "gue1-version5": b"\x50" + inner_packet(4)[1:],
}


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_unsupported_gue_dropped(prog, name):
    frame = eth(bytes(IP(dst=REAL4) / UDP(dport=GUE_PORT, chksum=0) / Raw(UNSUPPORTED[name])),
                ETH_P_IP)
    action, _ = run_prog(prog, frame)
    assert action == "drop"
    assert prog.read_stats() == only("dropped_unsupported")


def test_fragments_passed(prog):
    inner = inner_packet(4, payload=b"y" * 100)
    first = eth(bytes(IP(dst=REAL4, proto=IPPROTO_IPIP, flags="MF") / Raw(inner[:64])), ETH_P_IP)
    later = eth(bytes(IP(dst=REAL4, proto=IPPROTO_IPIP, frag=8) / Raw(inner[64:])), ETH_P_IP)
    gue_first = eth(bytes(IP(dst=REAL4, flags="MF") / UDP(dport=GUE_PORT) / Raw(inner[:64])),
                    ETH_P_IP)
    frag6 = eth(bytes(IPv6(dst=REAL6, nh=44) / Raw(bytes([IPPROTO_IPIP, 0, 0, 1, 0, 0, 0, 7]) +
                                                      inner)), ETH_P_IPV6)
    for frame in (first, later, gue_first, frag6):
        action, out = run_prog(prog, frame)
        assert (action, out) == ("pass", frame)
    assert prog.read_stats() == only("passed_fragment", 4)


def test_allow_list(prog):
    inner4, inner6 = inner_packet(4), inner_packet(6)
    to_listed4 = tunnel_frame("ipip", 4, inner4, outer_dst=REAL4)
    to_other4 = tunnel_frame("ipip", 4, inner4, outer_dst="198.18.9.9")
    to_listed6 = tunnel_frame("gue1-6/6", 6, inner6, outer_dst=REAL6)
    to_other6 = tunnel_frame("ip6ip6", 6, inner6, outer_dst="2001:db8:9::9")

    prog.set_allowed_destinations([REAL4, REAL6, "198.18.7.7"])
    assert prog.allowed_destinations() == sorted([REAL4, REAL6, "198.18.7.7"])
    assert run_prog(prog, to_listed4) == ("pass", expected_frame(inner4))
    assert run_prog(prog, to_listed6) == ("pass", expected_frame(inner6))
    assert run_prog(prog, to_other4) == ("pass", to_other4)
    assert run_prog(prog, to_other6) == ("pass", to_other6)
    stats = prog.read_stats()
    assert (stats["v4_in_v4"], stats["gue"], stats["passed_not_allowed"]) == (1, 1, 2)

    # replacing the list drops stale entries
    prog.set_allowed_destinations(["2001:db8:9::9"])
    assert prog.allowed_destinations() == ["2001:db8:9::9"]
    prog.reset_stats()
    assert run_prog(prog, to_listed4) == ("pass", to_listed4)
    assert run_prog(prog, to_other6) == ("pass", expected_frame(inner6))
    assert prog.read_stats() == {**only("passed_not_allowed"), "v6_in_v6": 1}

    # empty list: everything decapsulated again
    prog.set_allowed_destinations([])
    assert prog.allowed_destinations() == []
    prog.reset_stats()
    assert run_prog(prog, to_other4) == ("pass", expected_frame(inner4))
    assert prog.read_stats() == only("v4_in_v4")


def test_allow_list_limits(xdp_prog):
    with pytest.raises(ValueError):
        xdp_prog.set_allowed_destinations([f"198.18.{i // 250}.{i % 250}" for i in range(65)])
    with pytest.raises(ValueError):
        xdp_prog.set_allowed_destinations(["not-an-address"])


def test_configured_gue_port():
    p = DecapProgram("xdp", gue_port=7777)
    try:
        inner = inner_packet(4)
        on_default = tunnel_frame("gue1-4/4", 4, inner)
        on_custom = tunnel_frame("gue1-4/4", 4, inner, gue_port=7777)
        assert run_prog(p, on_default) == ("pass", on_default)
        assert run_prog(p, on_custom) == ("pass", expected_frame(inner))
        assert p.read_stats() == {**only("passed"), "gue": 1}
    finally:
        p.close()


def test_bad_arguments():
    with pytest.raises(ValueError):
        DecapProgram("lwt")
    with pytest.raises(ValueError):
        DecapProgram("xdp", gue_port=0)
    with pytest.raises(ValueError):
        DecapProgram("xdp", xdp_mode="offload")


# ---- part 2: end to end through network namespaces ---------------------------------------

def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + ["ip", *args]
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=30)


@dataclass
class Topo:
    client_ns: str
    real_ns: str
    client_if: str
    real_if: str
    spare_if: str  # one end of a second veth pair inside real_ns, for attach/detach tests
    client_mac: str = ""
    real_mac: str = ""


@pytest.fixture(scope="module")
def topo():
    """client ns <-veth-> real ns; VIPs on the real's lo; the client's addresses are on
    the veth subnet, so the real answers them directly."""
    tag = secrets.token_hex(3)
    t = Topo(client_ns=f"lbd{tag}", real_ns=f"lbd{secrets.token_hex(3)}",
             client_if=f"lbd{tag}a", real_if=f"lbd{tag}b", spare_if=f"lbd{tag}c")
    made = []
    try:
        for ns in (t.client_ns, t.real_ns):
            _ip("netns", "add", ns)
            made.append(ns)
            # No duplicate address detection: a tentative link-local address would hold
            # back neighbour solicitations for a second or two after link-up.
            for conf in ("all", "default"):
                subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw",
                                f"net.ipv6.conf.{conf}.accept_dad=0"], check=True, timeout=30)
        _ip("link", "add", t.client_if, "netns", t.client_ns, "type", "veth",
            "peer", "name", t.real_if, "netns", t.real_ns)
        for ns, ifname, a4, a6 in ((t.client_ns, t.client_if, CLIENT4, CLIENT6),
                                   (t.real_ns, t.real_if, REAL4, REAL6)):
            _ip("link", "set", "lo", "up", ns=ns)
            _ip("addr", "add", f"{a4}/24", "dev", ifname, ns=ns)
            _ip("-6", "addr", "add", f"{a6}/64", "dev", ifname, "nodad", ns=ns)
            # Room for the tunnel header on full-size segments: the client's routes to
            # the VIPs say 1500, the wire carries 1500 + encapsulation.
            _ip("link", "set", ifname, "mtu", "1600", "up", ns=ns)
        _ip("link", "add", t.spare_if, "netns", t.real_ns, "type", "veth",
            "peer", "name", f"lbd{tag}d", "netns", t.real_ns)
        _ip("link", "set", t.spare_if, "up", ns=t.real_ns)
        _ip("addr", "add", f"{VIP4}/32", "dev", "lo", ns=t.real_ns)
        _ip("-6", "addr", "add", f"{VIP6}/128", "dev", "lo", "nodad", ns=t.real_ns)
        # The client reaches the VIPs through the real (used by the TCP test, whose
        # packets a tc egress program encapsulates on the way out).
        _ip("route", "add", f"{VIP4}/32", "via", REAL4, "mtu", "1500", ns=t.client_ns)
        _ip("-6", "route", "add", f"{VIP6}/128", "via", REAL6, "mtu", "1500", ns=t.client_ns)
        with in_netns(t.client_ns):
            t.client_mac = _mac(t.client_if)
        with in_netns(t.real_ns):
            t.real_mac = _mac(t.real_if)
        yield t
    finally:
        for ns in made:
            _ip("netns", "del", ns, check=False)
        left = [ns for ns in made if os.path.exists(f"/run/netns/{ns}")]
        assert not left, f"namespaces left behind: {left}"


def _mac(ifname: str) -> str:
    """MAC of ifname in the calling thread's namespace (/sys/class/net would show the
    namespace sysfs was mounted in, not ours)."""
    import fcntl
    import struct
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        req = struct.pack("16s16x", ifname.encode())
        res = fcntl.ioctl(s.fileno(), 0x8927, req)  # SIOCGIFHWADDR
    finally:
        s.close()
    return ":".join(f"{b:02x}" for b in res[18:24])


@pytest.fixture(scope="module", params=["xdp", "tc"])
def attached(request, topo):
    """The decap program attached to the real's veth, for one mode at a time."""
    prog = request.getfixturevalue("xdp_prog" if request.param == "xdp" else "tc_prog")
    prog.set_allowed_destinations([])
    prog.attach(topo.real_if, netns=topo.real_ns)
    try:
        yield prog
    finally:
        prog.detach()


def _udp_socket(ns: str, addr: str, port: int) -> socket.socket:
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with in_netns(ns):
        s = socket.socket(fam, socket.SOCK_DGRAM)
    s.settimeout(3)
    s.bind((addr, port))
    return s


def _send_frames(topo: Topo, frames: list[bytes]) -> None:
    with in_netns(topo.client_ns):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        s.bind((topo.client_if, 0))
        for f in frames:
            s.send(f)
    finally:
        s.close()


@pytest.mark.netns
@pytest.mark.parametrize("kind,outer_v,inner_v,counter", KINDS, ids=KIND_IDS)
def test_e2e_udp_echo(topo, attached, kind, outer_v, inner_v, counter):
    vip, client = (VIP4, CLIENT4) if inner_v == 4 else (VIP6, CLIENT6)
    port = 20000 + secrets.randbelow(20000)
    server = _udp_socket(topo.real_ns, vip, 7)
    cli = _udp_socket(topo.client_ns, client, port)
    try:
        before = attached.read_stats()
        payload = f"hello via {kind} ({attached.mode})".encode()
        inner = inner_packet(inner_v, payload=payload, sport=port, dport=7, src=client, dst=vip)
        frame = eth(encapsulate(kind, outer_v, inner), ETH_P_IP if outer_v == 4 else ETH_P_IPV6,
                    dst=topo.real_mac, src=topo.client_mac)
        _send_frames(topo, [frame])
        data, peer = server.recvfrom(2048)
        assert data == payload
        assert (peer[0], peer[1]) == (client, port)
        # echo: the reply leaves the real from the VIP straight to the client
        server.sendto(data.upper(), peer)
        reply, src = cli.recvfrom(2048)
        assert reply == payload.upper()
        assert (src[0], src[1]) == (vip, 7)
        after = attached.read_stats()
        assert after[counter] - before[counter] == 1
        for bad in ("dropped_malformed", "dropped_unsupported", "dropped_error"):
            assert after[bad] == before[bad]
    finally:
        server.close()
        cli.close()


@pytest.mark.netns
def test_e2e_plain_traffic_still_works(topo, attached):
    """Non-tunnel traffic (here: UDP to the real's own address, with ARP/ND before it)
    is passed to the kernel."""
    for real, client in ((REAL4, CLIENT4), (REAL6, CLIENT6)):
        server = _udp_socket(topo.real_ns, real, 9999)
        cli = _udp_socket(topo.client_ns, client, 0)
        try:
            before = attached.read_stats()["passed"]
            cli.sendto(b"plain", (real, 9999))
            data, peer = server.recvfrom(100)
            assert data == b"plain" and peer[0] == client
            assert attached.read_stats()["passed"] > before
        finally:
            server.close()
            cli.close()


@pytest.mark.netns
def test_e2e_malformed_dropped(topo, attached):
    server = _udp_socket(topo.real_ns, VIP4, 7)
    try:
        before = attached.read_stats()["dropped_malformed"]
        inner = inner_packet(4, sport=5555, dport=7)
        frame = _set_outer_len(eth(encapsulate("ipip", 4, inner), ETH_P_IP, dst=topo.real_mac,
                                   src=topo.client_mac), 4, -4)
        _send_frames(topo, [frame])
        server.settimeout(0.5)
        with pytest.raises(socket.timeout):
            server.recvfrom(100)
        assert attached.read_stats()["dropped_malformed"] == before + 1
    finally:
        server.close()


# A test-only tc egress program for the client side: it encapsulates the client kernel's
# own packets to the VIPs (IPIP, IP6IP6, IPv4-in-IPv6 or GUE variant 1), standing in
# for the balancer so that real TCP connections go through the decap program.
ENCAP_SRC = r"""
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>

struct encap_cfg {
	__u32 kind;          /* 0 off, 1 ipip, 2 ip6ip6, 3 4in6, 4 gue (outer = inner family) */
	__u32 vip4, src4, dst4;
	__u32 vip6[4], src6[4], dst6[4];
	__u32 gue_port;      /* host order */
};
BPF_ARRAY(encap_cfg_map, struct encap_cfg, 1);
BPF_ARRAY(encap_count, __u64, 1);

struct hdr4 { struct iphdr ip; struct udphdr udp; } __attribute__((packed));
struct hdr6 { struct ipv6hdr ip; struct udphdr udp; } __attribute__((packed));

int encap_egress(struct __sk_buff *skb)
{
	__u32 k = 0;
	struct encap_cfg *c = encap_cfg_map.lookup(&k);
	void *data = (void *)(long)skb->data, *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	__u32 inner_len = skb->len - ETH_HLEN;
	__u64 *n;

	if (!c || !c->kind || (void *)(eth + 1) > data_end)
		return TC_ACT_OK;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *iph = (void *)(eth + 1);
		if ((void *)(iph + 1) > data_end || iph->daddr != c->vip4)
			return TC_ACT_OK;
		if (c->kind == 1 || c->kind == 4) {
			struct hdr4 h = {};
			int gue = c->kind == 4;
			int olen = gue ? sizeof(h) : sizeof(h.ip);
			h.ip.version = 4; h.ip.ihl = 5; h.ip.tos = iph->tos; h.ip.ttl = 64;
			h.ip.tot_len = bpf_htons(inner_len + olen);
			h.ip.protocol = gue ? IPPROTO_UDP : IPPROTO_IPIP;
			h.ip.saddr = c->src4; h.ip.daddr = c->dst4;
			__u32 s = bpf_csum_diff(0, 0, (void *)&h.ip, sizeof(h.ip), 0);
			s = (s & 0xffff) + (s >> 16); s = (s & 0xffff) + (s >> 16);
			h.ip.check = ~s;
			h.udp.source = bpf_htons(40000); h.udp.dest = bpf_htons(c->gue_port);
			h.udp.len = bpf_htons(inner_len + sizeof(h.udp));
			if (bpf_skb_adjust_room(skb, olen, BPF_ADJ_ROOM_MAC,
					BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | (gue ? BPF_F_ADJ_ROOM_ENCAP_L4_UDP : 0)))
				return TC_ACT_SHOT;
			if (bpf_skb_store_bytes(skb, ETH_HLEN, &h, olen, 0))
				return TC_ACT_SHOT;
		} else if (c->kind == 3) {
			struct ipv6hdr h = {};
			__be16 proto = bpf_htons(ETH_P_IPV6);
			h.version = 6; h.payload_len = bpf_htons(inner_len); h.nexthdr = IPPROTO_IPIP;
			h.hop_limit = 64;
			__builtin_memcpy(&h.saddr, c->src6, 16); __builtin_memcpy(&h.daddr, c->dst6, 16);
			if (bpf_skb_adjust_room(skb, sizeof(h), BPF_ADJ_ROOM_MAC,
					BPF_F_ADJ_ROOM_ENCAP_L3_IPV6))
				return TC_ACT_SHOT;
			if (bpf_skb_store_bytes(skb, ETH_HLEN, &h, sizeof(h), 0) ||
			    bpf_skb_store_bytes(skb, 12, &proto, 2, 0))
				return TC_ACT_SHOT;
		} else {
			return TC_ACT_OK;
		}
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6h = (void *)(eth + 1);
		if ((void *)(ip6h + 1) > data_end)
			return TC_ACT_OK;
		if (ip6h->daddr.in6_u.u6_addr32[0] != c->vip6[0] ||
		    ip6h->daddr.in6_u.u6_addr32[1] != c->vip6[1] ||
		    ip6h->daddr.in6_u.u6_addr32[2] != c->vip6[2] ||
		    ip6h->daddr.in6_u.u6_addr32[3] != c->vip6[3])
			return TC_ACT_OK;
		if (c->kind != 2 && c->kind != 4)
			return TC_ACT_OK;
		struct hdr6 h = {};
		int gue = c->kind == 4;
		int olen = gue ? sizeof(h) : sizeof(h.ip);
		h.ip.version = 6; h.ip.hop_limit = 64;
		h.ip.payload_len = bpf_htons(inner_len + (gue ? sizeof(h.udp) : 0));
		h.ip.nexthdr = gue ? IPPROTO_UDP : IPPROTO_IPV6;
		__builtin_memcpy(&h.ip.saddr, c->src6, 16); __builtin_memcpy(&h.ip.daddr, c->dst6, 16);
		h.udp.source = bpf_htons(40000); h.udp.dest = bpf_htons(c->gue_port);
		h.udp.len = bpf_htons(inner_len + sizeof(h.udp));
		if (bpf_skb_adjust_room(skb, olen, BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_ENCAP_L3_IPV6 | (gue ? BPF_F_ADJ_ROOM_ENCAP_L4_UDP : 0)))
			return TC_ACT_SHOT;
		if (bpf_skb_store_bytes(skb, ETH_HLEN, &h, olen, 0))
			return TC_ACT_SHOT;
	} else {
		return TC_ACT_OK;
	}
	n = encap_count.lookup(&k);
	if (n)
		__sync_fetch_and_add(n, 1);
	return TC_ACT_OK;
}
"""

TCP_KINDS = [("ipip", 1, 4, "v4_in_v4"), ("ip6ip6", 2, 6, "v6_in_v6"), ("4in6", 3, 4, "v4_in_v6"),
             ("gue-v4", 4, 4, "gue"), ("gue-v6", 4, 6, "gue")]


@pytest.fixture(scope="module")
def client_encap(topo):
    """ENCAP_SRC on the client veth's clsact egress; yields a setter for the kind."""
    from bcc import BPF
    from pyroute2 import IPRoute

    b = BPF(text=ENCAP_SRC.encode(), cflags=["-Wno-unused-value", "-Wno-pointer-sign",
                                    "-Wno-compare-distinct-pointer-types"])
    fn = b.load_func(b"encap_egress", BPF.SCHED_CLS)
    cfg = b[b"encap_cfg_map"]

    def set_kind(kind: int) -> None:
        v = cfg.Leaf()
        v.kind = kind
        v.vip4 = int.from_bytes(socket.inet_aton(VIP4), "little")
        v.src4 = int.from_bytes(socket.inet_aton(CLIENT4), "little")
        v.dst4 = int.from_bytes(socket.inet_aton(REAL4), "little")
        for field, addr in (("vip6", VIP6), ("src6", CLIENT6), ("dst6", REAL6)):
            raw = ipaddress.IPv6Address(addr).packed
            arr = getattr(v, field)
            for i in range(4):
                arr[i] = int.from_bytes(raw[4 * i:4 * i + 4], "little")
        v.gue_port = GUE_PORT
        cfg[cfg.Key(0)] = v

    with in_netns(topo.client_ns):
        ipr = IPRoute()  # its netlink socket stays in the client namespace
    try:
        idx = ipr.link_lookup(ifname=topo.client_if)[0]
        ipr.tc("add", "clsact", idx)
        ipr.tc("add-filter", "bpf", idx, ":1", fd=fn.fd, name="encap_egress",
               parent=0xFFFFFFF3, classid=1, direct_action=True)
        yield set_kind, b[b"encap_count"]
    finally:
        ipr.close()  # the qdisc and filter go with the namespace
        b.cleanup()


@pytest.mark.netns
@pytest.mark.parametrize("name,kind,family,counter", TCP_KINDS, ids=[k[0] for k in TCP_KINDS])
def test_e2e_tcp_connection(topo, attached, client_encap, name, kind, family, counter):
    """A kernel TCP connection client -> VIP: the client's packets leave encapsulated,
    the decap program strips them on the real, the real's answers go straight back.
    2 MB each way: full-size segments and, in tc mode, GSO packets across the veth."""
    set_kind, encap_count = client_encap
    vip, client = (VIP4, CLIENT4) if family == 4 else (VIP6, CLIENT6)
    fam = socket.AF_INET if family == 4 else socket.AF_INET6
    msg = (f"tcp via {name} ({attached.mode}) ".encode() * 100000)[:2_000_000]
    with in_netns(topo.real_ns):
        srv = socket.socket(fam, socket.SOCK_STREAM)
    with in_netns(topo.client_ns):
        cli = socket.socket(fam, socket.SOCK_STREAM)
    srv.settimeout(10)
    cli.settimeout(10)
    server_result: dict[str, object] = {}

    def serve() -> None:
        try:
            conn, peer = srv.accept()
            with conn:
                conn.settimeout(10)
                got = bytearray()
                while len(got) < len(msg):
                    chunk = conn.recv(1 << 16)
                    if not chunk:
                        break
                    got += chunk
                server_result["peer"] = peer[0]
                server_result["ok"] = bytes(got) == msg
                conn.sendall(bytes(got[::-1]))
        except Exception as e:  # reported by the main thread
            server_result["error"] = repr(e)

    set_kind(kind)
    thread = threading.Thread(target=serve, daemon=True)
    try:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        port = 20000 + secrets.randbelow(20000)
        srv.bind((vip, port))
        srv.listen(4)
        thread.start()
        before = attached.read_stats()
        sent_before = encap_count[encap_count.Key(0)].value
        cli.bind((client, 0))
        cli.connect((vip, port))
        cli.sendall(msg)
        back = bytearray()
        while len(back) < len(msg):
            chunk = cli.recv(1 << 16)
            assert chunk, f"connection closed early, server: {server_result}"
            back += chunk
        thread.join(10)
        assert "error" not in server_result, server_result
        assert server_result == {"peer": client, "ok": True}
        assert bytes(back) == msg[::-1]
        after = attached.read_stats()
        encapsulated = encap_count[encap_count.Key(0)].value - sent_before
        assert encapsulated >= 3  # SYN, ACK, data (at least)
        assert after[counter] - before[counter] >= 3
        for bad in ("dropped_malformed", "dropped_unsupported", "dropped_error"):
            assert after[bad] == before[bad]
    finally:
        set_kind(0)
        cli.close()
        srv.close()
        thread.join(10)


XDP_PASS_SRC = "int pass_all(struct xdp_md *ctx) { return XDP_PASS; }"


@pytest.mark.netns
def test_xdp_attach_does_not_replace_and_detach_is_selective(topo, xdp_prog):
    """XDP attach refuses to replace a program someone else attached; detach(ifname)
    removes ours from that interface only."""
    from bcc import BPF

    other = BPF(text=XDP_PASS_SRC.encode())
    try:
        fn = other.load_func(b"pass_all", BPF.XDP)
        with in_netns(topo.real_ns):
            BPF.attach_xdp(topo.spare_if.encode(), fn, 0)
        try:
            with pytest.raises(DecapError):
                xdp_prog.attach(topo.spare_if, netns=topo.real_ns)
        finally:
            with in_netns(topo.real_ns):
                BPF.remove_xdp(topo.spare_if.encode(), 0)
    finally:
        other.cleanup()
    n = len(xdp_prog.attachments)
    xdp_prog.attach(topo.spare_if, netns=topo.real_ns)
    assert (topo.spare_if, topo.real_ns) in xdp_prog.attachments
    shown = _ip("link", "show", "dev", topo.spare_if, ns=topo.real_ns).stdout
    assert "prog/xdp" in shown and "xdpgeneric" not in shown  # native mode on veth
    xdp_prog.detach(topo.spare_if, netns=topo.real_ns)
    assert len(xdp_prog.attachments) == n
    assert "xdp" not in _ip("link", "show", "dev", topo.spare_if, ns=topo.real_ns).stdout


def _tc(*args: str, ns: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, "tc", *args], check=True,
                          capture_output=True, text=True, timeout=30).stdout


@pytest.mark.netns
def test_tc_attach_and_detach(topo, tc_prog):
    tc_prog.attach(topo.spare_if, netns=topo.real_ns)
    try:
        out = _tc("filter", "show", "dev", topo.spare_if, "ingress", ns=topo.real_ns)
        assert "decap_tc" in out and "direct-action" in out
    finally:
        tc_prog.detach(topo.spare_if, netns=topo.real_ns)
    assert _tc("filter", "show", "dev", topo.spare_if, "ingress", ns=topo.real_ns).strip() == ""
    assert "clsact" not in _tc("qdisc", "show", "dev", topo.spare_if, ns=topo.real_ns)


@pytest.mark.netns
def test_tc_detach_keeps_foreign_qdisc(topo, tc_prog):
    """A clsact qdisc that was there before is left in place."""
    _tc("qdisc", "add", "dev", topo.spare_if, "clsact", ns=topo.real_ns)
    try:
        tc_prog.attach(topo.spare_if, netns=topo.real_ns)
        tc_prog.detach(topo.spare_if, netns=topo.real_ns)
        assert "clsact" in _tc("qdisc", "show", "dev", topo.spare_if, ns=topo.real_ns)
        assert _tc("filter", "show", "dev", topo.spare_if, "ingress",
                   ns=topo.real_ns).strip() == ""
    finally:
        _tc("qdisc", "del", "dev", topo.spare_if, "clsact", ns=topo.real_ns)


def test_in_netns_restores_namespace():
    before = os.readlink("/proc/thread-self/ns/net")
    with pytest.raises(OSError) as e:
        with in_netns(f"lbd{secrets.token_hex(3)}-missing"):
            pass
    assert e.value.errno == errno.ENOENT
    assert os.readlink("/proc/thread-self/ns/net") == before


@pytest.mark.netns
def test_tc_detach_keeps_qdisc_with_other_filters(topo, tc_prog, tc_legacy_prog):
    """We added the clsact qdisc, but someone else added a filter since: the qdisc stays."""
    from pyroute2 import IPRoute

    tc_prog.attach(topo.spare_if, netns=topo.real_ns)
    with in_netns(topo.real_ns):
        ipr = IPRoute()
    try:
        idx = ipr.link_lookup(ifname=topo.spare_if)[0]
        ipr.tc("add-filter", "bpf", idx, ":1", fd=tc_legacy_prog.prog_fd, name="foreign",
               parent=0xFFFFFFF3, classid=1, direct_action=True, prio=7)
        tc_prog.detach(topo.spare_if, netns=topo.real_ns)
        assert _tc("filter", "show", "dev", topo.spare_if, "ingress",
                   ns=topo.real_ns).strip() == ""
        assert "foreign" in _tc("filter", "show", "dev", topo.spare_if, "egress",
                                ns=topo.real_ns)
        assert "clsact" in _tc("qdisc", "show", "dev", topo.spare_if, ns=topo.real_ns)
    finally:
        tc_prog.detach(topo.spare_if, netns=topo.real_ns)
        _tc("qdisc", "del", "dev", topo.spare_if, "clsact", ns=topo.real_ns)
        ipr.close()


@pytest.mark.netns
def test_tc_priority_taken(topo, tc_prog, tc_legacy_prog):
    """A second decap filter at the same priority is refused, and leaves nothing behind."""
    tc_prog.attach(topo.spare_if, netns=topo.real_ns)
    try:
        with pytest.raises(DecapError):
            tc_legacy_prog.attach(topo.spare_if, netns=topo.real_ns)
        assert (topo.spare_if, topo.real_ns) not in tc_legacy_prog.attachments
    finally:
        tc_prog.detach(topo.spare_if, netns=topo.real_ns)
    assert "clsact" not in _tc("qdisc", "show", "dev", topo.spare_if, ns=topo.real_ns)
