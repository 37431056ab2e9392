"""The reconciler: from what the datapath holds to what it should hold, in the fewest writes.

:func:`plan` compares a datapath's current contents (a :class:`DatapathView`) with
:class:`~control.tables.DesiredTables` and returns a :class:`Plan`: an ordered list of
map writes, each carrying the value it overwrites, so that every write has an inverse.
Only differences are written: changed ring slots (not whole rings), VIP entries added,
changed or deleted, real entries added, changed or cleared, the control record if it
changed, routing entries (QUIC server ids, source routes) added, changed or deleted,
words of the down set ((VIP, real) pairs the health checks hold down) that change,
counters of a VIP number or real id that is being (re)used. :func:`apply`
performs a plan on a :class:`DatapathPort` as one unit: if a write fails, the writes
already made are undone in reverse order and :class:`ApplyError` is raised, leaving the
datapath as it was.

The order keeps a live datapath consistent at every step and within the maps' sizes:
VIPs that go (and addresses only they used) first — the VIP hash maps hold max_vips
entries, so adding before deleting could overflow them, and a VIP number handed to a new
VIP must not be reachable through the old one while its ring is rewritten —; then real
entries before the rings that name them, stateless VIPs' previous rings (``prev_rings``
slots, then the ``prev_ref`` words naming them) before the rings change, rings before the
VIP entries that lead to them, and last the real entries no ring names any more. Routing
entries that go are deleted first (with the VIPs; they may name a real that is cleared at
the end) and new or changed ones are written once the real entries they name are in
place. Between two writes a packet sees either the old or the new value of each slot,
never a VIP without its address entry, a ring slot naming an empty real, or a ring naming
a real that is down for its VIP. (One exception, only when every real id has been used
once: an id freed and handed to a new real in the same change names the new real before
the old VIP rings are rewritten; the allocator reuses the id freed longest ago to make
that rare.)

Down reals: the datapath moves a flow off a real only when it sees both the real's
``REAL_F_DOWN`` hint and the (VIP, real) bit of the down set, so each write alone is
harmless, and the two are ordered around the rings. Pairs that come back up leave the
down set (and a real up for every VIP loses its hint, with the other real writes) before
a ring names the real again; pairs that go down join the down set, and then a real newly
down for some VIP gets its hint, once the rings have moved off it (a flow re-hashed away
from a real must not land on it again). A down-set word that loses and gains bits in one
change is written twice: the lost bits before the rings, the gained ones after.

:func:`plan` is pure given the view; :func:`apply` does the I/O through the port.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

from control.tables import EMPTY_REAL, ROUTING_TABLES, DesiredTables, Sizes
from lb import constants as C
from lb import layout

__all__ = [
    "WriteReal", "WriteCtl", "WriteRing", "PutVipAddr", "DeleteVipAddr", "PutVip", "DeleteVip",
    "PutEntry", "DeleteEntry", "WriteDownWord", "ResetCounters", "WritePrevRing", "WritePrevRef", "Op", "Plan",
    "DatapathView", "DatapathPort", "ApplyError", "RollbackError",
    "plan", "apply", "inverse",
]


# --- operations (each knows the value it replaces) --------------------------------------


@dataclass(frozen=True)
class WriteReal:
    real_id: int
    new: bytes  # REAL record; all zero clears the entry
    old: bytes


@dataclass(frozen=True)
class WriteCtl:
    new: bytes
    old: bytes


@dataclass(frozen=True, eq=False)
class WriteRing:
    """Slots ``slots`` of ring ``vip_num`` get ``new`` (they held ``old``)."""

    vip_num: int
    slots: np.ndarray  # int64 slot indexes
    new: np.ndarray  # uint32
    old: np.ndarray  # uint32


@dataclass(frozen=True)
class PutVipAddr:
    key: bytes  # VIP_ADDR_KEY


@dataclass(frozen=True)
class DeleteVipAddr:
    key: bytes


@dataclass(frozen=True)
class PutVip:
    key: bytes  # VIP_KEY
    new: bytes  # VIP_META
    old: bytes | None  # None: the VIP was absent


@dataclass(frozen=True)
class DeleteVip:
    key: bytes
    old: bytes


@dataclass(frozen=True)
class PutEntry:
    """Entry ``key`` of routing map ``table`` (control.tables.ROUTING_TABLES) gets ``new``."""

    table: str
    key: bytes
    new: bytes  # u32 real id
    old: bytes | None  # None: the key was absent


@dataclass(frozen=True)
class DeleteEntry:
    table: str
    key: bytes
    old: bytes


@dataclass(frozen=True)
class WriteDownWord:
    """Word ``index`` of the down set (lb.datapath_tables.down_bit) gets ``new``."""

    index: int
    new: int  # u64
    old: int


@dataclass(frozen=True)
class ResetCounters:
    """Zero the per-VIP (``vip``) or per-real (``real``) packet/byte counters of a number
    that is being given to a new VIP/real. Has no inverse (the old counts belonged to
    something that no longer exists)."""

    table: Literal["vip", "real"]
    index: int


@dataclass(frozen=True, eq=False)
class WritePrevRing:
    """Slots ``slots`` of previous-ring slot ``slot`` (stateless VIPs) get ``new``."""

    slot: int
    slots: np.ndarray  # int64 slot indexes
    new: np.ndarray  # uint32
    old: np.ndarray  # uint32


@dataclass(frozen=True)
class WritePrevRef:
    """VIP ``vip_num``'s prev_ref word (layout.PREV_REF) gets ``new``."""

    vip_num: int
    new: int
    old: int


Op = (WriteReal | WriteCtl | WriteRing | PutVipAddr | DeleteVipAddr | PutVip | DeleteVip | PutEntry | DeleteEntry
      | WriteDownWord | ResetCounters | WritePrevRing | WritePrevRef)


def inverse(op: Op) -> Op | None:
    """The write that undoes ``op`` (None for ResetCounters)."""
    if isinstance(op, WriteReal):
        return WriteReal(op.real_id, op.old, op.new)
    if isinstance(op, WriteCtl):
        return WriteCtl(op.old, op.new)
    if isinstance(op, WriteRing):
        return WriteRing(op.vip_num, op.slots, op.old, op.new)
    if isinstance(op, PutVipAddr):
        return DeleteVipAddr(op.key)
    if isinstance(op, DeleteVipAddr):
        return PutVipAddr(op.key)
    if isinstance(op, PutVip):
        return DeleteVip(op.key, op.new) if op.old is None else PutVip(op.key, op.old, op.new)
    if isinstance(op, DeleteVip):
        return PutVip(op.key, op.old, None)
    if isinstance(op, PutEntry):
        return (DeleteEntry(op.table, op.key, op.new) if op.old is None
                else PutEntry(op.table, op.key, op.old, op.new))
    if isinstance(op, DeleteEntry):
        return PutEntry(op.table, op.key, op.old, None)
    if isinstance(op, WriteDownWord):
        return WriteDownWord(op.index, op.old, op.new)
    if isinstance(op, WritePrevRing):
        return WritePrevRing(op.slot, op.slots, op.old, op.new)
    if isinstance(op, WritePrevRef):
        return WritePrevRef(op.vip_num, op.old, op.new)
    return None


@dataclass(frozen=True)
class Plan:
    """Writes in the order they must be made."""

    ops: tuple[Op, ...] = ()
    rings_checked: int = 0  # rings compared slot by slot

    def __len__(self) -> int:
        return len(self.ops)

    @property
    def empty(self) -> bool:
        return not self.ops

    def summary(self) -> dict[str, int]:
        """Counts by kind: ring_slots, rings, reals, ctl, vip_addrs_put/_deleted,
        vips_put/_deleted, down_words, counter_resets, and per routing map (quic_servers,
        src_routes_v4, src_routes_v6) the entries put or deleted."""
        out = {"ring_slots": 0, "rings": 0, "reals": 0, "ctl": 0, "vip_addrs_put": 0,
               "vip_addrs_deleted": 0, "vips_put": 0, "vips_deleted": 0, "down_words": 0,
               "counter_resets": 0, **{name: 0 for name in ROUTING_TABLES}, "prev_ring_slots": 0,
               "prev_refs": 0}
        for op in self.ops:
            if isinstance(op, WriteRing):
                out["ring_slots"] += int(op.slots.size)
                out["rings"] += 1
            elif isinstance(op, WriteReal):
                out["reals"] += 1
            elif isinstance(op, WriteCtl):
                out["ctl"] += 1
            elif isinstance(op, PutVipAddr):
                out["vip_addrs_put"] += 1
            elif isinstance(op, DeleteVipAddr):
                out["vip_addrs_deleted"] += 1
            elif isinstance(op, PutVip):
                out["vips_put"] += 1
            elif isinstance(op, DeleteVip):
                out["vips_deleted"] += 1
            elif isinstance(op, (PutEntry, DeleteEntry)):
                out[op.table] += 1
            elif isinstance(op, WriteDownWord):
                out["down_words"] += 1
            elif isinstance(op, WritePrevRing):
                out["prev_ring_slots"] += int(op.slots.size)
            elif isinstance(op, WritePrevRef):
                out["prev_refs"] += 1
            else:
                out["counter_resets"] += 1
        return out


# --- the datapath as the reconciler sees it ------------------------------------------------


class DatapathView(Protocol):
    """Read access to a datapath's tables (records in lb.layout formats)."""

    sizes: Sizes

    def vip_entries(self) -> dict[bytes, bytes]: ...  # VIP_KEY -> VIP_META

    def vip_addr_entries(self) -> set[bytes]: ...

    def real_entries(self) -> dict[int, bytes]: ...  # id -> REAL, non-empty entries only

    def ctl_entry(self) -> bytes: ...

    def ring(self, vip_num: int) -> np.ndarray: ...  # a copy

    def routing_entries(self, table: str) -> dict[bytes, bytes]: ...  # a ROUTING_TABLES map

    def down_words(self) -> dict[int, int]: ...  # the down set: index -> word, non-zero only

    def prev_ring(self, slot: int) -> np.ndarray: ...  # a copy of a prev_rings slot

    def prev_refs(self) -> dict[int, int]: ...  # vip_num -> prev_ref word, nonzero only


class DatapathPort(DatapathView, Protocol):
    """A datapath the control plane can write: one write per :data:`Op`."""

    kind: str

    def apply(self, op: Op) -> None: ...

    def commit(self) -> None: ...  # after a unit of writes (userspace: reload its lookup tables)


class ApplyError(RuntimeError):
    """A write failed; every write of the plan made before it was undone."""

    def __init__(self, message: str, failed: Op | None, cause: BaseException) -> None:
        super().__init__(message)
        self.failed = failed
        self.cause = cause


class RollbackError(ApplyError):
    """A write failed and undoing the earlier ones failed too: the datapath holds a mix.
    The caller must reconcile again from a full read of the datapath."""


_FLAGS = layout.REAL.fields["flags"][1]  # offset of the flags byte in a REAL record


def _only_goes_down(old: bytes, new: bytes) -> bool:
    """``new`` is ``old`` with REAL_F_DOWN set and nothing else changed."""
    return (old[_FLAGS] | C.REAL_F_DOWN == new[_FLAGS] and not old[_FLAGS] & C.REAL_F_DOWN
            and old[:_FLAGS] == new[:_FLAGS] and old[_FLAGS + 1:] == new[_FLAGS + 1:])


def _meta_num(meta: bytes) -> int:
    return int.from_bytes(meta[4:8], "little")


def plan(view: DatapathView, desired: DesiredTables, ring_nums: Iterable[int] | None = None,
         tables: Iterable[str] | None = None) -> Plan:
    """The writes that turn ``view`` into ``desired``.

    ``ring_nums``: the VIP numbers whose rings may differ (a change knows which rings it
    rebuilt); None compares every ring of ``desired`` (start-up, after a failure).
    ``tables``: likewise the routing maps that may differ (None: all of them).
    Rings of VIPs being deleted are left as they are: nothing reads them, and a number
    given out again is compared slot by slot then.
    """
    if view.sizes != desired.sizes:
        raise ValueError(f"datapath sized {view.sizes}, desired tables sized {desired.sizes}")
    cur_vips = view.vip_entries()
    cur_addrs = view.vip_addr_entries()
    cur_reals = view.real_entries()
    names = ROUTING_TABLES if tables is None else [n for n in ROUTING_TABLES if n in set(tables)]
    cur_routing = {name: view.routing_entries(name) for name in names}
    ops: list[Op] = []

    # 1. VIPs that go, and addresses no remaining VIP uses: first, so the hash maps (sized
    #    max_vips) never hold old and new entries at once, and a VIP number given to a new
    #    VIP below is no longer reachable through the old one
    for key in sorted(set(cur_vips) - set(desired.vips)):
        ops.append(DeleteVip(key, cur_vips[key]))
    for key in sorted(cur_addrs - desired.vip_addrs):
        ops.append(DeleteVipAddr(key))
    #    routing entries that go (they may name a real cleared in step 6; deleting them
    #    first also keeps the maps within their sizes)
    for name, cur in cur_routing.items():
        for key in sorted(set(cur) - set(desired.routing[name])):
            ops.append(DeleteEntry(name, key, cur[key]))

    # 2. down-set bits of pairs that come back up (before a ring names the real again);
    #    bits that go down wait for step 6
    cur_down = view.down_words()
    setting: list[WriteDownWord] = []
    for i in sorted(set(cur_down) | set(desired.down)):
        old_w, new_w = cur_down.get(i, 0), desired.down.get(i, 0)
        kept = old_w & new_w
        if kept != old_w:
            ops.append(WriteDownWord(i, kept, old_w))
        if new_w != kept:
            setting.append(WriteDownWord(i, new_w, kept))
    #    real entries that are new or changed (before any ring names them); a real that
    #    only gains its down hint waits for step 6, after the rings no longer name it
    going_down: list[WriteReal] = []
    for rid, rec in desired.reals.items():
        old = cur_reals.get(rid, EMPTY_REAL)
        if old != rec:
            if old[:17] != rec[:17]:  # another address (or family): the counts aren't its
                ops.append(ResetCounters("real", rid))
            if _only_goes_down(old, rec):
                going_down.append(WriteReal(rid, rec, old))
            else:
                ops.append(WriteReal(rid, rec, old))

    # 3. control record
    old_ctl = view.ctl_entry()
    if old_ctl != desired.ctl:
        ops.append(WriteCtl(desired.ctl, old_ctl))

    #    routing entries new or changed (the reals they name are in place)
    for name, cur in cur_routing.items():
        for key, value in desired.routing[name].items():
            old = cur.get(key)
            if old != value:
                ops.append(PutEntry(name, key, value, old))

    # 4. stateless VIPs: previous rings, then the refs that name them, before the rings
    #    change (a slot still named is never rewritten: control.ring_history)
    for slot, want in sorted(desired.prev.rings.items()):
        have = view.prev_ring(slot)
        diff = np.flatnonzero(have != want)
        if diff.size:
            ops.append(WritePrevRing(slot, diff, want[diff].copy(), have[diff].copy()))
    cur_refs = view.prev_refs()
    for num in sorted({*cur_refs, *desired.prev.refs}):
        want_ref, have_ref = desired.prev.refs.get(num, 0), cur_refs.get(num, 0)
        if want_ref != have_ref:
            ops.append(WritePrevRef(num, want_ref, have_ref))

    #    ring slots
    nums = sorted(desired.rings) if ring_nums is None else sorted(set(ring_nums) & set(desired.rings))
    for num in nums:
        want = desired.rings[num]
        have = view.ring(num)
        diff = np.flatnonzero(have != want)
        if diff.size:
            ops.append(WriteRing(num, diff, want[diff].copy(), have[diff].copy()))

    # 5. VIP addresses, then VIP entries (a new VIP appears once its ring is in place)
    for key in sorted(desired.vip_addrs - cur_addrs):
        ops.append(PutVipAddr(key))
    for key, meta in desired.vips.items():
        old = cur_vips.get(key)
        if old != meta:
            if old is None or _meta_num(old) != _meta_num(meta):
                ops.append(ResetCounters("vip", _meta_num(meta)))
            ops.append(PutVip(key, meta, old))

    # 6. pairs that go down, then the hint of reals now down for some VIP, once the rings
    #    have moved off them (a flow re-hashed away from a real must not land on it
    #    again), then real entries no ring names any more
    ops += setting
    ops += going_down
    for rid in sorted(set(cur_reals) - set(desired.reals)):
        ops.append(WriteReal(rid, EMPTY_REAL, cur_reals[rid]))
    return Plan(tuple(ops), rings_checked=len(nums))


@dataclass
class Applied:
    """What :func:`apply` did."""

    writes: int = 0
    summary: dict[str, int] = field(default_factory=dict)


def apply(p: Plan, port: DatapathPort) -> Applied:
    """Make every write of ``p`` on ``port``, or none: on a failure the writes made so
    far (and the failed one, in case it half-happened) are undone in reverse order and
    :class:`ApplyError` is raised (:class:`RollbackError` if undoing failed too)."""
    done: list[Op] = []
    for op in [*p.ops, None]:
        try:
            if op is None:
                port.commit()
            else:
                port.apply(op)
        except Exception as e:  # noqa: BLE001 - any failure of the port rolls back
            undo_errors = []
            for prev in reversed([*done, op] if op is not None else done):
                inv = inverse(prev)
                if inv is None:
                    continue
                try:
                    port.apply(inv)
                except Exception as ue:  # noqa: BLE001
                    undo_errors.append(f"{type(inv).__name__}: {ue}")
            try:
                port.commit()
            except Exception as ce:  # noqa: BLE001
                undo_errors.append(f"commit: {ce}")
            name = type(op).__name__ if op is not None else "commit"
            what = f"{name} failed after {len(done)} of {len(p.ops)} writes: {e}"
            if undo_errors:
                raise RollbackError(f"{what}; rollback failed too: {'; '.join(undo_errors)}", op, e) from e
            raise ApplyError(f"{what}; the {len(done)} earlier writes were undone", op, e) from e
        if op is not None:
            done.append(op)
    return Applied(len(done), p.summary())
