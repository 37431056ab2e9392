"""Userspace datapath on real packet I/O: packets per second, against XDP on the same topology.

Run: ``.venv/bin/python -m bench.bench_userspace_io [--json PATH] [--seconds S]`` (root).
Topology, built fresh and torn down by :class:`netns.ns.Sandbox`::

    netns gen:  live-frames generator (lb/pktgen.py), thread pinned to --gen-cpu,
                "receives" on veth end A and XDP_TXes out of it; xdp/sink.c on A counts
                and drops what comes back
       A <--veth (1 queue)--> B
    netns bal:  the balancer on B: UserspaceBalancer (AF_PACKET TPACKET_V3 rings, numba
                loop thread pinned to --bal-cpu), or XdpBalancer (native XDP) as the
                reference; either sends its output back out of B (on a stick) to A

Traffic: 64-byte IPv4 TCP ACK frames to one VIP (10 reals), 1,000 flows (source port
varied), offered as fast as the generator goes (several Mpps: more than either balancer
takes, so both run saturated and the excess is dropped where each design drops it).

Where the work runs (2 CPUs; B has one NAPI instance, which live frames need: XDP enables
it, for the AF_PACKET balancer GRO on B does). Softirq work runs on the CPU that raised
it: B's on the generator's CPU, the sink's on the CPU that transmits to it. Cases:
  A  B's NAPI threaded, kthread pinned to --bal-cpu; the sink's NAPI threaded, on
     --gen-cpu. Everything the balancer does is on --bal-cpu: userspace = B's receive
     path into the ring (kthread) + the numba loop and its send(); XDP = B's NAPI.
  B  as A, the sink's NAPI in softirq: it runs on --bal-cpu as well (its frames come
     from there), as on a host whose NIC interrupts land on the balancer's CPU.
  C  (userspace only) B's receive path in softirq on the generator's CPU: the loop alone.
Placement is read back (generator and sink per-CPU counters), not assumed. "balancer
CPU" is the CPU time the loop thread and B's NAPI kthread got / wall time: the machine
is shared, and "Mpps per balancer CPU" (balancer Mpps / that share) is the figure that
survives other work on the same CPU (softirq work done outside those two threads is not
in it).

First, two figures without the generator: process_batch alone on the same frames (in
memory), and what sending costs per frame with each TX path (TPACKET_V3 TX ring or
sendmmsg, qdisc bypass on/off) including the veth peer's receive on the same CPU.

Figures are rates over a --seconds window while traffic flows (after a warm-up):
offered (generated), balancer (frames the balancer processed), out (frames the sink got
back), ring drops (the AF_PACKET ring was full: the loop was behind), loop CPU (CPU time
of the loop thread / wall time). After each case the generator stops, the pipeline
drains, and every frame is accounted for (out == offered - every counted drop).
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from typing import Any

import numpy as np

from bench.common import report
from lb.afpacket import set_offload
from lb.bpf_loader import XdpBalancer
from lb.config import parse_config
from lb.datapath import UserspaceDatapath
from lb.datapath_tables import compile_tables
from lb.kernel.netns import run_in_netns
from lb.pktgen import PacketGenerator, Sink, build_frame
from lb.userspace_io import UserspaceBalancer
from netns.ns import Sandbox, napi_thread_cpu

VIP = "198.18.100.1"
FRAME = 64
FLOWS = 1000


def make_tables(gw_mac: str):
    cfg = parse_config({
        "settings": {"gateway_mac": gw_mac, "max_vips": 16, "max_reals": 64,
                     "conn_table_size": 1 << 16},
        "vips": [{"address": VIP, "port": 80, "protocol": "tcp",
                  "reals": [{"address": f"198.19.0.{i + 1}"} for i in range(10)]}],
    })
    return compile_tables(cfg)


def task_cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


class Bed:
    """gen netns --veth--> bal netns; generator, sink on A; GRO on B."""

    def __init__(self, lab: Sandbox, gen: PacketGenerator, gen_cpu: int, bal_cpu: int):
        self.lab, self.gen, self.gen_cpu, self.bal_cpu = lab, gen, gen_cpu, bal_cpu
        self.gen_ns, self.bal_ns = lab.netns("lbug"), lab.netns("lbub")
        self.a, self.b = lab.veth(self.gen_ns, self.bal_ns, "lb", queues=1)
        # NAPI on B (live frames reach a veth peer only through its NAPI)
        run_in_netns(self.bal_ns, set_offload, self.b.name, "gro", True)
        self.sink = Sink(self.a.name, self.a.ns)
        lab.on_teardown(self.sink.close)
        self.tables = make_tables(self.a.mac)
        frame = build_frame(4, "tcp", FRAME, dst=VIP, dport=80, src_mac=bytes.fromhex("02000000c1e7"),
                            dst_mac=self.b.mac_bytes)
        gen.set_template(frame, flows=FLOWS, vary="src_port")
        self.frame = frame
        self.napi_pids: list[int] = []
        self.sink_pids: list[int] = []

    def set_napi(self, b_threaded: bool, sink_threaded: bool) -> None:
        """Threaded NAPI on B (kthread pinned to the balancer's CPU) and/or on A, the
        sink (kthread pinned to the generator's CPU); kthreads get this process's nice."""
        self.b.set_threaded(b_threaded)
        self.napi_pids = self.b.pin_napi({self.bal_cpu}) if b_threaded else []
        self.a.set_threaded(sink_threaded)
        self.sink_pids = self.a.pin_napi({self.gen_cpu}) if sink_threaded else []
        nice = os.getpriority(os.PRIO_PROCESS, 0)
        for pid in self.napi_pids + self.sink_pids:
            os.setpriority(os.PRIO_PROCESS, pid, nice)

    # --- traffic ---------------------------------------------------------------------------

    def start_traffic(self, chunk: int = 500_000) -> tuple[threading.Thread, threading.Event, list]:
        stop = threading.Event()
        errors: list[BaseException] = []

        def body() -> None:
            try:
                while not stop.is_set():
                    self.gen.run(chunk, self.a.index, netns=self.gen_ns, cpu=self.gen_cpu)
            except BaseException as e:  # noqa: BLE001 - re-raised by run_case
                errors.append(e)

        t = threading.Thread(target=body, name="traffic", daemon=True)
        t.start()
        return t, stop, errors

    def snapshot(self, bal: Any) -> dict[str, Any]:
        gen_cpu = self.gen.counters_per_cpu()
        sink = self.sink.counts()
        s: dict[str, Any] = {
            "t": time.perf_counter(),
            "gen": sum(gen_cpu),
            "gen_per_cpu": gen_cpu,
            "a_tx_dropped": self.a.stats().get("tx_dropped", 0),
            "b": self.b.stats(),
            "sink": sink.packets,
            "sink_per_cpu": dict(sink.per_cpu),
            "napi_cpu_s": sum(task_cpu_seconds(p) for p in self.napi_pids),
        "sink_napi_cpu_s": sum(task_cpu_seconds(p) for p in self.sink_pids),
        }
        if isinstance(bal, UserspaceBalancer):
            s["bal"] = bal.stats()
            s["loop_cpu_s"] = bal.loop_cpu_seconds()
            s["processed"] = s["bal"]["rx_packets"]
        else:
            s["bal"] = bal.read_stats().counters
            s["loop_cpu_s"] = 0.0
            s["processed"] = s["bal"]["rx_packets"]
        return s


def run_case(bed: Bed, bal: Any, seconds: float, warmup: float) -> dict[str, Any]:
    """Offer traffic, measure a window, stop, drain, account."""
    t, stop, errors = bed.start_traffic()
    try:
        time.sleep(warmup)
        s0 = bed.snapshot(bal)
        time.sleep(seconds)
        s1 = bed.snapshot(bal)
    finally:
        stop.set()
        t.join()
    if errors:
        raise errors[0]
    # drain: wait until the balancer and the sink stop moving
    last = None
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        time.sleep(0.1)
        s2 = bed.snapshot(bal)
        key = (s2["processed"], s2["sink"], s2["bal"].get("tx_in_flight", 0))
        if key == last and key[2] == 0:
            break
        last = key
    dt = s1["t"] - s0["t"]

    def rate(k: str) -> float:
        return (s1[k] - s0[k]) / dt / 1e6

    out: dict[str, Any] = {
        "window_s": dt,
        "offered_mpps": rate("gen"),
        "balancer_mpps": rate("processed"),
        "out_mpps": rate("sink"),
        "gen_cpus": [c for c, (x, y) in enumerate(zip(s1["gen_per_cpu"], s0["gen_per_cpu"])) if x != y],
        "sink_cpus": sorted(c for c in s1["sink_per_cpu"] if s1["sink_per_cpu"][c] != s0["sink_per_cpu"].get(c, 0)),
        "loop_cpu_share": (s1["loop_cpu_s"] - s0["loop_cpu_s"]) / dt,
        "napi_kthread_cpu_share": (s1["napi_cpu_s"] - s0["napi_cpu_s"]) / dt if bed.napi_pids else None,
        "napi_kthread_cpus": [napi_thread_cpu(p) for p in bed.napi_pids],
        "sink_kthread_cpu_share": (s1["sink_napi_cpu_s"] - s0["sink_napi_cpu_s"]) / dt if bed.sink_pids else None,
        "veth_a_dropped_mpps": rate("a_tx_dropped"),
    }
    b0, b1, b2 = s0["bal"], s1["bal"], s2["bal"]
    if isinstance(bal, UserspaceBalancer):
        d = {k: b1[k] - b0[k] for k in ("ring_packets", "ring_drops", "rx_frames", "tx_frames", "tx_ring_full",
                                       "tx_busy", "loop_batches", "loop_polls", "tx_send_errors")}
        out.update(
            ring_drop_fraction=d["ring_drops"] / d["ring_packets"] if d["ring_packets"] else 0.0,
            frames_per_batch=d["rx_frames"] / d["loop_batches"] if d["loop_batches"] else 0.0,
            window=d,
        )
        # every frame generated in this case, from the first (warm-up) to the drain
        offered = s2["gen"] - bed.case_gen0
        sock_saw = b2["ring_packets"] - bed.case_bal0["ring_packets"]
        dropped = {
            "veth_a_to_b": s2["a_tx_dropped"] - bed.case_a_drop0,
            "ring_drops": b2["ring_drops"] - bed.case_bal0["ring_drops"],
            "rx_oversize": b2["rx_oversize"] - bed.case_bal0["rx_oversize"],
            "not_tx": sum(b2[k] - bed.case_bal0[k] for k in b2 if k.startswith(("drop_", "pass_"))),
            "tx_ring_full": b2["tx_ring_full"] - bed.case_bal0["tx_ring_full"],
            "tx_oversize": b2["tx_oversize"] - bed.case_bal0["tx_oversize"],
            "tx_refused": sum(b2[k] - bed.case_bal0[k] for k in ("tx_busy", "tx_rejected")),
        }
        # B's tx_dropped: refused transmit attempts (the TX ring retries them; sendmmsg
        # counts them in tx_busy): reported, not part of the sum
        out["veth_b_refused_attempts"] = s2["b"].get("tx_dropped", 0) - bed.case_b0.get("tx_dropped", 0)
        sink = s2["sink"] - bed.case_sink0
        out.update(total_offered=offered, total_socket_saw=sock_saw, total_out=sink, total_dropped=dropped,
                   accounted=sink == offered - sum(dropped.values()),
                   unaccounted=offered - sum(dropped.values()) - sink)
    else:
        processed = b2["rx_packets"] - bed.case_bal0["rx_packets"]
        offered = s2["gen"] - bed.case_gen0
        a_drop = s2["a_tx_dropped"] - bed.case_a_drop0
        tx = (b2["tx_encap"] + b2["tx_icmp_echo_reply"]) - (bed.case_bal0["tx_encap"] + bed.case_bal0["tx_icmp_echo_reply"])
        sink = s2["sink"] - bed.case_sink0
        xdp_tx_lost = tx - sink
        out.update(total_offered=offered, total_out=sink, veth_a_to_b_dropped=a_drop,
                   total_processed=processed, xdp_tx_not_delivered=xdp_tx_lost,
                   accounted=processed == offered - a_drop,
                   ring_drop_fraction=None, frames_per_batch=None)
    return out


def mark_case_start(bed: Bed, bal: Any) -> None:
    s = bed.snapshot(bal)
    bed.case_gen0, bed.case_sink0 = s["gen"], s["sink"]
    bed.case_a_drop0, bed.case_b0, bed.case_bal0 = s["a_tx_dropped"], s["b"], s["bal"]


def in_memory_ns_per_packet(bed: Bed, batch: int) -> float:
    """process_batch alone on the same frames, ``batch`` frames per call (median of 5)."""
    dp = UserspaceDatapath(bed.tables)
    frames = np.zeros((FLOWS, 2048), dtype=np.uint8)
    base = np.frombuffer(bed.frame, dtype=np.uint8)
    for i in range(FLOWS):
        frames[i, :FRAME] = base
        sport = 10000 + i
        frames[i, 34], frames[i, 35] = sport >> 8, sport & 0xFF
    lens = np.full(FLOWS, FRAME, dtype=np.int64)
    idx = np.arange(batch) % FLOWS
    fb, lb = np.ascontiguousarray(frames[idx]), lens[idx]
    dp.process(fb, lb, now=1, deltas=False)
    out = []
    for _ in range(5):
        t0 = time.perf_counter_ns()
        reps = max(1, 200_000 // batch)
        for _ in range(reps):
            dp.process(fb, lb, now=1, deltas=False)
        out.append((time.perf_counter_ns() - t0) / (reps * batch))
    return statistics.median(out)


def one_case(bed: Bed, kind: str, tx_mode: str, bypass: bool, batch: int, b_threaded: bool,
             sink_threaded: bool, args: argparse.Namespace) -> dict[str, Any]:
    bal_cpu, gen_cpu = bed.bal_cpu, bed.gen_cpu
    if kind == "userspace":
        bed.set_napi(b_threaded, sink_threaded)
        t0 = time.perf_counter()
        bal: Any = UserspaceBalancer(bed.tables, bed.b.name, bed.bal_ns, batch, cpu=bal_cpu,
                                     tx_mode=tx_mode, qdisc_bypass=bypass)
        bal.start()
        start_s = time.perf_counter() - t0
        try:
            mark_case_start(bed, bal)
            r = run_case(bed, bal, args.seconds, args.warmup)
        finally:
            bal.stop()
    else:
        t0 = time.perf_counter()
        bal = XdpBalancer.from_tables(bed.tables)
        try:
            bal.attach(bed.b.name, "native", netns=bed.bal_ns.name)
            start_s = time.perf_counter() - t0
            bed.set_napi(b_threaded, sink_threaded)  # attaching XDP re-creates B's NAPI
            mark_case_start(bed, bal)
            r = run_case(bed, bal, args.seconds, args.warmup)
        finally:
            bal.close()
            bed.set_napi(False, False)
    # CPU time of what runs on the balancer's CPU for the balancer: the loop thread and
    # B's NAPI kthread when threaded (softirq work run elsewhere is not in it)
    share = (r["loop_cpu_share"] if kind == "userspace" else 0.0) + (r["napi_kthread_cpu_share"] or 0.0)
    r.update(datapath=kind, tx_mode=tx_mode, qdisc_bypass=bypass,
             batch=batch if kind == "userspace" else None,
             b_napi=f"kthread@{bal_cpu}" if b_threaded else "softirq",
             sink_napi=f"kthread@{gen_cpu}" if sink_threaded else "softirq",
             balancer_cpu_share=share,
             mpps_per_balancer_cpu=r["balancer_mpps"] / share if share else None,
             start_seconds=start_s)
    return r


def tx_cost(lab: Sandbox, gen_ns: Any, bal_ns: Any, bal_cpu: int, reps: int = 2000,
            batch: int = 256) -> list[dict[str, Any]]:
    """What sending costs, TX ring vs sendmmsg, qdisc bypass on/off: batches of 84-byte
    frames (the encapsulated 64-byte input) out of a veth end whose peer has no XDP and no
    NAPI, so the peer's receive (backlog, stack, drop: the frames are for nobody) runs in
    softirq on the sending CPU too. Wall time per frame on ``bal_cpu``, median of 3."""
    from lb.afpacket import PacketSocket

    _c, d = lab.veth(gen_ns, bal_ns, "lt", queues=1)
    frame = build_frame(4, "tcp", 84, dst="198.19.0.1", dport=80)
    outs = np.zeros((batch, 2048), dtype=np.uint8)
    outs[:, :len(frame)] = np.frombuffer(frame, dtype=np.uint8)
    lens = np.full(batch, len(frame), dtype=np.int64)
    acts = np.full(batch, 3, dtype=np.uint8)  # XDP_TX

    def one(tx_mode: str, bypass: bool) -> dict[str, Any]:
        ps = run_in_netns(bal_ns, PacketSocket, d.name, tx_mode=tx_mode, qdisc_bypass=bypass, rx=False)
        try:
            def body() -> list[float]:
                out = []
                for _ in range(3):
                    t0 = time.perf_counter_ns()
                    for _ in range(reps):
                        ps.flush(ps.queue(outs, lens, acts, batch))
                    out.append((time.perf_counter_ns() - t0) / (reps * batch))
                return out

            runs = run_in_netns(None, body, cpu=bal_cpu)
            st = ps.stats()
        finally:
            ps.close()
        return {"tx_mode": tx_mode, "qdisc_bypass": bypass, "ns_per_frame": statistics.median(runs),
                "runs": runs, "dropped": st["tx_ring_full"] + st["tx_busy"] + st["tx_rejected"]}

    return [one(m, b) for m in ("ring", "sendmmsg") for b in (True, False)]


def loadavg() -> list[float]:
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


# (label, datapath, tx_mode, qdisc_bypass, batch (0: --batch), B NAPI threaded, sink NAPI threaded)
MAIN_CASES = [
    # A: everything the balancer does on --bal-cpu (userspace: the loop and B's receive path
    # into the ring; XDP: B's NAPI), the generator and the sink on --gen-cpu
    ("userspace, TX ring", "userspace", "ring", True, 0, True, True),
    ("userspace, sendmmsg", "userspace", "sendmmsg", True, 0, True, True),
    ("XDP", "xdp", "-", False, 0, True, True),
    # B: as A, but the sink's NAPI runs on the balancer's CPU too (where its frames come from)
    ("userspace, TX ring", "userspace", "ring", True, 0, True, False),
    ("userspace, sendmmsg", "userspace", "sendmmsg", True, 0, True, False),
    ("XDP", "xdp", "-", False, 0, True, False),
]
EXTRA_CASES = [
    # C: the loop alone on --bal-cpu (B's receive path in softirq on the generator's CPU)
    ("userspace loop alone, TX ring", "userspace", "ring", True, 0, False, True),
    ("userspace loop alone, sendmmsg", "userspace", "sendmmsg", True, 0, False, True),
    ("userspace, TX ring, no qdisc bypass", "userspace", "ring", False, 0, True, True),
    ("userspace, TX ring, batch 64", "userspace", "ring", True, 64, True, True),
    ("userspace, TX ring, batch 1024", "userspace", "ring", True, 1024, True, True),
    ("XDP, all on the generator CPU", "xdp", "-", False, 0, False, False),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="where to write results (default bench/results/userspace_io.json)")
    ap.add_argument("--seconds", type=float, default=3.0, help="measuring window per case")
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=256, help="frames per datapath call")
    ap.add_argument("--gen-cpu", type=int, default=None)
    ap.add_argument("--bal-cpu", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="only the six main cases")
    ap.add_argument("--reps", type=int, default=3, help="runs per case (the median run is reported)")
    ap.add_argument("--nice", type=int, default=0,
                    help="nice value for every thread of the benchmark (generator, loop, NAPI "
                         "kthreads); negative values take CPU time from other work on a shared machine")
    args = ap.parse_args(argv)
    if args.nice:
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)  # threads made from now on inherit it

    cpus = sorted(os.sched_getaffinity(0))
    gen_cpu = cpus[0] if args.gen_cpu is None else args.gen_cpu
    bal_cpu = (cpus[1] if len(cpus) > 1 else cpus[0]) if args.bal_cpu is None else args.bal_cpu
    os.sched_setaffinity(0, {gen_cpu})  # this thread (sampling) stays off the balancer's CPU
    cases = MAIN_CASES + ([] if args.quick else EXTRA_CASES)

    load_before = loadavg()
    results: list[dict[str, Any]] = []
    gen = PacketGenerator()
    try:
        with Sandbox() as lab:
            bed = Bed(lab, gen, gen_cpu, bal_cpu)
            mem_ns = in_memory_ns_per_packet(bed, args.batch)
            print(f"process_batch in memory, batches of {args.batch}: {mem_ns:.0f} ns/packet "
                  f"({1e3 / mem_ns:.2f} Mpps); load average {load_before}", flush=True)
            tx = tx_cost(lab, bed.gen_ns, bed.bal_ns, bal_cpu)
            for t in tx:
                print(f"  send + peer receive, {t['tx_mode']:8} qdisc bypass {'on ' if t['qdisc_bypass'] else 'off'}: "
                      f"{t['ns_per_frame']:.0f} ns/frame (runs {[round(x) for x in t['runs']]}, "
                      f"dropped {t['dropped']})", flush=True)
            for label, kind, tx_mode, bypass, batch, b_threaded, sink_threaded in cases:
                batch = batch or args.batch
                runs = [one_case(bed, kind, tx_mode, bypass, batch, b_threaded, sink_threaded, args)
                        for _ in range(args.reps)]
                runs.sort(key=lambda x: x["mpps_per_balancer_cpu"] or x["balancer_mpps"])
                r = runs[len(runs) // 2]
                r["reps"] = [{k: x[k] for k in ("balancer_mpps", "out_mpps", "balancer_cpu_share",
                                                 "mpps_per_balancer_cpu", "accounted")} for x in runs]
                r["accounted"] = all(x["accounted"] for x in runs)
                r["case"] = label
                results.append(r)
                share = r["balancer_cpu_share"]
                print(f"  {label:36} B {r['b_napi']:10} sink {r['sink_napi']:10} offered {r['offered_mpps']:.2f} "
                      f"balancer {r['balancer_mpps']:.3f} out {r['out_mpps']:.3f} Mpps, "
                      f"balancer CPU {share or 0:.0%}, accounted={r['accounted']}", flush=True)
    finally:
        gen.close()
    load_after = loadavg()

    def xdp_ref(r: dict[str, Any]) -> dict[str, Any] | None:
        return next((x for x in results if x["datapath"] == "xdp" and x["b_napi"] == r["b_napi"]
                     and x["sink_napi"] == r["sink_napi"]), None)

    rows = []
    for r in results:
        us = r["datapath"] == "userspace"
        ref = xdp_ref(r)
        ratio = ratio_cpu = "-"
        if ref is not None:
            ratio = f"{r['balancer_mpps'] / ref['balancer_mpps']:.2f}"
            if r["mpps_per_balancer_cpu"] and ref["mpps_per_balancer_cpu"]:
                ratio_cpu = f"{r['mpps_per_balancer_cpu'] / ref['mpps_per_balancer_cpu']:.2f}"
        where = (f"loop@{bal_cpu}, " if us else "") + f"B {r['b_napi']}, sink {r['sink_napi']}"
        rows.append([
            r["case"], where, f"{r['offered_mpps']:.2f}", f"{r['balancer_mpps']:.3f}",
            f"{r['out_mpps']:.3f}", f"{r['ring_drop_fraction']:.0%}" if us else "-",
            f"{r['balancer_cpu_share']:.0%}" if r["balancer_cpu_share"] else "-",
            f"{r['mpps_per_balancer_cpu']:.2f}" if r["mpps_per_balancer_cpu"] else "-",
            ratio, ratio_cpu, "yes" if r["accounted"] else f"NO ({r.get('unaccounted')})",
        ])
    os.environ.setdefault("COLUMNS", "230")  # rich: a wide table even when not on a terminal
    report(
        f"userspace datapath (AF_PACKET TPACKET_V3) vs XDP, veth on a stick: 64-byte TCP v4, "
        f"{FLOWS} flows; generator CPU {gen_cpu}, balancer CPU {bal_cpu}; load average "
        f"{load_before} -> {load_after} (shared machine)",
        ["case", "balancer / sink placement", "offered Mpps", "balancer Mpps", "out Mpps",
         "ring drops", "balancer CPU", "Mpps per balancer CPU", "vs XDP", "vs XDP per CPU", "accounted"],
        rows,
        {"benchmark": "userspace_io", "frame_bytes": FRAME, "flows": FLOWS, "gen_cpu": gen_cpu,
         "bal_cpu": bal_cpu, "in_memory_ns_per_packet": mem_ns, "batch": args.batch,
         "seconds": args.seconds, "reps": args.reps, "nice": args.nice, "tx_cost": tx,
         "loadavg_before": load_before, "loadavg_after": load_after,
         "results": results},
        args.json, "userspace_io.json",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
