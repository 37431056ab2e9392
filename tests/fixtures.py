"""Golden fixtures: every row of docs/datapath.md as data, run through both datapaths.

A fixture is (description, row, input frame, expected action, expected output frame,
expected global-counter deltas, expected real). Expected outputs are built here with
scapy from the spec alone — never by calling the datapath — so they check it
independently. All fixtures share one provisioning config (:data:`FIXTURE_CONFIG`), as
Katran's tester does; each runs on a fresh datapath after its optional ``setup`` frames.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

import numpy as np
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, TCPerror, UDPerror
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoRequest,
    ICMPv6ND_NS,
    ICMPv6PacketTooBig,
    IPerror6,
    IPv6,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
)
from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether
from scapy.packet import Raw, raw

from lb import layout
from lb.config import parse_config
from lb.constants import F_LOCAL, IPPROTO_TCP, REAL_F_DOWN
from lb.datapath_tables import (
    DatapathTables,
    addr16,
    compile_tables,
    down_bit,
    empty_down_set,
)

# The config shape the issue fixes as a contract: it must load, and `lbctl simulate` runs on it.
CONTRACT_YAML = """\
settings:
  ring_size: 65537
  max_vips: 512
  gateway_mac: "00:00:de:ad:be:af"
  encap: ipip
vips:
  - address: 10.200.1.1
    port: 80
    protocol: tcp
    hash: maglev          # maglev | maglev_v2 (default)
    flags: []             # no_src_port, lru_bypass, dport_only, local
    reals:
      - {address: 10.0.0.1, weight: 1}
      - {address: 10.0.0.2, weight: 1}
"""

GW_MAC = "00:00:de:ad:be:af"
LB_MAC = "02:00:00:00:00:01"  # the balancer's interface (input frames' destination)
ROUTER_MAC = "02:00:00:00:00:fe"  # input frames' source
CLIENT4 = "198.18.0.10"
CLIENT6 = "2001:db8:ffff::10"
MAX_FRAME = 1514

# --- QUIC connection-id routing and source routing (real selection steps 0 and 2) -------
# Appended after the VIPs above so their real ids and rings stay as they were. Each routed
# VIP has one real on its ring (the fallback), so a routed packet is told apart by its real.
QUIC_VIP4 = "198.18.101.1"  # udp 443, quic
QUIC_VIP4_BYPASS = "198.18.101.2"  # udp 443, quic + lru_bypass
QUIC_VIP6 = "2001:db8:101::1"  # udp 443, quic
SRC_VIP4 = "198.18.101.3"  # tcp 80, src_routing
SRC_VIP4_BYPASS = "198.18.101.4"  # tcp 80, src_routing + lru_bypass
SRC_VIP6 = "2001:db8:101::2"  # tcp 80, src_routing
RING4, RING6 = "198.19.1.1", "2001:db8:2::1"  # the routed VIPs' rings
# Reals taken out of the reals table by fixture_tables() (the control plane removed them,
# the routing tables still name them): "real gone".
GONE_REALS = ("198.19.1.99", "2001:db8:2::99")
ROUTING_VIPS = [
    {"address": QUIC_VIP4, "port": 443, "protocol": "udp", "flags": ["quic"], "reals": [{"address": RING4}]},
    {"address": QUIC_VIP4_BYPASS, "port": 443, "protocol": "udp", "flags": ["quic", "lru_bypass"],
     "reals": [{"address": RING4}]},
    {"address": QUIC_VIP6, "port": 443, "protocol": "udp", "flags": ["quic"], "reals": [{"address": RING6}]},
    {"address": SRC_VIP4, "port": 80, "protocol": "tcp", "flags": ["src_routing"], "reals": [{"address": RING4}]},
    {"address": SRC_VIP4_BYPASS, "port": 80, "protocol": "tcp", "flags": ["src_routing", "lru_bypass"],
     "reals": [{"address": RING4}]},
    {"address": SRC_VIP6, "port": 80, "protocol": "tcp", "flags": ["src_routing"], "reals": [{"address": RING6}]},
    # the routing tables' reals must be reals of some VIP
    {"address": "198.18.101.9", "port": 80, "protocol": "tcp",
     "reals": [{"address": a} for a in ("198.19.1.2", "198.19.1.3", "2001:db8:2::2", "2001:db8:2::3",
                                         *GONE_REALS)]},
]
QUIC_ID_V1, QUIC_ID_V2, QUIC_ID_V3 = 1000, 0xABCDEF, 0xC0FFEE01  # fit 16 / 24 / 32 bits
QUIC_ID_V6_V1 = 2000  # an IPv6 real for a 16-bit id
QUIC_ID_GONE, QUIC_ID_UNKNOWN = 77, 4242
QUIC_SERVERS = [
    {"id": QUIC_ID_V1, "real": "198.19.1.2"},
    {"id": QUIC_ID_V2, "real": "198.19.1.3"},
    {"id": QUIC_ID_V3, "real": "2001:db8:2::2"},
    {"id": QUIC_ID_V6_V1, "real": "2001:db8:2::3"},
    {"id": QUIC_ID_GONE, "real": GONE_REALS[0]},
]
SOURCE_ROUTES = [  # nested prefixes: the longest match wins
    {"prefix": "198.18.0.0/16", "real": "198.19.1.2"},
    {"prefix": "198.18.0.0/24", "real": "198.19.1.3"},
    {"prefix": "198.18.5.0/24", "real": GONE_REALS[0]},
    {"prefix": "2001:db8:ffff::/48", "real": "2001:db8:2::2"},
    {"prefix": "2001:db8:ffff::/64", "real": "2001:db8:2::3"},
    {"prefix": "2001:db8:ffff:1::/64", "real": GONE_REALS[1]},
]

# --- CIDR VIPs (a prefix as the VIP address): exact VIP, longest prefix, port-0 VIP,
# longest port-0 prefix. Appended last, so the VIPs above keep their numbers and reals.
PREFIX4, PREFIX4_LONG, PREFIX6, PREFIX6_LONG = ("198.18.64.0/24", "198.18.64.128/25", "2001:db8:64::/48",
                                                "2001:db8:64:1::/64")
PREFIX_EXACT = "198.18.64.7"  # an exact tcp 80 VIP inside PREFIX4
PREFIX_EXACT_ANY = "198.18.64.8"  # an exact tcp port-0 VIP inside PREFIX4
PREFIX_VIPS = [
    {"address": PREFIX4, "port": 80, "protocol": "tcp", "reals": [{"address": "198.19.3.1"}]},
    {"address": PREFIX4_LONG, "port": 80, "protocol": "tcp", "reals": [{"address": "198.19.3.2"}]},
    {"address": PREFIX4, "port": 0, "protocol": "tcp", "reals": [{"address": "198.19.3.3"}]},
    {"address": PREFIX_EXACT, "port": 80, "protocol": "tcp", "reals": [{"address": "198.19.3.4"}]},
    {"address": PREFIX_EXACT_ANY, "port": 0, "protocol": "tcp", "reals": [{"address": "198.19.3.5"}]},
    {"address": PREFIX6, "port": 53, "protocol": "udp", "reals": [{"address": "2001:db8:3::1"}]},
    {"address": PREFIX6_LONG, "port": 53, "protocol": "udp", "flags": ["no_src_port"],
     "reals": [{"address": "2001:db8:3::2"}]},
    {"address": "198.18.66.0/23", "port": 443, "protocol": "udp", "flags": ["lru_bypass"], "reals": []},
]

FIXTURE_CONFIG = {
    "settings": {
        "gateway_mac": GW_MAC,
        "max_frame_size": MAX_FRAME,
        "local_addresses": ["198.19.0.250"],
        "conn_table_size": 1024,
    },
    "vips": [
        {"address": "198.18.100.1", "port": 80, "protocol": "tcp", "reals": [{"address": "198.19.0.1"}]},
        {"address": "198.18.100.1", "port": 53, "protocol": "udp", "reals": [{"address": "198.19.0.2"}]},
        {"address": "198.18.100.2", "port": 0, "protocol": "tcp", "reals": [{"address": "198.19.0.3"}]},
        {"address": "198.18.100.3", "port": 80, "protocol": "tcp", "flags": ["no_src_port"],
         "reals": [{"address": "198.19.0.1"}]},
        {"address": "198.18.100.4", "port": 80, "protocol": "tcp", "flags": ["lru_bypass"],
         "reals": [{"address": "198.19.0.1"}]},
        {"address": "198.18.100.5", "port": 80, "protocol": "tcp", "flags": ["dport_only"],
         "reals": [{"address": "198.19.0.1"}]},
        {"address": "198.18.100.6", "port": 80, "protocol": "tcp", "reals": []},
        {"address": "198.18.100.7", "port": 80, "protocol": "tcp", "reals": [{"address": "2001:db8:1::1"}]},
        {"address": "198.18.100.8", "port": 80, "protocol": "tcp", "flags": ["local"],
         "reals": [{"address": "198.19.0.250"}]},
        {"address": "198.18.100.9", "port": 80, "protocol": "tcp", "hash": "maglev",
         "reals": [{"address": "198.19.0.1"}, {"address": "198.19.0.2"}, {"address": "198.19.0.3"}]},
        {"address": "198.18.100.10", "port": 80, "protocol": "tcp",
         "reals": [{"address": "198.19.0.1", "weight": 0}]},
        {"address": "2001:db8:100::1", "port": 80, "protocol": "tcp", "reals": [{"address": "2001:db8:1::2"}]},
        {"address": "2001:db8:100::1", "port": 443, "protocol": "udp", "reals": [{"address": "2001:db8:1::3"}]},
        *ROUTING_VIPS,
        *PREFIX_VIPS,
    ],
    "quic_servers": QUIC_SERVERS,
    "source_routes": SOURCE_ROUTES,
}
# Not expressible in a valid config (the validator refuses an IPv4 real for an IPv6 VIP),
# but the datapath must still handle such tables: added by :func:`fixture_tables`.
# (VIP address, port, real, VIP flags)
V6_VIP_WITH_V4_REAL = ("2001:db8:100::2", 80, "198.19.0.1", 0)
V6_LOCAL_VIP_WITH_V4_LOCAL_REAL = ("2001:db8:100::3", 80, "198.19.0.250", F_LOCAL)


def _add_vip(t: DatapathTables, vip: str, port: int, real: str, flags: int) -> None:
    """Append a TCP VIP whose whole ring is ``real`` (already a real of ``t``)."""
    num = len(t.vip_keys)
    vip_num = num + len(t.vip_prefix_keys)  # the next VIP number (CIDR VIPs have theirs)
    ip = ipaddress.ip_address(vip)
    key = np.zeros(num + 1, dtype=layout.VIP_KEY)
    meta = np.zeros(num + 1, dtype=layout.VIP_META)
    for name in layout.VIP_KEY.names:
        key[name][:num] = t.vip_keys[name]
    for name in layout.VIP_META.names:
        meta[name][:num] = t.vip_metas[name]
    key[num]["addr"], key[num]["family"] = addr16(ip)
    key[num]["port"], key[num]["proto"] = port, IPPROTO_TCP
    meta[num]["vip_num"], meta[num]["flags"] = vip_num, flags
    akey = np.zeros(len(t.vip_addr_keys) + 1, dtype=layout.VIP_ADDR_KEY)
    for name in layout.VIP_ADDR_KEY.names:
        akey[name][:-1] = t.vip_addr_keys[name]
    akey[-1]["addr"], akey[-1]["family"] = addr16(ip)
    t.vip_keys, t.vip_metas, t.vip_addr_keys = key, meta, akey
    t.rings[vip_num, :] = t.real_ids[ipaddress.ip_address(real)]


def fixture_tables() -> DatapathTables:
    """The provisioning every fixture runs against."""
    t = compile_tables(parse_config(FIXTURE_CONFIG))
    _add_vip(t, *V6_VIP_WITH_V4_REAL)
    _add_vip(t, *V6_LOCAL_VIP_WITH_V4_LOCAL_REAL)
    for gone in GONE_REALS:
        t.reals[t.real_ids[ipaddress.ip_address(gone)]] = np.zeros((), dtype=layout.REAL)
    return t


@dataclass(frozen=True)
class Fixture:
    """One golden case. ``output`` is None for DROP; for PASS it is the input."""

    description: str
    row: int  # row of the table in docs/datapath.md
    frame: bytes
    action: str  # "TX" | "PASS" | "DROP"
    output: bytes | None
    counters: dict[str, int]  # global counter deltas of this frame (others: 0)
    real: str | None = None  # address of the real chosen, if any
    setup: tuple[bytes, ...] = field(default=())  # frames processed first (same datapath)
    # table set (FIXTURE_SETS name) loaded after the setup frames, connection table kept:
    # the control plane changed the tables while the setup's flows were pinned
    reload: str | None = None


# --- frame builders ----------------------------------------------------------------------


def eth(**kw) -> Ether:
    return Ether(dst=LB_MAC, src=ROUTER_MAC, **kw)


def tcp4(dst: str = "198.18.100.1", dport: int = 80, sport: int = 31337, tcp_flags: str = "S",
         src: str = CLIENT4, payload: bytes = b"", **ip_kw) -> bytes:
    return raw(eth() / IP(src=src, dst=dst, **ip_kw) / TCP(sport=sport, dport=dport, flags=tcp_flags) / payload)


def tcp6(dst: str = "2001:db8:100::1", dport: int = 80, sport: int = 31337, tcp_flags: str = "S",
         src: str = CLIENT6, **ip_kw) -> bytes:
    return raw(eth() / IPv6(src=src, dst=dst, **ip_kw) / TCP(sport=sport, dport=dport, flags=tcp_flags))


def outer_src4(client: str, sport: int) -> str:
    c = ipaddress.IPv4Address(client).packed
    return f"172.16.{c[2] ^ (sport & 0xFF)}.{c[3] ^ (sport >> 8)}"


def outer_src6(client: str, sport: int) -> str:
    c = ipaddress.ip_address(client).packed[-4:]
    last = bytes([c[0] ^ (sport >> 8), c[1] ^ (sport & 0xFF), c[2], c[3]])
    return str(ipaddress.IPv6Address(b"\x01\x00" + b"\x00" * 10 + last))


def encap(frame: bytes, real: str, client: str, sport: int) -> bytes:
    """The frame as docs/datapath.md encapsulates it for ``real``."""
    inp = Ether(frame)
    vlan = Dot1Q in inp
    l3 = 18 if vlan else 14
    inner = frame[l3:]
    first = inp[Dot1Q].payload if vlan else inp.payload
    tos = first.tos if isinstance(first, IP) else first.tc
    l2 = Ether(dst=GW_MAC, src=inp.dst)
    if vlan:
        l2 = l2 / Dot1Q(prio=inp[Dot1Q].prio, dei=inp[Dot1Q].dei, vlan=inp[Dot1Q].vlan)
    # the inner packet's own length: Ethernet padding is carried but not counted
    plen = first.len if isinstance(first, IP) else first.plen + 40
    if ipaddress.ip_address(real).version == 4:
        outer = IP(src=outer_src4(client, sport), dst=real, proto=4, ttl=64, id=0, flags=0, tos=tos,
                   len=plen + 20)
        return raw(l2 / outer / Raw(inner))
    nh = 4 if isinstance(first, IP) else 41
    outer6 = IPv6(src=outer_src6(client, sport), dst=real, nh=nh, hlim=64, tc=tos, fl=0, plen=plen)
    return raw(l2 / outer6 / Raw(inner))


def echo_reply(frame: bytes, check: int | None = None) -> bytes:
    """ICMP(v6) echo reply as the balancer builds it from the request ``frame``: its
    checksum is a full recomputation's, or ``check``."""
    p = Ether(frame)
    p.src, p.dst = p.dst, p.src
    if IP in p:
        ip = p[IP]
        ip.src, ip.dst, ip.ttl = ip.dst, ip.src, 64
        del ip.chksum
        p[ICMP].type = 0
        p[ICMP].chksum = check  # None: a full recompute equals the incremental update
    else:
        ip6 = p[IPv6]
        ip6.src, ip6.dst, ip6.hlim = ip6.dst, ip6.src, 64
        p[ICMPv6EchoRequest].type = 129
        p[ICMPv6EchoRequest].cksum = check
    return raw(p)


def echo_id_for(frame: bytes, reply_check: int) -> int:
    """The echo id that, in place of the id 0 of the echo request ``frame``, makes the
    reply's full-recomputation checksum ``reply_check``: ids add straight into the sum."""
    l4 = 34 if IP in Ether(frame) else 54  # untagged frames only
    c0 = int.from_bytes(echo_reply(frame)[l4 + 2:l4 + 4], "big")
    # sum' = sum0 + id must be ~reply_check: id = ~reply_check - sum0 = ~reply_check + c0
    s = (~reply_check & 0xFFFF) + c0
    return (s & 0xFFFF) + (s >> 16)


def C(**kw: int) -> dict[str, int]:
    """Counter deltas of one frame: rx_packets plus the ones named."""
    return {"rx_packets": 1, **kw}


def build_fixtures() -> list[Fixture]:
    fx: list[Fixture] = []
    add = fx.append
    syn = tcp4()
    real1 = "198.19.0.1"

    # row 1-2: L2
    add(Fixture("runt frame, 10 bytes", 1, syn[:10], "DROP", None, C(drop_malformed=1)))
    vlan_runt = raw(eth() / Dot1Q(vlan=7))[:16]
    add(Fixture("802.1Q frame cut inside the tag", 1, vlan_runt, "DROP", None, C(drop_malformed=1)))
    arp = raw(eth(type=0x0806) / ARP(pdst="198.18.100.1"))
    add(Fixture("ARP", 2, arp, "PASS", arp, C(pass_not_ip=1)))
    qinq = raw(eth() / Dot1AD(vlan=5) / Dot1Q(vlan=7) / IP(src=CLIENT4, dst="198.18.100.1") / TCP(dport=80))
    add(Fixture("802.1ad outer tag", 2, qinq, "PASS", qinq, C(pass_not_ip=1)))
    dbl = raw(eth() / Dot1Q(vlan=5) / Dot1Q(vlan=7) / IP(src=CLIENT4, dst="198.18.100.1") / TCP(dport=80))
    add(Fixture("two 802.1Q tags", 2, dbl, "PASS", dbl, C(pass_not_ip=1)))

    # rows 3-4: IP sanity
    add(Fixture("IPv4 header cut at 10 bytes", 3, syn[:24], "DROP", None, C(drop_malformed=1)))
    bad = bytearray(syn); bad[14] = 0x55
    add(Fixture("IPv4 version 5", 3, bytes(bad), "DROP", None, C(drop_malformed=1)))
    bad = bytearray(syn); bad[14] = 0x44
    add(Fixture("IPv4 IHL 4", 3, bytes(bad), "DROP", None, C(drop_malformed=1)))
    add(Fixture("IPv4 tot_len beyond frame", 3, tcp4(len=400), "DROP", None, C(drop_malformed=1)))
    add(Fixture("IPv4 tot_len < header", 3, tcp4(len=12), "DROP", None, C(drop_malformed=1)))
    syn6 = tcp6()
    add(Fixture("IPv6 header cut at 30 bytes", 4, syn6[:44], "DROP", None, C(drop_malformed=1)))
    bad = bytearray(syn6); bad[14] = 0x40
    add(Fixture("IPv6 version 4", 4, bytes(bad), "DROP", None, C(drop_malformed=1)))
    add(Fixture("IPv6 payload_len beyond frame", 4, tcp6(plen=200), "DROP", None, C(drop_malformed=1)))

    # row 5: not ours
    for desc, f in [
        ("IPv4 TCP to a non-VIP address", tcp4(dst="198.18.200.1")),
        ("IPv6 TCP to a non-VIP address", tcp6(dst="2001:db8:200::1")),
        ("IPv4 with options to a non-VIP address", tcp4(dst="198.18.200.1", options=b"\x01\x01\x01\x00")),
        ("IPv4 fragment to a non-VIP address", tcp4(dst="198.18.200.1", flags="MF")),
        ("ICMP echo to a non-VIP address", raw(eth() / IP(src=CLIENT4, dst="198.18.200.1") / ICMP())),
    ]:
        add(Fixture(desc, 5, f, "PASS", f, C(pass_not_vip=1)))

    # rows 6-8: VIP-address checks
    big = tcp4(payload=b"x" * (MAX_FRAME - 54 + 1))
    add(Fixture("frame of max_frame_size + 1 to a VIP", 6, big, "DROP", None, C(drop_oversize=1)))
    fits = tcp4(payload=b"x" * (MAX_FRAME - 54))
    add(Fixture("frame of exactly max_frame_size to a VIP", 18, fits, "TX",
                encap(fits, real1, CLIENT4, 31337), C(tx_encap=1, lru_miss=1), real1))
    add(Fixture("IPv4 options to a VIP", 7, tcp4(options=b"\x01\x01\x01\x00"), "DROP", None,
                C(drop_ip_options=1)))
    add(Fixture("IPv4 MF to a VIP", 8, tcp4(flags="MF"), "DROP", None, C(drop_fragment=1)))
    add(Fixture("IPv4 fragment offset to a VIP", 8, tcp4(frag=100), "DROP", None, C(drop_fragment=1)))
    df = tcp4(flags="DF")
    add(Fixture("IPv4 DF alone is fine", 18, df, "TX", encap(df, real1, CLIENT4, 31337),
                C(tx_encap=1, lru_miss=1), real1))
    frag6 = raw(eth() / IPv6(src=CLIENT6, dst="2001:db8:100::1") / IPv6ExtHdrFragment() / TCP(dport=80))
    add(Fixture("IPv6 fragment header to a VIP", 8, frag6, "DROP", None, C(drop_fragment=1)))

    # row 9: truncated L4
    t = tcp4()
    add(Fixture("TCP header of 10 bytes", 9, t[: 14 + 20 + 10], "DROP", None, C(drop_malformed=1)))
    short_ip = tcp4(len=20 + 10)  # tot_len says 10 bytes of TCP; the frame holds 20
    add(Fixture("TCP header beyond tot_len (frame has it)", 9, short_ip, "DROP", None, C(drop_malformed=1)))
    u = raw(eth() / IP(src=CLIENT4, dst="198.18.100.1") / UDP(sport=5000, dport=53))
    add(Fixture("UDP header of 4 bytes", 9, u[: 14 + 20 + 4], "DROP", None, C(drop_malformed=1)))
    e = raw(eth() / IP(src=CLIENT4, dst="198.18.100.1") / ICMP())
    add(Fixture("ICMP header of 4 bytes", 9, e[: 14 + 20 + 4], "DROP", None, C(drop_malformed=1)))

    # row 10: other protocols to a VIP address
    gre = raw(eth() / IP(src=CLIENT4, dst="198.18.100.1", proto=47) / Raw(b"\x00" * 8))
    add(Fixture("GRE to a VIP address", 10, gre, "PASS", gre, C(pass_not_vip=1)))
    hbh = raw(eth() / IPv6(src=CLIENT6, dst="2001:db8:100::1") / IPv6ExtHdrHopByHop() / TCP(dport=80))
    add(Fixture("IPv6 hop-by-hop header to a VIP", 10, hbh, "PASS", hbh, C(pass_not_vip=1)))
    i6in4 = raw(eth() / IP(src=CLIENT4, dst="198.18.100.1", proto=58) / Raw(b"\x80\x00" + b"\x00" * 6))
    add(Fixture("ICMPv6 inside IPv4 to a VIP address", 10, i6in4, "PASS", i6in4, C(pass_not_vip=1)))

    # row 11: echo
    ping = raw(eth() / IP(src=CLIENT4, dst="198.18.100.1", ttl=7) / ICMP(id=7, seq=1) / b"ping")
    add(Fixture("ICMP echo request to a VIP address", 11, ping, "TX", echo_reply(ping), C(tx_icmp_echo_reply=1)))
    ping6 = raw(eth() / IPv6(src=CLIENT6, dst="2001:db8:100::1", hlim=9) / ICMPv6EchoRequest(id=7, data=b"ping"))
    add(Fixture("ICMPv6 echo request to a VIP address", 11, ping6, "TX", echo_reply(ping6),
                C(tx_icmp_echo_reply=1)))
    vping = raw(eth() / Dot1Q(vlan=42) / IP(src=CLIENT4, dst="198.18.100.1") / ICMP(code=3) / b"x")
    add(Fixture("802.1Q ICMP echo (code 3) to a VIP address", 11, vping, "TX", echo_reply(vping),
                C(tx_icmp_echo_reply=1)))
    # the checksum's edges: the reply's checksum is the one that verifies (a full
    # recomputation's), also where an addition carries or the sum is zero
    for desc, ping, check in [
        # all zero after the type byte: only 0xFFFF verifies (eqn. 3 alone gives 0x0000)
        ("ICMP echo, reply all zero after the type -> checksum 0xFFFF",
         raw(eth() / IP(src=CLIENT4, dst="198.18.100.1") / ICMP(id=0, seq=0)), 0xFFFF),
        # nonzero reply summing to zero: a full recompute gives 0x0000; 0xFFFF verifies too
        ("ICMP echo, nonzero reply summing to 0xFFFF -> checksum 0xFFFF",
         raw(eth() / IP(src=CLIENT4, dst="198.18.100.1") / ICMP(id=0xFFFF, seq=0)), 0xFFFF),
        # request checksum 0xFFFE: + 0x0800 carries out of 16 bits (end-around carry)
        ("ICMP echo, checksum update carries (request 0xFFFE -> 0x07FF)",
         raw(eth() / IP(src=CLIENT4, dst="198.18.100.1") / ICMP(id=0xF800, seq=0)), 0x07FF),
        # carries out of both bytes (Katran's update gives 0x0000 here, which fails)
        ("ICMP echo, request checksum 0xF8FF -> 0x0100",
         raw(eth() / IP(src=CLIENT4, dst="198.18.100.1") / ICMP(id=0xFEFF, seq=0)), 0x0100),
    ]:
        add(Fixture(desc, 11, ping, "TX", echo_reply(ping, check), C(tx_icmp_echo_reply=1)))
    base6 = raw(eth() / IPv6(src=CLIENT6, dst="2001:db8:100::1") / ICMPv6EchoRequest(id=0, seq=0))
    add(Fixture("ICMPv6 echo, all zero after the type (the pseudo header is not)", 11, base6, "TX",
                echo_reply(base6), C(tx_icmp_echo_reply=1)))
    for desc, check in [("ICMPv6 echo, reply summing to 0xFFFF -> checksum 0x0000 (verifies)", 0x0000),
                        ("ICMPv6 echo, checksum update borrows (reply 0xFF7F)", 0xFF7F),
                        # request checksum 0x0000 (Katran's update gives 0xFFFF, which fails)
                        ("ICMPv6 echo, request checksum 0x0000 -> 0xFEFF", 0xFEFF)]:
        p6 = raw(eth() / IPv6(src=CLIENT6, dst="2001:db8:100::1")
                 / ICMPv6EchoRequest(id=echo_id_for(base6, check), seq=0))
        add(Fixture(desc, 11, p6, "TX", echo_reply(p6, check), C(tx_icmp_echo_reply=1)))

    # rows 12-13: ICMP errors and other ICMP
    err_inner = IPerror(src="198.18.100.1", dst=CLIENT4) / TCPerror(sport=80, dport=31337)
    frag_needed = raw(eth() / IP(src="198.18.0.1", dst="198.18.100.1") / ICMP(type=3, code=4, nexthopmtu=1400)
                      / err_inner)
    add(Fixture("ICMP frag-needed with inner cut before ports", 12,
                raw(eth() / IP(src="198.18.0.1", dst="198.18.100.1") / ICMP(type=3, code=4)
                    / Raw(raw(err_inner)[:22])), "DROP", None, C(drop_malformed=1)))
    opt_inner = raw(eth() / IP(src="198.18.0.1", dst="198.18.100.1") / ICMP(type=3, code=1)
                    / IPerror(src="198.18.100.1", dst=CLIENT4, options=b"\x01\x01\x01\x00")
                    / TCPerror(sport=80, dport=31337))
    add(Fixture("ICMP error, inner IPv4 with options", 12, opt_inner, "DROP", None, C(drop_malformed=1)))
    ts = raw(eth() / IP(src=CLIENT4, dst="198.18.100.1") / ICMP(type=13))
    add(Fixture("ICMP timestamp to a VIP address", 13, ts, "PASS", ts, C(pass_not_vip=1)))
    ns = raw(eth() / IPv6(src=CLIENT6, dst="2001:db8:100::1") / ICMPv6ND_NS(tgt="2001:db8:100::1"))
    add(Fixture("ICMPv6 neighbour solicitation to a VIP address", 13, ns, "PASS", ns, C(pass_not_vip=1)))

    # row 14: VIP address, no VIP for the port/protocol
    p81 = tcp4(dport=81)
    add(Fixture("TCP to a VIP address, unconfigured port", 14, p81, "PASS", p81, C(pass_not_vip=1)))
    u80 = raw(eth() / IP(src=CLIENT4, dst="198.18.100.1") / UDP(sport=5, dport=80))
    add(Fixture("UDP to a TCP-only VIP port", 14, u80, "PASS", u80, C(pass_not_vip=1)))
    orphan_err = raw(eth() / IP(src="198.18.0.1", dst="198.18.100.1") / ICMP(type=3, code=4)
                     / IPerror(src="198.18.100.1", dst=CLIENT4) / TCPerror(sport=81, dport=31337))
    add(Fixture("ICMP error about a flow of no VIP", 14, orphan_err, "PASS", orphan_err, C(pass_not_vip=1)))

    # rows 15-16: no real / real can't carry it
    add(Fixture("VIP without reals", 15, tcp4(dst="198.18.100.6"), "DROP", None,
                C(drop_no_real=1, lru_miss=1)))
    add(Fixture("VIP whose only real has weight 0", 15, tcp4(dst="198.18.100.10"), "DROP", None,
                C(drop_no_real=1, lru_miss=1)))
    add(Fixture("IPv6 client, IPv4 real", 16, tcp6(dst=V6_VIP_WITH_V4_REAL[0]), "DROP", None,
                C(drop_encap_failed=1, lru_miss=1)))

    # row 17: local
    loc = tcp4(dst="198.18.100.8")
    add(Fixture("local VIP, real is this host", 17, loc, "PASS", loc, C(pass_local=1, lru_miss=1), "198.19.0.250"))
    loc6 = tcp6(dst=V6_LOCAL_VIP_WITH_V4_LOCAL_REAL[0])
    add(Fixture("local IPv6 VIP, local IPv4 real: local wins over row 16", 17, loc6, "PASS", loc6,
                C(pass_local=1, lru_miss=1), "198.19.0.250"))

    # row 18: encapsulation
    add(Fixture("IPv4 TCP SYN -> IPIP", 18, syn, "TX", encap(syn, real1, CLIENT4, 31337),
                C(tx_encap=1, lru_miss=1), real1))
    ack = tcp4(tcp_flags="A")
    add(Fixture("IPv4 TCP ACK after the SYN -> connection table hit", 18, ack, "TX",
                encap(ack, real1, CLIENT4, 31337), C(tx_encap=1, lru_hit=1), real1, setup=(syn,)))
    add(Fixture("IPv4 TCP SYN after a SYN: always re-hashed", 18, syn, "TX", encap(syn, real1, CLIENT4, 31337),
                C(tx_encap=1, lru_miss=1), real1, setup=(syn,)))
    tos = tcp4(tos=0xB8, ttl=3, payload=b"GET / HTTP/1.1\r\n\r\n", tcp_flags="PA")
    add(Fixture("TOS copied, inner TTL untouched, payload kept", 18, tos, "TX",
                encap(tos, real1, CLIENT4, 31337), C(tx_encap=1, lru_miss=1), real1))
    padded = raw(eth() / IP(src=CLIENT4, dst="198.18.100.1") / UDP(sport=5000, dport=53)) + b"\x00" * 18
    add(Fixture("UDP with Ethernet padding (kept)", 18, padded, "TX", encap(padded, "198.19.0.2", CLIENT4, 5000),
                C(tx_encap=1, lru_miss=1), "198.19.0.2"))
    udp2 = raw(eth() / IP(src=CLIENT4, dst="198.18.100.1") / UDP(sport=5000, dport=53) / b"q")
    add(Fixture("UDP second datagram -> hit", 18, udp2, "TX", encap(udp2, "198.19.0.2", CLIENT4, 5000),
                C(tx_encap=1, lru_hit=1), "198.19.0.2", setup=(udp2,)))
    any_port = tcp4(dst="198.18.100.2", dport=8443)
    add(Fixture("port-0 VIP, any destination port", 18, any_port, "TX",
                encap(any_port, "198.19.0.3", CLIENT4, 31337), C(tx_encap=1, lru_miss=1), "198.19.0.3"))
    nsp = tcp4(dst="198.18.100.3", sport=40000)
    add(Fixture("no_src_port: outer source built from port 0", 18, nsp, "TX", encap(nsp, real1, CLIENT4, 0),
                C(tx_encap=1, lru_miss=1), real1))
    byp = tcp4(dst="198.18.100.4", tcp_flags="A")
    add(Fixture("lru_bypass: no connection-table counters", 18, byp, "TX", encap(byp, real1, CLIENT4, 31337),
                C(tx_encap=1), real1, setup=(byp,)))
    dpo = tcp4(dst="198.18.100.5", sport=40001)
    add(Fixture("dport_only: outer source keeps the real source port", 18, dpo, "TX",
                encap(dpo, real1, CLIENT4, 40001), C(tx_encap=1, lru_miss=1), real1))
    v4in6 = tcp4(dst="198.18.100.7", sport=4660, tos=0x10)
    add(Fixture("IPv4 client, IPv6 real -> IPv4-in-IPv6", 18, v4in6, "TX",
                encap(v4in6, "2001:db8:1::1", CLIENT4, 4660), C(tx_encap=1, lru_miss=1), "2001:db8:1::1"))
    v6 = tcp6(tc=0x28, fl=12345)
    add(Fixture("IPv6 TCP -> IPv6-in-IPv6 (flow label 0, TC copied)", 18, v6, "TX",
                encap(v6, "2001:db8:1::2", CLIENT6, 31337), C(tx_encap=1, lru_miss=1), "2001:db8:1::2"))
    u6 = raw(eth() / IPv6(src=CLIENT6, dst="2001:db8:100::1") / UDP(sport=443, dport=443) / b"quic")
    add(Fixture("IPv6 UDP -> IPv6-in-IPv6", 18, u6, "TX", encap(u6, "2001:db8:1::3", CLIENT6, 443),
                C(tx_encap=1, lru_miss=1), "2001:db8:1::3"))
    vlan = raw(eth() / Dot1Q(vlan=42, prio=5) / IP(src=CLIENT4, dst="198.18.100.1") / TCP(sport=1000, dport=80))
    add(Fixture("802.1Q tagged TCP: tag kept on the encapsulated frame", 18, vlan, "TX",
                encap(vlan, real1, CLIENT4, 1000), C(tx_encap=1, lru_miss=1), real1))
    # Katran vector: 192.168.1.1:31337 -> :80 hashes to 0xc7e68632 (ring position below).
    kat = tcp4(dst="198.18.100.9", src="192.168.1.1")
    kat_real = KATRAN_VECTOR_REAL
    add(Fixture("3 reals, Katran's flow-hash vector picks the real", 18, kat, "TX",
                encap(kat, kat_real, "192.168.1.1", 31337), C(tx_encap=1, lru_miss=1), kat_real))

    # row 19: ICMP errors forwarded to the flow's real
    add(Fixture("ICMP frag-needed for a VIP flow -> its real", 19, frag_needed, "TX",
                encap(frag_needed, real1, CLIENT4, 31337),
                C(tx_encap=1, lru_miss=1, icmp_error_forwarded=1), real1))
    ptb = raw(eth() / IPv6(src="2001:db8::1", dst="2001:db8:100::1") / ICMPv6PacketTooBig(mtu=1280)
              / IPerror6(src="2001:db8:100::1", dst=CLIENT6) / TCPerror(sport=80, dport=31337))
    add(Fixture("ICMPv6 packet-too-big for a VIP flow -> its real", 19, ptb, "TX",
                encap(ptb, "2001:db8:1::2", CLIENT6, 31337),
                C(tx_encap=1, lru_miss=1, icmp_error_forwarded=1), "2001:db8:1::2"))
    du6 = raw(eth() / IPv6(src="2001:db8::1", dst="2001:db8:100::1") / ICMPv6DestUnreach(code=1)
              / IPerror6(src="2001:db8:100::1", dst=CLIENT6) / UDPerror(sport=443, dport=5353))
    add(Fixture("ICMPv6 dest-unreachable for a UDP VIP flow, hit after the flow", 19, du6, "TX",
                encap(du6, "2001:db8:1::3", CLIENT6, 5353),
                C(tx_encap=1, lru_hit=1, icmp_error_forwarded=1), "2001:db8:1::3",
                setup=(raw(eth() / IPv6(src=CLIENT6, dst="2001:db8:100::1") / UDP(sport=5353, dport=443)),)))
    return fx


# --- QUIC and source-routing fixtures ----------------------------------------------------


def quic_cid(version: int, server_id: int, length: int = 8) -> bytes:
    """A destination connection id of ``length`` bytes carrying ``server_id`` in Katran's
    layout ``version`` (docs/datapath.md, step 0); the bits around the id are filler."""
    filler = 0x15
    if version == 1:
        head = [0x40 | (server_id >> 10), (server_id >> 2) & 0xFF, ((server_id & 3) << 6) | filler]
    elif version == 2:
        head = [0x80 | filler, server_id >> 16, (server_id >> 8) & 0xFF, server_id & 0xFF]
    elif version == 3:
        head = [0xC0 | filler, server_id >> 24, (server_id >> 16) & 0xFF, (server_id >> 8) & 0xFF,
                server_id & 0xFF]
    else:
        head = [filler, 0x12, 0x34, 0x56, 0x78]
    return (bytes(head) + bytes([0x5A] * 20))[:length]


def quic_short(dcid: bytes) -> bytes:
    """1-RTT (short header) packet: header form 0, fixed bit, then the DCID and payload."""
    return bytes([0x41]) + dcid + b"\xa5" * 24


QUIC_INITIAL, QUIC_0RTT, QUIC_HANDSHAKE, QUIC_RETRY = 0, 1, 2, 3


def quic_long(ptype: int, dcid: bytes) -> bytes:
    """Long header packet of type ``ptype``: flags, version 1, DCID length, DCID, SCID."""
    return bytes([0xC0 | (ptype << 4)]) + b"\x00\x00\x00\x01" + bytes([len(dcid)]) + dcid + b"\x04scid" + b"\xa5" * 24


def udp_frame(dst: str, payload: bytes, src: str | None = None, sport: int = 50000, dport: int = 443) -> bytes:
    ip = IPv6(src=src or CLIENT6, dst=dst) if ":" in dst else IP(src=src or CLIENT4, dst=dst)
    return raw(eth() / ip / UDP(sport=sport, dport=dport) / Raw(payload))


def build_routing_fixtures() -> list[Fixture]:
    """Real selection steps 0 (QUIC server ids) and 2 (source routing)."""
    fx: list[Fixture] = []

    def tx(desc: str, frame: bytes, real: str, client: str, sport: int, row: int = 18,
           setup: tuple[bytes, ...] = (), **counters: int) -> None:
        fx.append(Fixture(desc, row, frame, "TX", encap(frame, real, client, sport),
                          C(tx_encap=1, **counters), real, setup))

    # -- QUIC: routed by the server id (the connection table is not read, no lru_* counter;
    #    the routed real is written into it: quic_conn_written)
    v1, v2, v3 = quic_cid(1, QUIC_ID_V1), quic_cid(2, QUIC_ID_V2), quic_cid(3, QUIC_ID_V3)
    for desc, payload, real in [
        ("QUIC short header, CID v1 -> its server's real", quic_short(v1), "198.19.1.2"),
        ("QUIC short header, CID v2 -> its server's real", quic_short(v2), "198.19.1.3"),
        ("QUIC short header, CID v3 -> its server's IPv6 real (IPv4-in-IPv6)", quic_short(v3), "2001:db8:2::2"),
        ("QUIC long header Handshake -> routed", quic_long(QUIC_HANDSHAKE, v1), "198.19.1.2"),
        ("QUIC long header Retry -> routed", quic_long(QUIC_RETRY, v2), "198.19.1.3"),
        ("QUIC Handshake with a 20-byte DCID -> routed", quic_long(QUIC_HANDSHAKE, quic_cid(1, QUIC_ID_V1, 20)),
         "198.19.1.2"),
        ("QUIC short header, exactly 9 payload bytes -> routed", quic_short(v1)[:9], "198.19.1.2"),
    ]:
        tx(desc, udp_frame(QUIC_VIP4, payload), real, CLIENT4, 50000, quic_routed=1, quic_conn_written=1)
    init = udp_frame(QUIC_VIP4, quic_long(QUIC_INITIAL, v1))
    routed = udp_frame(QUIC_VIP4, quic_short(v1))
    tx("QUIC routed wins over a connection-table entry, and takes it over", routed, "198.19.1.2", CLIENT4,
       50000, setup=(init,), quic_routed=1, quic_conn_written=1)
    tx("QUIC routed again: the entry already names its real, nothing written", routed, "198.19.1.2",
       CLIENT4, 50000, setup=(routed,), quic_routed=1)
    tx("QUIC fallback uses the connection table", udp_frame(QUIC_VIP4, quic_long(QUIC_0RTT, v1)), RING4,
       CLIENT4, 50000, setup=(init,), quic_fallback=1, lru_hit=1)
    # after a routed packet, the flow's packets without a usable id stay on the routed real
    # (Katran: balancer.bpf.c writes the real into its LRU); the ring would say RING4
    for desc, payload, counter in [
        ("QUIC short header without a connection id after a routed one -> same real",
         quic_short(v1)[:1], "quic_fallback"),
        ("QUIC server id 0 after a routed packet -> same real", quic_short(quic_cid(1, 0)), "quic_fallback"),
        ("QUIC unknown server id after a routed packet -> same real",
         quic_short(quic_cid(1, QUIC_ID_UNKNOWN)), "quic_unknown"),
        ("QUIC Initial after the routed packet took over the entry -> same real",
         quic_long(QUIC_INITIAL, v1), "quic_fallback"),
    ]:
        tx(desc, udp_frame(QUIC_VIP4, payload), "198.19.1.2", CLIENT4, 50000, setup=(init, routed),
           lru_hit=1, **{counter: 1})
    tx("QUIC id 0 after a routed packet of another flow -> the ring", udp_frame(QUIC_VIP4, quic_short(
        quic_cid(1, 0)), sport=50001), RING4, CLIENT4, 50001, setup=(routed,), quic_fallback=1, lru_miss=1)

    # -- QUIC: fallback (no id to route on) and unknown ids, then the ring
    good_long = quic_long(QUIC_HANDSHAKE, v1)
    for desc, payload in [
        ("QUIC Initial (client-chosen DCID) -> fallback", quic_long(QUIC_INITIAL, v1)),
        ("QUIC 0-RTT -> fallback", quic_long(QUIC_0RTT, v2)),
        ("QUIC Handshake with a 7-byte DCID -> fallback", quic_long(QUIC_HANDSHAKE, quic_cid(1, QUIC_ID_V1, 7))),
        ("QUIC short header, CID version 0 -> fallback", quic_short(quic_cid(0, 0))),
        ("QUIC short header, server id 0 -> fallback", quic_short(quic_cid(2, 0))),
        ("QUIC, empty UDP payload -> fallback", b""),
        ("QUIC, 1-byte payload -> fallback", quic_short(v1)[:1]),
        ("QUIC short header, 8 payload bytes -> fallback", quic_short(v1)[:8]),
        ("QUIC long header, 13 payload bytes -> fallback", good_long[:13]),
    ]:
        tx(desc, udp_frame(QUIC_VIP4, payload), RING4, CLIENT4, 50000, quic_fallback=1, lru_miss=1)
    # the DCID continues in the Ethernet padding: bytes outside the packet are not read
    cut = udp_frame(QUIC_VIP4, quic_short(v1)[:8]) + quic_short(v1)[8:12]
    tx("QUIC short header cut by the IP length (rest in the padding) -> fallback", cut, RING4, CLIENT4,
       50000, quic_fallback=1, lru_miss=1)
    tx("QUIC server id not in the table -> unknown", udp_frame(QUIC_VIP4, quic_short(quic_cid(1, QUIC_ID_UNKNOWN))),
       RING4, CLIENT4, 50000, quic_unknown=1, lru_miss=1)
    tx("QUIC server id whose real is gone -> unknown", udp_frame(QUIC_VIP4, quic_short(quic_cid(3, QUIC_ID_GONE))),
       RING4, CLIENT4, 50000, quic_unknown=1, lru_miss=1)

    # -- QUIC with lru_bypass, over IPv6, and ICMP errors (never parsed as QUIC)
    byp = udp_frame(QUIC_VIP4_BYPASS, quic_short(v2))
    tx("QUIC + lru_bypass -> routed", byp, "198.19.1.3", CLIENT4, 50000, setup=(byp,), quic_routed=1)
    tx("QUIC + lru_bypass, Initial -> fallback, no lru_* counter",
       udp_frame(QUIC_VIP4_BYPASS, quic_long(QUIC_INITIAL, v2)), RING4, CLIENT4, 50000, quic_fallback=1)
    tx("QUIC + lru_bypass: a routed packet writes no entry, id 0 after it -> the ring",
       udp_frame(QUIC_VIP4_BYPASS, quic_short(quic_cid(1, 0))), RING4, CLIENT4, 50000, setup=(byp,),
       quic_fallback=1)
    tx("IPv6 QUIC short header, CID v3 -> routed", udp_frame(QUIC_VIP6, quic_short(v3)), "2001:db8:2::2",
       CLIENT6, 50000, quic_routed=1, quic_conn_written=1)
    tx("IPv6 QUIC Handshake, CID v1 -> routed",
       udp_frame(QUIC_VIP6, quic_long(QUIC_HANDSHAKE, quic_cid(1, QUIC_ID_V6_V1))), "2001:db8:2::3",
       CLIENT6, 50000, quic_routed=1, quic_conn_written=1)
    tx("IPv6 QUIC unknown server id after a routed packet -> same real",
       udp_frame(QUIC_VIP6, quic_short(quic_cid(2, QUIC_ID_UNKNOWN))), "2001:db8:2::2", CLIENT6, 50000,
       setup=(udp_frame(QUIC_VIP6, quic_short(v3)),), quic_unknown=1, lru_hit=1)
    tx("IPv6 QUIC Initial -> fallback", udp_frame(QUIC_VIP6, quic_long(QUIC_INITIAL, v3)), RING6, CLIENT6,
       50000, quic_fallback=1, lru_miss=1)
    fx.append(Fixture("IPv6 QUIC routed to an IPv4 real: counted, written, then row 16", 16,
                      udp_frame(QUIC_VIP6, quic_short(v1)), "DROP", None,
                      C(drop_encap_failed=1, quic_routed=1, quic_conn_written=1)))
    err = raw(eth() / IP(src="198.18.0.1", dst=QUIC_VIP4) / ICMP(type=3, code=4)
              / IPerror(src=QUIC_VIP4, dst=CLIENT4) / UDPerror(sport=443, dport=50000) / Raw(quic_short(v1)))
    tx("ICMP error about a QUIC VIP flow: not parsed as QUIC", err, RING4, CLIENT4, 50000, row=19,
       lru_miss=1, icmp_error_forwarded=1)

    # -- source routing: longest prefix, on a connection-table miss
    for desc, vip, client, real, routed in [
        ("src_routing: longest prefix (/24 inside a /16)", SRC_VIP4, CLIENT4, "198.19.1.3", 1),
        ("src_routing: only the /16 matches", SRC_VIP4, "198.18.7.7", "198.19.1.2", 1),
        ("src_routing: no prefix matches -> ring", SRC_VIP4, "198.19.77.1", RING4, 0),
        ("src_routing: longest match's real is gone -> ring (not the /16)", SRC_VIP4, "198.18.5.7", RING4, 0),
        ("IPv6 src_routing: longest prefix (/64 inside a /48)", SRC_VIP6, CLIENT6, "2001:db8:2::3", 1),
        ("IPv6 src_routing: only the /48 matches", SRC_VIP6, "2001:db8:ffff:2::1", "2001:db8:2::2", 1),
        ("IPv6 src_routing: no prefix matches -> ring", SRC_VIP6, "2001:db8:eeee::1", RING6, 0),
        ("IPv6 src_routing: longest match's real is gone -> ring", SRC_VIP6, "2001:db8:ffff:1::5", RING6, 0),
    ]:
        f = tcp6(dst=vip, src=client) if ":" in vip else tcp4(dst=vip, src=client)
        tx(desc, f, real, client, 31337, lru_miss=1, **({"src_routed": 1} if routed else {}))
    syn, ack = tcp4(dst=SRC_VIP4), tcp4(dst=SRC_VIP4, tcp_flags="A")
    tx("src_routing: a connection-table hit is used, no route lookup", ack, "198.19.1.3", CLIENT4, 31337,
       setup=(syn,), lru_hit=1)
    tx("src_routing: SYN re-hashed, then routed", syn, "198.19.1.3", CLIENT4, 31337, setup=(ack,),
       lru_miss=1, src_routed=1)
    bsyn = tcp4(dst=SRC_VIP4_BYPASS, tcp_flags="A")
    tx("src_routing + lru_bypass: routed every time", bsyn, "198.19.1.3", CLIENT4, 31337, setup=(bsyn,),
       src_routed=1)
    serr = raw(eth() / IP(src="198.18.0.1", dst=SRC_VIP4) / ICMP(type=3, code=4)
               / IPerror(src=SRC_VIP4, dst=CLIENT4) / TCPerror(sport=80, dport=31337))
    tx("ICMP error about a src_routing VIP flow -> the client's route", serr, "198.19.1.3", CLIENT4, 31337,
       row=19, lru_miss=1, src_routed=1, icmp_error_forwarded=1)
    return fx


def build_prefix_fixtures() -> list[Fixture]:
    """CIDR VIPs: the lookup order (exact VIP, longest prefix, exact port-0 VIP, longest
    port-0 prefix), the VIP-address rows for addresses inside a prefix, and traffic."""
    fx: list[Fixture] = []

    def tx(desc: str, frame: bytes, real: str, client: str = CLIENT4, sport: int = 31337, row: int = 18,
           setup: tuple[bytes, ...] = (), **counters: int) -> None:
        fx.append(Fixture(desc, row, frame, "TX", encap(frame, real, client, sport),
                          C(tx_encap=1, **counters), real, setup))

    for desc, dst, dport, real, by_prefix in [
        ("CIDR VIP: an address inside the /24", "198.18.64.1", 80, "198.19.3.1", 1),
        ("CIDR VIP: another address inside the /24 (same VIP)", "198.18.64.127", 80, "198.19.3.1", 1),
        ("CIDR VIP: the longest prefix wins (/25 inside the /24)", "198.18.64.200", 80, "198.19.3.2", 1),
        ("CIDR VIP: the prefix's first address", "198.18.64.0", 80, "198.19.3.1", 1),
        ("CIDR VIP: an exact VIP inside the prefix wins", PREFIX_EXACT, 80, "198.19.3.4", 0),
        ("CIDR VIP: the prefix with the port wins over an exact port-0 VIP", PREFIX_EXACT_ANY, 80,
         "198.19.3.1", 1),
        ("CIDR VIP: other port -> the exact port-0 VIP", PREFIX_EXACT_ANY, 81, "198.19.3.5", 0),
        ("CIDR VIP: other port -> the port-0 prefix", "198.18.64.9", 8080, "198.19.3.3", 1),
        ("CIDR VIP: other port inside the /25 -> the /24's port-0 prefix", "198.18.64.201", 22,
         "198.19.3.3", 1),
    ]:
        tx(desc, tcp4(dst=dst, dport=dport), real, lru_miss=1, **({"vip_prefix_matched": 1} if by_prefix else {}))
    syn, ack = tcp4(dst="198.18.64.33"), tcp4(dst="198.18.64.33", tcp_flags="A")
    tx("CIDR VIP: ACK after the SYN -> connection-table hit", ack, "198.19.3.1", setup=(syn,),
       lru_hit=1, vip_prefix_matched=1)
    other = tcp4(dst="198.18.64.34", tcp_flags="A")
    tx("CIDR VIP: the flow key has the packet's own destination (no hit for another address)", other,
       "198.19.3.1", setup=(syn,), lru_miss=1, vip_prefix_matched=1)
    u6 = udp_frame("2001:db8:64::abcd", b"q", dport=53, sport=5353)
    tx("IPv6 CIDR VIP: an address inside the /48", u6, "2001:db8:3::1", CLIENT6, 5353, lru_miss=1,
       vip_prefix_matched=1)
    u6l = udp_frame("2001:db8:64:1::1", b"q", dport=53, sport=5353)
    tx("IPv6 CIDR VIP: the /64 inside the /48, no_src_port", u6l, "2001:db8:3::2", CLIENT6, 0, lru_miss=1,
       vip_prefix_matched=1)
    err = raw(eth() / IP(src="198.18.0.1", dst="198.18.64.50") / ICMP(type=3, code=4)
              / IPerror(src="198.18.64.50", dst=CLIENT4) / TCPerror(sport=80, dport=31337))
    tx("ICMP error about a CIDR VIP flow -> its real", err, "198.19.3.1", row=19, lru_miss=1,
       vip_prefix_matched=1, icmp_error_forwarded=1)
    fx.append(Fixture("CIDR VIP without reals (lru_bypass)", 15, udp_frame("198.18.67.255", b"", dport=443),
                      "DROP", None, C(drop_no_real=1, vip_prefix_matched=1)))

    # the VIP-address rows: an address inside a prefix is a VIP address, any port or protocol
    for desc, f in [
        ("TCP just outside a CIDR VIP's prefix", tcp4(dst="198.18.65.0")),
        ("IPv6 UDP just outside a CIDR VIP's prefix", udp_frame("2001:db8:65::1", b"", dport=53)),
    ]:
        fx.append(Fixture(desc, 5, f, "PASS", f, C(pass_not_vip=1)))
    ping = raw(eth() / IP(src=CLIENT4, dst="198.18.64.99") / ICMP(type=8, id=3, seq=4))
    fx.append(Fixture("ICMP echo to an address inside a CIDR VIP", 11, ping, "TX", echo_reply(ping),
                      C(tx_icmp_echo_reply=1)))
    ping6 = raw(eth() / IPv6(src=CLIENT6, dst="2001:db8:64:ffff::9") / ICMPv6EchoRequest(id=1, seq=2))
    fx.append(Fixture("ICMPv6 echo to an address inside a CIDR VIP", 11, ping6, "TX", echo_reply(ping6),
                      C(tx_icmp_echo_reply=1)))
    fx.append(Fixture("IPv4 fragment to an address inside a CIDR VIP", 8, tcp4(dst="198.18.64.3", flags="MF"),
                      "DROP", None, C(drop_fragment=1)))
    u = udp_frame("198.18.64.3", b"", dport=80)
    fx.append(Fixture("UDP to a TCP-only CIDR VIP", 14, u, "PASS", u, C(pass_not_vip=1)))
    u53 = udp_frame("2001:db8:64::1", b"", dport=54)
    fx.append(Fixture("IPv6 UDP to a CIDR VIP's address, unconfigured port", 14, u53, "PASS", u53,
                      C(pass_not_vip=1)))
    return fx


# Ring position of Katran's vector in VIP 198.18.100.9 (maglev V1, reals .1,.2,.3 in that
# id order): 0xc7e68632 % 65537. Which real sits there follows from the Maglev vectors
# (tested in test_maglev.py); pinned here so a change in either shows up.
KATRAN_VECTOR_POS = 0xC7E68632 % 65537
KATRAN_VECTOR_REAL = "198.19.0.3"

FIXTURES = build_fixtures() + build_routing_fixtures() + build_prefix_fixtures()


# --- GUE and the MTU check (global settings: their own table sets) -------------------------

GUE_SRC4 = "198.18.0.254"
GUE_SRC6 = "2001:db8:fffe::254"
GUE_PORT = 6080
GUE_MTU = 1400
GUE_CONFIG = {
    "settings": {
        "gateway_mac": GW_MAC,
        "max_frame_size": MAX_FRAME,
        "conn_table_size": 1024,
        "encap": "gue",
        "gue": {"port": GUE_PORT, "source_v4": GUE_SRC4, "source_v6": GUE_SRC6},
        "mtu": GUE_MTU,
    },
    "vips": [
        {"address": "198.18.110.1", "port": 80, "protocol": "tcp", "reals": [{"address": "198.19.1.1"}]},
        {"address": "198.18.110.1", "port": 53, "protocol": "udp", "reals": [{"address": "198.19.1.2"}]},
        {"address": "198.18.110.2", "port": 80, "protocol": "tcp", "flags": ["no_src_port"],
         "reals": [{"address": "198.19.1.1"}]},
        {"address": "198.18.110.3", "port": 80, "protocol": "tcp", "reals": [{"address": "2001:db8:2::1"}]},
        {"address": "2001:db8:110::1", "port": 80, "protocol": "tcp", "reals": [{"address": "2001:db8:2::2"}]},
        {"address": "2001:db8:110::2", "port": 80, "protocol": "tcp", "reals": [{"address": "198.19.1.3"}]},
    ],
}

# IPIP with an MTU: 1500 towards the reals, so IPv4 packets up to 1480 (IPv4 real) or 1460
# (IPv6 real) bytes go through.
MTU_IPIP = 1500
MTU_CONFIG = {
    "settings": {
        "gateway_mac": GW_MAC,
        "max_frame_size": MAX_FRAME,
        "conn_table_size": 1024,
        "local_addresses": ["198.19.2.250"],
        "mtu": MTU_IPIP,
    },
    "vips": [
        {"address": "198.18.120.1", "port": 80, "protocol": "tcp", "reals": [{"address": "198.19.2.1"}]},
        {"address": "198.18.120.2", "port": 80, "protocol": "tcp", "reals": [{"address": "2001:db8:3::1"}]},
        {"address": "198.18.120.3", "port": 80, "protocol": "tcp", "flags": ["local"],
         "reals": [{"address": "198.19.2.250"}]},
        {"address": "2001:db8:120::1", "port": 80, "protocol": "tcp", "reals": [{"address": "2001:db8:3::2"}]},
    ],
}
MTU_V6_VIP_WITH_V4_REAL = ("2001:db8:120::2", 80, "198.19.2.1", 0)


def fixture_tables_gue() -> DatapathTables:
    """encap gue, mtu 1400: every GUE and too-big fixture runs against these."""
    return compile_tables(parse_config(GUE_CONFIG))


def fixture_tables_mtu() -> DatapathTables:
    """encap ipip with mtu 1500 (plus an IPv6 VIP with an IPv4 real, for the row order)."""
    t = compile_tables(parse_config(MTU_CONFIG))
    _add_vip(t, *MTU_V6_VIP_WITH_V4_REAL)
    return t


def gue_sport(client: str, sport: int, real: str) -> int:
    """Katran's outer UDP source port (pckt_encap.h gue_encap_v4 / gue_encap_v6), computed
    the way its u16 arithmetic runs on a little-endian host: fields are read from memory
    little-endian, the result is stored as is and read off the wire big-endian."""
    a = ipaddress.ip_address(client).packed
    port16 = int.from_bytes(sport.to_bytes(2, "big"), "little")  # flow.port16[0]
    src = int.from_bytes(a[:4], "little")  # flow.src (an IPv6 client's srcv6[0])
    if ipaddress.ip_address(real).version == 4:
        v = int.from_bytes(port16.to_bytes(2, "little"), "big") ^ ((src >> 16) & 0xFFFF)  # htons
    elif len(a) == 4:
        v = ((src >> 16) & 0xFFFF) ^ port16
    else:
        v = (int.from_bytes(a[12:], "little") & 0xFFFF) ^ port16  # srcv6[3]
    return int.from_bytes(v.to_bytes(2, "little"), "big")


def _l3_first(frame: bytes):
    inp = Ether(frame)
    vlan = Dot1Q in inp
    first = inp[Dot1Q].payload if vlan else inp.payload
    plen = first.len if isinstance(first, IP) else first.plen + 40
    return inp, vlan, (18 if vlan else 14), first, plen


def gue_encap(frame: bytes, real: str, client: str, sport: int, chksum: int | None = None) -> bytes:
    """The frame as docs/datapath.md encapsulates it in GUE (variant 1) for ``real``; the
    UDP checksum is scapy's, over the whole datagram, or ``chksum``."""
    inp, vlan, l3, first, plen = _l3_first(frame)
    tos = first.tos if isinstance(first, IP) else first.tc
    l2 = Ether(dst=GW_MAC, src=inp.dst)
    if vlan:
        l2 = l2 / Dot1Q(prio=inp[Dot1Q].prio, dei=inp[Dot1Q].dei, vlan=inp[Dot1Q].vlan)
    udp = UDP(sport=gue_sport(client, sport, real), dport=GUE_PORT, len=plen + 8, chksum=chksum)
    if ipaddress.ip_address(real).version == 4:
        outer = IP(src=GUE_SRC4, dst=real, proto=17, ttl=64, id=0, flags=0, tos=tos, len=plen + 28)
    else:
        outer = IPv6(src=GUE_SRC6, dst=real, nh=17, hlim=64, tc=tos, fl=0, plen=plen + 8)
    # the packet only: its Ethernet padding goes after the checksummed datagram
    (l2[Dot1Q] if vlan else l2).type = 0x0800 if isinstance(outer, IP) else 0x86DD
    return raw(l2) + raw(outer / udp / Raw(frame[l3:l3 + plen])) + frame[l3 + plen:]


def gue_zero_sum_sport(vip: str, real: str) -> int:
    """A client source port whose GUE frame (a TCP SYN from CLIENT4 to ``vip`` port 80,
    sent to ``real``) has an outer UDP sum of zero: the checksum field must say 0xFFFF."""
    c0 = Ether(gue_encap(_tcp(vip, sport=0), real, CLIENT4, 0))[UDP].chksum
    # One's complement: the sum is K + g for source port field g (the inner packet adds a
    # constant: its own checksum cancels its bytes). At port 0, K + g0 = ~c0; so the sum
    # is zero (mod 0xFFFF) for g = g0 + c0.
    want = (gue_sport(CLIENT4, 0, real) + c0) % 0xFFFF
    for p in range(65536):
        if gue_sport(CLIENT4, p, real) % 0xFFFF == want:
            return p
    raise AssertionError("no such port")


def too_big(frame: bytes, next_hop_mtu: int) -> bytes:
    """ICMP frag-needed / ICMPv6 packet-too-big for ``frame``, quoting 128 / 256 bytes."""
    inp, vlan, l3, first, _ = _l3_first(frame)
    l2 = Ether(dst=inp.src, src=inp.dst)
    if vlan:
        l2 = l2 / Dot1Q(prio=inp[Dot1Q].prio, dei=inp[Dot1Q].dei, vlan=inp[Dot1Q].vlan)
    if isinstance(first, IP):
        ip = IP(src=first.dst, dst=first.src, tos=0, id=0, flags=0, ttl=64, proto=1)
        return raw(l2 / ip / ICMP(type=3, code=4, nexthopmtu=next_hop_mtu) / Raw(frame[l3:l3 + 128]))
    ip6 = IPv6(src=first.dst, dst=first.src, tc=0, fl=0, hlim=64, nh=58)
    return raw(l2 / ip6 / ICMPv6PacketTooBig(mtu=next_hop_mtu) / Raw(frame[l3:l3 + 256]))


def _tcp(dst: str, size: int = 0, sport: int = 31337, src: str | None = None, vlan: int | None = None,
         tcp_flags: str = "S", payload: bytes = b"", **ip_kw) -> bytes:
    v6 = ":" in dst
    ip = (IPv6(src=src or CLIENT6, dst=dst, **ip_kw) if v6 else IP(src=src or CLIENT4, dst=dst, **ip_kw))
    l2 = eth() / Dot1Q(vlan=vlan, prio=3) if vlan is not None else eth()
    bare = l2 / ip / TCP(sport=sport, dport=80, flags=tcp_flags)
    fill = max(0, size - len(raw(bare[IPv6] if v6 else bare[IP]))) if size else 0
    return raw(bare / (payload + (bytes(range(256)) * 6)[:fill]))


def build_gue_fixtures() -> list[Fixture]:
    """Against :func:`fixture_tables_gue` (encap gue, mtu 1400)."""
    fx: list[Fixture] = []
    add = fx.append
    r1, r2, r6, r6b, r4b = "198.19.1.1", "198.19.1.2", "2001:db8:2::1", "2001:db8:2::2", "198.19.1.3"
    syn = _tcp("198.18.110.1")
    add(Fixture("GUE: IPv4 TCP SYN -> IPv4/UDP/IPv4", 18, syn, "TX", gue_encap(syn, r1, CLIENT4, 31337),
                C(tx_encap=1, lru_miss=1), r1))
    v6 = _tcp("2001:db8:110::1", tc=0x28, fl=777, sport=4242)
    add(Fixture("GUE: IPv6 TCP -> IPv6/UDP/IPv6", 18, v6, "TX", gue_encap(v6, r6b, CLIENT6, 4242),
                C(tx_encap=1, lru_miss=1), r6b))
    v4in6 = _tcp("198.18.110.3", tos=0x10, sport=999)
    add(Fixture("GUE: IPv4 client, IPv6 real -> IPv6/UDP/IPv4", 18, v4in6, "TX",
                gue_encap(v4in6, r6, CLIENT4, 999), C(tx_encap=1, lru_miss=1), r6))
    v6in4 = _tcp("2001:db8:110::2", tc=0xB8)
    add(Fixture("GUE: IPv6 client, IPv4 real (row 16 does not apply) -> IPv4/UDP/IPv6", 18, v6in4, "TX",
                gue_encap(v6in4, r4b, CLIENT6, 31337), C(tx_encap=1, lru_miss=1), r4b))
    vl = _tcp("198.18.110.1", vlan=42, sport=1000)
    add(Fixture("GUE: 802.1Q tag kept", 18, vl, "TX", gue_encap(vl, r1, CLIENT4, 1000),
                C(tx_encap=1, lru_miss=1), r1))
    padded = raw(eth() / IP(src=CLIENT4, dst="198.18.110.1") / UDP(sport=5000, dport=53)) + b"\x00" * 18
    add(Fixture("GUE: UDP with Ethernet padding (kept, not counted in the lengths)", 18, padded, "TX",
                gue_encap(padded, r2, CLIENT4, 5000), C(tx_encap=1, lru_miss=1), r2))
    nsp = _tcp("198.18.110.2", sport=40000, src="198.18.7.9")
    add(Fixture("GUE: no_src_port: UDP source port from sport 0", 18, nsp, "TX",
                gue_encap(nsp, r1, "198.18.7.9", 0), C(tx_encap=1, lru_miss=1), r1))
    err = raw(eth() / IP(src="198.18.0.1", dst="198.18.110.1") / ICMP(type=3, code=4, nexthopmtu=1300)
              / IPerror(src="198.18.110.1", dst=CLIENT4) / TCPerror(sport=80, dport=31337))
    add(Fixture("GUE: ICMP error forwarded to the flow's real", 19, err, "TX",
                gue_encap(err, r1, CLIENT4, 31337), C(tx_encap=1, lru_miss=1, icmp_error_forwarded=1), r1))
    # the outer UDP checksum (scapy's, over the whole datagram) on its edges
    err6 = raw(eth() / IPv6(src="2001:db8::1", dst="2001:db8:110::1") / ICMPv6PacketTooBig(mtu=1280)
               / IPerror6(src="2001:db8:110::1", dst=CLIENT6) / TCPerror(sport=80, dport=4242))
    add(Fixture("GUE: ICMPv6 error forwarded, checksum over it", 19, err6, "TX",
                gue_encap(err6, r6b, CLIENT6, 4242), C(tx_encap=1, lru_miss=1, icmp_error_forwarded=1), r6b))
    odd6 = _tcp("2001:db8:110::1", sport=4242, payload=b"x" * 33, tcp_flags="PA")
    add(Fixture("GUE: IPv6 TCP with an odd payload length", 18, odd6, "TX", gue_encap(odd6, r6b, CLIENT6, 4242),
                C(tx_encap=1, lru_miss=1), r6b))
    nock = raw(eth() / IP(src=CLIENT4, dst="198.18.110.1") / UDP(sport=5000, dport=53, chksum=0) / b"no csum")
    add(Fixture("GUE: IPv4 UDP without a checksum -> outer UDP checksum 0 as well", 18, nock, "TX",
                gue_encap(nock, r2, CLIENT4, 5000, chksum=0), C(tx_encap=1, lru_miss=1), r2))
    zsum = _tcp("198.18.110.1", sport=gue_zero_sum_sport("198.18.110.1", r1))
    add(Fixture("GUE: outer UDP checksum summing to zero -> 0xFFFF", 18, zsum, "TX",
                gue_encap(zsum, r1, CLIENT4, gue_zero_sum_sport("198.18.110.1", r1)),
                C(tx_encap=1, lru_miss=1), r1))
    v4in6z = _tcp("198.18.110.3", sport=gue_zero_sum_sport("198.18.110.3", r6))
    add(Fixture("GUE: IPv6 outer, checksum summing to zero -> 0xFFFF", 18, v4in6z, "TX",
                gue_encap(v4in6z, r6, CLIENT4, gue_zero_sum_sport("198.18.110.3", r6)),
                C(tx_encap=1, lru_miss=1), r6))

    # MTU 1400: IPv4 real 28 bytes of overhead (1372 fit), IPv6 real 48 (1352 fit)
    at = _tcp("198.18.110.1", size=1372, flags="DF")
    add(Fixture("GUE: IPv4 packet of exactly mtu - 28 passes", 18, at, "TX", gue_encap(at, r1, CLIENT4, 31337),
                C(tx_encap=1, lru_miss=1), r1))
    over = _tcp("198.18.110.1", size=1373, flags="DF")
    add(Fixture("GUE: IPv4 DF, 1 byte over -> ICMP frag-needed, next-hop MTU 1372", 20, over, "TX",
                too_big(over, 1372), C(tx_icmp_too_big=1, lru_miss=1)))
    ack = _tcp("198.18.110.1", size=1373, flags="DF", tcp_flags="A")
    add(Fixture("GUE: too big after a connection-table hit: lru_hit counted", 20, ack, "TX",
                too_big(ack, 1372), C(tx_icmp_too_big=1, lru_hit=1), setup=(_tcp("198.18.110.1"),)))
    nodf = _tcp("198.18.110.1", size=1373)
    add(Fixture("GUE: IPv4 without DF, too big -> drop", 21, nodf, "DROP", None,
                C(drop_too_big=1, lru_miss=1)))
    over6 = _tcp("2001:db8:110::1", size=1353, sport=4242)
    add(Fixture("GUE: IPv6, 1 byte over -> ICMPv6 packet-too-big, MTU 1352", 20, over6, "TX",
                too_big(over6, 1352), C(tx_icmp_too_big=1, lru_miss=1)))
    at6 = _tcp("2001:db8:110::1", size=1352, sport=4242)
    add(Fixture("GUE: IPv6 packet of exactly mtu - 48 passes", 18, at6, "TX",
                gue_encap(at6, r6b, CLIENT6, 4242), C(tx_encap=1, lru_miss=1), r6b))
    over6v = _tcp("2001:db8:110::1", size=1400, vlan=7)
    add(Fixture("GUE: 802.1Q IPv6 too big -> packet-too-big with the tag kept", 20, over6v, "TX",
                too_big(over6v, 1352), C(tx_icmp_too_big=1, lru_miss=1)))
    over4v = _tcp("198.18.110.1", size=1480, vlan=9, flags="DF", tos=0xB8)
    add(Fixture("GUE: 802.1Q IPv4 DF too big -> frag-needed with the tag kept", 20, over4v, "TX",
                too_big(over4v, 1372), C(tx_icmp_too_big=1, lru_miss=1)))
    o46 = _tcp("198.18.110.3", size=1353, flags="DF")
    add(Fixture("GUE: IPv4 client, IPv6 real: 48 bytes of overhead, next-hop MTU 1352", 20, o46, "TX",
                too_big(o46, 1352), C(tx_icmp_too_big=1, lru_miss=1)))
    o64 = _tcp("2001:db8:110::2", size=1373)
    add(Fixture("GUE: IPv6 client, IPv4 real: 28 bytes of overhead, MTU 1372", 20, o64, "TX",
                too_big(o64, 1372), C(tx_icmp_too_big=1, lru_miss=1)))
    a64 = _tcp("2001:db8:110::2", size=1372)
    add(Fixture("GUE: IPv6 client, IPv4 real, exactly mtu - 28 passes", 18, a64, "TX",
                gue_encap(a64, r4b, CLIENT6, 31337), C(tx_encap=1, lru_miss=1), r4b))
    big_err = raw(eth() / IP(src="198.18.0.1", dst="198.18.110.1", flags="DF")
                  / ICMP(type=3, code=4, nexthopmtu=1300)
                  / IPerror(src="198.18.110.1", dst=CLIENT4) / TCPerror(sport=80, dport=31337)
                  / Raw(bytes(1400)))
    add(Fixture("GUE: ICMP error too big to forward (DF set) -> drop", 21, big_err, "DROP", None,
                C(drop_too_big=1, lru_miss=1)))
    return fx


def build_mtu_fixtures() -> list[Fixture]:
    """Against :func:`fixture_tables_mtu` (encap ipip, mtu 1500)."""
    fx: list[Fixture] = []
    add = fx.append
    r1, r6, r6b = "198.19.2.1", "2001:db8:3::1", "2001:db8:3::2"
    at = _tcp("198.18.120.1", size=1480)
    add(Fixture("IPIP mtu: IPv4 packet of exactly mtu - 20 passes", 18, at, "TX", encap(at, r1, CLIENT4, 31337),
                C(tx_encap=1, lru_miss=1), r1))
    over = _tcp("198.18.120.1", size=1481, flags="DF", ttl=5)
    add(Fixture("IPIP mtu: IPv4 DF, 1 byte over -> frag-needed, next-hop MTU 1480", 20, over, "TX",
                too_big(over, 1480), C(tx_icmp_too_big=1, lru_miss=1)))
    nodf = _tcp("198.18.120.1", size=1500)
    add(Fixture("IPIP mtu: IPv4 without DF, too big -> drop", 21, nodf, "DROP", None,
                C(drop_too_big=1, lru_miss=1)))
    o46 = _tcp("198.18.120.2", size=1461, flags="DF")
    add(Fixture("IPIP mtu: IPv4 client, IPv6 real, 1 byte over -> next-hop MTU 1460", 20, o46, "TX",
                too_big(o46, 1460), C(tx_icmp_too_big=1, lru_miss=1)))
    a46 = _tcp("198.18.120.2", size=1460, flags="DF")
    add(Fixture("IPIP mtu: IPv4 client, IPv6 real, exactly mtu - 40 passes", 18, a46, "TX",
                encap(a46, r6, CLIENT4, 31337), C(tx_encap=1, lru_miss=1), r6))
    o6 = _tcp("2001:db8:120::1", size=1461)
    add(Fixture("IPIP mtu: IPv6, 1 byte over -> packet-too-big, MTU 1460", 20, o6, "TX",
                too_big(o6, 1460), C(tx_icmp_too_big=1, lru_miss=1)))
    a6 = _tcp("2001:db8:120::1", size=1460)
    add(Fixture("IPIP mtu: IPv6 of exactly mtu - 40 passes", 18, a6, "TX", encap(a6, r6b, CLIENT6, 31337),
                C(tx_encap=1, lru_miss=1), r6b))
    loc = _tcp("198.18.120.3", size=1500, flags="DF")
    add(Fixture("IPIP mtu: local real: row 17 before the MTU check", 17, loc, "PASS", loc,
                C(pass_local=1, lru_miss=1), "198.19.2.250"))
    v6v4 = _tcp(MTU_V6_VIP_WITH_V4_REAL[0], size=1480)
    add(Fixture("IPIP mtu: IPv6 client, IPv4 real, too big: row 16 before the MTU check", 16, v6v4, "DROP",
                None, C(drop_encap_failed=1, lru_miss=1)))
    return fx


# --- the flood guard and down-real flow migration (their own table sets) -------------------

GUARD_RATE = 3  # settings.max_conn_rate: the 4th new connection in a window is over it
G_TCP = "198.18.130.1"  # tcp 80, ring: G_R1
G_SRC = "198.18.130.2"  # tcp 80, src_routing (198.18.0.0/16 -> G_R2), ring: G_R1
G_BYPASS = "198.18.130.3"  # tcp 80, src_routing + lru_bypass, ring: G_R1
G_UDP = "198.18.130.4"  # udp 53: ring G_DOWN, then (guard_down) G_R1
G_MIG = "198.18.130.5"  # tcp 80, migrate_down_tcp: ring G_DOWN, then G_R1
G_KEEP = "198.18.130.6"  # tcp 80 without the flag: ring G_DOWN, then G_R1
G_UDP_UP = "198.18.130.7"  # udp 53: ring G_DOWN throughout (up for this VIP)
G_MIG_UP = "198.18.130.8"  # tcp 80, migrate_down_tcp: ring G_DOWN throughout
G_R1, G_R2, G_DOWN = "198.19.3.1", "198.19.3.2", "198.19.3.3"


def _guard_config(down: bool) -> dict:
    """The guard table sets' config; with ``down``, G_DOWN has left the rings of G_UDP,
    G_MIG and G_KEEP (weight 0 keeps every real id where it was), not those of G_UDP_UP
    and G_MIG_UP (down for some VIPs only)."""
    moving = [{"address": G_DOWN, "weight": 0 if down else 1}, {"address": G_R1, "weight": 1 if down else 0}]
    return {
        "settings": {"gateway_mac": GW_MAC, "max_frame_size": MAX_FRAME, "conn_table_size": 1024,
                     "ring_size": 4099, "max_vips": 16, "max_conn_rate": GUARD_RATE},
        "vips": [
            {"address": G_TCP, "port": 80, "protocol": "tcp", "reals": [{"address": G_R1}]},
            {"address": G_SRC, "port": 80, "protocol": "tcp", "flags": ["src_routing"],
             "reals": [{"address": G_R1}]},
            {"address": G_BYPASS, "port": 80, "protocol": "tcp", "flags": ["src_routing", "lru_bypass"],
             "reals": [{"address": G_R1}]},
            {"address": G_UDP, "port": 53, "protocol": "udp", "reals": moving},
            {"address": G_MIG, "port": 80, "protocol": "tcp", "flags": ["migrate_down_tcp"], "reals": moving},
            {"address": G_KEEP, "port": 80, "protocol": "tcp", "reals": moving},
            {"address": G_UDP_UP, "port": 53, "protocol": "udp", "reals": [{"address": G_DOWN}]},
            {"address": G_MIG_UP, "port": 80, "protocol": "tcp", "flags": ["migrate_down_tcp"],
             "reals": [{"address": G_DOWN}]},
            {"address": "198.18.130.9", "port": 80, "protocol": "tcp", "reals": [{"address": G_R2}]},
        ],
        "source_routes": [{"prefix": "198.18.0.0/16", "real": G_R2}],
    }


GUARD_CONFIG = _guard_config(down=False)


def fixture_tables_guard() -> DatapathTables:
    """max_conn_rate 3; G_DOWN healthy and on the rings of G_UDP, G_MIG, G_KEEP."""
    return compile_tables(parse_config(GUARD_CONFIG))


def fixture_tables_guard_bits() -> DatapathTables:
    """:func:`fixture_tables_guard` while the health checks take G_DOWN down for G_UDP,
    G_MIG and G_KEEP (up for G_UDP_UP and G_MIG_UP): out of those VIPs' rings, the pairs
    in the down set, the real not yet flagged REAL_F_DOWN. Same real ids."""
    t = compile_tables(parse_config(_guard_config(down=True)))
    rid = t.real_ids[ipaddress.ip_address(G_DOWN)]
    t.down_set = empty_down_set(t.max_vips, t.max_reals)
    flat = t.down_set.reshape(-1)
    for vip in (G_UDP, G_MIG, G_KEEP):
        num = next(n for (a, _, _), n in t.vip_nums.items() if str(a) == vip)
        word, bit = down_bit(num, rid, t.max_reals)
        flat[word] |= bit
    return t


def fixture_tables_guard_down() -> DatapathTables:
    """:func:`fixture_tables_guard_bits` with G_DOWN flagged REAL_F_DOWN (down for at
    least one VIP): the state once the health checks took it down for those three."""
    t = fixture_tables_guard_bits()
    t.reals[t.real_ids[ipaddress.ip_address(G_DOWN)]]["flags"] |= REAL_F_DOWN
    return t


def _syn(dst: str, sport: int, tcp_flags: str = "S") -> bytes:
    return tcp4(dst=dst, sport=sport, tcp_flags=tcp_flags)


def build_guard_fixtures() -> list[Fixture]:
    """Against :func:`fixture_tables_guard` (some reload :func:`fixture_tables_guard_down`).
    Every fixture runs on one CPU: the flood guard counts per CPU."""
    fx: list[Fixture] = []

    def tx(desc: str, frame: bytes, real: str, sport: int, setup: tuple[bytes, ...] = (),
           reload: str | None = None, **counters: int) -> None:
        fx.append(Fixture(desc, 18, frame, "TX", encap(frame, real, CLIENT4, sport),
                          C(tx_encap=1, **counters), real, setup, reload))

    three = tuple(_syn(G_TCP, p) for p in (1001, 1002, 1003))
    tx("flood guard: the 3rd new connection in a window is still recorded", _syn(G_TCP, 1003), G_R1, 1003,
       three[:2], lru_miss=1)
    tx("flood guard: the 4th is over max_conn_rate -> hashed, counted", _syn(G_TCP, 1004), G_R1, 1004,
       three, lru_miss=1, flood_new_conns=1)
    tx("flood guard: a flow that came over the rate was not recorded", _syn(G_TCP, 1004, "A"), G_R1, 1004,
       (*three, _syn(G_TCP, 1004)), lru_miss=1, flood_new_conns=1)
    tx("flood guard: an established flow keeps its entry through the flood", _syn(G_TCP, 1001, "A"), G_R1,
       1001, (*three, _syn(G_TCP, 1004), _syn(G_TCP, 1005)), lru_hit=1)
    tx("flood guard: no source routing over the rate (ring, not the route)", _syn(G_SRC, 2000), G_R1, 2000,
       three, lru_miss=1, flood_new_conns=1)
    tx("flood guard: under the rate the route is used", _syn(G_SRC, 2000), G_R2, 2000, three[:2],
       lru_miss=1, src_routed=1)
    tx("flood guard: lru_bypass VIPs are not counted and keep source routing", _syn(G_BYPASS, 2000), G_R2,
       2000, (*three, _syn(G_TCP, 1004)), src_routed=1)

    udp = raw(eth() / IP(src=CLIENT4, dst=G_UDP) / UDP(sport=5353, dport=53) / b"q")
    fx.append(Fixture("down real: UDP flow pinned to it is re-hashed onto the healthy ring", 18, udp, "TX",
                      encap(udp, G_R1, CLIENT4, 5353), C(tx_encap=1, lru_miss=1, down_real_migrated=1), G_R1,
                      (udp,), "guard_down"))
    tx("down real: UDP flow pinned to it before it went down (setup)", udp, G_DOWN, 5353, (udp,), lru_hit=1)
    tx("down real: TCP non-SYN with migrate_down_tcp is re-hashed", _syn(G_MIG, 3000, "A"), G_R1, 3000,
       (_syn(G_MIG, 3000),), "guard_down", lru_miss=1, down_real_migrated=1)
    tx("down real: TCP without migrate_down_tcp keeps its real", _syn(G_KEEP, 3000, "A"), G_DOWN, 3000,
       (_syn(G_KEEP, 3000),), "guard_down", lru_hit=1)
    tx("down real: a SYN re-hashes anyway (not a migration)", _syn(G_MIG, 3000), G_R1, 3000,
       (_syn(G_MIG, 3000),), "guard_down", lru_miss=1)
    udp_up = raw(eth() / IP(src=CLIENT4, dst=G_UDP_UP) / UDP(sport=5353, dport=53) / b"q")
    tx("down real for other VIPs only: a UDP flow of a VIP it is up for keeps it", udp_up, G_DOWN, 5353,
       (udp_up,), "guard_down", lru_hit=1)
    tx("down real for other VIPs only: TCP with migrate_down_tcp on a VIP it is up for keeps it",
       _syn(G_MIG_UP, 3000, "A"), G_DOWN, 3000, (_syn(G_MIG_UP, 3000),), "guard_down", lru_hit=1)
    tx("down set without the real's REAL_F_DOWN hint (mid-write): the UDP flow keeps its real", udp, G_DOWN,
       5353, (udp,), "guard_bits", lru_hit=1)
    tx("down real: a migrated flow over the flood rate is re-hashed, not rewritten", _syn(G_MIG, 3000, "A"),
       G_R1, 3000, (_syn(G_MIG, 3000), *three), "guard_down", lru_miss=1, down_real_migrated=1,
       flood_new_conns=1)
    return fx


# --- stateless VIPs: hop lists from previous rings (encap gue, mtu 1400) ------------------

SL4, SL4_DUP, SL4_ONE, SL6, SL_MIX = "198.18.130.1", "198.18.130.2", "198.18.130.3", "2001:db8:130::1", "198.18.130.4"
SL4_NONE = "198.18.130.5"  # stateless, no previous ring
SL_R4 = ("198.19.4.1", "198.19.4.2", "198.19.4.3")
SL_R6 = ("2001:db8:4::1", "2001:db8:4::2", "2001:db8:4::3")


def _sl_vip(addr: str, reals: tuple[str, ...], port: int = 80, proto: str = "tcp", weights=(1, 0, 0)) -> dict:
    return {"address": addr, "port": port, "protocol": proto, "flags": ["stateless"],
            "reals": [{"address": r, "weight": w} for r, w in zip(reals, weights)]}


STATELESS_CONFIG = {
    "settings": {**GUE_CONFIG["settings"]},
    "vips": [
        _sl_vip(SL4, SL_R4),  # prev rings: all r2, then all r3 -> hops r1, r2, r3
        _sl_vip(SL4, SL_R4, port=53, proto="udp"),  # UDP stays on its first hop
        _sl_vip(SL4_DUP, SL_R4),  # prev ring all r1: the same real, no hop list
        _sl_vip(SL4_ONE, SL_R4),  # prev rings all r1, then all r2 -> hops r1, r2
        _sl_vip(SL6, SL_R6),  # IPv6 reals: prev rings all ::2, then all ::3
        _sl_vip(SL_MIX, SL_R4, weights=(1, 1, 1)),  # a real ring; prev ring: other weights
        _sl_vip(SL4_NONE, SL_R4),
        {"address": "198.18.130.6", "port": 80, "protocol": "tcp", "reals": [{"address": SL_R4[0]}]},
    ],
}


def fixture_tables_stateless() -> DatapathTables:
    """Stateless VIPs with and without previous rings (prev_rings slots set by hand)."""
    from lb.constants import MAX_PREV_RINGS
    from lb.datapath_tables import prev_ref_value
    from lb.maglev import ring_for

    t = compile_tables(parse_config(STATELESS_CONFIG))
    rid = {str(a): i for a, i in t.real_ids.items()}
    prev = np.zeros((MAX_PREV_RINGS, t.ring_size), dtype=np.uint32)
    for slot, real in enumerate((SL_R4[1], SL_R4[2], SL_R4[0], SL_R6[1], SL_R6[2])):
        prev[slot] = rid[real]
    prev[5] = ring_for([(a, w, rid[a]) for a, w in zip(SL_R4, (2, 1, 0))], t.ring_size)
    refs = np.zeros(t.max_vips, dtype=np.uint32)
    num = {(str(a), p, proto): n for (a, p, proto), n in t.vip_nums.items()}
    refs[num[(SL4, 80, "tcp")]] = prev_ref_value([0, 1])
    refs[num[(SL4, 53, "udp")]] = prev_ref_value([0])
    refs[num[(SL4_DUP, 80, "tcp")]] = prev_ref_value([2])
    refs[num[(SL4_ONE, 80, "tcp")]] = prev_ref_value([2, 0])
    refs[num[(SL6, 80, "tcp")]] = prev_ref_value([3, 4])
    refs[num[(SL_MIX, 80, "tcp")]] = prev_ref_value([5])
    t.prev_rings, t.prev_refs = prev, refs
    return t


def hoplist_encap(frame: bytes, hops: tuple[str, ...], client: str, sport: int) -> bytes:
    """The frame as docs/datapath.md encapsulates it for a stateless VIP: GUE variant 0
    with a hop list to ``hops[0]``; scapy computes the outer UDP checksum over the whole
    datagram."""
    import struct

    inp, vlan, l3, first, plen = _l3_first(frame)
    tos = first.tos if isinstance(first, IP) else first.tc
    v4 = ipaddress.ip_address(hops[0]).version == 4
    addrs = b"".join(ipaddress.ip_address(h).packed for h in hops)
    gue = bytes([(4 + len(addrs)) // 4, 4 if isinstance(first, IP) else 41, 0, 0])
    gue += struct.pack("!HBB", 0x4C42, 1, len(hops)) + addrs
    l2 = Ether(dst=GW_MAC, src=inp.dst)
    if vlan:
        l2 = l2 / Dot1Q(prio=inp[Dot1Q].prio, dei=inp[Dot1Q].dei, vlan=inp[Dot1Q].vlan)
    ulen = plen + 8 + len(gue)
    udp = UDP(sport=gue_sport(client, sport, hops[0]), dport=GUE_PORT, len=ulen)  # chksum computed
    if v4:
        outer = IP(src=GUE_SRC4, dst=hops[0], proto=17, ttl=64, id=0, flags=0, tos=tos, len=ulen + 20)
    else:
        outer = IPv6(src=GUE_SRC6, dst=hops[0], nh=17, hlim=64, tc=tos, fl=0, plen=ulen)
    return raw(l2 / outer / udp / Raw(gue + frame[l3:l3 + plen])) + frame[l3 + plen:]


def build_stateless_fixtures() -> list[Fixture]:
    """Against :func:`fixture_tables_stateless` (encap gue, mtu 1400)."""
    fx: list[Fixture] = []
    add = fx.append
    r1, r2, r3 = SL_R4
    v1, v2, v3 = SL_R6
    ack = _tcp(SL4, tcp_flags="A", payload=b"hello")
    add(Fixture("stateless: TCP, two previous rings -> hop list r1, r2, r3; no connection table", 18, ack,
                "TX", hoplist_encap(ack, (r1, r2, r3), CLIENT4, 31337), C(tx_encap=1, hoplist_sent=1), r1))
    syn = _tcp(SL4, vlan=5, sport=777)
    add(Fixture("stateless: a SYN carries the hop list too (802.1Q kept)", 18, syn, "TX",
                hoplist_encap(syn, (r1, r2, r3), CLIENT4, 777), C(tx_encap=1, hoplist_sent=1), r1))
    udp = raw(eth() / IP(src=CLIENT4, dst=SL4) / UDP(sport=5000, dport=53) / b"q")
    add(Fixture("stateless: UDP stays on its first hop (plain GUE, no hop list)", 18, udp, "TX",
                gue_encap(udp, r1, CLIENT4, 5000), C(tx_encap=1), r1))
    dup = _tcp(SL4_DUP, tcp_flags="A")
    add(Fixture("stateless: previous ring picks the same real -> plain GUE", 18, dup, "TX",
                gue_encap(dup, r1, CLIENT4, 31337), C(tx_encap=1), r1))
    one = _tcp(SL4_ONE, tcp_flags="PA", payload=b"x" * 33)
    add(Fixture("stateless: duplicate removed -> hop list r1, r2", 18, one, "TX",
                hoplist_encap(one, (r1, r2), CLIENT4, 31337), C(tx_encap=1, hoplist_sent=1), r1))
    none = _tcp(SL4_NONE, tcp_flags="A")
    add(Fixture("stateless: no previous ring -> plain GUE, no connection table", 18, none, "TX",
                gue_encap(none, r1, CLIENT4, 31337), C(tx_encap=1), r1))
    six = _tcp(SL6, tcp_flags="A", tc=0x20, fl=99, sport=4242)
    add(Fixture("stateless: IPv6 -> IPv6/UDP/GUE hop list of IPv6 addresses", 18, six, "TX",
                hoplist_encap(six, (v1, v2, v3), CLIENT6, 4242), C(tx_encap=1, hoplist_sent=1), v1))
    pad = _tcp(SL4, tcp_flags="A") + bytes(12)
    add(Fixture("stateless: Ethernet padding kept, not in the checksum", 18, pad, "TX",
                hoplist_encap(pad, (r1, r2, r3), CLIENT4, 31337), C(tx_encap=1, hoplist_sent=1), r1))
    err = raw(eth() / IP(src="198.18.0.1", dst=SL4) / ICMP(type=3, code=4, nexthopmtu=1300)
              / IPerror(src=SL4, dst=CLIENT4) / TCPerror(sport=80, dport=31337))
    add(Fixture("stateless: ICMP error -> its flow's ring real, plain GUE", 19, err, "TX",
                gue_encap(err, r1, CLIENT4, 31337), C(tx_encap=1, icmp_error_forwarded=1), r1))
    # mtu 1400: 20 + 8 + 8 + 3 * 4 = 48 bytes of overhead with three IPv4 hops
    at = _tcp(SL4, size=1352, flags="DF", tcp_flags="A")
    add(Fixture("stateless: IPv4 packet of exactly mtu - 48 (hop list counted) passes", 18, at, "TX",
                hoplist_encap(at, (r1, r2, r3), CLIENT4, 31337), C(tx_encap=1, hoplist_sent=1), r1))
    over = _tcp(SL4, size=1353, flags="DF", tcp_flags="A")
    add(Fixture("stateless: 1 byte over with the hop list -> frag-needed, next-hop MTU 1352", 20, over, "TX",
                too_big(over, 1352), C(tx_icmp_too_big=1)))
    return fx


GUE_FIXTURES = build_gue_fixtures()
MTU_FIXTURES = build_mtu_fixtures()
GUARD_FIXTURES = build_guard_fixtures()
STATELESS_FIXTURES = build_stateless_fixtures()
# table set name -> (provisioning, fixtures); tests run each fixture against its own set
FIXTURE_SETS = {
    "main": (fixture_tables, FIXTURES),
    "gue": (fixture_tables_gue, GUE_FIXTURES),
    "mtu": (fixture_tables_mtu, MTU_FIXTURES),
    "guard": (fixture_tables_guard, GUARD_FIXTURES),
    "guard_down": (fixture_tables_guard_down, []),
    "guard_bits": (fixture_tables_guard_bits, []),
    "stateless": (fixture_tables_stateless, STATELESS_FIXTURES),
}
