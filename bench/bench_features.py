"""What each datapath feature costs per packet, in both datapaths, side by side in one run.

Run (root): ``.venv/bin/python -m bench.bench_features [--json PATH] [--frames N] [--reps N]``

Each feature is measured against a baseline that differs only in that feature, on the
same flows (1,000 flows: the source port varies), IPv4 and IPv6:

=============  ===========================================  ===============================
feature        measured frames                              baseline
=============  ===========================================  ===============================
quic_routed    QUIC VIP, short header, DCID names a server  plain UDP VIP (conn-table hits)
src_routed     src_routing + lru_bypass VIP: an LPM hit     lru_bypass UDP VIP (ring)
               on every packet (hits in the connection
               table never look the table up)
src_miss       the same VIP, clients outside every          lru_bypass UDP VIP (ring)
               prefix: an LPM miss, then the ring
gue            plain UDP VIP, ``encap: gue``                the same frames, ``encap: ipip``
mtu_check      plain UDP VIP, ``mtu: 1500`` (frames fit)    the same frames, no ``mtu``
icmp_too_big   1514-byte frames (IPv4 with DF), ``mtu:      the same frames encapsulated
               1400``: an ICMP too-big goes back            (no ``mtu``)
=============  ===========================================  ===============================

XDP: the live-frames generator (xdp/pktgen.c) tail-calls the balancer, which XDP_TXes out
of a veth (MTU 1600) to a counting sink in another namespace: bench_xdp's harness (a).
Figures are the kernel's own BPF_PROG_TEST_RUN time per frame on --gen-cpu (generator,
balancer and the sink's NAPI in softirq all run there). Feature and baseline runs are
interleaved, ``--reps`` each. Single runs swing by up to ~150 ns when other work lands
on the generating CPU, so the table shows each side's best (lowest) run and "added" =
the median over reps of (feature run - the baseline run just after it): pairing cancels
slow drifts, the median the outliers. Expect +-15 ns between runs of this script: a
feature within that costs nothing measurable here.
Userspace: lb/datapath.py on the same frames, batches of 65,536, best of 15 passes, pinned
to --other-cpu.

Every namespace and veth is named ``lbf<random hex>`` and torn down on exit; traffic
stays inside them (198.18.0.0/15, 2001:db8::/32).
"""

from __future__ import annotations

import argparse
import os
import statistics
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.bench_datapath import time_batches
from bench.common import cpu_model, loadavg, report
from lb.config import parse_config
from lb.datapath_tables import compile_tables
from lb.pktgen import MAX_FRAME, PacketGenerator, Sink, build_frame
from netns.quic import encode_cid, short_packet

FLOWS = 1000
SPORT0 = 20000
SRC = {4: "198.18.0.1", 6: "2001:db8:1::1"}
OTHER_SRC = {4: "198.18.1.1", 6: "2001:db8:2::1"}  # outside ROUTED_PREFIX
ROUTED_PREFIX = {4: "198.18.0.0/24", 6: "2001:db8:1::/64"}  # covers every source above
VIP = {  # (family, kind) -> address; one UDP VIP per kind
    (4, "plain"): "198.19.210.1", (4, "quic"): "198.19.210.2",
    (4, "bypass"): "198.19.210.3", (4, "srcroute"): "198.19.210.4",
    (6, "plain"): "2001:db8:210::1", (6, "quic"): "2001:db8:210::2",
    (6, "bypass"): "2001:db8:210::3", (6, "srcroute"): "2001:db8:210::4",
}
FLAGS = {"plain": [], "quic": ["quic"], "bypass": ["lru_bypass"], "srcroute": ["src_routing", "lru_bypass"]}
REALS = {4: [f"198.19.250.{i + 1}" for i in range(100)],
         6: [f"2001:db8:300::{i + 1:x}" for i in range(100)]}
DPORT = 443
SERVER_ID = 0x1234
SMALL = 80  # bytes: room for a short header + 8-byte DCID in IPv6 too
BIG = MAX_FRAME  # 1514
GEN_SRC_MAC = bytes.fromhex("02000000c1e7")


def config(gateway_mac: str, encap: str = "ipip", mtu: int | None = None):
    """Every feature's VIPs in one config; ``encap``/``mtu`` are the global settings."""
    vips = [{"address": addr, "port": DPORT, "protocol": "udp", "flags": FLAGS[kind],
             "reals": [{"address": r} for r in REALS[fam]]}
            for (fam, kind), addr in VIP.items()]
    settings: dict[str, Any] = {"gateway_mac": gateway_mac, "conn_table_size": 65536, "encap": encap,
                                "gue": {"source_v4": "198.18.255.254", "source_v6": "2001:db8:ffff::fe"}}
    if mtu:
        settings["mtu"] = mtu
    return parse_config({
        "settings": settings, "vips": vips,
        "quic_servers": [{"id": SERVER_ID, "real": REALS[4][7]}, {"id": SERVER_ID + 1, "real": REALS[6][7]}],
        "source_routes": [{"prefix": ROUTED_PREFIX[4], "real": REALS[4][3]},
                          {"prefix": ROUTED_PREFIX[6], "real": REALS[6][3]}],
    })


def frame(family: int, kind: str, size: int, dst_mac: bytes, other_src: bool = False) -> bytes:
    """The template of a flow mix: UDP to the ``kind`` VIP (from OTHER_SRC if
    ``other_src``); QUIC VIPs get a short-header packet whose DCID carries the server id;
    IPv4 frames have DF set."""
    src = (OTHER_SRC if other_src else SRC)[family]
    f = bytearray(build_frame(family, "udp", size, src=src, dst=VIP[(family, kind)],
                              sport=SPORT0, dport=DPORT, src_mac=GEN_SRC_MAC, dst_mac=dst_mac))
    l4 = 14 + (20 if family == 4 else 40)
    if kind == "quic":
        sid = SERVER_ID if family == 4 else SERVER_ID + 1
        q = short_packet(encode_cid(sid, rand=bytes(8)), b"")
        f[l4 + 8:l4 + 8 + len(q)] = q
    if family == 4:
        f[14 + 6] |= 0x40  # DF
    return bytes(f)  # PacketGenerator.set_template recomputes the checksums


def user_frames(tmpl: bytes) -> tuple[np.ndarray, np.ndarray]:
    """FLOWS copies of ``tmpl`` with source ports SPORT0 + i (as the generator makes them)."""
    family = 4 if tmpl[12:14] == b"\x08\x00" else 6
    sport_off = 14 + (20 if family == 4 else 40)
    out = np.tile(np.frombuffer(tmpl, dtype=np.uint8), (FLOWS, 1))
    ports = SPORT0 + np.arange(FLOWS)
    out[:, sport_off] = ports >> 8
    out[:, sport_off + 1] = ports & 0xFF
    return out, np.full(FLOWS, len(tmpl), dtype=np.int64)


@dataclass(frozen=True)
class Case:
    feature: str
    kind: str  # VIP kind of the measured frames
    base_kind: str  # ... and of the baseline's
    size: int
    setting: str  # which balancer runs the feature: "base", "gue", "mtu1500", "mtu1400"
    base_setting: str = "base"
    other_src: bool = False  # both sides' clients outside the source-route prefixes


CASES = (
    Case("quic_routed", "quic", "plain", SMALL, "base"),
    Case("src_routed", "srcroute", "bypass", SMALL, "base"),
    Case("src_miss", "srcroute", "bypass", SMALL, "base", other_src=True),
    Case("gue", "plain", "plain", SMALL, "gue"),
    Case("mtu_check", "plain", "plain", SMALL, "mtu1500"),
    Case("icmp_too_big", "plain", "plain", BIG, "mtu1400"),
)
SETTINGS = {"base": {}, "gue": {"encap": "gue"}, "mtu1500": {"mtu": 1500}, "mtu1400": {"mtu": 1400}}
EXPECT = {  # the counter every measured frame must bump (checked: a wrong path is no figure)
    "quic_routed": "quic_routed", "src_routed": "src_routed", "src_miss": "tx_encap", "gue": "tx_encap",
    "mtu_check": "tx_encap", "icmp_too_big": "tx_icmp_too_big",
}


class XdpBed:
    """Generator namespace + veth (MTU 1600, one queue) + sink namespace, and one
    balancer per setting; torn down on exit."""

    def __init__(self, gen_cpu: int) -> None:
        from lb.bpf_loader import XdpBalancer
        from netns.ns import Sandbox

        self.gen_cpu = gen_cpu
        self.lab = Sandbox()
        self.gen = None
        self.bals: dict[str, Any] = {}
        try:
            self.gen_ns = self.lab.netns("lbfg")
            sink_ns = self.lab.netns("lbfs")
            self.a, self.b = self.lab.veth(self.gen_ns, sink_ns, "lf", queues=1, mtu=1600)
            self.sink = Sink(self.b.name, self.b.ns)
            self.lab.on_teardown(self.sink.close)
            self.gen = PacketGenerator()
            for name, extra in SETTINGS.items():
                self.bals[name] = XdpBalancer.from_tables(compile_tables(config(self.b.mac, **extra)))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for b in self.bals.values():
            b.close()
        self.bals.clear()
        if self.gen is not None:
            self.gen.close()
            self.gen = None
        self.lab.close()

    def run(self, setting: str, tmpl: bytes, count: int) -> tuple[float, dict[str, int]]:
        """``count`` frames of the mix through balancer ``setting``: kernel ns/frame and
        the balancer's counter deltas."""
        bal = self.bals[setting]
        before = bal.read_stats().counters
        self.gen.set_template(tmpl, flows=FLOWS, vary="src_port")
        self.gen.attach_tail_call(bal.prog_fd)
        r = self.gen.run(count, self.a.index, netns=self.gen_ns, cpu=self.gen_cpu)
        if r.tail_missed:
            raise RuntimeError(f"{r.tail_missed} tail calls failed")
        after = bal.read_stats().counters
        return r.kernel_ns_per_frame, {k: after[k] - before[k] for k in after}


def measure_xdp(bed: XdpBed, case: Case, family: int, frames: int, reps: int) -> dict[str, Any]:
    tmpl = frame(family, case.kind, case.size, bed.a.mac_bytes, case.other_src)
    base = frame(family, case.base_kind, case.size, bed.a.mac_bytes, case.other_src)
    for setting, t in ((case.setting, tmpl), (case.base_setting, base)):
        bed.run(setting, t, max(FLOWS, 20_000))  # warm: fills the connection tables
    feat, basel = [], []
    for _ in range(reps):
        ns, delta = bed.run(case.setting, tmpl, frames)
        if delta[EXPECT[case.feature]] != frames:
            raise RuntimeError(f"{case.feature} v{family}: {EXPECT[case.feature]} counted "
                               f"{delta[EXPECT[case.feature]]} of {frames} frames: {delta}")
        feat.append(ns)
        basel.append(bed.run(case.base_setting, base, frames)[0])
    return {"feature_ns": min(feat), "baseline_ns": min(basel),
            "added_ns": statistics.median(f - b for f, b in zip(feat, basel)),
            "feature_median_ns": statistics.median(feat), "baseline_median_ns": statistics.median(basel),
            "feature_runs": feat, "baseline_runs": basel}


def measure_user(case: Case, family: int, repeat: int) -> dict[str, Any]:
    from lb.datapath import UserspaceDatapath

    mac = bytes.fromhex("020000000001")
    out = {}
    for label, setting, kind in (("feature_ns", case.setting, case.kind),
                                 ("baseline_ns", case.base_setting, case.base_kind)):
        dp = UserspaceDatapath(compile_tables(config("02:00:00:00:00:fe", **SETTINGS[setting])))
        frames, lens = user_frames(frame(family, kind, case.size, mac, case.other_src))
        dp.process(frames, lens, now=1)  # warm: connection table and numba
        if label == "feature_ns":
            counted = dp.process(frames, lens, now=1).stats
            from lb import constants as C

            if counted[C.STAT_INDEX[EXPECT[case.feature]]] != FLOWS:
                raise RuntimeError(f"userspace {case.feature} v{family}: not every frame took the path")
        out[label] = time_batches(dp, frames, lens, repeat)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None, help="where to write results (default bench/results/features.json)")
    ap.add_argument("--frames", type=int, default=1_000_000, help="frames per XDP run")
    ap.add_argument("--reps", type=int, default=15, help="interleaved XDP runs per side")
    ap.add_argument("--gen-cpu", type=int, default=0)
    ap.add_argument("--other-cpu", type=int, default=1)
    ap.add_argument("--user-repeat", type=int, default=15, help="userspace passes per side (best)")
    ap.add_argument("--no-xdp", action="store_true", help="userspace only (no root needed)")
    args = ap.parse_args(argv)

    rows, results = [], []
    load0 = loadavg()
    bed = None if args.no_xdp else XdpBed(args.gen_cpu)
    try:
        for case in CASES:
            for family in (4, 6):
                res: dict[str, Any] = {"feature": case.feature, "family": family}
                if bed is not None:
                    res["xdp"] = measure_xdp(bed, case, family, args.frames, args.reps)
                results.append(res)
    finally:
        if bed is not None:
            bed.close()
    affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {args.other_cpu})
    try:
        for res, (case, family) in zip(results, [(c, f) for c in CASES for f in (4, 6)]):
            res["userspace"] = measure_user(case, family, repeat=args.user_repeat)
    finally:
        os.sched_setaffinity(0, affinity)
    for res, (case, family) in zip(results, [(c, f) for c in CASES for f in (4, 6)]):
        x, u = res.get("xdp"), res["userspace"]
        rows.append([case.feature, f"v{family}",
                     f"{x['baseline_ns']:.1f}" if x else "-", f"{x['feature_ns']:.1f}" if x else "-",
                     f"{x['added_ns']:+.1f}" if x else "-",
                     f"{u['baseline_ns']:.1f}", f"{u['feature_ns']:.1f}",
                     f"{u['feature_ns'] - u['baseline_ns']:+.1f}"])
    data = {"flows": FLOWS, "frames": args.frames, "reps": args.reps, "gen_cpu": args.gen_cpu,
            "userspace_cpu": args.other_cpu, "cpu_model": cpu_model(), "load_before": load0,
            "load_after": loadavg(), "results": results}
    report(f"Per-feature cost, ns/packet ({FLOWS} flows; XDP on CPU {args.gen_cpu}, "
           f"userspace on CPU {args.other_cpu})",
           ["feature", "family", "XDP base", "XDP feature", "XDP added",
            "user base", "user feature", "user added"], rows, data, args.json, "features.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
