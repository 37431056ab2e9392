"""XDP balancer datapath benchmarks: the balancer against the no-balancer harness.

Run (root): ``.venv/bin/python -m bench.bench_xdp [--json PATH] [--quick]``
(``--parts a,b,c,d`` runs a subset; ``--help`` lists the rest). Every namespace and veth
is named ``lbb<random hex>`` and torn down on exit, also on failure or Ctrl-C; traffic
stays inside them (198.18.0.0/15, 2001:db8::/32).

Flow mixes (the same in every part): 64-byte TCP ACK frames (IPv6: 74 bytes, the
Ethernet + IPv6 + TCP headers alone; there is no 64-byte IPv6 TCP frame), IPv4 and
IPv6, 1 / 1k / 100k / 1M flows, to an LRU VIP and to an ``lru_bypass`` VIP, each with
100 reals. Flow i differs in its source port (up to 64,512 flows) or source address;
IPv4 has only 2^17 addresses in 198.18.0.0/15, so 1M IPv4 flows are 16 source
addresses x 62,500 ports, the generator's template switched every 62,500 frames (each
flow still recurs every N frames, as in a round robin over N flows). The connection
table has the shipped default size (1,048,576 entries per CPU) and is emptied before
each flow mix, then filled by one pass over all flows: measured frames are hits.

(a) datapath cost without a veth in front of the balancer::

        gen netns: live-frames generator (pktgen.c) --tail call--> program under test
                   --XDP_TX--> veth A ==> veth B (sink netns): sink.c counts, drops

    program under test: balancer_xdp (encapsulates, XDP_TX) or, for the no-balancer
    harness, pktgen_tx_stub (only the output stage: MAC rewrite, a counter, XDP_TX).
    Generator and program run on --gen-cpu; the sink's NAPI runs in softirq on the same
    CPU ("softirq") or in its kthread pinned to --other-cpu ("threaded").
    Ratio = balancer Mpps / no-balancer Mpps, paired rep by rep (interleaved runs) and
    the median taken. "added ns/pkt" = 1e3/bal_Mpps - 1e3/stub_Mpps: what the balancer
    costs per packet on the generating CPU.

(b) through a real topology::

        gen netns: generator --XDP_TX--> veth A ==> veth B (bal netns): balancer_xdp
                   attached natively, encapsulates, XDP_TX back out of B
                   ==> veth A: sink.c attached on A counts what came back

    XDP_TX can only send a frame back out of the interface it came in on, so the
    balancer's output arrives at A, in the generator's namespace: the sink sits on A
    (live frames run the generator program, not A's attached one, so the two don't
    interfere). A second veth hop would need XDP_REDIRECT, which the balancer doesn't
    do. No-balancer: pktgen_tx_stub attached to B instead. B's NAPI runs in softirq on
    the generator's CPU ("softirq": everything on one CPU) or in its kthread pinned to
    --other-cpu ("threaded": the balancer on its own CPU; A's NAPI then runs in softirq
    where B's XDP_TX scheduled it). The CPUs are read back from per-CPU counters.
    Reported: frames counted back by the sink per second (Mpps), ratio as in (a).

(c) the userspace datapath (lb/datapath/) on the same flow mixes: ns/packet with
    bench.bench_datapath.time_batches (batches of 65,536 frames), pinned to --other-cpu.

(p) where the time goes: the cost of one BPF helper call on this machine, what one
    dependent read through an array map costs a BPF program by working-set size (0.5 to
    64 MB: the price of per-flow state once it outgrows the caches), and cpu-clock
    profiles (perf, this process's samples) of the generating CPU running harness (a)
    with the balancer and with the stub, IPv4 LRU VIP, 1k and 100k flows.

(s) side by side (bench/xdp_compare.py): the stub, Katran's balancer (``--katran DIR``:
    a Katran checkout or git dir; bench/katran.py builds and loads it) and ours in each
    mode, harness (a), --rounds interleaved rounds of --round-frames; per-round ratios
    to the stub and to Katran (median, IQR, best rounds), IPv4 and IPv6, 1k / 10k /
    100k / 1M flows.

(t) stage costs (bench/xdp_compare.py): ns per packet of parsing, VIP lookup,
    connection table, ring and encapsulation, from balancer variants that stop after
    each stage, measured in the same rounds.

Charts: bench/charts.py draws Mpps against flow count (part s) and ns per stage (part t)
from the JSON, as PNG files beside it.

Mpps in (a), (d), (s) and (t) is frames / the kernel's own BPF_PROG_TEST_RUN run time on the
generating CPU, which leaves out time other tasks had that CPU (this machine is shared);
the wall-clock figures are in the JSON and (a)'s table too. (b) counts frames back at
the sink per wall-clock second.

Load average (1-minute) is recorded before and after every measurement; a measurement
that started or ended with it above --load-high is run again (up to --max-reruns) and
the calmer one kept; both are in the JSON.
"""

from __future__ import annotations

import argparse
import ctypes
import ipaddress
import os
import shutil
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from bench.bench_pktgen import cpu_model, loadavg, task_cpu_seconds
from bench.common import report
from bench.jit_profile import line_profile
from lb import constants as C
from lb.config import parse_config
from lb.datapath_tables import compile_tables
from lb.kernel.maps import map_lookup
from lb.kernel.netns import netns_path, run_in_netns
from lb.kernel.testrun import test_run
from lb.kernel.xdp import XDP_MODE_FLAGS, xdp_attach, xdp_detach
from lb.pktgen import PacketGenerator, Sink, build_frame
from netns.ns import Iface, Netns, Sandbox

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "xdp.json"

FLOW_COUNTS = (1, 1_000, 100_000, 1_000_000)
FAMILIES = (4, 6)
VIP_KINDS = ("lru", "lru_bypass")
MODES = ("softirq", "threaded")
TARGETS = {1_000: 0.60, 100_000: 0.45}  # balancer Mpps / no-balancer Mpps, part (a)

FRAME_SIZE = 64
MIN_TCP_FRAME = {4: 64, 6: 74}  # Ethernet + IP + TCP headers (IPv6: 14 + 40 + 20)
VIPS = {(4, "lru"): "198.19.200.1", (4, "lru_bypass"): "198.19.200.2",
        (6, "lru"): "2001:db8:200::1", (6, "lru_bypass"): "2001:db8:200::2"}
# Stateless VIPs (part s), on a second balancer loaded with encap gue, which they need:
# a default LRU VIP under GUE for reference, a stateless VIP without a previous ring and
# one whose previous ring lacks the 100th real (the ring after adding a real: ~1% of the
# flows carry a hop list of two reals, every frame reads the previous ring).
STATELESS_VIPS = {(4, "gue_lru"): "198.19.201.1", (4, "stateless"): "198.19.201.2",
                  (4, "stateless_prev"): "198.19.201.3", (6, "gue_lru"): "2001:db8:201::1",
                  (6, "stateless"): "2001:db8:201::2", (6, "stateless_prev"): "2001:db8:201::3"}
STATELESS_KINDS = ("gue_lru", "stateless", "stateless_prev")
REALS = {4: [f"198.19.250.{i + 1}" for i in range(100)],
         6: [f"2001:db8:300::{i + 1:x}" for i in range(100)]}
SRC = {4: "198.18.0.1", 6: "2001:db8:1::1"}
SPORT0 = 1024
DPORT = 80
MAX_PORT_FLOWS = 65536 - SPORT0  # source ports SPORT0..65535
PORTS_PER_ADDR = 62_500  # chunked IPv4 mixes: 16 addresses x 62,500 ports = 1M flows
V4_ADDR_FLOWS_MAX = 120_000  # 198.18.0.1 + 120k stays below the VIPs in 198.19.200.0/24
STUB_SRC_MAC = bytes.fromhex("02000000c1e7")  # the "client side" MAC in harness (a)
ACK = 0x10

# names of every namespace this process's test beds made (tests check they are gone)
NETNS_MADE: list[str] = []


# ---------------------------------------------------------------------------------------
# configuration and flow mixes


def bench_config(gateway_mac: str, conn_table_size: int = C.CONN_TABLE_SIZE):
    """The balancer configuration of every part: an LRU and an lru_bypass TCP VIP per
    family, 100 reals each."""
    vips = []
    for (family, kind), addr in VIPS.items():
        vips.append({"address": addr, "port": DPORT, "protocol": "tcp",
                     "flags": ["lru_bypass"] if kind == "lru_bypass" else [],
                     "reals": [{"address": r} for r in REALS[family]]})
    return parse_config({"settings": {"gateway_mac": gateway_mac,
                                      "conn_table_size": conn_table_size},
                         "vips": vips})


def stateless_tables(gateway_mac: str, conn_table_size: int):
    """The stateless balancer's tables (STATELESS_VIPS, encap gue, 100 reals each): the
    ``stateless_prev`` VIPs get a previous ring built without their last real."""
    from lb.datapath_tables import prev_ref_value
    from lb.maglev import ring_for

    vips = [{"address": addr, "port": DPORT, "protocol": "tcp",
             "flags": [] if kind == "gue_lru" else ["stateless"],
             "reals": [{"address": r} for r in REALS[family]]}
            for (family, kind), addr in STATELESS_VIPS.items()]
    cfg = parse_config({"settings": {"gateway_mac": gateway_mac, "conn_table_size": conn_table_size,
                                     "encap": "gue", "gue": {"source_v4": "198.18.0.254",
                                                             "source_v6": "2001:db8:fffe::254"}},
                        "vips": vips})
    t = compile_tables(cfg)
    t.prev_rings = np.zeros((C.MAX_PREV_RINGS, t.ring_size), dtype=np.uint32)
    t.prev_refs = np.zeros(t.max_vips, dtype=np.uint32)
    for slot, family in enumerate((4, 6)):
        reals = [(a, 1, t.real_ids[ipaddress.ip_address(a)]) for a in REALS[family][:-1]]
        t.prev_rings[slot] = ring_for(reals, t.ring_size)
        num = list(STATELESS_VIPS).index((family, "stateless_prev"))
        t.prev_refs[num] = prev_ref_value([slot])
    return t


@dataclass(frozen=True)
class Segment:
    """``flows`` consecutive flows of a mix: source ``src`` + i ("src_addr") or source
    port SPORT0 + i ("src_port")."""

    src: str
    flows: int
    vary: str


def flow_segments(family: int, flows: int) -> list[Segment]:
    """How the generator makes ``flows`` distinct flows (see the module docstring)."""
    if flows <= MAX_PORT_FLOWS:
        return [Segment(SRC[family], flows, "src_port")]
    if family == 6 or flows <= V4_ADDR_FLOWS_MAX:
        return [Segment(SRC[family], flows, "src_addr")]
    base = int(ipaddress.ip_address(SRC[family]))
    segs, done, i = [], 0, 0
    while done < flows:
        n = min(PORTS_PER_ADDR, flows - done)
        segs.append(Segment(str(ipaddress.ip_address(base + i)), n, "src_port"))
        done, i = done + n, i + 1
    return segs


def frame_size(family: int) -> int:
    return max(FRAME_SIZE, MIN_TCP_FRAME[family])


def template(family: int, src: str, dst: str, src_mac: bytes, dst_mac: bytes) -> bytes:
    return build_frame(family, "tcp", frame_size(family), src=src, dst=dst, sport=SPORT0,
                       dport=DPORT, src_mac=src_mac, dst_mac=dst_mac, tcp_flags=ACK)


def mix_frames(family: int, flows: int, dst: str) -> np.ndarray:
    """The frames of a flow mix as rows of a uint8 array (flow order = generator order),
    for the userspace datapath. Checksums are not updated (neither datapath checks them)."""
    tmpl = np.frombuffer(template(family, SRC[family], dst, STUB_SRC_MAC, b"\x02" + bytes(5)),
                         dtype=np.uint8)
    out = np.tile(tmpl, (flows, 1))
    src_lo = 26 if family == 4 else 34  # the low 32 bits of the source address
    sport_off = 34 if family == 4 else 54
    row = 0
    for seg in flow_segments(family, flows):
        i = np.arange(seg.flows, dtype=np.int64)
        rows = slice(row, row + seg.flows)
        src = int(ipaddress.ip_address(seg.src)) & 0xFFFFFFFF
        srcs = src + i if seg.vary == "src_addr" else np.full(seg.flows, src)
        ports = SPORT0 + i if seg.vary == "src_port" else np.full(seg.flows, SPORT0)
        for b in range(4):
            out[rows, src_lo + b] = (srcs >> (24 - 8 * b)) & 0xFF
        out[rows, sport_off] = ports >> 8
        out[rows, sport_off + 1] = ports & 0xFF
        row += seg.flows
    return out


# ---------------------------------------------------------------------------------------
# small kernel helpers


def balancer_rx_per_cpu(bal: Any) -> np.ndarray:
    """rx_packets of the balancer per CPU (where it ran)."""
    raw = map_lookup(bal.map_fd("stats"), bytes(4), 8 * C.N_STATS * bal.ncpus)
    return np.frombuffer(raw, dtype=np.uint64).reshape(bal.ncpus, C.N_STATS)[:, C.STAT_RX_PACKETS].copy()


def detach(iface: Iface, mode: str = "native") -> None:
    """Remove the XDP program from ``iface``; gone with its interface or namespace is fine."""
    if iface.ns is not None and not os.path.exists(netns_path(iface.ns)):
        return
    try:
        xdp_detach(iface.name, XDP_MODE_FLAGS[mode], iface.ns)
    except OSError:
        pass  # already gone with its interface


def _one_min_load() -> float:
    return loadavg()[0]


# ---------------------------------------------------------------------------------------
# test beds


class Bed:
    """Namespaces + veth + sink for harness (a)/(d) or the topology (b); context manager,
    everything torn down on exit (also on exceptions and Ctrl-C)."""

    def __init__(self, gen: PacketGenerator, topology: bool, gen_cpu: int, other_cpu: int):
        self.gen, self.topology = gen, topology
        self.gen_cpu, self.other_cpu = gen_cpu, other_cpu
        self.lab = Sandbox()
        self.napi_pids: list[int] = []
        self.attached_fd: int | None = None
        self.mode = "softirq"

    def __enter__(self) -> Bed:
        try:
            self.gen_ns: Netns = self.lab.netns("lbbg")
            self.far_ns: Netns = self.lab.netns("lbbb" if self.topology else "lbbs")
            NETNS_MADE.extend((self.gen_ns.name, self.far_ns.name))
            # 1 queue per end: exactly one NAPI instance (one kthread when threaded)
            self.a, self.b = self.lab.veth(self.gen_ns, self.far_ns, "lbb", queues=1)
            # (a): the sink counts on B. (b): the program under test sits on B and the
            # sink on A, where XDP_TX from B arrives.
            sink_end = self.a if self.topology else self.b
            self.sink = Sink(sink_end.name, sink_end.ns)
            self.lab.on_teardown(self.sink.close)
            if self.topology:
                self.lab.on_teardown(lambda: detach(self.b))
        except BaseException:
            self.lab.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.lab.close()

    @property
    def napi_iface(self) -> Iface:
        """The end whose NAPI the mode moves: the sink's in (a), the balancer's in (b)."""
        return self.b

    @property
    def gateway_mac(self) -> str:
        """Where the balancer's output goes: B (the sink) in (a), back to A in (b)."""
        return (self.a if self.topology else self.b).mac

    def set_mode(self, mode: str) -> None:
        if self.topology and self.attached_fd is None:
            raise RuntimeError("attach a program to B before setting the NAPI mode")
        self.napi_iface.set_threaded(mode == "threaded")
        self.napi_pids = self.napi_iface.pin_napi({self.other_cpu}) if mode == "threaded" else []
        self.mode = mode

    def put_on_b(self, fd: int) -> None:
        if self.attached_fd != fd:
            xdp_attach(self.b.name, fd, XDP_MODE_FLAGS["native"], self.b.ns)
            self.attached_fd = fd

    def frame(self, family: int, src: str, dst: str) -> bytes:
        if self.topology:  # sent by A to B
            return template(family, src, dst, self.a.mac_bytes, self.b.mac_bytes)
        # (a): as received on A, which the program under test turns around
        return template(family, src, dst, STUB_SRC_MAC, self.a.mac_bytes)


@dataclass
class Program:
    """One program under test: a label, its fd, the VIP its frames go to, and the
    balancer whose counters to read (None for the stub)."""

    label: str
    fd: int
    dst: str
    bal: Any = None
    uses_lru: bool = False


@dataclass
class RunResult:
    """One generator run. ``seconds``: wall time of the generating thread(s);
    ``kernel_seconds``: the kernel's own BPF_PROG_TEST_RUN timing of the same frames,
    which leaves out time the generating thread was switched out for other tasks (the
    kernel is PREEMPT_NONE/voluntary here: the generator yields only between batches,
    where the timer stops), so it measures the generating CPU's cost per frame even
    when other work shares that CPU. Softirq work the batches trigger on that CPU (the
    sink's NAPI in "softirq" mode) is inside it."""

    packets: int
    seconds: float
    kernel_seconds: float
    delivered: int
    veth_dropped: int
    gen_cpus: dict[int, int]
    sink_cpus: dict[int, int]
    bal_cpus: dict[int, int]
    lru_hit: int = 0
    lru_miss: int = 0
    tx_encap: int = 0
    napi_cpu_share: float | None = None
    load_before: list[float] = field(default_factory=list)
    load_after: list[float] = field(default_factory=list)

    @property
    def mpps(self) -> float:
        return self.packets / self.seconds / 1e6 if self.seconds else 0.0

    @property
    def kernel_mpps(self) -> float:
        return self.packets / self.kernel_seconds / 1e6 if self.kernel_seconds else 0.0

    @property
    def delivered_mpps(self) -> float:
        return self.delivered / self.seconds / 1e6 if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.update(mpps=self.mpps, kernel_mpps=self.kernel_mpps, delivered_mpps=self.delivered_mpps,
                 gen_cpus={str(k): v for k, v in self.gen_cpus.items()},
                 sink_cpus={str(k): v for k, v in self.sink_cpus.items()},
                 bal_cpus={str(k): v for k, v in self.bal_cpus.items()})
        return d


# ---------------------------------------------------------------------------------------
# the measurement loop


class XdpBench:
    """Shared state of one benchmark run: the generator, the balancer(s), CPUs, sizes.
    ``close()`` (or the context manager) releases the BPF objects."""

    def __init__(self, *, gen_cpu: int = 0, other_cpu: int = 1, frames: int = 2_000_000,
                 reps: int = 3, conn_table_size: int = C.CONN_TABLE_SIZE,
                 load_high: float = 2.5, max_reruns: int = 1,
                 warm_frames: int = 100_000, console: Console | None = None):
        from lb.bpf_loader import XdpBalancer

        self.gen_cpu, self.other_cpu = gen_cpu, other_cpu
        self.frames, self.reps = frames, reps
        self.conn_table_size = conn_table_size
        self.load_high, self.max_reruns = load_high, max_reruns
        self._gateway = "02:00:00:00:00:01"
        self.warm_frames = warm_frames
        self.console = console or Console()
        self.gen = PacketGenerator()
        self.bal = None
        self._stateless = None  # loaded on first use (part s)
        try:
            tables = compile_tables(bench_config("02:00:00:00:00:01", conn_table_size))
            self.bal = XdpBalancer.from_tables(tables)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.bal is not None:
            self.bal.close()
        self.bal = None
        if self._stateless is not None:
            self._stateless.close()
        self._stateless = None
        if self.gen is not None:
            self.gen.close()
            self.gen = None

    def __enter__(self) -> XdpBench:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fresh_balancers(self) -> None:
        """Load the balancer again: new maps, whatever earlier parts did to them."""
        from lb.bpf_loader import XdpBalancer

        tables = compile_tables(bench_config("02:00:00:00:00:01", self.conn_table_size))
        if self.bal is not None:
            self.bal.close()
        self.bal = None
        self.bal = XdpBalancer.from_tables(tables)
        if self._stateless is not None:
            self._stateless.close()
        self._stateless = None

    def stateless_balancer(self) -> Any:
        """The second balancer (encap gue) with the STATELESS_VIPS, loaded on first use
        with the gateway of the last set_gateway."""
        from lb.bpf_loader import XdpBalancer

        if self._stateless is None:
            self._stateless = XdpBalancer.from_tables(
                stateless_tables(self._gateway, self.conn_table_size))
        return self._stateless

    def set_gateway(self, mac: str) -> None:
        self._gateway = mac
        self.bal.load_tables(compile_tables(bench_config(mac, self.conn_table_size)))
        if self._stateless is not None:
            self._stateless.load_tables(stateless_tables(mac, self.conn_table_size))

    # --- one run ---------------------------------------------------------------------

    def _generate(self, bed: Bed, prog: Program, family: int, flows: int, count: int,
                  tail: bool) -> tuple[int, float, float, dict[int, int]]:
        """Generate ``count`` frames of the mix (whole segments for chunked mixes);
        returns (frames, wall seconds, kernel-timed seconds, frames per CPU)."""
        gen = self.gen
        segs = flow_segments(family, flows)
        packets, seconds, kseconds, cpus = 0, 0.0, 0.0, {}
        while packets < count:
            for seg in segs:
                gen.set_template(bed.frame(family, seg.src, prog.dst), flows=seg.flows, vary=seg.vary)
                if tail:
                    gen.attach_tail_call(prog.fd)
                else:
                    gen.detach_tail_call()
                n = count if len(segs) == 1 else seg.flows
                r = gen.run(n, bed.a.index, netns=bed.gen_ns, cpu=self.gen_cpu)
                if r.tail_missed:
                    raise RuntimeError(f"{r.tail_missed} tail calls into {prog.label} failed")
                packets += r.packets
                seconds += r.seconds
                kseconds += r.kernel_ns_per_frame * r.packets / 1e9
                for c, v in r.cpus.items():
                    cpus[c] = cpus.get(c, 0) + v
                if packets >= count:
                    break
        return packets, seconds, kseconds, cpus

    def run_once(self, bed: Bed, prog: Program, family: int, flows: int, count: int) -> RunResult:
        tail = not bed.topology
        if bed.topology:
            bed.put_on_b(prog.fd)
        bed.sink.reset()
        drop0 = bed.b.stats().get("tx_dropped", 0) + bed.a.stats().get("tx_dropped", 0)
        st0 = prog.bal.read_stats().counters if prog.bal else None
        rx0 = balancer_rx_per_cpu(prog.bal) if prog.bal else None
        napi0 = {p: task_cpu_seconds(p) for p in bed.napi_pids}
        load0 = loadavg()
        packets, seconds, kseconds, gen_cpus = self._generate(bed, prog, family, flows, count, tail)
        # let the sink drain the veth rings (a few hundred frames)
        deadline = time.monotonic() + 2.0
        while True:
            c = bed.sink.counts()
            dropped = bed.b.stats().get("tx_dropped", 0) + bed.a.stats().get("tx_dropped", 0) - drop0
            if c.packets + dropped >= packets or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        res = RunResult(packets=packets, seconds=seconds, kernel_seconds=kseconds,
                        delivered=c.packets,
                        veth_dropped=dropped, gen_cpus=gen_cpus, sink_cpus=dict(c.per_cpu),
                        bal_cpus={}, load_before=load0, load_after=loadavg())
        if bed.napi_pids:
            res.napi_cpu_share = sum(task_cpu_seconds(p) - t for p, t in napi0.items()) / seconds
        if prog.bal is not None:
            st = prog.bal.read_stats().counters
            rx = balancer_rx_per_cpu(prog.bal) - rx0
            res.bal_cpus = {i: int(v) for i, v in enumerate(rx) if v}
            res.lru_hit = st["lru_hit"] - st0["lru_hit"]
            res.lru_miss = st["lru_miss"] - st0["lru_miss"]
            res.tx_encap = st["tx_encap"] - st0["tx_encap"]
        return res

    # --- one cell: programs side by side ---------------------------------------------

    def warm(self, bed: Bed, progs: Sequence[Program], family: int, flows: int) -> None:
        """One pass over all flows through every program (fills the connection tables;
        measured frames are hits), warm_frames at least. The tables are empty:
        :meth:`cell` clears them after each cell."""
        mode = bed.mode
        if bed.topology and mode != "softirq":
            # (b) threaded: frames are lost before the balancer, so the warm-up would
            # miss flows; warm with everything on one CPU, lossless, then measure
            bed.set_mode("softirq")
        try:
            self._warm(bed, progs, family, flows)
        finally:
            if bed.mode != mode:
                bed.set_mode(mode)

    def _warm(self, bed: Bed, progs: Sequence[Program], family: int, flows: int) -> None:
        for p in progs:
            if p.uses_lru:
                p.bal.clear_conn_table()  # normally empty already
        for p in progs:
            if p.uses_lru:
                self.gen.reset_counters()  # flow numbering from 0: inserts in flow order
            # a pass may lose frames before the balancer (a full veth ring in (b)): repeat
            # until a pass finds every flow that reached it in the table
            for _ in range(5):
                r = self.run_once(bed, p, family, flows, max(flows, self.warm_frames))
                if not p.uses_lru or (r.lru_miss == 0 and r.delivered == r.packets):
                    break

    def cell(self, bed: Bed, progs: Sequence[Program], family: int, flows: int,
             reps: int | None = None, count: int | None = None) -> dict[str, Any]:
        """Interleaved reps of every program; reruns the cell if the load was high."""
        reps = reps or self.reps
        count = max(count or self.frames, flows if flows > 1 else 0)
        attempts = []
        for attempt in range(self.max_reruns + 1):
            self.warm(bed, progs, family, flows)
            load0 = loadavg()
            runs: dict[str, list[RunResult]] = {p.label: [] for p in progs}
            for rep in range(reps):
                # each round starts one program later: no program always runs right after
                # the same other one (whose tables it would find in the caches' place)
                k = rep % len(progs)
                for p in progs[k:] + progs[:k]:
                    runs[p.label].append(self.run_once(bed, p, family, flows, count))
            load1 = loadavg()
            high = max(load0[0], load1[0]) > self.load_high
            attempts.append({"runs": runs, "load_before": load0, "load_after": load1,
                             "load_high": high})
            if not high or attempt == self.max_reruns:
                break
            self.console.print(f"    [yellow]load average {load0[0]:.2f} -> {load1[0]:.2f} above "
                               f"{self.load_high}: measuring again[/yellow]")
        for p in progs:
            if p.uses_lru:
                p.bal.clear_conn_table()
        best = min(attempts, key=lambda a: max(a["load_before"][0], a["load_after"][0]))
        return {"runs": best["runs"], "load_before": best["load_before"],
                "load_after": best["load_after"], "load_high": best["load_high"],
                "reruns": len(attempts) - 1,
                "discarded_attempts": [
                    {"load_before": a["load_before"], "load_after": a["load_after"],
                     "runs": {k: [r.as_dict() for r in v] for k, v in a["runs"].items()}}
                    for a in attempts if a is not best]}


def _median(xs: Sequence[float]) -> float | None:
    return statistics.median(xs) if xs else None


METRICS = {"kernel": lambda r: r.kernel_mpps, "wall": lambda r: r.mpps,
           "delivered": lambda r: r.delivered_mpps}


def summarize(cell: dict[str, Any], label: str, base: str = "stub",
              metric: str = "kernel") -> dict[str, Any]:
    """Median Mpps of ``label`` and of ``base`` and the median of the per-rep ratios, by
    ``metric`` ("kernel": frames / kernel-timed seconds, "wall": frames / wall seconds,
    "delivered": frames the sink counted / wall seconds); the others alongside."""
    runs, brun = cell["runs"][label], cell["runs"][base]

    def stats(get):
        ratios = [get(r) / get(b) for r, b in zip(runs, brun) if get(b) > 0]
        return _median([get(r) for r in runs]), _median([get(b) for b in brun]), _median(ratios), ratios

    mpps, base_mpps, ratio, ratios = stats(METRICS[metric])
    out = {
        "metric": metric,
        "mpps": mpps,
        "base_mpps": base_mpps,
        "ratio": ratio,
        "ratios": ratios,
        "by_metric": {m: dict(zip(("mpps", "base_mpps", "ratio", "ratios"), stats(f)))
                      for m, f in METRICS.items()},
        "generated_mpps": _median([r.mpps for r in runs]),
        "base_generated_mpps": _median([b.mpps for b in brun]),
        "delivered_mpps": _median([r.delivered_mpps for r in runs]),
        "base_delivered_mpps": _median([b.delivered_mpps for b in brun]),
        "lost_fraction": _median([1 - r.delivered / r.packets for r in runs if r.packets]),
        "accounted": all(r.delivered + r.veth_dropped == r.packets for r in runs + brun),
        "gen_cpus": sorted({c for r in runs + brun for c in r.gen_cpus}),
        "sink_cpus": sorted({c for r in runs + brun for c in r.sink_cpus}),
        "bal_cpus": sorted({c for r in runs for c in r.bal_cpus}),
        "napi_kthread_cpu_share": _median([r.napi_cpu_share for r in runs
                                           if r.napi_cpu_share is not None]),
        "load_before": cell["load_before"], "load_after": cell["load_after"],
        "load_high": cell["load_high"], "reruns": cell["reruns"],
    }
    hits = sum(r.lru_hit for r in runs)
    looked = hits + sum(r.lru_miss for r in runs)
    out["lru_hit_ratio"] = hits / looked if looked else None
    if out["mpps"] > 0 and out["base_mpps"] > 0:
        out["added_ns_per_pkt"] = 1e3 / out["mpps"] - 1e3 / out["base_mpps"]
    return out


def _cpus(xs: Sequence[int]) -> str:
    return ",".join(map(str, xs)) or "-"


def _load(s: dict[str, Any]) -> str:
    mark = " HIGH" if s["load_high"] else ""
    rr = f" (rerun x{s['reruns']})" if s["reruns"] else ""
    return f"{s['load_before'][0]:.2f}->{s['load_after'][0]:.2f}{mark}{rr}"


# ---------------------------------------------------------------------------------------
# the parts


def part_a(xb: XdpBench, families: Sequence[int], flow_counts: Sequence[int],
           kinds: Sequence[str], modes: Sequence[str]) -> list[dict[str, Any]]:
    """(a) generator -> tail call -> balancer | stub -> XDP_TX -> veth -> sink."""
    rows = []
    with Bed(xb.gen, False, xb.gen_cpu, xb.other_cpu) as bed:
        xb.set_gateway(bed.gateway_mac)
        stub_fd = xb.gen.configure_tx_stub(bed.b.mac_bytes)
        for mode in modes:
            bed.set_mode(mode)
            for family in families:
                for flows in flow_counts:
                    progs = [Program("stub", stub_fd, VIPS[(family, "lru")])]
                    progs += [Program(k, xb.bal.prog_fd, VIPS[(family, k)], xb.bal, k == "lru")
                              for k in kinds]
                    cell = xb.cell(bed, progs, family, flows)
                    for k in kinds:
                        s = summarize(cell, k)
                        row = {"part": "a", "mode": mode, "family": family,
                               "frame_bytes": frame_size(family), "flows": flows, "vip": k,
                               "target": TARGETS.get(flows) if k == "lru" else None, **s,
                               "runs": {p: [r.as_dict() for r in v] for p, v in cell["runs"].items()
                                        if p in ("stub", k)}}
                        rows.append(row)
                        xb.console.print(
                            f"  (a) {mode:8} v{family} {flows:>9,} flows {k:10} "
                            f"stub {s['base_mpps']:5.2f} bal {s['mpps']:5.2f} Mpps "
                            f"ratio {s['ratio']:.3f} (wall {s['by_metric']['wall']['ratio']:.3f}) "
                            f"+{s.get('added_ns_per_pkt', 0):.0f} ns/pkt "
                            f"hit {s['lru_hit_ratio'] if s['lru_hit_ratio'] is not None else '-'} "
                            f"cpu gen {s['gen_cpus']} bal {s['bal_cpus']} sink {s['sink_cpus']} "
                            f"load {_load(s)}")
        bed.set_mode("softirq")
        xb.gen.detach_tail_call()
    return rows


def part_b(xb: XdpBench, families: Sequence[int], flow_counts: Sequence[int],
           kinds: Sequence[str], modes: Sequence[str]) -> list[dict[str, Any]]:
    """(b) generator -> veth -> balancer (native XDP on B) -> XDP_TX -> veth -> sink on A."""
    rows = []
    with Bed(xb.gen, True, xb.gen_cpu, xb.other_cpu) as bed:
        xb.set_gateway(bed.gateway_mac)
        stub_fd = xb.gen.configure_tx_stub(bed.a.mac_bytes)
        xb.gen.detach_tail_call()
        xb.gen.set_action("tx")
        bed.put_on_b(stub_fd)  # NAPI needs a program on B before threaded can be set
        for mode in modes:
            bed.set_mode(mode)
            for family in families:
                for flows in flow_counts:
                    progs = [Program("stub", stub_fd, VIPS[(family, "lru")])]
                    progs += [Program(k, xb.bal.prog_fd, VIPS[(family, k)], xb.bal, k == "lru")
                              for k in kinds]
                    cell = xb.cell(bed, progs, family, flows)
                    for k in kinds:
                        # softirq: all of it runs on the generator's CPU, inside the
                        # kernel's timing; threaded: frames counted back per wall second
                        s = summarize(cell, k, metric="kernel" if mode == "softirq" else "delivered")
                        row = {"part": "b", "mode": mode, "family": family,
                               "frame_bytes": frame_size(family), "flows": flows, "vip": k, **s,
                               "runs": {p: [r.as_dict() for r in v] for p, v in cell["runs"].items()
                                        if p in ("stub", k)}}
                        rows.append(row)
                        xb.console.print(
                            f"  (b) {mode:8} v{family} {flows:>9,} flows {k:10} "
                            f"stub {s['base_mpps']:5.2f} bal {s['mpps']:5.2f} Mpps back "
                            f"ratio {s['ratio']:.3f} gen {s['generated_mpps']:.2f} Mpps "
                            f"lost {s['lost_fraction'] * 100:.1f}% cpu gen {s['gen_cpus']} "
                            f"bal {s['bal_cpus']} sink {s['sink_cpus']} load {_load(s)}")
        bed.set_mode("softirq")
    return rows


def part_c(xb: XdpBench | None, families: Sequence[int], flow_counts: Sequence[int],
           kinds: Sequence[str], cpu: int, repeat: int = 3,
           conn_table_size: int = C.CONN_TABLE_SIZE,
           console: Console | None = None) -> list[dict[str, Any]]:
    """(c) the userspace datapath on the same flow mixes (ns/packet, one CPU)."""
    from bench.bench_datapath import BATCH, time_batches
    from lb.datapath import UserspaceDatapath

    console = console or (xb.console if xb else Console())
    tables = compile_tables(bench_config("02:00:00:00:00:01", conn_table_size))
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    rows = []
    try:
        for family in families:
            for flows in flow_counts:
                for k in kinds:
                    frames = mix_frames(family, flows, VIPS[(family, k)])
                    lens = np.full(len(frames), frames.shape[1], dtype=np.int64)
                    dp = UserspaceDatapath(tables)
                    dp.process(frames, lens, now=1, deltas=False)  # JIT warm-up, fills the table
                    load0 = loadavg()
                    r = dp.process(frames, lens, now=1)
                    hit = int(r.stats[C.STAT_LRU_HIT])
                    looked = hit + int(r.stats[C.STAT_LRU_MISS])
                    ns = time_batches(dp, frames, lens, repeat)
                    row = {"part": "c", "family": family, "flows": flows, "vip": k,
                           "frame_bytes": int(frames.shape[1]), "ns_per_pkt": ns,
                           "mpps": 1e3 / ns, "lru_hit_ratio": hit / looked if looked else None,
                           "cpu": cpu, "batch": BATCH, "load_before": load0,
                           "load_after": loadavg()}
                    rows.append(row)
                    console.print(f"  (c) userspace v{family} {flows:>9,} flows {k:10} "
                                  f"{ns:6.1f} ns/pkt hit {row['lru_hit_ratio']} cpu {cpu}")
    finally:
        os.sched_setaffinity(0, saved)
    return rows


def helper_call_ns(cpu: int, repeat: int = 200_000) -> dict[str, float]:
    """What one BPF helper call costs here: an XDP program calling bpf_get_prandom_u32()
    100 times vs. not at all, timed by BPF_PROG_TEST_RUN (kernel-timed, repeat runs).
    Every hash-map lookup of the balancer is ~4 such calls/returns inside the kernel
    (__htab_map_lookup_elem, htab_map_hash, lookup_nulls_elem_raw, memcmp)."""
    from bcc import BPF


    src = b"""
    #include <uapi/linux/bpf.h>
    int none(struct xdp_md *ctx) { return XDP_DROP; }
    int calls(struct xdp_md *ctx) {
        __u32 s = 0;
    #pragma unroll
        for (int i = 0; i < 100; i++)
            s += bpf_get_prandom_u32();
        return s == 12345 ? XDP_PASS : XDP_DROP;
    }
    """
    b = BPF(text=src)
    try:
        fds = {n: b.load_func(n.encode(), BPF.XDP).fd for n in ("none", "calls")}

        def best(fd: int) -> float:
            return min(test_run(fd, bytes(64), repeat=repeat)[2] for _ in range(5))

        t = run_in_netns(None, lambda: {n: best(fd) for n, fd in fds.items()}, cpu=cpu)
    finally:
        b.cleanup()
    return {"empty_program_ns": t["none"], "ns_per_helper_call": (t["calls"] - t["none"]) / 100}


READ_LATENCY_MB = (0.5, 1, 2, 3, 4, 8, 16, 64)


def map_read_latency_ns(cpu: int, sizes_mb: Sequence[float] = READ_LATENCY_MB,
                        steps: int = 256, repeat: int = 2_000, seed: int = 1) -> dict[str, float]:
    """What one access to per-flow state costs a BPF program on this machine, by
    working-set size: a program follows a random cycle through an array map of
    64-byte cells (one cache line each, the first ``size`` MB of the map), each read's
    address depending on the previous read, ``steps`` reads per run, the position kept
    across runs. Returns {"<MB>": ns per read} (run time minus an empty program's,
    divided by ``steps``). A connection-table lookup is such a dependent read (its
    entry's address comes from the packet); once the flows' entries outgrow the
    caches, each packet pays this."""
    import mmap

    from bcc import BPF


    cell = 64
    entries = int(max(sizes_mb) * 2**20) // cell
    src = f"""
    #include <uapi/linux/bpf.h>
    struct cell {{ __u32 next; __u32 pad[15]; }};
    BPF_F_TABLE("array", __u32, struct cell, cells, {entries}, BPF_F_MMAPABLE);
    BPF_ARRAY(cursor, __u32, 1);
    int none(struct xdp_md *ctx) {{ return XDP_DROP; }}
    int chase(struct xdp_md *ctx) {{
        __u32 zero = 0, i, *at = cursor.lookup(&zero);
        struct cell *c;

        if (!at)
            return XDP_ABORTED;
        i = *at;
        for (int s = 0; s < {steps}; s++) {{
            c = cells.lookup(&i);
            if (!c)
                return XDP_ABORTED;
            i = c->next;
        }}
        *at = i;
        return XDP_DROP;
    }}
    """.encode()
    b = BPF(text=src)
    try:
        fds = {n: b.load_func(n.encode(), BPF.XDP).fd for n in ("none", "chase")}
        mm = mmap.mmap(b["cells"].map_fd, entries * cell, mmap.MAP_SHARED,
                       mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            nxt = np.frombuffer(mm, dtype=np.uint32).reshape(entries, cell // 4)
            rng = np.random.default_rng(seed)
            out: dict[str, float] = {}
            for mb in sizes_mb:
                n = int(mb * 2**20) // cell
                order = rng.permutation(n).astype(np.uint32)  # one cycle through all n
                nxt[order, 0] = np.roll(order, -1)
                b["cursor"][ctypes.c_uint(0)] = ctypes.c_uint(int(order[0]))

                def best(n: int = n) -> float:
                    test_run(fds["chase"], bytes(64), repeat=max(1, n // steps))  # warm
                    return min(test_run(fds["chase"], bytes(64), repeat=repeat)[2]
                               for _ in range(3))

                empty = run_in_netns(None, lambda: min(
                    test_run(fds["none"], bytes(64), repeat=repeat)[2] for _ in range(3)), cpu=cpu)
                out[f"{mb:g}"] = (run_in_netns(None, best, cpu=cpu) - empty) / steps
            del nxt
        finally:
            mm.close()
    finally:
        b.cleanup()
    return out


PERF_HZ = 2000  # part (p) sampling frequency


def perf_top(cpu: int, seconds_fn, top: int = 15, then=None) -> list[tuple[float, str]] | None:
    """Run ``seconds_fn()`` under ``perf record -e cpu-clock -C cpu`` (sampling, no
    hardware counters in this VM) and return the top symbols of this process's samples
    (share % of them, symbol). ``then(perf_data_path)``, if given, reads the samples
    before they are deleted."""
    import subprocess
    import tempfile

    if shutil.which("perf") is None:
        return None
    with tempfile.TemporaryDirectory(prefix="lbbperf") as d:
        data = os.path.join(d, "perf.data")
        p = subprocess.Popen(["perf", "record", "-q", "-e", "cpu-clock", "-F", str(PERF_HZ), "-C", str(cpu),
                              "-o", data], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(1.0)  # perf needs a moment before it samples
            seconds_fn()
        finally:
            p.send_signal(2)
            p.wait(timeout=30)
        # only this process's samples (the generator thread, and the softirq work it
        # triggers): other sessions share the CPU
        out = subprocess.run(["perf", "report", "-i", data, "--stdio", "--no-children",
                              "--pid", str(os.getpid()), "--percentage", "relative",
                              "--sort", "sym", "-q"], capture_output=True, text=True).stdout
        if then is not None:
            then(data)
    rows = []
    for line in out.splitlines():
        parts = line.split(None, 2)
        if len(parts) == 3 and parts[0].endswith("%"):
            rows.append((float(parts[0][:-1]), parts[2].strip()))
    return rows[:top]


def part_p(xb: XdpBench, flow_counts: Sequence[int], seconds: float = 2.0) -> dict[str, Any]:
    """(p) where the balancer's time goes: the cost of a helper call on this machine,
    a dependent map read by working-set size (map_read_latency_ns), and cpu-clock
    profiles of the generating CPU in harness (a) (IPv4, sink in softirq) for the stub,
    the default VIP and a stateless VIP, the balancer's also by source line
    (bench.jit_profile)."""
    out: dict[str, Any] = {"helper_call": helper_call_ns(xb.gen_cpu), "profiles": [],
                           "map_read_ns": map_read_latency_ns(xb.gen_cpu)}
    xb.console.print(f"  (p) helper call: {out['helper_call']['ns_per_helper_call']:.1f} ns "
                     f"(empty program {out['helper_call']['empty_program_ns']:.0f} ns per run)")
    xb.console.print("  (p) dependent map read by working set: " + ", ".join(
        f"{mb} MB {ns:.0f} ns" for mb, ns in out["map_read_ns"].items()))
    with Bed(xb.gen, False, xb.gen_cpu, xb.other_cpu) as bed:
        xb.set_gateway(bed.gateway_mac)
        stub_fd = xb.gen.configure_tx_stub(bed.b.mac_bytes)
        bed.set_mode("softirq")
        vip = VIPS[(4, "lru")]
        sl = xb.stateless_balancer()
        for flows in flow_counts:
            progs = [Program("stub", stub_fd, vip), Program("lru", xb.bal.prog_fd, vip, xb.bal, True),
                     Program("stateless", sl.prog_fd, STATELESS_VIPS[(4, "stateless")], sl)]
            xb.warm(bed, progs, 4, flows)
            for p in progs:
                res: dict[str, Any] = {}

                def go() -> None:  # the generator alone (run_once's netlink calls fork)
                    t0, packets, kseconds = time.monotonic(), 0, 0.0
                    while time.monotonic() - t0 < seconds:
                        n, _, k, _ = xb._generate(bed, p, 4, flows, max(xb.frames, flows), tail=True)
                        packets, kseconds = packets + n, kseconds + k
                    res["r"] = packets, kseconds

                def by_line(data: str, p: Program = p) -> None:  # the balancer's own lines
                    if p.bal is not None:
                        res["lines"] = line_profile(data, p.fd, res["r"][0], PERF_HZ)

                top = perf_top(xb.gen_cpu, go, then=by_line)
                if p.uses_lru:
                    p.bal.clear_conn_table()
                packets, kseconds = res["r"]
                out["profiles"].append({"flows": flows, "program": p.label, "top": top,
                                        "kernel_mpps_under_perf": packets / kseconds / 1e6,
                                        "by_line": res.get("lines")})
                if top:
                    xb.console.print(f"  (p) v4 {flows:>9,} flows {p.label:5}: " + ", ".join(
                        f"{sym.split()[-1]} {pct:.1f}%" for pct, sym in top[:8]))
                if res.get("lines"):
                    lp = res["lines"]
                    xb.console.print(f"  (p) v4 {flows:>9,} flows {p.label}: {lp['ns_per_packet']:.0f} ns "
                                     "per packet in the program; costliest lines: " + "; ".join(
                                         f"{r['line']} {r['ns']:.1f} ns" for r in lp["lines"][:10]))
        xb.gen.detach_tail_call()
    return out


def _f(x: Any, fmt: str = "{:.2f}") -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "-"
    return fmt.format(x)


def table_a(rows: list[dict[str, Any]], gen_cpu: int, other_cpu: int) -> Table:
    t = Table(title="(a) generator -> tail call -> balancer | no-balancer stub -> XDP_TX -> "
                    f"veth -> sink; generator + program on CPU {gen_cpu}. Mpps: frames / the "
                    "kernel's run time on that CPU (wall-clock ratio beside it)")
    for col in ("sink NAPI", "fam", "bytes", "flows", "VIP", "no-bal Mpps", "bal Mpps",
                "ratio", "wall ratio", "target", "met", "+ns/pkt", "LRU hit", "gen CPU",
                "bal CPU", "sink CPU", "lost", "load 1m"):
        t.add_column(col, justify="right", no_wrap=True)
    for r in rows:
        tgt = r.get("target")
        met = "-" if tgt is None else ("yes" if r["ratio"] >= tgt else "NO")
        t.add_row("softirq" if r["mode"] == "softirq" else f"kthread@{other_cpu}",
                  f"v{r['family']}", str(r["frame_bytes"]), f"{r['flows']:,}", r["vip"],
                  _f(r["base_mpps"]), _f(r["mpps"]), _f(r["ratio"], "{:.3f}"),
                  _f(r["by_metric"]["wall"]["ratio"], "{:.3f}"),
                  _f(tgt, "{:.2f}"), met, _f(r.get("added_ns_per_pkt"), "{:.0f}"),
                  _f(r["lru_hit_ratio"], "{:.4f}"), _cpus(r["gen_cpus"]), _cpus(r["bal_cpus"]),
                  _cpus(r["sink_cpus"]), f"{r['lost_fraction'] * 100:.1f}%", _load(r))
    return t


def table_b(rows: list[dict[str, Any]], other_cpu: int) -> Table:
    t = Table(title="(b) gen netns -> veth -> balancer | stub (native XDP on B) -> XDP_TX "
                    "-> veth -> sink on A. Mpps: softirq (all on the generator's CPU) frames / "
                    "kernel run time; threaded: frames counted back by the sink / wall second")
    for col in ("B NAPI", "fam", "bytes", "flows", "VIP", "no-bal Mpps", "bal Mpps", "ratio",
                "gen Mpps", "lost", "LRU hit", "gen CPU", "bal CPU", "sink CPU",
                "kthread CPU", "load 1m"):
        t.add_column(col, justify="right", no_wrap=True)
    for r in rows:
        share = r.get("napi_kthread_cpu_share")
        t.add_row("softirq" if r["mode"] == "softirq" else f"kthread@{other_cpu}",
                  f"v{r['family']}", str(r["frame_bytes"]), f"{r['flows']:,}", r["vip"],
                  _f(r["base_mpps"]), _f(r["mpps"]), _f(r["ratio"], "{:.3f}"),
                  _f(r["generated_mpps"]), f"{r['lost_fraction'] * 100:.1f}%",
                  _f(r["lru_hit_ratio"], "{:.4f}"), _cpus(r["gen_cpus"]), _cpus(r["bal_cpus"]),
                  _cpus(r["sink_cpus"]), _f(None if share is None or share != share else share * 100,
                                            "{:.0f}%"), _load(r))
    return t


def table_c(rows: list[dict[str, Any]], a_rows: list[dict[str, Any]]) -> Table:
    xdp = {(r["family"], r["flows"], r["vip"]): r for r in a_rows if r["mode"] == "softirq"}
    t = Table(title="(c) userspace datapath (numba), same flow mixes, batches of 65,536 "
                    "frames; XDP column: the balancer's added ns/pkt from (a), softirq")
    for col in ("fam", "bytes", "flows", "VIP", "userspace ns/pkt", "userspace Mpps",
                "LRU hit", "XDP +ns/pkt", "CPU", "load 1m"):
        t.add_column(col, justify="right", no_wrap=True)
    for r in rows:
        x = xdp.get((r["family"], r["flows"], r["vip"]))
        t.add_row(f"v{r['family']}", str(r["frame_bytes"]), f"{r['flows']:,}", r["vip"],
                  _f(r["ns_per_pkt"], "{:.1f}"), _f(r["mpps"]), _f(r["lru_hit_ratio"], "{:.4f}"),
                  _f(x.get("added_ns_per_pkt") if x else None, "{:.0f}"), str(r["cpu"]),
                  f"{r['load_before'][0]:.2f}->{r['load_after'][0]:.2f}")
    return t


def run_bpf_parts(xb: XdpBench, parts: set[str], flow_counts: Sequence[int], kinds: Sequence[str],
                  modes_a: Sequence[str]) -> tuple[list, list]:
    rows_a: list[dict[str, Any]] = []
    rows_b: list[dict[str, Any]] = []
    if "a" in parts:
        rows_a = part_a(xb, FAMILIES, flow_counts, kinds, modes_a)
        xb.console.print(table_a(rows_a, xb.gen_cpu, xb.other_cpu))
    if "b" in parts:
        if rows_a:
            xb.fresh_balancers()
        rows_b = part_b(xb, FAMILIES, flow_counts, kinds, list(MODES))
        xb.console.print(table_b(rows_b, xb.other_cpu))
    return rows_a, rows_b


def main(argv: list[str] | None = None) -> int:
    from bench import xdp_compare as xc  # parts s and t; it imports this module
    from bench.charts import write_charts

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, default=None, help=f"where to write results (default {DEFAULT_JSON})")
    ap.add_argument("--quick", action="store_true",
                    help="1 rep of 1M frames, 1k and 100k flows, LRU VIP only, sink in softirq for (a)")
    ap.add_argument("--parts", default="a,b,c,p,s,t",
                    help="comma-separated subset of a,b,c,k,p,s,t (p: profile, where the time "
                         "goes; s: side by side with Katran; k: with --katran, ns per packet of "
                         "each program and of the harness; t: stage costs)")
    ap.add_argument("--katran", type=Path, default=None,
                    help="a Katran source tree (checkout or git dir): its balancer joins part s, and part k runs")
    ap.add_argument("--rounds", type=int, default=None,
                    help=f"interleaved rounds of parts s and t (default {xc.ROUNDS})")
    ap.add_argument("--round-frames", type=int, default=xc.ROUND_FRAMES,
                    help="frames per program per round in parts s and t")
    ap.add_argument("--flows", default=None, help="comma-separated flow counts (default 1,1000,100000,1000000)")
    ap.add_argument("--frames", type=int, default=2_000_000, help="frames per run (at least the flow count)")
    ap.add_argument("--reps", type=int, default=3, help="interleaved runs per program (median reported)")
    ap.add_argument("--gen-cpu", type=int, default=None, help="generator CPU (default: the first allowed)")
    ap.add_argument("--other-cpu", type=int, default=None,
                    help="CPU for threaded NAPI kthreads and the userspace datapath (default: another)")
    ap.add_argument("--load-high", type=float, default=2.5,
                    help="1-min load average above which a measurement is run again")
    ap.add_argument("--max-reruns", type=int, default=1)
    args = ap.parse_args(argv)

    cpus = sorted(os.sched_getaffinity(0))
    gen_cpu = cpus[0] if args.gen_cpu is None else args.gen_cpu
    other_cpu = args.other_cpu if args.other_cpu is not None else next((c for c in cpus if c != gen_cpu), gen_cpu)
    parts = set(args.parts.split(","))
    if args.katran is not None:
        if not args.katran.exists():
            ap.error(f"--katran {args.katran}: no such directory")
        parts |= {"s", "k"}  # side by side, and the per-packet budget
    flow_counts = [int(x) for x in args.flows.split(",")] if args.flows else list(FLOW_COUNTS)
    rounds = args.rounds or (3 if args.quick else xc.ROUNDS)
    kinds, modes_a, reps, frames = list(VIP_KINDS), list(MODES), args.reps, args.frames
    if args.quick:
        flow_counts = [int(x) for x in args.flows.split(",")] if args.flows else [1_000, 100_000]
        kinds, modes_a, reps, frames = ["lru"], ["softirq"], 1, min(frames, 1_000_000)
    side_flows = flow_counts if args.flows or args.quick else list(xc.SIDE_FLOWS)

    console = Console(width=max(200, shutil.get_terminal_size().columns))
    load_start = loadavg()
    console.print(f"CPU: {cpu_model()}, {os.cpu_count()} CPUs; generator (+ program in (a)/(s)/(t)) on "
                  f"CPU {gen_cpu}; threaded NAPI kthreads and the userspace datapath on CPU "
                  f"{other_cpu}; load average {load_start}")
    data: dict[str, Any] = {
        "benchmark": "xdp_balancer", "cpu_model": cpu_model(), "gen_cpu": gen_cpu,
        "other_cpu": other_cpu, "frames_per_run": frames, "reps": reps,
        "conn_table_size_per_cpu": C.CONN_TABLE_SIZE, "frame_bytes": {"4": 64, "6": 74},
        "flows": flow_counts, "targets": {str(k): v for k, v in TARGETS.items()},
        "quick": args.quick, "load_start": load_start,
        "rounds": rounds, "round_frames": args.round_frames,
        "placement_s_t": xc.placement(gen_cpu),
    }
    rows_a: list[dict[str, Any]] = []
    rows_b: list[dict[str, Any]] = []
    rows_c: list[dict[str, Any]] = []
    profile: dict[str, Any] = {}
    rows_s: list[dict[str, Any]] = []
    rows_t: list[dict[str, Any]] = []
    if parts & {"a", "b", "p", "s", "t"}:
        with XdpBench(gen_cpu=gen_cpu, other_cpu=other_cpu, frames=frames, reps=reps,
                      load_high=args.load_high,
                      max_reruns=args.max_reruns, console=console) as xb:
            data["balancer_prog"] = xb.bal.prog_info()
            rows_a, rows_b = run_bpf_parts(xb, parts, flow_counts, kinds, modes_a)
            if "p" in parts:
                if parts & {"a", "b"}:
                    xb.fresh_balancers()
                profile = part_p(xb, [f for f in flow_counts if f in (1_000, 100_000)] or flow_counts[:1])
            if parts & {"k", "s", "t"}:
                if parts & {"a", "b", "p"}:
                    xb.fresh_balancers()
                rows_s, rows_t = xc.run_compare_parts(xb, parts, side_flows, rounds, args.round_frames,
                                                      args.katran, data)
    if "c" in parts:
        rows_c = part_c(None, FAMILIES, flow_counts, kinds, other_cpu, console=console)
        console.print(table_c(rows_c, rows_a))

    data.update(part_a=rows_a, part_b=rows_b, part_c=rows_c, profile=profile,
                part_s=rows_s, part_t=rows_t, load_end=loadavg())
    summary = []
    for r in rows_a:
        if r.get("target") is not None:
            summary.append([r["mode"], f"v{r['family']}", f"{r['flows']:,}", r["vip"],
                            f"{r['base_mpps']:.2f}", f"{r['mpps']:.2f}", f"{r['ratio']:.3f}",
                            f">= {r['target']:.2f}", "yes" if r["ratio"] >= r["target"] else "NO",
                            _load(r)])
    report(f"targets (part a): balancer Mpps / no-balancer Mpps, one run, CPU {gen_cpu}",
           ["sink NAPI", "fam", "flows", "VIP", "no-bal Mpps", "bal Mpps", "ratio", "target",
            "met", "load 1m"], summary, data, str(args.json) if args.json else None, "xdp.json")
    for chart in write_charts(data, (args.json or DEFAULT_JSON).parent):
        console.print(f"wrote {chart}")
    return 0


if __name__ == "__main__":
    # run the imported module's main: bench.xdp_compare uses bench.bench_xdp, and one copy
    # of its classes and state (NETNS_MADE) serves both
    from bench.bench_xdp import main as _main

    raise SystemExit(_main())
