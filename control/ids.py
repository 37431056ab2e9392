"""Stable VIP numbers and real ids across changes.

:func:`lb.datapath_tables.compile_tables` numbers VIPs by their position in the config and reals
by first use, which is right for one config but would reshuffle the datapath when a VIP
or real is added or removed at runtime: every ring, every per-VIP counter and every
connection-table entry (they store real ids) would point somewhere else. The allocator
here keeps every number that is still in use and hands out free ones:

* a VIP keeps its number as long as its (address, port, protocol) exists; a new VIP takes
  the lowest free number;
* a real keeps its id as long as any VIP uses its address; a new real takes the lowest id
  never handed out yet, and only when those run out the id freed longest ago. A freed id
  is thus reused as late as possible, so a connection-table entry of a removed real does
  not silently point at a new one.

Starting from :data:`EMPTY`, :func:`allocate` gives exactly compile_tables' numbering
(VIPs 0.. in config order, reals 1.. in order of first use); tests/test_control_ids.py
checks that.

Pure: values in, values out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

VipKey = tuple[str, int, str]  # (canonical address, port, protocol), as lb.config.Vip.key

__all__ = ["VipKey", "Ids", "EMPTY", "AllocationError", "allocate"]


class AllocationError(ValueError):
    """No free VIP number or real id (the config's limits were not checked first)."""


def _frozen(d: Mapping[Any, int]) -> Mapping[Any, int]:
    return MappingProxyType(dict(d))


@dataclass(frozen=True)
class Ids:
    """Numbers handed out so far. Treat as a value; :func:`allocate` returns a new one."""

    vips: Mapping[VipKey, int] = field(default_factory=dict)  # VIP key -> vip_num (0..max_vips-1)
    reals: Mapping[str, int] = field(default_factory=dict)  # real address -> id (1..max_reals-1)
    next_real: int = 1  # lowest real id never handed out
    retired: tuple[int, ...] = ()  # freed real ids, freed longest ago first

    def __post_init__(self) -> None:
        object.__setattr__(self, "vips", _frozen(self.vips))
        object.__setattr__(self, "reals", _frozen(self.reals))

    def to_json(self) -> dict[str, Any]:
        return {
            "vips": [[a, p, proto, n] for (a, p, proto), n in sorted(self.vips.items(), key=lambda kv: kv[1])],
            "reals": [[a, i] for a, i in sorted(self.reals.items(), key=lambda kv: kv[1])],
            "next_real": self.next_real,
            "retired": list(self.retired),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Ids:
        """Inverse of :meth:`to_json`; ValueError if the numbers are inconsistent."""
        vips = {(str(a), int(p), str(proto)): int(n) for a, p, proto, n in data["vips"]}
        reals = {str(a): int(i) for a, i in data["reals"]}
        ids = cls(vips, reals, int(data["next_real"]), tuple(int(i) for i in data["retired"]))
        ids.check()
        return ids

    def check(self) -> None:
        """ValueError unless numbers are unique and consistent with next_real/retired."""
        if len(set(self.vips.values())) != len(self.vips) or any(n < 0 for n in self.vips.values()):
            raise ValueError("VIP numbers are not unique non-negative integers")
        used = set(self.reals.values())
        if len(used) != len(self.reals) or any(not 0 < i < self.next_real for i in used):
            raise ValueError("real ids are not unique and in 1..next_real-1")
        if used & set(self.retired) or len(set(self.retired)) != len(self.retired):
            raise ValueError("retired real ids overlap the ids in use or repeat")
        if any(not 0 < i < self.next_real for i in self.retired):
            raise ValueError("retired real ids must be in 1..next_real-1")


EMPTY = Ids()


def allocate(
    prev: Ids,
    vip_keys: Iterable[VipKey],
    real_addresses: Iterable[str],
    max_vips: int,
    max_reals: int,
) -> Ids:
    """Numbers for a new desired state.

    ``vip_keys`` in config order; ``real_addresses`` in order of first use (duplicates
    allowed, the first counts). Numbers of ``prev`` that no longer fit the sizes are
    dropped (as if new). Raises :class:`AllocationError` if a table is full.
    """
    keys = list(dict.fromkeys(vip_keys))
    vips: dict[VipKey, int] = {}
    for k in keys:
        n = prev.vips.get(k)
        if n is not None and n < max_vips:
            vips[k] = n
    taken = set(vips.values())
    free = (n for n in range(max_vips) if n not in taken)
    for k in keys:
        if k not in vips:
            n = next(free, None)
            if n is None:
                raise AllocationError(f"no free VIP number: {len(keys)} VIPs, max_vips = {max_vips}")
            vips[k] = n

    addresses = list(dict.fromkeys(real_addresses))
    wanted = set(addresses)
    reals: dict[str, int] = {}
    for a in addresses:
        i = prev.reals.get(a)
        if i is not None and i < max_reals:
            reals[a] = i
    next_real = min(prev.next_real, max_reals)
    in_use = set(reals.values())
    # Oldest first: ids already retired, then the ones freed by this change.
    retired = [i for i in prev.retired if i < max_reals and i not in in_use]
    retired += sorted(i for a, i in prev.reals.items()
                      if a not in wanted and i < max_reals and i not in in_use and i not in retired)
    if prev.next_real > max_reals:  # the table shrank: every id below the new size not in use is free
        known = set(retired) | in_use
        retired += [i for i in range(1, max_reals) if i not in known]
    for a in addresses:
        if a in reals:
            continue
        if next_real < max_reals:
            reals[a] = next_real
            next_real += 1
        elif retired:
            reals[a] = retired.pop(0)
        else:
            raise AllocationError(f"no free real id: {len(addresses)} reals, max_reals = {max_reals}"
                                  f" (ids 1..{max_reals - 1})")
    return Ids(vips, reals, next_real, tuple(retired))
