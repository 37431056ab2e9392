"""Desired datapath contents: what the maps should hold for a desired state.

:class:`DesiredTables` is the control plane's form of :class:`lb.datapath_tables.DatapathTables`:
map records as bytes keyed the way the maps are keyed, and one ring per VIP in use (not a
``max_vips x ring_size`` array), so that a change costs what it touches. Records are made
with lb.datapath_tables's helpers and lb.layout's dtypes, byte for byte as compile_tables makes
them; :meth:`DesiredTables.to_datapath_tables` assembles a DatapathTables (for the
userspace datapath, ``simulate``, and the test that a fresh allocation reproduces
compile_tables exactly).

What goes into a ring is a real's *effective* weight: its configured weight, or 0 if it
is drained, or down by its VIP's health check. If every real that would otherwise take
traffic is down, the VIP's ``healthcheck.on_all_down`` decides: ``fail_open`` (default)
ignores health for that VIP, ``drop`` leaves the ring empty (the datapath drops and
counts ``drop_no_real``).

Each (VIP, real) pair the health checks hold down (:func:`down_pairs`: failing, and not
kept in the ring by ``fail_open``) is a bit of the down set (``down``: word index ->
word, layout.DOWN_WORD), and a real down for at least one VIP is flagged ``REAL_F_DOWN``
in its real record (the hint that makes the datapath read the set): a connection-table
entry naming the real is then not honoured for a flow of such a VIP, for UDP (and TCP on
VIPs flagged ``migrate_down_tcp``); the flow is re-hashed onto that VIP's healthy ring.
Flows of the VIPs it is still up for stay.

The routing tables (``quic_servers``: QUIC server id -> real id; ``src_routes_v4`` /
``src_routes_v6``: client prefix -> real id) hold every configured entry except those of
a real that is down for every VIP it serves (:func:`routed_out`): such a packet then
falls back to hashing onto the healthy reals. A drained real keeps its entries, so
connections pinned to it by their QUIC connection id or client prefix keep working
while it drains.

Pure: values in, values out.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from types import MappingProxyType
from typing import Any

import numpy as np

from control.ids import Ids, VipKey
from control.ring_history import EMPTY as NO_PREV_RINGS
from control.ring_history import History, PrevTables
from lb import constants as C
from lb import layout
from lb.datapath_tables import (
    PROTOCOLS,
    DatapathTables,
    addr16,
    ctl_array,
    down_bit,
    empty_down_set,
    vip_address,
    vip_lpm_key,
)
from lb.hashing import endpoint_hash
from lb.maglev import HASH_FUNCTIONS, build_ring

__all__ = ["Sizes", "DesiredTables", "RealTarget", "effective_weights", "build_tables",
           "vip_key_record", "is_prefix_record", "vip_arrays", "real_record", "vip_label",
           "ROUTING_TABLES", "routed_out",
           "quic_key_record", "src_route_key_record", "id_record", "down_pairs"]

# The routing maps, by their map names (xdp/maps.h): key -> u32 real id.
ROUTING_TABLES = ("quic_servers", "src_routes_v4", "src_routes_v6")


@dataclass(frozen=True)
class Sizes:
    """Compile-time sizes of a datapath (fixed for a loaded program)."""

    ring_size: int
    max_vips: int
    max_reals: int
    conn_table_size: int

    @classmethod
    def of(cls, obj: Any) -> Sizes:
        """From lb.config.Settings, DatapathTables, XdpBalancer: anything with the four names."""
        return cls(int(obj.ring_size), int(obj.max_vips), int(obj.max_reals), int(obj.conn_table_size))


def vip_label(key: VipKey) -> str:
    """'198.18.0.1:80/tcp', '[2001:db8::1]:443/udp'."""
    addr, port, proto = key
    host = f"[{addr}]" if ":" in addr else addr
    return f"{host}:{port}/{proto}"


# --- records (cached: the same VIP / real gives the same bytes) ------------------------


def is_prefix_record(key: bytes) -> bool:
    """A VIP or VIP-address key of a CIDR VIP (layout.VIP_LPM_KEY, for the vip_prefixes /
    vip_prefix_addrs tries), not of an exact VIP (VIP_KEY / VIP_ADDR_KEY, 20 bytes)."""
    return len(key) == layout.VIP_LPM_KEY.itemsize


@lru_cache(maxsize=8192)
def vip_key_record(address: str, port: int, protocol: str) -> bytes:
    """The map key of a VIP: VIP_KEY, or VIP_LPM_KEY for a CIDR VIP (``address`` a prefix)."""
    if "/" in address:
        return vip_lpm_key(ipaddress.ip_network(address), port, PROTOCOLS[protocol]).tobytes()
    rec = np.zeros(1, dtype=layout.VIP_KEY)
    raw, fam = addr16(ipaddress.ip_address(address))
    rec[0]["addr"] = raw
    rec[0]["port"] = port
    rec[0]["proto"] = PROTOCOLS[protocol]
    rec[0]["family"] = fam
    return rec.tobytes()


@lru_cache(maxsize=8192)
def vip_addr_record(address: str) -> bytes:
    """The VIP-address key: VIP_ADDR_KEY, or VIP_LPM_KEY (port, proto 0) of a prefix."""
    if "/" in address:
        return vip_lpm_key(ipaddress.ip_network(address)).tobytes()
    rec = np.zeros(1, dtype=layout.VIP_ADDR_KEY)
    raw, fam = addr16(ipaddress.ip_address(address))
    rec[0]["addr"] = raw
    rec[0]["family"] = fam
    return rec.tobytes()


def vip_meta_record(flags: int, vip_num: int) -> bytes:
    rec = np.zeros(1, dtype=layout.VIP_META)
    rec[0]["flags"] = flags
    rec[0]["vip_num"] = vip_num
    return rec.tobytes()


@lru_cache(maxsize=65536)
def real_record(address: str, local: bool, down: bool = False) -> bytes:
    """A REAL record; ``down``: health checks took it down for at least one VIP it serves
    (REAL_F_DOWN: the datapath looks up the down set for flows pinned to it,
    docs/datapath.md)."""
    rec = np.zeros(1, dtype=layout.REAL)
    raw, fam = addr16(ipaddress.ip_address(address))
    rec[0]["addr"] = raw
    rec[0]["family"] = fam
    rec[0]["flags"] = (C.REAL_F_LOCAL if local else 0) | (C.REAL_F_DOWN if down else 0)
    return rec.tobytes()


def ctl_record(settings: Any, cidr_vips: bool = False) -> bytes:
    return ctl_array(settings, cidr_vips).tobytes()


EMPTY_REAL = bytes(layout.REAL.itemsize)


def id_record(value: int) -> bytes:
    """A u32 as the maps store it (QUIC server ids, real ids as map values)."""
    return int(value).to_bytes(4, "little")


quic_key_record = id_record  # quic_servers is keyed by the u32 server id


@lru_cache(maxsize=65536)
def src_route_key_record(prefix: str) -> tuple[str, bytes]:
    """(map name, LPM key) of a canonical prefix, as lb.datapath_tables.src_route_arrays lays it out."""
    net = ipaddress.ip_network(prefix)
    dtype = layout.LPM_V4_KEY if net.version == 4 else layout.LPM_V6_KEY
    rec = np.zeros(1, dtype=dtype)
    rec[0]["prefixlen"] = net.prefixlen
    rec[0]["addr"] = np.frombuffer(net.network_address.packed, np.uint8)
    return ("src_routes_v4" if net.version == 4 else "src_routes_v6"), rec.tobytes()


@lru_cache(maxsize=65536)
def _endpoint_hash(address: str) -> int:
    """lb.hashing.endpoint_hash of a canonical address (lb.config refuses IPv4-mapped
    IPv6, so no normalisation is needed), cached: a real's hash never changes."""
    return endpoint_hash(ipaddress.ip_address(address))


def ring_of(ring_in: tuple[tuple[str, int, int], ...], ring_size: int, hash_name: str) -> np.ndarray:
    """lb.maglev.ring_for for validated, canonical, distinct addresses, with the endpoint
    hashes cached (ring_for re-parses and re-hashes every address on every build)."""
    n = len(ring_in)
    return build_ring(np.fromiter((_endpoint_hash(a) for a, _, _ in ring_in), dtype=np.uint64, count=n),
                      np.fromiter((w for _, w, _ in ring_in), dtype=np.uint32, count=n),
                      np.fromiter((i for _, _, i in ring_in), dtype=np.uint32, count=n),
                      ring_size, HASH_FUNCTIONS[hash_name])


# --- effective weights -------------------------------------------------------------------


@dataclass(frozen=True)
class RealTarget:
    """One real of one VIP as the ring sees it."""

    address: str
    weight: int  # configured
    effective: int  # what the ring is built with
    drained: bool
    up: bool | None  # None: the VIP has no health check


def effective_weights(vip: Any, drained: Collection[str], down: Collection[str]
                      ) -> tuple[list[RealTarget], bool]:
    """Per real of ``vip`` (an lb.config.Vip) its effective weight, and whether every
    real that would take traffic is down (then ``on_all_down`` has been applied).

    ``drained``/``down``: addresses of this VIP's reals that are drained / failing their
    health check (``down`` is ignored if the VIP has no health check)."""
    hc = vip.healthcheck
    out = []
    candidates = healthy = 0
    for r in vip.reals:
        is_drained = r.address in drained
        up = None if hc is None else r.address not in down
        if r.weight > 0 and not is_drained:
            candidates += 1
            healthy += up is not False
        out.append(RealTarget(r.address, r.weight, 0 if is_drained or up is False else r.weight,
                              is_drained, up))
    all_down = hc is not None and candidates > 0 and healthy == 0
    if all_down and hc.on_all_down == "fail_open":
        out = [RealTarget(t.address, t.weight, 0 if t.drained else t.weight, t.drained, t.up)
               for t in out]
    return out, all_down


# --- the tables ----------------------------------------------------------------------------


def _frozen(d: Mapping[Any, Any]) -> Mapping[Any, Any]:
    return MappingProxyType(dict(d))


@dataclass(frozen=True)
class DesiredTables:
    """What the maps should contain. Records are bytes in lb.layout's formats."""

    sizes: Sizes
    vips: Mapping[bytes, bytes]  # VIP_KEY (CIDR VIPs: VIP_LPM_KEY) -> VIP_META, config order
    vip_addrs: frozenset[bytes]  # VIP_ADDR_KEY (prefixes of CIDR VIPs: VIP_LPM_KEY)
    reals: Mapping[int, bytes]  # real id -> REAL, ids in use only
    ctl: bytes  # CTL
    rings: Mapping[int, np.ndarray]  # vip_num -> uint32[ring_size] (read-only)
    ring_inputs: Mapping[int, tuple] = field(default_factory=dict)  # vip_num -> what built the ring
    vip_nums: Mapping[VipKey, int] = field(default_factory=dict)
    real_ids: Mapping[str, int] = field(default_factory=dict)
    targets: Mapping[VipKey, tuple[RealTarget, ...]] = field(default_factory=dict)
    all_down: frozenset[VipKey] = frozenset()  # VIPs whose reals are all failing
    parts: Mapping[VipKey, Any] = field(default_factory=dict)  # VipKey -> VipPart, for the next build
    ids: Ids | None = None  # the numbers these tables were built with
    local: frozenset[str] = frozenset()  # settings.local_addresses they were built with
    # map name (ROUTING_TABLES) -> key record -> real id record, config order
    routing: Mapping[str, Mapping[bytes, bytes]] = field(
        default_factory=lambda: {name: {} for name in ROUTING_TABLES})
    routed_out: frozenset[str] = frozenset()  # reals whose routing entries are left out (down)
    # the down set: flat word index (lb.datapath_tables.down_bit) -> word, non-zero words only
    down: Mapping[int, int] = field(default_factory=dict)
    down_reals: frozenset[str] = frozenset()  # reals down for at least one VIP (REAL_F_DOWN)
    routing_input: tuple = ()  # what built ``routing`` (reused by the next build when equal)
    # stateless VIPs: their previous rings (control.ring_history) and where they are
    history: History = field(default_factory=dict)
    prev: PrevTables = NO_PREV_RINGS
    generation: int = -1  # of the desired state these tables were built from

    def ring_for_num(self, num: int) -> np.ndarray:
        """The desired ring of VIP ``num`` (all zeros for a number not in use)."""
        ring = self.rings.get(num)
        return ring if ring is not None else np.zeros(self.sizes.ring_size, dtype=np.uint32)

    def to_datapath_tables(self) -> DatapathTables:
        """The same contents as an lb.datapath_tables.DatapathTables (arrays, VIPs in config order)."""
        s = self.sizes
        vips = vip_arrays(self.vips)
        assert {_addr_of(k) for k in self.vips} == set(self.vip_addrs), "vip_addrs out of step with vips"
        reals = np.zeros(s.max_reals, dtype=layout.REAL)
        for rid, rec in self.reals.items():
            reals[rid] = np.frombuffer(rec, dtype=layout.REAL)[0]
        rings = np.zeros((s.max_vips, s.ring_size), dtype=np.uint32)
        for num, ring in self.rings.items():
            rings[num] = ring
        ctl = np.frombuffer(bytearray(self.ctl), dtype=layout.CTL, count=1)
        prev_rings = np.zeros((C.MAX_PREV_RINGS, s.ring_size), dtype=np.uint32)
        for slot, ring in self.prev.rings.items():
            prev_rings[slot] = ring
        prev_refs = np.zeros(s.max_vips, dtype=np.uint32)
        for num, ref in self.prev.refs.items():
            prev_refs[num] = ref
        down = empty_down_set(s.max_vips, s.max_reals)
        flat = down.reshape(-1)
        for i, word in self.down.items():
            flat[i] = word
        return DatapathTables(
            ring_size=s.ring_size, max_vips=s.max_vips, max_reals=s.max_reals,
            conn_table_size=s.conn_table_size, reals=reals, rings=rings, ctl=ctl, **vips,
            **routing_arrays(self.routing),
            real_ids={ipaddress.ip_address(a): i for a, i in self.real_ids.items()},
            vip_nums={(vip_address(a), p, proto): n for (a, p, proto), n in self.vip_nums.items()},
            prev_rings=prev_rings, prev_refs=prev_refs, down_set=down,
        )


def _addr_of(key: bytes) -> bytes:
    """The VIP-address record of a VIP record: VIP_ADDR_KEY from VIP_KEY (address, family),
    VIP_LPM_KEY with port and proto 0 from VIP_LPM_KEY."""
    if is_prefix_record(key):
        return key[:4] + bytes(3) + key[7:]
    return key[:16] + bytes([key[19]]) + bytes(3)


def vip_arrays(vips: Mapping[bytes, bytes], addrs: Collection[bytes] | None = None) -> dict[str, np.ndarray]:
    """VIP and VIP-address records (exact and CIDR VIPs mixed, :func:`is_prefix_record`) as
    lb.datapath_tables.DatapathTables' arrays: vip_keys, vip_metas, vip_addr_keys and the
    vip_prefix_* ones; VIPs in the mapping's order. ``addrs``: the address records (sorted);
    None: those of ``vips``, in order of first use (as compile_tables makes them)."""

    def arr(recs: list[bytes], dtype: np.dtype) -> np.ndarray:
        return np.frombuffer(bytearray(b"".join(recs)), dtype=dtype, count=len(recs))

    exact = [k for k in vips if not is_prefix_record(k)]
    prefix = [k for k in vips if is_prefix_record(k)]
    addrs = list(dict.fromkeys(_addr_of(k) for k in vips)) if addrs is None else sorted(addrs)
    return {
        "vip_keys": arr(exact, layout.VIP_KEY),
        "vip_metas": arr([vips[k] for k in exact], layout.VIP_META),
        "vip_addr_keys": arr([a for a in addrs if not is_prefix_record(a)], layout.VIP_ADDR_KEY),
        "vip_prefix_keys": arr(prefix, layout.VIP_LPM_KEY),
        "vip_prefix_metas": arr([vips[k] for k in prefix], layout.VIP_META),
        "vip_prefix_addr_keys": arr([a for a in addrs if is_prefix_record(a)], layout.VIP_LPM_KEY),
    }


def routing_arrays(routing: Mapping[str, Mapping[bytes, bytes]]) -> dict[str, np.ndarray]:
    """The routing maps' records as lb.datapath_tables.DatapathTables' arrays (quic_servers,
    src_routes_v4, src_routes_v6), in the mappings' order."""
    out = {}
    for name, dtype, key_dtype in (("quic_servers", layout.QUIC_SERVER, None),
                                   ("src_routes_v4", layout.SRC_ROUTE_V4, layout.LPM_V4_KEY),
                                   ("src_routes_v6", layout.SRC_ROUTE_V6, layout.LPM_V6_KEY)):
        entries = routing.get(name, {})
        arr = np.zeros(len(entries), dtype=dtype)
        for i, (k, v) in enumerate(entries.items()):
            if key_dtype is None:
                arr[i]["server_id"] = int.from_bytes(k, "little")
            else:
                arr[i]["key"] = np.frombuffer(k, dtype=key_dtype)[0]
            arr[i]["real_id"] = int.from_bytes(v, "little")
        out[name] = arr
    return out


def _is_down(part: Any, t: RealTarget) -> bool:
    """Real ``t`` of VIP ``part`` is down: failing its health check, and not kept in the
    ring by ``on_all_down: fail_open`` (which ignores health for its VIP)."""
    hc = part.vip.healthcheck
    return t.up is False and not (part.all_down and hc is not None and hc.on_all_down == "fail_open")


def down_pairs(parts: Mapping[VipKey, Any]) -> list[tuple[int, str]]:
    """(VIP number, real address) of every real down for a VIP (:func:`_is_down`). Drain
    does not count (a drained real's flows stay while it drains)."""
    return [(p.num, t.address) for p in parts.values() for t in p.targets if _is_down(p, t)]


def _down_set(pairs: list[tuple[int, str]], ids: Ids, max_reals: int) -> dict[int, int]:
    """The down set's non-zero words for ``pairs``."""
    words: dict[int, int] = {}
    for num, addr in pairs:
        i, bit = down_bit(num, ids.reals[addr], max_reals)
        words[i] = words.get(i, 0) | bit
    return words


def routed_out(parts: Mapping[VipKey, Any]) -> frozenset[str]:
    """Reals that are down (:func:`_is_down`) for every VIP they serve. Drain does not
    count: a drained real is out of the rings but keeps its routing entries, so its pinned
    QUIC connections and routed clients keep working."""
    up: set[str] = set()
    down: set[str] = set()
    for part in parts.values():
        for t in part.targets:
            (down if _is_down(part, t) else up).add(t.address)
    return frozenset(down - up)


def _routing(cfg: Any, ids: Ids, out: frozenset[str], prev: DesiredTables | None
             ) -> tuple[Mapping[str, Mapping[bytes, bytes]], tuple]:
    """The routing maps' desired contents (reused from ``prev`` when built from the same
    lists, real ids and left-out reals)."""
    inp = (cfg.quic_servers, cfg.source_routes, ids.reals, out)
    if prev is not None and len(prev.routing_input) == 4 and all(
            a is b for a, b in zip(prev.routing_input[:3], inp[:3])) and prev.routing_input[3] == out:
        return prev.routing, prev.routing_input
    tables: dict[str, dict[bytes, bytes]] = {name: {} for name in ROUTING_TABLES}
    for q in cfg.quic_servers:
        if q.real not in out:
            tables["quic_servers"][quic_key_record(q.id)] = id_record(ids.reals[q.real])
    for r in cfg.source_routes:
        if r.real not in out:
            name, key = src_route_key_record(r.prefix)
            tables[name][key] = id_record(ids.reals[r.real])
    return _frozen({n: _frozen(t) for n, t in tables.items()}), inp


@dataclass(frozen=True)
class VipPart:
    """What one VIP contributes to the tables, with what it was made from (so an
    unchanged VIP is reused as is by the next build)."""

    vip: Any  # the lb.config.Vip it was built from (compared by identity)
    num: int
    drained: frozenset[str]
    down: frozenset[str]
    local: frozenset[str]
    ring_size: int
    key_rec: bytes
    meta_rec: bytes
    addr_rec: bytes
    targets: tuple[RealTarget, ...]
    all_down: bool
    ring_input: tuple
    ring: np.ndarray


def _vip_part(vip: Any, num: int, ids: Ids, drained: frozenset[str], down: frozenset[str],
              local: frozenset[str], ring_size: int, prev: VipPart | None) -> VipPart:
    if (prev is not None and prev.vip is vip and prev.num == num and prev.drained == drained
            and prev.down == down and prev.local == local and prev.ring_size == ring_size):
        return prev  # the VIP and everything its tables depend on are unchanged
    tgts, none_up = effective_weights(vip, drained, down)
    ring_in = tuple((t.address, t.effective, ids.reals[t.address]) for t in tgts)
    inp = (vip.hash, ring_size, ring_in)
    if prev is not None and prev.ring_input == inp:
        ring = prev.ring
    else:
        ring = ring_of(ring_in, ring_size, vip.hash)
        ring.flags.writeable = False
    return VipPart(vip, num, drained, down, local, ring_size, vip_key_record(*vip.key),
                   vip_meta_record(vip.flag_bits, num), vip_addr_record(vip.address), tuple(tgts),
                   none_up, inp, ring)


def build_tables(
    cfg: Any,
    ids: Ids,
    drained: Collection[tuple[VipKey, str]] = (),
    down: Collection[tuple[VipKey, str]] = (),
    prev: DesiredTables | None = None,
) -> DesiredTables:
    """Desired contents for ``cfg`` (a validated lb.config.Config) numbered by ``ids``.

    ``drained``/``down``: (VIP key, real address) pairs. What a VIP contributes is reused
    from ``prev`` when the VIP (the same model object), its number, its drained and down
    reals and the local addresses are unchanged, and its ring when its inputs are, so a
    change costs what it touches. Real ids of a VIP that is unchanged are stable by
    construction (:func:`control.ids.allocate`). Raises ValueError (from lb.maglev) if a
    ring cannot be built, e.g. more reals than slots; KeyError if ``ids`` lacks a number
    (allocate first).
    """
    s = cfg.settings
    sizes = Sizes.of(s)
    local = frozenset(str(ipaddress.ip_address(a)) for a in s.local_addresses)
    drained_by: dict[VipKey, set[str]] = {}
    for key, addr in drained:
        drained_by.setdefault(key, set()).add(addr)
    down_by: dict[VipKey, set[str]] = {}
    for key, addr in down:
        down_by.setdefault(key, set()).add(addr)
    none: frozenset[str] = frozenset()
    prev_parts = prev.parts if prev is not None else {}

    parts: dict[VipKey, VipPart] = {}
    for vip in cfg.vips:
        key = vip.key
        parts[key] = _vip_part(vip, ids.vips[key], ids,
                               frozenset(drained_by[key]) if key in drained_by else none,
                               frozenset(down_by[key]) if key in down_by else none,
                               local, sizes.ring_size, prev_parts.get(key))
    out = routed_out(parts)
    pairs = down_pairs(parts)
    hinted = frozenset(addr for _, addr in pairs)
    # every real in use, whatever its weight (ids.reals holds exactly those); a real down
    # for at least one VIP is flagged, so the datapath looks its flows up in the down set
    if prev is not None and prev.ids is ids and prev.local == local and prev.down_reals == hinted:
        reals = prev.reals
    else:
        reals = {rid: real_record(addr, addr in local, addr in hinted) for addr, rid in ids.reals.items()}
    routing, routing_input = _routing(cfg, ids, out, prev)
    return DesiredTables(
        sizes=sizes,
        vips=_frozen({p.key_rec: p.meta_rec for p in parts.values()}),
        vip_addrs=frozenset(p.addr_rec for p in parts.values()),
        reals=_frozen(reals),
        ctl=ctl_record(s, any(is_prefix_record(p.key_rec) for p in parts.values())),
        rings=_frozen({p.num: p.ring for p in parts.values()}),
        ring_inputs=_frozen({p.num: p.ring_input for p in parts.values()}),
        vip_nums=_frozen({k: p.num for k, p in parts.items()}),
        real_ids=_frozen(ids.reals),
        targets=_frozen({k: p.targets for k, p in parts.items()}),
        all_down=frozenset(k for k, p in parts.items() if p.all_down),
        parts=_frozen(parts),
        ids=ids,
        local=local,
        routing=routing,
        routed_out=out,
        routing_input=routing_input,
        down=_frozen(_down_set(pairs, ids, sizes.max_reals)),
        down_reals=hinted,
    )
