"""Desired datapath contents: what the maps should hold for a desired state.

:class:`DesiredTables` is the control plane's form of :class:`lb.state.DatapathTables`:
map records as bytes keyed the way the maps are keyed, and one ring per VIP in use (not a
``max_vips x ring_size`` array), so that a change costs what it touches. Records are made
with lb.state's helpers and lb.layout's dtypes, byte for byte as compile_tables makes
them; :meth:`DesiredTables.to_datapath_tables` assembles a DatapathTables (for the
userspace datapath, ``simulate``, and the test that a fresh allocation reproduces
compile_tables exactly).

What goes into a ring is a real's *effective* weight: its configured weight, or 0 if it
is drained, or down by its VIP's health check. If every real that would otherwise take
traffic is down, the VIP's ``healthcheck.on_all_down`` decides: ``fail_open`` (default)
ignores health for that VIP, ``drop`` leaves the ring empty (the datapath drops and
counts ``drop_no_real``).

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

from lb import constants as C
from lb import layout
from lb.state import PROTOCOLS, DatapathTables, addr16, mac_bytes
from lb.maglev import ring_for

from control.ids import Ids, VipKey

__all__ = ["Sizes", "DesiredTables", "RealTarget", "effective_weights", "build_tables",
           "vip_key_record", "real_record", "vip_label"]


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


@lru_cache(maxsize=8192)
def vip_key_record(address: str, port: int, protocol: str) -> bytes:
    rec = np.zeros(1, dtype=layout.VIP_KEY)
    raw, fam = addr16(ipaddress.ip_address(address))
    rec[0]["addr"] = raw
    rec[0]["port"] = port
    rec[0]["proto"] = PROTOCOLS[protocol]
    rec[0]["family"] = fam
    return rec.tobytes()


@lru_cache(maxsize=8192)
def vip_addr_record(address: str) -> bytes:
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
def real_record(address: str, local: bool) -> bytes:
    rec = np.zeros(1, dtype=layout.REAL)
    raw, fam = addr16(ipaddress.ip_address(address))
    rec[0]["addr"] = raw
    rec[0]["family"] = fam
    rec[0]["flags"] = C.REAL_F_LOCAL if local else 0
    return rec.tobytes()


def ctl_record(gateway_mac: str, max_frame_size: int) -> bytes:
    rec = np.zeros(1, dtype=layout.CTL)
    rec[0]["gw_mac"] = np.frombuffer(mac_bytes(gateway_mac), dtype=np.uint8)
    rec[0]["max_frame"] = max_frame_size
    return rec.tobytes()


EMPTY_REAL = bytes(layout.REAL.itemsize)


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
    vips: Mapping[bytes, bytes]  # VIP_KEY -> VIP_META, config order
    vip_addrs: frozenset[bytes]  # VIP_ADDR_KEY
    reals: Mapping[int, bytes]  # real id -> REAL, ids in use only
    ctl: bytes  # CTL
    rings: Mapping[int, np.ndarray]  # vip_num -> uint32[ring_size] (read-only)
    ring_inputs: Mapping[int, tuple] = field(default_factory=dict)  # vip_num -> what built the ring
    vip_nums: Mapping[VipKey, int] = field(default_factory=dict)
    real_ids: Mapping[str, int] = field(default_factory=dict)
    targets: Mapping[VipKey, tuple[RealTarget, ...]] = field(default_factory=dict)
    all_down: frozenset[VipKey] = frozenset()  # VIPs whose reals are all failing

    def ring_for_num(self, num: int) -> np.ndarray:
        """The desired ring of VIP ``num`` (all zeros for a number not in use)."""
        ring = self.rings.get(num)
        return ring if ring is not None else np.zeros(self.sizes.ring_size, dtype=np.uint32)

    def to_datapath_tables(self) -> DatapathTables:
        """The same contents as an lb.state.DatapathTables (arrays, VIPs in config order)."""
        s = self.sizes
        n = len(self.vips)
        vip_keys = np.frombuffer(bytearray(b"".join(self.vips.keys())), dtype=layout.VIP_KEY, count=n)
        vip_metas = np.frombuffer(bytearray(b"".join(self.vips.values())), dtype=layout.VIP_META, count=n)
        addrs: dict[bytes, None] = {}
        for k in self.vips:
            addrs[k[:16] + bytes([k[19]]) + bytes(3)] = None  # VIP_ADDR_KEY from VIP_KEY, first use order
        assert set(addrs) == set(self.vip_addrs), "vip_addrs out of step with vips"
        vip_addr_keys = np.frombuffer(bytearray(b"".join(addrs)), dtype=layout.VIP_ADDR_KEY, count=len(addrs))
        reals = np.zeros(s.max_reals, dtype=layout.REAL)
        for rid, rec in self.reals.items():
            reals[rid] = np.frombuffer(rec, dtype=layout.REAL)[0]
        rings = np.zeros((s.max_vips, s.ring_size), dtype=np.uint32)
        for num, ring in self.rings.items():
            rings[num] = ring
        ctl = np.frombuffer(bytearray(self.ctl), dtype=layout.CTL, count=1)
        return DatapathTables(
            ring_size=s.ring_size, max_vips=s.max_vips, max_reals=s.max_reals,
            conn_table_size=s.conn_table_size, vip_keys=vip_keys, vip_metas=vip_metas,
            vip_addr_keys=vip_addr_keys, reals=reals, rings=rings, ctl=ctl,
            real_ids={ipaddress.ip_address(a): i for a, i in self.real_ids.items()},
            vip_nums={(ipaddress.ip_address(a), p, proto): n for (a, p, proto), n in self.vip_nums.items()},
        )


def build_tables(
    cfg: Any,
    ids: Ids,
    drained: Collection[tuple[VipKey, str]] = (),
    down: Collection[tuple[VipKey, str]] = (),
    prev: DesiredTables | None = None,
) -> DesiredTables:
    """Desired contents for ``cfg`` (a validated lb.config.Config) numbered by ``ids``.

    ``drained``/``down``: (VIP key, real address) pairs. Rings whose inputs equal those
    of ``prev`` are reused, so a change rebuilds only the rings it touches. Raises
    ValueError (from lb.maglev) if a ring cannot be built, e.g. more reals than slots;
    KeyError if ``ids`` lacks a number (allocate first).
    """
    s = cfg.settings
    if s.encap != "ipip":
        raise ValueError(f"settings.encap: {s.encap!r} is not implemented by the datapath yet (use ipip)")
    sizes = Sizes.of(s)
    local = {str(ipaddress.ip_address(a)) for a in s.local_addresses}
    drained_by: dict[VipKey, set[str]] = {}
    for key, addr in drained:
        drained_by.setdefault(key, set()).add(addr)
    down_by: dict[VipKey, set[str]] = {}
    for key, addr in down:
        down_by.setdefault(key, set()).add(addr)

    vips: dict[bytes, bytes] = {}
    vip_addrs: set[bytes] = set()
    reals: dict[int, bytes] = {}
    rings: dict[int, np.ndarray] = {}
    inputs: dict[int, tuple] = {}
    targets: dict[VipKey, tuple[RealTarget, ...]] = {}
    all_down: set[VipKey] = set()
    for vip in cfg.vips:
        key = vip.key
        num = ids.vips[key]
        vips[vip_key_record(*key)] = vip_meta_record(vip.flag_bits, num)
        vip_addrs.add(vip_addr_record(vip.address))
        tgts, none_up = effective_weights(vip, drained_by.get(key, ()), down_by.get(key, ()))
        targets[key] = tuple(tgts)
        if none_up:
            all_down.add(key)
        ring_in = []
        for t in tgts:
            rid = ids.reals[t.address]
            if rid not in reals:
                reals[rid] = real_record(t.address, t.address in local)
            ring_in.append((t.address, t.effective, rid))
        inp = (vip.hash, sizes.ring_size, tuple(ring_in))
        inputs[num] = inp
        if prev is not None and prev.ring_inputs.get(num) == inp:
            rings[num] = prev.rings[num]
        else:
            ring = ring_for(ring_in, sizes.ring_size, vip.hash)
            ring.flags.writeable = False
            rings[num] = ring
    return DesiredTables(
        sizes=sizes,
        vips=_frozen(vips),
        vip_addrs=frozenset(vip_addrs),
        reals=_frozen(reals),
        ctl=ctl_record(s.gateway_mac, s.max_frame_size),
        rings=_frozen(rings),
        ring_inputs=_frozen(inputs),
        vip_nums=_frozen({v.key: ids.vips[v.key] for v in cfg.vips}),
        real_ids=_frozen({a: ids.reals[a] for v in cfg.vips for a in (r.address for r in v.reals)}),
        targets=_frozen(targets),
        all_down=frozenset(all_down),
    )
