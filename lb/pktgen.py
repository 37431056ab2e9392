"""Traffic generator (XDP live frames) and counting sink for the datapath benchmarks.

:class:`PacketGenerator` loads ``xdp/pktgen.c`` with bcc and runs it through
BPF_PROG_TEST_RUN in live-frames mode (:mod:`lb.kernel.testrun`): every run rewrites a template
frame, varies the flow over N flows and either sends the frame out of the interface it
was "received" on (XDP_TX: over a veth to its peer), tail-calls a program under test, or
drops it. :class:`Sink` loads ``xdp/sink.c`` on an interface (in a namespace) and counts.
Namespaces and interfaces are given by name (or netns path) and ifindex: building
them is netns/'s business.

Live frames need the ifindex of an interface in the *calling thread's* namespace, and
the generating thread's CPU is where frames are made, so :meth:`PacketGenerator.run`
starts one thread per generator, each of which enters the namespace (``setns`` changes
only that thread), pins itself to its CPU, waits at a barrier and then loops over
BPF_PROG_TEST_RUN calls of at most ``chunk`` frames. Thread start + setns + pinning
costs well under a millisecond; it is reported as ``setup_seconds`` and is not part of
``seconds``. (A subprocess, ``ip netns exec python ...``, would cost ~0.1-0.3 s of
interpreter start-up and could not share the bcc program fds.)

Only addresses in 198.18.0.0/15 and 2001:db8::/32 are accepted in templates, for every
generated flow.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from lb.addresses import check_address
from lb.c_header import c_flags
from lb.checksum import internet_checksum
from lb.constants import (
    ETH_HLEN,
    ETH_P_IP,
    ETH_P_IPV6,
    IPPROTO_TCP,
    IPPROTO_UDP,
    MAX_FRAME_SIZE,
    PKTGEN_ACT_DROP,
    PKTGEN_ACT_TAIL,
    PKTGEN_ACT_TX,
    PKTGEN_MIN_FRAME,
    PKTGEN_N_STATS,
    PKTGEN_STAT_SEQ,
    PKTGEN_STAT_TAIL_MISSED,
    PKTGEN_TMPL_MAX,
    PKTGEN_VARY_ADDR,
    PKTGEN_VARY_PORT,
    SINK_KEY_DST,
    SINK_KEY_FLOW,
    SINK_KEY_NONE,
    SINK_MAX_KEYS,
)
from lb.kernel.netns import NetnsRef, netns_path, run_in_netns, setns_current_thread
from lb.kernel.testrun import TestRunResult, live_frames, test_run
from lb.kernel.xdp import XDP_MODE_FLAGS, xdp_attach, xdp_detach

XDP_DIR = Path(__file__).resolve().parent.parent / "xdp"
PKTGEN_C = XDP_DIR / "pktgen.c"
SINK_C = XDP_DIR / "sink.c"

MIN_FRAME = PKTGEN_MIN_FRAME
MAX_FRAME = MAX_FRAME_SIZE  # 1514: a 1500-byte IP packet plus Ethernet
TMPL_MAX = PKTGEN_TMPL_MAX
DEFAULT_CHUNK = 1 << 22  # frames per BPF_PROG_TEST_RUN call (a signal ends a call early)

VARY = {"src_port": PKTGEN_VARY_PORT, "src_addr": PKTGEN_VARY_ADDR,
        "both": PKTGEN_VARY_PORT | PKTGEN_VARY_ADDR}
ACTIONS = {"tx": PKTGEN_ACT_TX, "tail": PKTGEN_ACT_TAIL, "drop": PKTGEN_ACT_DROP}
SINK_KEY_MODES = {"none": SINK_KEY_NONE, "dst": SINK_KEY_DST, "flow": SINK_KEY_FLOW}

DEFAULT_SRC = {4: "198.18.0.1", 6: "2001:db8:1::1"}
DEFAULT_DST = {4: "198.19.0.1", 6: "2001:db8:2::1"}
DEFAULT_SRC_MAC = bytes.fromhex("020000000001")
DEFAULT_DST_MAC = bytes.fromhex("020000000002")
TCP_ACK = 0x10

_PROTOS = {"udp": IPPROTO_UDP, "tcp": IPPROTO_TCP, IPPROTO_UDP: IPPROTO_UDP, IPPROTO_TCP: IPPROTO_TCP}


def _bcc():
    from bcc import BPF  # imported late: importing bcc is slow and needs root only to load

    return BPF


# ---------------------------------------------------------------------------------------
# frames


def _pseudo_sum(family: int, src: bytes, dst: bytes, proto: int, l4_len: int) -> int:
    if family == 4:
        ph = src + dst + struct.pack("!BBH", 0, proto, l4_len)
    else:
        ph = src + dst + struct.pack("!IxxxB", l4_len, proto)
    return sum(struct.unpack(f"!{len(ph) // 2}H", ph))


def _header_len(family: int, proto: int) -> int:
    return ETH_HLEN + (20 if family == 4 else 40) + (20 if proto == IPPROTO_TCP else 8)


def build_frame(family: int = 4, proto: str | int = "udp", size: int = MIN_FRAME, *,
                src: str | None = None, dst: str | None = None, sport: int = 10000,
                dport: int = 80, src_mac: bytes = DEFAULT_SRC_MAC,
                dst_mac: bytes = DEFAULT_DST_MAC, ttl: int = 64, tcp_flags: int = TCP_ACK,
                udp_v4_csum: bool = True) -> bytes:
    """An Ethernet + IPv4/IPv6 + TCP/UDP frame of exactly ``size`` bytes (payload zeros),
    lengths and checksums right. ``udp_v4_csum=False`` leaves an IPv4 UDP checksum 0."""
    p = _PROTOS[proto]
    src = src or DEFAULT_SRC[family]
    dst = dst or DEFAULT_DST[family]
    hlen = _header_len(family, p)
    if not MIN_FRAME <= size <= MAX_FRAME or size < hlen:
        raise ValueError(f"frame size must be {max(MIN_FRAME, hlen)}..{MAX_FRAME}")
    sa, da = ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed
    if len(sa) != (4 if family == 4 else 16) or len(da) != len(sa):
        raise ValueError("addresses do not match the family")
    eth = dst_mac + src_mac + struct.pack("!H", ETH_P_IP if family == 4 else ETH_P_IPV6)
    l4_len = size - ETH_HLEN - (20 if family == 4 else 40)
    payload = bytes(l4_len - (20 if p == IPPROTO_TCP else 8))
    if p == IPPROTO_TCP:
        l4 = struct.pack("!HHIIBBHHH", sport, dport, 1, 1, 5 << 4, tcp_flags, 65535, 0, 0) + payload
        off = 16
    else:
        l4 = struct.pack("!HHHH", sport, dport, l4_len, 0) + payload
        off = 6
    if family == 6 or p == IPPROTO_TCP or udp_v4_csum:
        c = internet_checksum(l4, _pseudo_sum(family, sa, da, p, l4_len))
        if p == IPPROTO_UDP and c == 0:
            c = 0xFFFF
        l4 = l4[:off] + struct.pack("!H", c) + l4[off + 2:]
    if family == 4:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + l4_len, 0, 0x4000, ttl, p, 0, sa, da)
        ip = ip[:10] + struct.pack("!H", internet_checksum(ip)) + ip[12:]
    else:
        ip = struct.pack("!IHBB16s16s", 6 << 28, l4_len, p, ttl, sa, da)
    return eth + ip + l4


@dataclass(frozen=True)
class FrameInfo:
    family: int
    proto: int
    src: ipaddress.IPv4Address | ipaddress.IPv6Address
    dst: ipaddress.IPv4Address | ipaddress.IPv6Address
    sport: int
    dport: int
    l4_csum_ok: bool  # checksum right (or a 0 IPv4 UDP checksum)
    ip_csum_ok: bool  # IPv4 header checksum right (always True for IPv6)


def parse_frame(frame: bytes) -> FrameInfo:
    """Parse the fixed layout the generator handles; ValueError for anything else."""
    if len(frame) < ETH_HLEN + 20:
        raise ValueError("frame too short")
    (etype,) = struct.unpack_from("!H", frame, 12)
    if etype == ETH_P_IP:
        if frame[14] != 0x45:
            raise ValueError("IPv4 header must be version 4, IHL 5 (no options)")
        family, proto = 4, frame[23]
        src, dst = frame[26:30], frame[30:34]
        (tot,) = struct.unpack_from("!H", frame, 16)
        l4o, l4_len = 34, tot - 20
        ip_ok = internet_checksum(frame[14:34]) == 0
        if struct.unpack_from("!H", frame, 20)[0] & 0x3FFF:
            raise ValueError("IPv4 fragments are not supported")
    elif etype == ETH_P_IPV6:
        if len(frame) < ETH_HLEN + 40 or frame[14] >> 4 != 6:
            raise ValueError("bad IPv6 header")
        family, proto = 6, frame[20]
        src, dst = frame[22:38], frame[38:54]
        (l4_len,) = struct.unpack_from("!H", frame, 18)
        l4o, ip_ok = 54, True
    else:
        raise ValueError(f"ethertype {etype:#06x}: only IPv4/IPv6 without VLAN")
    if proto not in (IPPROTO_TCP, IPPROTO_UDP):
        raise ValueError(f"L4 protocol {proto}: only TCP and UDP")
    if len(frame) < _header_len(family, proto) or l4o + l4_len > len(frame):
        raise ValueError("frame shorter than its headers / length fields")
    sport, dport = struct.unpack_from("!HH", frame, l4o)
    l4 = frame[l4o:l4o + l4_len]
    coff = 16 if proto == IPPROTO_TCP else 6
    if family == 4 and proto == IPPROTO_UDP and l4[coff:coff + 2] == b"\0\0":
        l4_ok = True
    else:
        l4_ok = internet_checksum(l4, _pseudo_sum(family, src, dst, proto, l4_len)) == 0
    return FrameInfo(family, proto, ipaddress.ip_address(src), ipaddress.ip_address(dst),
                     sport, dport, l4_ok, ip_ok)


def normalize_frame(frame: bytes) -> bytes:
    """Lengths set to fill the frame, checksums recomputed (IPv4 UDP checksum 0 kept)."""
    info = parse_frame(frame)
    f = bytearray(frame)
    n = len(f)
    if info.family == 4:
        l4o, l4_len = 34, n - 34
        struct.pack_into("!H", f, 16, n - ETH_HLEN)
        struct.pack_into("!H", f, 24, 0)
        struct.pack_into("!H", f, 24, internet_checksum(bytes(f[14:34])))
    else:
        l4o, l4_len = 54, n - 54
        struct.pack_into("!H", f, 18, l4_len)
    coff = l4o + (16 if info.proto == IPPROTO_TCP else 6)
    if info.proto == IPPROTO_UDP:
        struct.pack_into("!H", f, l4o + 4, l4_len)
        if info.family == 4 and f[coff:coff + 2] == b"\0\0":
            return bytes(f)
    struct.pack_into("!H", f, coff, 0)
    c = internet_checksum(bytes(f[l4o:]), _pseudo_sum(info.family, info.src.packed,
                                                      info.dst.packed, info.proto, l4_len))
    if info.proto == IPPROTO_UDP and c == 0:
        c = 0xFFFF
    struct.pack_into("!H", f, coff, c)
    return bytes(f)


def flow_tuple(frame: bytes, flow: int, vary: str) -> tuple[str, int]:
    """(source address, source port) the generator gives flow ``flow`` of ``frame``."""
    info = parse_frame(frame)
    bits = VARY[vary]
    src = info.src
    if bits & 2:
        lo = (int(src) + flow) & 0xFFFFFFFF
        src = ipaddress.ip_address((int(src) & ~0xFFFFFFFF) | lo)
    port = (info.sport + flow) & 0xFFFF if bits & 1 else info.sport
    return str(src), port


# ---------------------------------------------------------------------------------------
# generator


@dataclass
class GenResult:
    packets: int  # frames the kernel generated (sum over threads)
    seconds: float  # wall time of the generating phase (first start .. last end)
    pps: float
    kernel_ns_per_frame: float  # the kernel's own measurement, mean over calls
    cpus: dict[int, int] = field(default_factory=dict)  # CPU -> frames the program ran there
    threads: int = 1
    thread_cpus: list[int | None] = field(default_factory=list)  # requested pinning
    setup_seconds: float = 0.0  # slowest thread's start + setns + pinning
    tail_missed: int = 0  # tail calls that found no program (frames dropped)
    frame_len: int = 0

    @property
    def mpps(self) -> float:
        return self.pps / 1e6

    def as_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["mpps"] = self.mpps
        d["cpus"] = {str(k): v for k, v in self.cpus.items()}
        return d


class PacketGenerator:
    """The live-frames generator. ``set_template`` before ``run``.

    >>> gen = PacketGenerator()
    >>> gen.set_template(build_frame(4, "udp", 64), flows=1000, vary="src_port")
    >>> r = gen.run(5_000_000, ifindex=veth.index, netns=gen_ns, cpu=0)
    """

    def __init__(self, cflags: Sequence[str] = ()):
        BPF = _bcc()
        self.bpf = BPF(src_file=str(PKTGEN_C).encode(), cflags=[*c_flags(), *cflags])
        self.fn = self.bpf.load_func(b"pktgen_xdp", BPF.XDP)
        self.tx_stub = self.bpf.load_func(b"pktgen_tx_stub", BPF.XDP)
        self._tmpl = self.bpf[b"pktgen_tmpl"]
        self._seq = self.bpf[b"pktgen_seq"]
        self._next = self.bpf[b"pktgen_next"]
        self.frame: bytes | None = None
        self.flows = 1
        self.vary = "src_port"
        self.action = "tx"
        self._info: FrameInfo | None = None

    # --- template ------------------------------------------------------------------------

    def set_template(self, frame: bytes, flows: int = 1, vary: str = "src_port",
                     normalize: bool = True) -> None:
        """Frame to send (64..1514 bytes, Ethernet + IPv4 (no options)/IPv6 + TCP/UDP),
        varied over ``flows`` flows: flow i has source port + i ("src_port"), the low 32
        bits of the source address + i ("src_addr"), or both ("both"). With
        ``normalize`` the length fields and checksums are recomputed first."""
        if vary not in VARY:
            raise ValueError(f"vary must be one of {sorted(VARY)}")
        if not MIN_FRAME <= len(frame) <= MAX_FRAME:
            raise ValueError(f"frame length must be {MIN_FRAME}..{MAX_FRAME}, not {len(frame)}")
        if normalize:
            frame = normalize_frame(frame)
        info = parse_frame(frame)
        if not (info.l4_csum_ok and info.ip_csum_ok):
            raise ValueError("template checksums are wrong (use normalize=True)")
        if not 1 <= flows <= 0xFFFFFFFF:
            raise ValueError("flows must be >= 1")
        bits = VARY[vary]
        if bits & 1 and not bits & 2 and flows > 65536:
            raise ValueError("more than 65536 flows need vary='src_addr' or 'both'")
        if bits & 2 and (int(info.src) & 0xFFFFFFFF) + flows - 1 > 0xFFFFFFFF:
            raise ValueError("source address + flows overflows its low 32 bits")
        last_src = ipaddress.ip_address(flow_tuple(frame, flows - 1, vary)[0])
        for a in (info.src, last_src, info.dst):
            check_address(a)
        self.frame, self.flows, self.vary, self._info = frame, flows, vary, info
        self._write_template()

    def _write_template(self) -> None:
        f, info = self.frame, self._info
        if f is None or info is None:
            return
        clen = min(len(f), TMPL_MAX)
        l4_csum = 0 if info.family == 4 and info.proto == IPPROTO_UDP and parse_udp4_csum(f) == 0 else 1
        raw = struct.pack("<128sIIBBBBB3x", f[:clen], clen, self.flows, info.family, info.proto,
                          VARY[self.vary], ACTIONS[self.action], l4_csum)
        leaf = self._tmpl.Leaf
        if ctypes.sizeof(leaf) != len(raw):
            raise RuntimeError(f"struct pktgen_tmpl is {ctypes.sizeof(leaf)} bytes, expected {len(raw)}")
        self._tmpl[ctypes.c_int(0)] = leaf.from_buffer_copy(raw)

    def set_action(self, action: str) -> None:
        """"tx" (XDP_TX), "tail" (tail call into attach_tail_call's program) or "drop"."""
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {sorted(ACTIONS)}")
        self.action = action
        self._write_template()

    def attach_tail_call(self, prog_fd: int) -> None:
        """Chain every generated frame into XDP program ``prog_fd`` (its verdict is the
        frame's: XDP_TX leaves through the generating interface)."""
        self._next[ctypes.c_int(0)] = ctypes.c_int(prog_fd)
        self.set_action("tail")

    def detach_tail_call(self) -> None:
        try:
            del self._next[ctypes.c_int(0)]
        except KeyError:
            pass
        self.set_action("tx")

    # --- the tx stub (no-balancer harness) ------------------------------------------------

    def configure_tx_stub(self, gw_mac: bytes) -> int:
        """Set the stub's gateway MAC; returns its program fd (for attach_tail_call)."""
        tbl = self.bpf[b"tx_stub_cfg"]
        tbl[ctypes.c_int(0)] = tbl.Leaf.from_buffer_copy(bytes(gw_mac) + b"\0\0")
        return self.tx_stub.fd

    def tx_stub_count(self) -> int:
        return sum(int(v) for v in self.bpf[b"tx_stub_count"].getvalue(ctypes.c_int(0)))

    # --- counters ---------------------------------------------------------------------------

    def counters_per_cpu(self, index: int = PKTGEN_STAT_SEQ) -> list[int]:
        return [int(v) for v in self._seq.getvalue(ctypes.c_int(index))]

    def reset_counters(self) -> None:
        """Zero the per-CPU frame and tail-miss counters (flow numbering restarts at 0)."""
        for i in range(PKTGEN_N_STATS):
            self._seq[ctypes.c_int(i)] = self._seq.Leaf()

    # --- running ----------------------------------------------------------------------------

    def preview(self, n: int, cpu: int | None = None) -> list[TestRunResult]:
        """Run the program ``n`` times in ordinary (not live) BPF_PROG_TEST_RUN mode, from
        one thread pinned to ``cpu`` (default: the lowest allowed), counters reset first:
        result i is what live mode would send as frame i on that CPU."""
        if self.frame is None:
            raise RuntimeError("set_template first")
        cpu = min(os.sched_getaffinity(0)) if cpu is None else cpu
        frame = self.frame

        def body() -> list[TestRunResult]:
            self.reset_counters()
            return [test_run(self.fn.fd, frame) for _ in range(n)]

        return run_in_netns(None, body, cpu=cpu)

    def run(self, count: int, ifindex: int, threads: int = 1, cpu: int | Sequence[int] | None = None,
            *, netns: NetnsRef | None = None, chunk: int = DEFAULT_CHUNK,
            batch_size: int = 0) -> GenResult:
        """Generate ``count`` frames (split over ``threads`` threads) as received on
        ``ifindex`` in ``netns`` (None: this namespace). ``cpu``: one CPU for one thread,
        a first CPU (thread i on cpu + i) or one CPU per thread; None leaves the threads
        unpinned. Placement actually seen is in ``GenResult.cpus`` (per-CPU counters).

        Each BPF_PROG_TEST_RUN call makes at most ``chunk`` frames; on KeyboardInterrupt
        the workers stop after their current call. ``batch_size`` is the kernel's frames
        per batch (0: its default, 64); above 64 a veth peer whose NAPI runs in softirq on
        this CPU can overflow its 256-frame ring and drop frames."""
        if self.frame is None:
            raise RuntimeError("set_template first")
        if count < threads or threads < 1:
            raise ValueError("need count >= threads >= 1")
        if cpu is None:
            cpus: list[int | None] = [None] * threads
        elif isinstance(cpu, int):
            cpus = [cpu + i for i in range(threads)]
        else:
            cpus = list(cpu)
            if len(cpus) != threads:
                raise ValueError("one CPU per thread")
        shares = [count // threads + (1 if i < count % threads else 0) for i in range(threads)]
        frame, fd = self.frame, self.fn.fd
        barrier = threading.Barrier(threads + 1)
        stop = threading.Event()
        out: list[dict[str, Any]] = [{} for _ in range(threads)]

        def worker(i: int) -> None:
            rec = out[i]
            t0 = time.perf_counter()
            try:
                if netns is not None:
                    setns_current_thread(netns)
                if cpus[i] is not None:
                    os.sched_setaffinity(0, {cpus[i]})
            except BaseException as e:
                rec["error"] = e
            rec["setup"] = time.perf_counter() - t0
            barrier.wait()
            if "error" in rec:
                return
            done, kns = 0, 0.0
            start = time.perf_counter()
            try:
                while done < shares[i] and not stop.is_set():
                    n = min(chunk, shares[i] - done)
                    kns += live_frames(fd, frame, n, ifindex, batch_size=batch_size) * n
                    done += n
            except BaseException as e:
                rec["error"] = e
            rec.update(start=start, end=time.perf_counter(), done=done, kns=kns)

        before = self.counters_per_cpu()
        missed_before = sum(self.counters_per_cpu(PKTGEN_STAT_TAIL_MISSED))
        ths = [threading.Thread(target=worker, args=(i,), name=f"pktgen-{i}", daemon=True)
               for i in range(threads)]
        for t in ths:
            t.start()
        try:
            barrier.wait()
            for t in ths:
                t.join()
        except BaseException:  # Ctrl-C: workers stop after their current call
            stop.set()
            for t in ths:
                t.join()
            raise
        errors = [r["error"] for r in out if "error" in r]
        if errors:
            raise errors[0]
        after = self.counters_per_cpu()
        done = sum(r["done"] for r in out)
        seconds = max(r["end"] for r in out) - min(r["start"] for r in out)
        return GenResult(
            packets=done,
            seconds=seconds,
            pps=done / seconds if seconds > 0 else 0.0,
            kernel_ns_per_frame=sum(r["kns"] for r in out) / done if done else 0.0,
            cpus={c: a - b for c, (a, b) in enumerate(zip(after, before)) if a != b},
            threads=threads,
            thread_cpus=cpus,
            setup_seconds=max(r["setup"] for r in out),
            tail_missed=sum(self.counters_per_cpu(PKTGEN_STAT_TAIL_MISSED)) - missed_before,
            frame_len=len(frame),
        )

    def close(self) -> None:
        self.bpf.cleanup()

    def __enter__(self) -> PacketGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def parse_udp4_csum(frame: bytes) -> int:
    return struct.unpack_from("!H", frame, 34 + 6)[0]


# ---------------------------------------------------------------------------------------
# sink


class SinkKey(NamedTuple):
    family: int
    proto: int  # 0 in "dst" mode
    src: str | None  # None in "dst" mode
    dst: str
    sport: int
    dport: int


@dataclass
class SinkCounts:
    packets: int
    bytes: int
    key_overflow: int
    key_unparsed: int
    per_cpu: dict[int, int]  # CPU -> packets (where the sink's NAPI ran)


class Sink:
    """``xdp/sink.c`` attached (native mode by default; see lb.kernel.xdp.XDP_MODE_FLAGS)
    to interface ``ifname`` in ``netns`` (None: this namespace). Counts and drops
    everything."""

    def __init__(self, ifname: str, netns: NetnsRef | None = None, *, key: str = "none",
                 max_keys: int = SINK_MAX_KEYS, xdp_mode: str = "native", cflags: Sequence[str] = ()):
        BPF = _bcc()
        self.ifname, self.netns = ifname, netns
        self.flags = XDP_MODE_FLAGS[xdp_mode]
        self.bpf = BPF(src_file=str(SINK_C).encode(), cflags=[*c_flags(sink_max_keys=max_keys), *cflags])
        self.fn = self.bpf.load_func(b"sink_xdp", BPF.XDP)
        self._stats = self.bpf[b"sink_stats"]
        self._keys = self.bpf[b"sink_keys"]
        self.set_key_mode(key)
        xdp_attach(self.ifname, self.fn.fd, self.flags, self.netns)
        self.attached = True

    def set_key_mode(self, key: str) -> None:
        """"none", "dst" (outer destination address) or "flow" (outer 5-tuple)."""
        tbl = self.bpf[b"sink_cfg"]
        tbl[ctypes.c_int(0)] = tbl.Leaf(SINK_KEY_MODES[key])
        self.key_mode = key

    def counts(self) -> SinkCounts:
        vals = self._stats.getvalue(ctypes.c_int(0))
        per_cpu = {c: int(v.packets) for c, v in enumerate(vals) if v.packets}
        return SinkCounts(
            packets=sum(int(v.packets) for v in vals),
            bytes=sum(int(v.bytes) for v in vals),
            key_overflow=sum(int(v.key_overflow) for v in vals),
            key_unparsed=sum(int(v.key_unparsed) for v in vals),
            per_cpu=per_cpu,
        )

    def keys(self) -> dict[SinkKey, tuple[int, int]]:
        """Per-key (packets, bytes), summed over CPUs."""
        out: dict[SinkKey, tuple[int, int]] = {}
        for k, vals in self._keys.items():
            n = 4 if k.family == 4 else 16
            src = bytes(k.src)[:n]
            key = SinkKey(
                family=k.family,
                proto=k.proto,
                src=str(ipaddress.ip_address(src)) if self.key_mode == "flow" else None,
                dst=str(ipaddress.ip_address(bytes(k.dst)[:n])),
                sport=int.from_bytes(struct.pack("<H", k.sport), "big"),
                dport=int.from_bytes(struct.pack("<H", k.dport), "big"),
            )
            vl = self._keys.getvalue(k)
            out[key] = (sum(int(v.packets) for v in vl), sum(int(v.bytes) for v in vl))
        return out

    def reset(self) -> None:
        self._stats[ctypes.c_int(0)] = self._stats.Leaf()
        self._keys.clear()

    def detach(self) -> None:
        if not self.attached:
            return
        self.attached = False
        ns_gone = self.netns is not None and not os.path.exists(netns_path(self.netns))
        if not ns_gone:
            try:
                xdp_detach(self.ifname, self.flags, self.netns)
            except OSError:
                pass  # interface already gone

    def close(self) -> None:
        self.detach()
        self.bpf.cleanup()

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = [
    "GenResult",
    "PacketGenerator",
    "Sink",
    "SinkCounts",
    "SinkKey",
    "build_frame",
    "flow_tuple",
    "normalize_frame",
    "parse_frame",
]
