"""Packet capture from the XDP balancer (``lbctl capture``): events -> pcapng.

The program (xdp/balancer.c, ``capture()``) sends a :data:`lb.layout.CAPTURE_RECORD` to
the ``capture_ring`` ring buffer for each frame behind an event that
``lb_runtime.capture`` turns on (:data:`lb.constants.CAPTURE_EVENTS`), at most one per
interval per CPU (a token bucket of ``CAPTURE_BURST``). The word is 0 (off) unless a
capture runs: then the cost on the forwarding path stays one branch on the rare paths
(misses, drops, too-big, unknown QUIC ids), and nothing on a connection-table hit.

Here, from userspace: :class:`CaptureMaps` opens the maps (pinned under a balancer's pin
directory, or of a loaded :class:`lb.bpf_loader.XdpBalancer`), :func:`capture` switches
the events on, reads the ring (libbpf's ring buffer consumer, through bcc's libbcc) and
writes each record as an Enhanced Packet Block of a pcapng file (scapy's writer): the
frame's first ``CAPTURE_SNAPLEN`` bytes, its original length, the time of the event
(``bpf_ktime_get_ns``, CLOCK_MONOTONIC, converted to wall-clock time) and the event as the
packet's comment (``opt_comment``; tshark: ``frame.comment``), and switches them off again
whatever happens.
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Self

import numpy as np

from lb import constants as C
from lb import layout
from lb.datapath_tables import addr_from16
from lb.kernel.cpus import possible_cpus
from lb.kernel.maps import map_info, map_keys, map_lookup, map_lookup_batch
from lb.kernel.objects import obj_get
from lb.xdp_maps import map_array

EVENT_NAMES = {code: name for name, code in C.CAPTURE_EVENTS.items()}
DEFAULT_RATE = 1000.0  # records per second per CPU
MIN_RATE = 1e9 / 0xFFFFFFFF  # the interval is a u32 of ns: ~0.23 records/s
MAX_RATE = 1e9  # one record per ns: no limit in practice
MAPS = ("lb_runtime", "capture_ring", "capture_buckets", "vip_map", "reals")
_PROTO = {C.IPPROTO_TCP: "tcp", C.IPPROTO_UDP: "udp"}
_CAPTURE_WORD = layout.RUNTIME.fields["capture"][1] // 8  # index of the u64 in lb_runtime


class CaptureError(RuntimeError):
    """A capture cannot start (bad arguments, maps missing, another capture running)."""


def parse_events(names: Iterable[str]) -> set[int]:
    """Event names (``lru-miss``, ``too-big``, ``quic-unknown``, ``drop``, ``all``) ->
    codes. Raises CaptureError naming an unknown one."""
    codes: set[int] = set()
    for name in names:
        if name == "all":
            codes.update(C.CAPTURE_EVENTS.values())
        elif name in C.CAPTURE_EVENTS:
            codes.add(C.CAPTURE_EVENTS[name])
        else:
            raise CaptureError(f"unknown event {name!r}; one of {', '.join([*C.CAPTURE_EVENTS, 'all'])}")
    if not codes:
        raise CaptureError("no event to capture")
    return codes


def capture_word(events: Iterable[int], rate: float) -> int:
    """The ``lb_runtime.capture`` value for ``events`` at ``rate`` records/s per CPU."""
    if not MIN_RATE <= rate <= MAX_RATE:
        raise CaptureError(f"rate must be {MIN_RATE:.2f}..{MAX_RATE:.0f} records/s per CPU (got {rate})")
    mask = 0
    for ev in events:
        if ev not in EVENT_NAMES:
            raise CaptureError(f"unknown event code {ev}")
        mask |= 1 << ev
    interval = max(1, min(0xFFFFFFFF, round(1e9 / rate)))
    return (interval << C.CAPTURE_INTERVAL_SHIFT) | mask


@dataclass(frozen=True)
class CaptureEvent:
    """One record of the ring (layout.CAPTURE_RECORD), decoded."""

    ts_ns: int  # CLOCK_MONOTONIC
    event: int  # constants.CAPTURE_EV_*
    reason: int  # STAT_* index, or 0
    cpu: int
    vip_num: int  # CAPTURE_NO_VIP: unknown
    real_id: int  # 0: unknown
    frame_len: int  # the frame's length as it arrived
    data: bytes  # its first min(frame_len, CAPTURE_SNAPLEN) bytes

    @classmethod
    def decode(cls, raw: bytes) -> CaptureEvent:
        if len(raw) < layout.CAPTURE_RECORD.itemsize:
            raise ValueError(f"capture record of {len(raw)} bytes, need {layout.CAPTURE_RECORD.itemsize}")
        r = np.frombuffer(raw, dtype=layout.CAPTURE_RECORD, count=1)[0]
        cap = min(int(r["cap_len"]), C.CAPTURE_SNAPLEN)
        return cls(int(r["ts_ns"]), int(r["event"]), int(r["reason"]), int(r["cpu"]),
                   int(r["vip_num"]), int(r["real_id"]), int(r["frame_len"]), bytes(r["data"][:cap]))

    @property
    def name(self) -> str:
        return EVENT_NAMES.get(self.event, f"event-{self.event}")

    def comment(self, vips: dict[int, str] | None = None, reals: dict[int, str] | None = None) -> str:
        """``lb event=drop reason=drop_no_real cpu=1 vip=198.18.0.100:80/tcp real=198.18.1.2``:
        what the packet's pcapng comment says (names from ``vips`` / ``reals`` when known,
        numbers otherwise)."""
        parts = [f"lb event={self.name}"]
        if self.reason:
            parts.append(f"reason={C.STATS[self.reason] if self.reason < C.N_STATS else self.reason}")
        parts.append(f"cpu={self.cpu}")
        if self.vip_num != C.CAPTURE_NO_VIP:
            parts.append(f"vip={(vips or {}).get(self.vip_num, f'#{self.vip_num}')}")
        if self.real_id:
            parts.append(f"real={(reals or {}).get(self.real_id, f'#{self.real_id}')}")
        return " ".join(parts)


def _vip_label(key: np.void) -> str:
    fam = int(key["family"])
    addr = addr_from16(key["addr"], fam)
    host = f"[{addr}]" if fam == C.FAMILY_V6 else str(addr)
    proto = int(key["proto"])
    return f"{host}:{int(key['port'])}/{_PROTO.get(proto, proto)}"


class CaptureMaps:
    """The maps a capture uses, by fd (owned: closed by :meth:`close`)."""

    def __init__(self, fds: dict[str, int]) -> None:
        missing = [m for m in MAPS if m not in fds]
        if missing:
            raise CaptureError(f"maps missing: {', '.join(missing)}")
        self.fds = fds
        self._mm, raw = map_array(fds["lb_runtime"], layout.RUNTIME.itemsize, 1)
        self._rt = raw.view(np.uint64).ravel()
        self.ncpus = possible_cpus()

    @classmethod
    def pinned(cls, pin_dir: str) -> CaptureMaps:
        """The maps a balancer pinned under ``pin_dir`` (``lbctl serve --pin-dir``, the lab)."""
        fds: dict[str, int] = {}
        try:
            for name in MAPS:
                path = os.path.join(pin_dir, name)
                if not os.path.exists(path):
                    raise CaptureError(f"{path} does not exist: no balancer with capture support "
                                       f"pinned its maps under {pin_dir}")
                fds[name] = obj_get(path)
            if map_info(fds["lb_runtime"]).value_size != layout.RUNTIME.itemsize:
                raise CaptureError(f"{pin_dir}/lb_runtime is of an older program (no capture word)")
            return cls(fds)
        except BaseException:
            for fd in fds.values():
                os.close(fd)
            raise

    @classmethod
    def of_balancer(cls, bal) -> CaptureMaps:
        """The maps of a loaded XdpBalancer (duplicated fds: the balancer keeps its own)."""
        return cls({name: os.dup(bal.map_fd(name)) for name in MAPS})

    @property
    def word(self) -> int:
        """``lb_runtime.capture`` now."""
        return int(self._rt[_CAPTURE_WORD])

    @word.setter
    def word(self, value: int) -> None:
        self._rt[_CAPTURE_WORD] = np.uint64(value)  # one aligned store

    def drops(self) -> tuple[int, int]:
        """(records not sent because of the rate, records lost to a full ring), all CPUs,
        since the maps were made."""
        size = layout.CAPTURE_BUCKET.itemsize
        _, values, n = map_lookup_batch(self.fds["capture_buckets"], 4, size * self.ncpus)
        b = np.frombuffer(values, dtype=layout.CAPTURE_BUCKET, count=n * self.ncpus)
        return int(b["limited"].sum()), int(b["lost"].sum())

    def names(self) -> tuple[dict[int, str], dict[int, str]]:
        """(vip_num -> 'addr:port/proto', real id -> address) as the maps hold them now."""
        vfd = self.fds["vip_map"]
        vips = {}
        for k in map_keys(vfd, layout.VIP_KEY.itemsize):
            meta = map_lookup(vfd, k, layout.VIP_META.itemsize)
            if meta is not None:
                key = np.frombuffer(k, dtype=layout.VIP_KEY, count=1)[0]
                vips[int(np.frombuffer(meta, dtype=layout.VIP_META)[0]["vip_num"])] = _vip_label(key)
        rfd = self.fds["reals"]
        n = map_info(rfd).max_entries
        _, values, got = map_lookup_batch(rfd, 4, layout.REAL.itemsize)
        arr = np.frombuffer(values, dtype=layout.REAL, count=min(got, n))
        reals = {int(i): str(addr_from16(arr[i]["addr"], int(arr[i]["family"])))
                 for i in np.flatnonzero(arr["family"])}
        return vips, reals

    def close(self) -> None:
        self._rt = None
        self._mm.close()
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RingReader:
    """libbpf's consumer of a BPF ring buffer (bcc's libbcc): :meth:`poll` waits up to
    ``timeout_ms`` and hands every record to ``on_record`` (bytes)."""

    def __init__(self, ring_fd: int, on_record: Callable[[bytes], None]) -> None:
        from bcc.libbcc import _RINGBUF_CB_TYPE, lib  # Debian's python3-bpfcc

        def cb(_ctx: int, data: int, size: int) -> int:
            on_record(ctypes.string_at(data, size))
            return 0

        self._lib = lib
        self._cb = _RINGBUF_CB_TYPE(cb)  # kept alive as long as the manager
        self._mgr = lib.bpf_new_ringbuf(ring_fd, self._cb, None)
        if not self._mgr:
            raise CaptureError("could not open the capture ring buffer")

    def poll(self, timeout_ms: int) -> None:
        self._lib.bpf_poll_ringbuf(self._mgr, timeout_ms)

    def close(self) -> None:
        if self._mgr:
            self._lib.bpf_free_ringbuf(self._mgr)
            self._mgr = None


class PcapngFile:
    """A pcapng file of Ethernet frames with a comment and a wall-clock time each (scapy's
    PcapNgWriter: section header, one interface, enhanced packet blocks)."""

    def __init__(self, path: str) -> None:
        from scapy.data import DLT_EN10MB
        from scapy.utils import PcapNgWriter

        self._w = PcapNgWriter(path)
        self._w.linktype = DLT_EN10MB
        self._w.write_header(None)

    def write(self, data: bytes, wall_ns: int, wirelen: int, comment: str) -> None:
        from scapy.packet import Raw

        pkt = Raw(data)
        pkt.comments = [comment.encode()]
        self._w.write_packet(pkt, sec=wall_ns / 1e9, wirelen=max(wirelen, len(data)))

    def flush(self) -> None:
        self._w.flush()

    def close(self) -> None:
        self._w.close()


@dataclass
class CaptureResult:
    """What a capture wrote, and what it missed while it ran."""

    written: int
    by_event: dict[str, int]
    limited: int  # records the per-CPU rate limit held back
    lost: int  # records lost to a full ring buffer


def capture(maps: CaptureMaps, path: str, events: set[int], *, rate: float = DEFAULT_RATE,
            count: int | None = None, duration: float | None = None, force: bool = False,
            stop: Callable[[], bool] | None = None,
            on_event: Callable[[CaptureEvent, str], None] | None = None) -> CaptureResult:
    """Capture ``events`` into the pcapng file ``path`` until ``count`` records, ``duration``
    seconds, ``stop()`` returning True (checked every 100 ms), or KeyboardInterrupt
    (returns what was captured); the events are off again when it returns (or raises).
    ``on_event(event, comment)`` sees each record as it is written. Refuses to start while another capture has events on,
    unless ``force`` (then takes them over: e.g. after a capture that was killed)."""
    if count is not None and count < 1:
        raise CaptureError(f"count must be >= 1 (got {count})")
    if duration is not None and duration <= 0:
        raise CaptureError(f"duration must be > 0 (got {duration})")
    word = capture_word(events, rate)
    if maps.word and not force:
        raise CaptureError(f"another capture is running on these maps (lb_runtime.capture = "
                           f"{maps.word:#x}); stop it, or take over with --force")
    vips, reals = maps.names()
    records: list[bytes] = []
    out = PcapngFile(path)
    try:
        reader = RingReader(maps.fds["capture_ring"], records.append)
    except BaseException:
        out.close()
        raise
    result = CaptureResult(0, {}, 0, 0)
    limited0, lost0 = maps.drops()
    to_wall = time.time_ns() - time.monotonic_ns()  # bpf_ktime_get_ns is CLOCK_MONOTONIC
    t_end = None if duration is None else time.monotonic() + duration
    try:
        reader.poll(0)  # records left by an earlier capture are not ours
        records.clear()
        maps.word = word
        while True:  # KeyboardInterrupt (Ctrl-C) ends it too: see below
            reader.poll(100)
            for raw in records:
                ev = CaptureEvent.decode(raw)
                if ((ev.vip_num != C.CAPTURE_NO_VIP and ev.vip_num not in vips)
                        or (ev.real_id and ev.real_id not in reals)):
                    vips, reals = maps.names()  # a VIP or real added since
                comment = ev.comment(vips, reals)
                out.write(ev.data, ev.ts_ns + to_wall, ev.frame_len, comment)
                result.written += 1
                result.by_event[ev.name] = result.by_event.get(ev.name, 0) + 1
                if on_event is not None:
                    on_event(ev, comment)
                if count is not None and result.written >= count:
                    break
            if records:
                out.flush()  # readable while the capture runs (tshark -r, tail)
            records.clear()
            if ((count is not None and result.written >= count)
                    or (t_end is not None and time.monotonic() >= t_end)
                    or (stop is not None and stop())):
                break
    except KeyboardInterrupt:
        pass  # the operator's way to stop: what was captured is kept
    finally:
        maps.word = 0
        reader.close()
        out.close()
        limited1, lost1 = maps.drops()
        result.limited, result.lost = limited1 - limited0, lost1 - lost0
    return result
