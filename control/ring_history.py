"""Stateless VIPs' previous rings: which rings a VIP had recently, and where they live.

A stateless VIP keeps no per-flow state on the balancer. When its ring changes, a
connection whose real the new ring no longer picks survives by the reals' second chance:
the balancer sends each TCP segment with the reals of the ring *and* of the VIP's
previous rings for the same flow hash (docs/datapath.md, "Stateless VIPs"). This module
decides, purely, which previous rings each stateless VIP has:

* :func:`next_history`: when a stateless VIP's ring changes (its ring inputs — hash,
  reals and effective weights — differ from the tables last written), the ring it had is
  kept for ``settings.second_chance_s`` seconds, newest first. A VIP keeps at most
  ``PREV_RINGS_PER_VIP`` (2, so hop lists hold 3 reals): a third change inside the window
  drops the oldest previous ring early, and says so (``dropped``: logged as a warning and
  counted by the caller), so no change breaks connections silently. A ring change back to
  a ring still held removes that previous ring (the flow's real is the ring's again).
  Expired entries go; so do VIPs that are gone or no longer stateless.
* :func:`prev_ring_tables`: the prev_rings map slots (``MAX_PREV_RINGS`` of them) and the
  per-VIP refs for a history. A previous ring keeps its slot while it lives; a new one
  takes a slot that neither the tables being replaced nor these use, so no slot the
  datapath may still read is rewritten (the reconciler writes slots, then refs, then
  rings). No free slot: that previous ring is left out, reported in ``skipped``.

The history is wall-clock timed (``expires``, seconds since the epoch) because it is
persisted with the desired state (:mod:`control.store`, etcd) and outlives the process:
a restarted balancer, or another balancer of the fleet, knows the previous rings too.
A previous ring is kept as its inputs (reals and weights), not as slots: a few hundred
bytes in the state document, rebuilt into a ring by whoever loads it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from lb import constants as C

VipKey = tuple[str, int, str]


@dataclass(frozen=True)
class PrevRing:
    """A ring a stateless VIP had: what built it, and until when it is kept."""

    hash: str  # the VIP's hash function (lb.maglev.HASH_FUNCTIONS)
    reals: tuple[tuple[str, int], ...]  # (address, effective weight), in ring-input order
    expires: float  # wall clock, seconds since the epoch

    @property
    def key(self) -> tuple[str, tuple[tuple[str, int], ...]]:
        """What identifies the ring (not when it expires)."""
        return self.hash, self.reals


History = Mapping[VipKey, tuple[PrevRing, ...]]  # newest first


def ring_key(ring_input: tuple) -> tuple[str, tuple[tuple[str, int], ...]]:
    """The PrevRing.key of a control.tables.VipPart.ring_input (hash, ring_size, reals)."""
    hash_name, _, ring_in = ring_input
    return hash_name, tuple((a, int(w)) for a, w, _ in ring_in)


def _stateless(part: Any) -> bool:
    return "stateless" in part.vip.flags


def next_history(base: History, old_parts: Mapping[VipKey, Any] | None, new_parts: Mapping[VipKey, Any],
                 now: float, window: float) -> tuple[dict[VipKey, tuple[PrevRing, ...]], list[VipKey]]:
    """The history after a build: ``base`` with a previous ring pushed for every stateless
    VIP whose ring inputs differ between ``old_parts`` (the tables last written; None at
    start-up: nothing is compared) and ``new_parts`` (control.tables.VipPart by VIP key),
    expired entries and VIPs that are gone or not stateless removed. Returns it and the
    VIPs whose oldest previous ring was dropped early (more than PREV_RINGS_PER_VIP)."""
    out: dict[VipKey, tuple[PrevRing, ...]] = {}
    dropped: list[VipKey] = []
    for key, part in new_parts.items():
        if not _stateless(part):
            continue
        cur = ring_key(part.ring_input)
        entries = [e for e in base.get(key, ()) if e.expires > now and e.key != cur]
        old = old_parts.get(key) if old_parts is not None else None
        if old is not None:
            before = ring_key(old.ring_input)
            if before != cur:
                entries = [PrevRing(before[0], before[1], now + window)] + [
                    e for e in entries if e.key != before]
        if len(entries) > C.PREV_RINGS_PER_VIP:
            entries = entries[:C.PREV_RINGS_PER_VIP]
            dropped.append(key)
        if entries:
            out[key] = tuple(entries)
    return out, dropped


def merge(a: History, b: History) -> dict[VipKey, tuple[PrevRing, ...]]:
    """Both histories, per VIP the entries of ``a`` first, a ring once (the later expiry)."""
    out: dict[VipKey, tuple[PrevRing, ...]] = {}
    for key in {*a, *b}:
        seen: dict[tuple, PrevRing] = {}
        for e in (*a.get(key, ()), *b.get(key, ())):
            if e.key not in seen or e.expires > seen[e.key].expires:
                seen[e.key] = e
        out[key] = tuple(sorted(seen.values(), key=lambda e: -e.expires))
    return out


def next_expiry(history: History) -> float | None:
    """When the first entry of ``history`` expires (None: empty)."""
    return min((e.expires for entries in history.values() for e in entries), default=None)


@dataclass(frozen=True)
class PrevTables:
    """A history's previous rings as the datapath holds them."""

    rings: Mapping[int, np.ndarray]  # prev_rings slot -> uint32[ring_size] (read-only)
    refs: Mapping[int, int]  # vip_num -> prev_ref word (layout.PREV_REF), nonzero only
    inputs: Mapping[int, tuple]  # slot -> (VIP key, PrevRing.key, ring input with ids)
    skipped: tuple[VipKey, ...] = ()  # VIPs with a previous ring left out: no free slot


EMPTY = PrevTables({}, {}, {})


def prev_ring_tables(history: History, vip_nums: Mapping[VipKey, int], real_ids: Mapping[str, int],
                     ring_size: int, prev: PrevTables | None, ring_of: Any) -> PrevTables:
    """Slots, rings and refs for ``history``. ``prev``: the tables being replaced (their
    slots keep their rings; the others are not reused in this change). ``ring_of``:
    control.tables.ring_of. A real that is no longer configured has id 0 in a previous
    ring (no hop)."""
    from lb.datapath_tables import prev_ref_value

    prev = prev or EMPTY
    by_input = {(v[0], v[1]): s for s, v in prev.inputs.items()}
    busy = set(prev.inputs)
    rings: dict[int, np.ndarray] = {}
    refs: dict[int, int] = {}
    inputs: dict[int, tuple] = {}
    skipped: list[VipKey] = []
    wanted = [(key, e) for key in sorted(history) if key in vip_nums for e in history[key]]
    # entries that had a slot keep it; then the new ones take free slots
    placed: dict[tuple, int] = {}
    for key, e in wanted:
        slot = by_input.get((key, e.key))
        if slot is not None:
            placed[(key, e.key)] = slot
    free = [s for s in range(C.MAX_PREV_RINGS) if s not in busy]
    for key, e in wanted:
        if (key, e.key) not in placed:
            if not free:
                skipped.append(key)
                continue
            placed[(key, e.key)] = free.pop(0)
    for key in sorted(history):
        if key not in vip_nums:
            continue
        slots = []
        for e in history[key]:
            slot = placed.get((key, e.key))
            if slot is None:
                continue
            ring_in = tuple((a, w, real_ids.get(a, 0)) for a, w in e.reals)
            inp = (key, e.key, ring_in)
            old = prev.rings.get(slot)
            if old is not None and prev.inputs.get(slot) == inp:
                ring = old
            else:
                ring = ring_of(ring_in, ring_size, e.hash)
                ring.flags.writeable = False
            rings[slot], inputs[slot] = ring, inp
            slots.append(slot)
        if slots:
            refs[vip_nums[key]] = prev_ref_value(slots)
    return PrevTables(rings, refs, inputs, tuple(dict.fromkeys(skipped)))


def history_to_json(history: History) -> list[dict[str, Any]]:
    """JSON form (state documents): one record per previous ring."""
    return [{"vip": list(key), "hash": e.hash, "reals": [list(r) for r in e.reals], "expires": e.expires}
            for key in sorted(history) for e in history[key]]


def history_from_json(data: Any) -> dict[VipKey, tuple[PrevRing, ...]]:
    """Inverse of :func:`history_to_json`. Raises ValueError/TypeError/KeyError on a bad record."""
    out: dict[VipKey, list[PrevRing]] = {}
    for rec in data or []:
        a, p, proto = rec["vip"]
        key = (str(a), int(p), str(proto))
        reals = tuple((str(r), int(w)) for r, w in rec["reals"])
        out.setdefault(key, []).append(PrevRing(str(rec["hash"]), reals, float(rec["expires"])))
    return {k: tuple(v) for k, v in out.items()}
