"""Live-frames generator throughput, and the no-balancer harness the balancer benchmark
compares against.

Run: ``.venv/bin/python -m bench.bench_pktgen [--json PATH]`` (root). Topology, built
fresh and torn down by :class:`netns.ns.Sandbox`::

    netns gen: [pktgen.c via BPF_PROG_TEST_RUN live frames, thread pinned to --gen-cpu]
                  |  XDP_TX out of veth end A (ingress_ifindex)
    netns sink:   veth end B: xdp/sink.c (counts, XDP_DROP)

Paths measured (64-byte frames by default (IPv6+TCP: 74, its headers), UDP/TCP over
IPv4/IPv6, 1 and 1000 flows):
  gen->drop  the generator alone: template rewrite + flow variation, XDP_DROP, no veth;
  gen->tx    (i) generator -> XDP_TX -> veth -> sink;
  gen->stub  (ii) generator -> tail call into pktgen_tx_stub (what the balancer's output
             stage does: MAC rewrite, a per-CPU counter, XDP_TX) -> veth -> sink.
each with the sink's threaded NAPI off (its XDP then runs in softirq on the generator's
CPU: the two share a core) and on (NAPI kthread pinned to --napi-cpu). Where the work
ran is read back, not assumed: the generator's and the sink's per-CPU counters.

"Mpps" is frames generated per second of wall time in the generating thread (median of
--reps runs); "delivered" is what the sink counted per second of the same time; "lost"
are frames the veth dropped (its peer ring was full: the sink was slower), which the
veth's tx_dropped counter accounts for ("accounted": sink + tx_dropped == generated).
"kthread CPU" is the CPU time the sink's NAPI kthread got during a run / the run's wall
time: on a shared machine it tells a starved sink from a slow one.

The harness (:class:`Testbed`) is importable: the balancer benchmark builds the same
testbed and attaches the balancer with ``bed.gen.attach_tail_call(fd)``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.common import cpu_model, loadavg
from lb.pktgen import PacketGenerator, Sink, build_frame
from netns.ns import Netns, Sandbox, napi_thread_cpu

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "pktgen.json"
PATHS = ("gen->drop", "gen->tx", "gen->stub")






class Testbed:
    """gen netns --veth--> sink netns, generator and sink loaded. Use as a context manager
    (everything is torn down on exit). ``gen`` may be shared between testbeds."""

    def __init__(self, gen: PacketGenerator | None = None, *, gen_cpu: int = 0,
                 napi_cpu: int | None = None, sink_key: str = "none"):
        self.gen = gen or PacketGenerator()
        self.gen_cpu = gen_cpu
        self.napi_cpu = napi_cpu
        self.sink_key = sink_key
        self.lab = Sandbox()
        self.sink: Sink | None = None
        self.napi_pids: list[int] = []

    def __enter__(self) -> Testbed:
        try:
            self.gen_ns: Netns = self.lab.netns("pgg")
            self.sink_ns: Netns = self.lab.netns("pgs")
            # 1 queue: the sink device has exactly one NAPI instance (one kthread if threaded)
            self.a, self.b = self.lab.veth(self.gen_ns, self.sink_ns, "pg", queues=1)
            self.sink = Sink(self.b.name, self.b.ns, key=self.sink_key)
            self.lab.on_teardown(self.sink.close)
        except BaseException:
            self.lab.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.lab.close()

    def set_threaded(self, on: bool) -> None:
        """Threaded NAPI on the sink end; when on, its kthread(s) go to napi_cpu."""
        self.b.set_threaded(on)
        self.napi_pids = []
        if on and self.napi_cpu is not None:
            self.napi_pids = self.b.pin_napi({self.napi_cpu})

    def frame(self, family: int, proto: str, size: int, *, to_stub: bool = False) -> bytes:
        # gen->tx: as sent by A to B. gen->stub: as received by A (the balancer's input);
        # the stub rewrites the MACs to A -> B.
        # IPv6 + TCP needs 74 bytes: smaller sizes are raised to the headers' length
        size = max(size, 74 if (family, proto) == (6, "tcp") else 0)
        a_mac, b_mac = self.a.mac_bytes, self.b.mac_bytes
        if to_stub:
            return build_frame(family, proto, size, src_mac=bytes.fromhex("02000000c1e7"), dst_mac=a_mac)
        return build_frame(family, proto, size, src_mac=a_mac, dst_mac=b_mac)

    def measure(self, count: int, reps: int = 3, warmup: int = 200_000) -> dict[str, Any]:
        """Run the generator ``reps`` times (current template/action); summary dict."""
        assert self.sink is not None
        self.gen.run(min(warmup, count), self.a.index, netns=self.gen_ns, cpu=self.gen_cpu)
        runs = []
        napi_busy: list[float] = []
        for _ in range(reps):
            self.sink.reset()
            drop0 = self.a.stats().get("tx_dropped", 0)
            napi0 = {p: task_cpu_seconds(p) for p in self.napi_pids}
            r = self.gen.run(count, self.a.index, netns=self.gen_ns, cpu=self.gen_cpu)
            # let the sink drain the veth ring (<= 256 frames; its kthread may be waiting
            # for a CPU that other work holds)
            deadline = time.monotonic() + 2.0
            while True:
                c = self.sink.counts()
                dropped = self.a.stats().get("tx_dropped", 0) - drop0
                if c.packets + dropped >= r.packets or time.monotonic() > deadline:
                    break
                time.sleep(0.01)
            napi_busy.append(sum(task_cpu_seconds(p) - t for p, t in napi0.items()) / r.seconds)
            runs.append((r, c, dropped))
        mpps = [r.mpps for r, _, _ in runs]
        delivered = [c.packets / r.seconds / 1e6 for r, c, _ in runs]
        gen_cpus = sorted({cpu for r, _, _ in runs for cpu in r.cpus})
        sink_cpus = sorted({cpu for _, c, _ in runs for cpu in c.per_cpu})
        last_r, last_c, last_d = runs[-1]
        return {
            "frames_per_run": count,
            "reps": reps,
            "mpps_median": statistics.median(mpps),
            "mpps_best": max(mpps),
            "mpps_runs": mpps,
            "kernel_ns_per_frame_median": statistics.median(r.kernel_ns_per_frame for r, _, _ in runs),
            "delivered_mpps_median": statistics.median(delivered),
            "sink_packets_last": last_c.packets,
            "veth_dropped_last": last_d,
            "lost_fraction_median": statistics.median(1 - c.packets / r.packets for r, c, _ in runs),
            "accounted": all(c.packets + d == r.packets for r, c, d in runs),
            "unaccounted_runs": [r.packets - c.packets - d for r, c, d in runs],
            # CPU time the sink's NAPI kthread got / generating wall time (threaded only):
            # well below 1 with loss means it was waiting for its CPU (other work there)
            "napi_kthread_cpu_share_median": statistics.median(napi_busy) if self.napi_pids else None,
            "gen_cpus": gen_cpus,
            "sink_cpus": sink_cpus,
            "sink_per_cpu_last": {str(k): v for k, v in last_c.per_cpu.items()},
            "napi_threads": [{"pid": p, "cpu_last_ran": napi_thread_cpu(p),
                              "affinity": sorted(os.sched_getaffinity(p))} for p in self.napi_pids],
            "setup_ms_median": statistics.median(r.setup_seconds for r, _, _ in runs) * 1e3,
        }


def task_cpu_seconds(pid: int) -> float:
    """Time a task has spent on a CPU (/proc/<pid>/schedstat, ns resolution), seconds."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


def netns_entry_overhead(ns: Netns, reps: int = 5) -> dict[str, float]:
    """What entering the generator's namespace costs: a thread + setns (what
    PacketGenerator.run does) against a subprocess through ``ip netns exec``."""
    from lb.kernel.netns import run_in_netns

    def t(fn) -> float:
        xs = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            xs.append(time.perf_counter() - t0)
        return statistics.median(xs) * 1e3

    return {
        "thread_setns_ms": t(lambda: run_in_netns(ns, lambda: None)),
        "ip_netns_exec_true_ms": t(lambda: subprocess.run(["ip", "netns", "exec", ns.name, "true"], check=True)),
        "ip_netns_exec_python_ms": t(lambda: subprocess.run(
            ["ip", "netns", "exec", ns.name, "/usr/bin/python3", "-c", "pass"], check=True)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write results")
    ap.add_argument("--count", type=int, default=3_000_000, help="frames per run")
    ap.add_argument("--reps", type=int, default=3, help="runs per case (median reported)")
    ap.add_argument("--size", type=int, default=64, help="frame size, 64..1514")
    ap.add_argument("--flows", type=int, nargs="+", default=[1, 1000])
    ap.add_argument("--gen-cpu", type=int, default=0, help="CPU the generator thread is pinned to")
    ap.add_argument("--napi-cpu", type=int, default=None,
                    help="CPU for the sink's NAPI kthread when threaded (default: another CPU)")
    ap.add_argument("--quick", action="store_true", help="IPv4/IPv6 UDP only, 1 rep")
    args = ap.parse_args(argv)

    cpus = sorted(os.sched_getaffinity(0))
    napi_cpu = args.napi_cpu
    if napi_cpu is None:
        others = [c for c in cpus if c != args.gen_cpu]
        napi_cpu = others[0] if others else args.gen_cpu
    reps = 1 if args.quick else args.reps
    protos = ("udp",) if args.quick else ("udp", "tcp")

    console = Console(width=max(170, shutil.get_terminal_size().columns))  # never truncate
    load_before = loadavg()
    console.print(f"CPU: {cpu_model()}, {os.cpu_count()} CPUs; generator thread pinned to CPU "
                  f"{args.gen_cpu}; threaded NAPI kthread pinned to CPU {napi_cpu}; "
                  f"load average {load_before}")
    rows: list[dict[str, Any]] = []
    gen = PacketGenerator()
    try:
        with Testbed(gen, gen_cpu=args.gen_cpu, napi_cpu=napi_cpu) as bed:
            overhead = netns_entry_overhead(bed.gen_ns)
            stub_fd = gen.configure_tx_stub(bed.b.mac_bytes)
            for path in PATHS:
                for threaded in ((False,) if path == "gen->drop" else (False, True)):
                    bed.set_threaded(threaded)
                    for family in (4, 6):
                        for proto in protos:
                            for flows in args.flows:
                                frame = bed.frame(family, proto, args.size, to_stub=path == "gen->stub")
                                gen.set_template(frame, flows=flows, vary="src_port")
                                if path == "gen->stub":
                                    gen.attach_tail_call(stub_fd)
                                else:
                                    gen.detach_tail_call()
                                    gen.set_action("drop" if path == "gen->drop" else "tx")
                                m = bed.measure(args.count, reps)
                                row = {"path": path, "family": family, "proto": proto,
                                       "size": len(frame), "flows": flows,
                                       "threaded_napi": threaded if path != "gen->drop" else None, **m}
                                rows.append(row)
                                console.print(f"  {path:9} v{family} {proto} {flows:5} flows "
                                              f"threaded={threaded!s:5} {m['mpps_median']:.2f} Mpps "
                                              f"gen cpu {m['gen_cpus']} sink cpu {m['sink_cpus']}")
            gen.detach_tail_call()
            bed.set_threaded(False)
    finally:
        gen.close()
    load_after = loadavg()

    table = Table(title=f"XDP live-frames generator, {args.size}-byte frames, "
                        f"{args.count:,} frames x {reps} runs (median)")
    for col in ("path", "fam", "L4", "bytes", "flows", "sink NAPI", "gen CPU", "sink CPU",
                "gen Mpps", "best", "kernel ns/frame", "delivered Mpps", "lost", "accounted",
                "kthread CPU"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in rows:
        if r["path"] == "gen->drop":
            napi, sink_cpu, delivered, lost, acc, share = "-", "-", "-", "-", "-", "-"
        else:
            napi = f"kthread@{napi_cpu}" if r["threaded_napi"] else "softirq"
            sink_cpu = ",".join(map(str, r["sink_cpus"]))
            delivered = f"{r['delivered_mpps_median']:.2f}"
            lost = f"{r['lost_fraction_median'] * 100:.1f}%"
            acc = "yes" if r["accounted"] else f"NO ({max(r['unaccounted_runs'])})"
            share = "-" if r["napi_kthread_cpu_share_median"] is None else \
                f"{r['napi_kthread_cpu_share_median'] * 100:.0f}%"
        table.add_row(r["path"], f"v{r['family']}", r["proto"], str(r["size"]), str(r["flows"]), napi,
                      ",".join(map(str, r["gen_cpus"])), sink_cpu, f"{r['mpps_median']:.2f}",
                      f"{r['mpps_best']:.2f}", f"{r['kernel_ns_per_frame_median']:.0f}",
                      delivered, lost, acc, share)
    console.print(table)
    console.print(f"entering the generator netns: thread+setns {overhead['thread_setns_ms']:.2f} ms, "
                  f"'ip netns exec true' {overhead['ip_netns_exec_true_ms']:.1f} ms, "
                  f"'ip netns exec python3 -c pass' {overhead['ip_netns_exec_python_ms']:.1f} ms")
    console.print(f"load average before {load_before}, after {load_after} (other work on this "
                  "machine shares its CPUs)")

    result = {
        "benchmark": "pktgen_live_frames",
        "kernel": platform.release(),
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        "gen_cpu": args.gen_cpu,
        "napi_cpu_when_threaded": napi_cpu,
        "veth_queues": 1,
        "frame_size": args.size,
        "frames_per_run": args.count,
        "reps": reps,
        "vary": "src_port",
        "batch_size": "kernel default (64)",
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "netns_entry_overhead_ms": overhead,
        "results": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
