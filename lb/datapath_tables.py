"""Compile a validated config into the datapath's tables (the contents of the BPF maps).

Both datapaths are loaded from one :class:`DatapathTables`: the userspace datapath builds
its lookup structures from it and the XDP loader writes it into maps, which is what makes
"identical state" in the differential tests literal.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

import numpy as np

from lb import constants as C
from lb import layout
from lb.maglev import ring_for

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
PROTOCOLS = {"tcp": C.IPPROTO_TCP, "udp": C.IPPROTO_UDP}


def addr16(ip: IPAddress) -> tuple[np.ndarray, int]:
    """16-byte table form of an address (IPv4 in the first 4 bytes) and its family."""
    raw = np.zeros(16, dtype=np.uint8)
    raw[: len(ip.packed)] = np.frombuffer(ip.packed, dtype=np.uint8)
    return raw, (C.FAMILY_V4 if ip.version == 4 else C.FAMILY_V6)


def addr_from16(raw: np.ndarray | bytes, family: int) -> IPAddress:
    """Inverse of :func:`addr16`."""
    data = bytes(raw)
    return ipaddress.IPv4Address(data[:4]) if family == C.FAMILY_V4 else ipaddress.IPv6Address(data)


def vip_lpm_key(net: IPNetwork, port: int = 0, proto: int = 0) -> np.ndarray:
    """The layout.VIP_LPM_KEY of a CIDR VIP (port and proto 0: of its prefix in
    vip_prefix_addrs)."""
    rec = np.zeros(1, dtype=layout.VIP_LPM_KEY)
    raw, fam = addr16(net.network_address)
    rec[0]["prefixlen"] = C.VIP_LPM_KEY_HEAD_BITS + net.prefixlen
    rec[0]["port"] = port
    rec[0]["proto"] = proto
    rec[0]["family"] = fam
    rec[0]["addr"] = raw
    return rec


def vip_address(text: str) -> IPAddress | IPNetwork:
    """A VIP's address as lb.config writes it: an address, or a prefix (a CIDR VIP)."""
    return ipaddress.ip_network(text) if "/" in text else ipaddress.ip_address(text)


def mac_bytes(mac: str) -> bytes:
    """'00:00:de:ad:be:af' -> 6 bytes."""
    return bytes(int(part, 16) for part in mac.split(":"))


@dataclass
class DatapathTables:
    """Everything the datapath reads; each array has the layout in :mod:`lb.layout`."""

    ring_size: int
    max_vips: int
    max_reals: int
    conn_table_size: int
    vip_keys: np.ndarray  # VIP_KEY[n]
    vip_metas: np.ndarray  # VIP_META[n]
    vip_addr_keys: np.ndarray  # VIP_ADDR_KEY[m]
    reals: np.ndarray  # REAL[max_reals], index = real id
    rings: np.ndarray  # uint32[max_vips, ring_size]
    ctl: np.ndarray  # CTL[1]
    quic_servers: np.ndarray = field(default_factory=lambda: np.zeros(0, layout.QUIC_SERVER))
    src_routes_v4: np.ndarray = field(default_factory=lambda: np.zeros(0, layout.SRC_ROUTE_V4))
    src_routes_v6: np.ndarray = field(default_factory=lambda: np.zeros(0, layout.SRC_ROUTE_V6))
    real_ids: dict[IPAddress, int] = field(default_factory=dict)
    vip_nums: dict[tuple[IPAddress | IPNetwork, int, str], int] = field(default_factory=dict)
    # CIDR VIPs: VIP_LPM_KEY[k] -> VIP_META[k], and their prefixes (VIP_LPM_KEY, port and
    # proto 0) as the prefix half of vip_addr_keys
    vip_prefix_keys: np.ndarray = field(default_factory=lambda: np.zeros(0, layout.VIP_LPM_KEY))
    vip_prefix_metas: np.ndarray = field(default_factory=lambda: np.zeros(0, layout.VIP_META))
    vip_prefix_addr_keys: np.ndarray = field(default_factory=lambda: np.zeros(0, layout.VIP_LPM_KEY))
    # stateless VIPs' previous rings: uint32[MAX_PREV_RINGS, ring_size] and the per-VIP
    # refs, uint32[max_vips] (layout.PREV_REF read as one u32); None = none at all
    prev_rings: np.ndarray | None = None
    prev_refs: np.ndarray | None = None
    # uint64[max_vips, down_row_words(max_reals)] (layout.DOWN_WORD): the (VIP, real) pairs
    # the health checks hold down; None = none (down_set_of makes an all-zero set)
    down_set: np.ndarray | None = None

    def real_address(self, real_id: int) -> IPAddress | None:
        """The address of a real id, or None for 0 / an unused id."""
        entry = self.reals[real_id]
        if real_id == 0 or entry["family"] == C.FAMILY_NONE:
            return None
        return addr_from16(entry["addr"], int(entry["family"]))


def empty_down_set(max_vips: int, max_reals: int) -> np.ndarray:
    """An all-zero down set (lazily zero pages: it costs memory only where bits are set)."""
    return np.zeros((max_vips, C.down_row_words(max_reals)), dtype=layout.DOWN_WORD)


def down_bit(vip_num: int, real_id: int, max_reals: int) -> tuple[int, int]:
    """(word index, bit mask) of the pair (``vip_num``, ``real_id``) in the flat down set."""
    return (vip_num * C.down_row_words(max_reals) + real_id // C.DOWN_WORD_BITS,
            1 << (real_id % C.DOWN_WORD_BITS))


def down_set_of(tables: object) -> np.ndarray:
    """The down set of ``tables`` (2-D, layout.DOWN_WORD), all zero where it is left out."""
    down = getattr(tables, "down_set", None)
    if down is None:
        return empty_down_set(tables.max_vips, tables.max_reals)  # type: ignore[attr-defined]
    return down


def routing_tables(tables: object) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(quic_servers, src_routes_v4, src_routes_v6) of ``tables``, empty where a
    hand-built table set (tests, benchmarks) leaves them out."""
    return (
        getattr(tables, "quic_servers", np.zeros(0, layout.QUIC_SERVER)),
        getattr(tables, "src_routes_v4", np.zeros(0, layout.SRC_ROUTE_V4)),
        getattr(tables, "src_routes_v6", np.zeros(0, layout.SRC_ROUTE_V6)),
    )


def prev_ring_tables(tables: object) -> tuple[np.ndarray, np.ndarray]:
    """(prev_rings, prev_refs) of ``tables``, all zero (no previous ring) where they are
    left out. np.zeros maps its pages lazily: unused slots cost no memory."""
    rings = getattr(tables, "prev_rings", None)
    refs = getattr(tables, "prev_refs", None)
    if rings is None:
        rings = np.zeros((C.MAX_PREV_RINGS, int(tables.ring_size)), dtype=np.uint32)
    if refs is None:
        refs = np.zeros(int(tables.max_vips), dtype=np.uint32)
    return np.ascontiguousarray(rings, dtype=np.uint32), np.ascontiguousarray(refs, dtype=np.uint32)


def prev_ref_value(slots: tuple[int, ...] | list[int]) -> int:
    """The prev_ref word of a VIP whose previous rings (newest first) are in prev_rings
    slots ``slots`` (at most constants.PREV_RINGS_PER_VIP)."""
    if len(slots) > C.PREV_RINGS_PER_VIP:
        raise ValueError(f"at most {C.PREV_RINGS_PER_VIP} previous rings per VIP")
    return sum((s + 1) << (16 * i) for i, s in enumerate(slots))


def prefix_tables(tables: object) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vip_prefix_keys, vip_prefix_metas, vip_prefix_addr_keys) of ``tables``, empty
    where a hand-built table set leaves them out."""
    return (
        getattr(tables, "vip_prefix_keys", np.zeros(0, layout.VIP_LPM_KEY)),
        getattr(tables, "vip_prefix_metas", np.zeros(0, layout.VIP_META)),
        getattr(tables, "vip_prefix_addr_keys", np.zeros(0, layout.VIP_LPM_KEY)),
    )


def ctl_array(settings, cidr_vips: bool = False) -> np.ndarray:
    """The single ctl entry (layout.CTL) for an :class:`lb.config.Settings`; ``cidr_vips``:
    whether any VIP is a CIDR VIP."""
    ctl = np.zeros(1, dtype=layout.CTL)
    ctl[0]["cidr_vips"] = int(cidr_vips)
    ctl[0]["gw_mac"] = np.frombuffer(mac_bytes(settings.gateway_mac), dtype=np.uint8)
    ctl[0]["max_frame"] = settings.max_frame_size
    ctl[0]["mtu"] = settings.mtu or 0
    ctl[0]["encap"] = C.ENCAP_GUE if settings.encap == "gue" else C.ENCAP_IPIP
    ctl[0]["gue_port"] = settings.gue.port
    ctl[0]["max_conn_rate"] = settings.max_conn_rate
    if settings.gue.source_v4:
        ctl[0]["gue_src_v4"] = np.frombuffer(ipaddress.IPv4Address(settings.gue.source_v4).packed, np.uint8)
    if settings.gue.source_v6:
        ctl[0]["gue_src_v6"] = np.frombuffer(ipaddress.IPv6Address(settings.gue.source_v6).packed, np.uint8)
    return ctl


def src_route_arrays(routes: list[tuple[str, int]]) -> tuple[np.ndarray, np.ndarray]:
    """(prefix, real id) pairs -> the IPv4 and IPv6 source-route tables."""
    nets = [(ipaddress.ip_network(p), rid) for p, rid in routes]
    out = []
    for version, dtype in ((4, layout.SRC_ROUTE_V4), (6, layout.SRC_ROUTE_V6)):
        mine = [(n, rid) for n, rid in nets if n.version == version]
        arr = np.zeros(len(mine), dtype=dtype)
        for i, (net, rid) in enumerate(mine):
            arr[i]["key"]["prefixlen"] = net.prefixlen
            arr[i]["key"]["addr"] = np.frombuffer(net.network_address.packed, np.uint8)
            arr[i]["real_id"] = rid
        out.append(arr)
    return out[0], out[1]


def _ip(value: object) -> IPAddress:
    return value if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)) else ipaddress.ip_address(str(value))


def compile_tables(cfg) -> DatapathTables:
    """Build the tables for ``cfg`` (an :class:`lb.config.Config`, already validated).

    VIP numbers follow the order of the config; real ids are handed out from 1 upward in
    order of first use, as Katran does. A CIDR VIP (its address a prefix) goes into the
    prefix tables instead of vip_keys, numbered like any other.
    """
    s = cfg.settings
    exact = [v for v in cfg.vips if "/" not in v.address]
    vip_keys = np.zeros(len(exact), dtype=layout.VIP_KEY)
    vip_metas = np.zeros(len(exact), dtype=layout.VIP_META)
    prefix_keys, prefix_metas, prefix_addrs = [], [], {}
    reals = np.zeros(s.max_reals, dtype=layout.REAL)
    # np.zeros maps untouched pages lazily, so the full max_vips x ring_size array costs
    # memory only for the VIPs in use.
    rings = np.zeros((s.max_vips, s.ring_size), dtype=np.uint32)
    local = {_ip(a) for a in (s.local_addresses or [])}

    real_ids: dict[IPAddress, int] = {}
    vip_nums: dict[tuple[IPAddress, int, str], int] = {}
    vip_addrs: dict[tuple[bytes, int], None] = {}
    e = 0  # index into vip_keys
    for num, vip in enumerate(cfg.vips):
        vip_ip = vip_address(str(vip.address))
        vip_nums[(vip_ip, vip.port, vip.protocol)] = num
        if isinstance(vip_ip, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
            prefix_keys.append(vip_lpm_key(vip_ip, vip.port, PROTOCOLS[vip.protocol]))
            meta = np.zeros(1, dtype=layout.VIP_META)
            meta[0]["flags"], meta[0]["vip_num"] = vip.flag_bits, num
            prefix_metas.append(meta)
            addr_key = vip_lpm_key(vip_ip)
            prefix_addrs[addr_key.tobytes()] = addr_key
        else:
            raw, fam = addr16(vip_ip)
            vip_keys[e]["addr"] = raw
            vip_keys[e]["port"] = vip.port
            vip_keys[e]["proto"] = PROTOCOLS[vip.protocol]
            vip_keys[e]["family"] = fam
            vip_metas[e]["flags"] = vip.flag_bits
            vip_metas[e]["vip_num"] = num
            vip_addrs[(raw.tobytes(), fam)] = None
            e += 1

        ring_input = []
        for real in vip.reals:
            rip = _ip(real.address)
            if rip not in real_ids:
                rid = len(real_ids) + 1
                real_ids[rip] = rid
                rraw, rfam = addr16(rip)
                reals[rid]["addr"] = rraw
                reals[rid]["family"] = rfam
                reals[rid]["flags"] = C.REAL_F_LOCAL if rip in local else 0
            ring_input.append((rip, real.weight, real_ids[rip]))
        rings[num] = ring_for(ring_input, s.ring_size, vip.hash)

    vip_addr_keys = np.zeros(len(vip_addrs), dtype=layout.VIP_ADDR_KEY)
    for i, (raw_bytes, fam) in enumerate(vip_addrs):
        vip_addr_keys[i]["addr"] = np.frombuffer(raw_bytes, dtype=np.uint8)
        vip_addr_keys[i]["family"] = fam

    quic_servers = np.zeros(len(cfg.quic_servers), dtype=layout.QUIC_SERVER)
    for i, q in enumerate(cfg.quic_servers):
        quic_servers[i] = (q.id, real_ids[_ip(q.real)])
    src_v4, src_v6 = src_route_arrays([(r.prefix, real_ids[_ip(r.real)]) for r in cfg.source_routes])
    return DatapathTables(
        ring_size=s.ring_size,
        max_vips=s.max_vips,
        max_reals=s.max_reals,
        conn_table_size=s.conn_table_size,
        vip_keys=vip_keys,
        vip_metas=vip_metas,
        vip_addr_keys=vip_addr_keys,
        reals=reals,
        rings=rings,
        ctl=ctl_array(s, cidr_vips=bool(prefix_keys)),
        quic_servers=quic_servers,
        src_routes_v4=src_v4,
        src_routes_v6=src_v6,
        real_ids=real_ids,
        vip_nums=vip_nums,
        vip_prefix_keys=_concat(prefix_keys, layout.VIP_LPM_KEY),
        vip_prefix_metas=_concat(prefix_metas, layout.VIP_META),
        vip_prefix_addr_keys=_concat(list(prefix_addrs.values()), layout.VIP_LPM_KEY),
    )


def _concat(recs: list[np.ndarray], dtype: np.dtype) -> np.ndarray:
    """One-record arrays of ``dtype`` as one array."""
    out = np.zeros(len(recs), dtype=dtype)
    for i, r in enumerate(recs):
        out[i] = r[0]
    return out
