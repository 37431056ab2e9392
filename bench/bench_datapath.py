"""Userspace datapath cost: ns per packet for batches of 64-byte TCP frames.

Run: .venv/bin/python -m bench.bench_datapath [--json PATH] [--flows 1000,1000000]
Pinned to one CPU (printed). Frames go in batches of 65,536 (cycling over the flows when
there are fewer). Paths measured, per flow count:
  hit   ACK frames of flows already in the connection table
  miss  SYN frames: always hashed (flow hash + ring lookup + table insert)
  bypass  ACK frames to an lru_bypass VIP: hash + ring, no table
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.packet import raw

from bench.common import pin_to_cpu, report
from lb.config import parse_config
from lb.datapath import UserspaceDatapath
from lb.datapath_tables import compile_tables

FRAME = 64


def make_frames(n_flows: int, vip: str, flags: str) -> tuple[np.ndarray, np.ndarray]:
    """n_flows distinct 64-byte TCP frames (source address x port vary)."""
    tmpl = np.frombuffer(
        raw(Ether(dst="02:00:00:00:00:01", src="02:00:00:00:00:02")
            / IP(src="198.18.0.0", dst=vip) / TCP(sport=1024, dport=80, flags=flags)).ljust(FRAME, b"\0"),
        dtype=np.uint8,
    )
    frames = np.tile(tmpl, (n_flows, 1))
    i = np.arange(n_flows, dtype=np.int64)
    host = i // 50000  # 50k ports per source address
    port = 1024 + (i % 50000)
    # source 198.18.0.0 + host (bytes 26..29; the datapath does not check the IP checksum)
    frames[:, 27] = 18 + ((host >> 16) & 0x1)
    frames[:, 28] = (host >> 8) & 0xFF
    frames[:, 29] = host & 0xFF
    frames[:, 34] = port >> 8
    frames[:, 35] = port & 0xFF
    return frames, np.full(n_flows, FRAME, dtype=np.int64)


BATCH = 65536


def time_batches(dp: UserspaceDatapath, frames: np.ndarray, lens: np.ndarray, repeat: int) -> float:
    """Best ns/packet over ``repeat`` passes over all frames, in batches of BATCH frames."""
    best = float("inf")
    n = len(frames)
    for _ in range(repeat):
        t0 = time.perf_counter_ns()
        done = 0
        while done < max(n, BATCH):
            idx = np.arange(done, done + BATCH) % n
            dp.process(frames[idx] if n < BATCH else frames[done:done + BATCH],
                       lens[idx] if n < BATCH else lens[done:done + BATCH], now=1, deltas=False)
            done += BATCH
        best = min(best, (time.perf_counter_ns() - t0) / max(n, BATCH))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="where to write the JSON (default bench/results/datapath.json)")
    ap.add_argument("--flows", default="1000,1000000", help="comma-separated flow counts")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    cpu = pin_to_cpu()
    cfg = parse_config({
        "settings": {"gateway_mac": "02:00:00:00:00:fe", "conn_table_size": 1 << 22},
        "vips": [
            {"address": "198.18.100.1", "port": 80, "protocol": "tcp",
             "reals": [{"address": f"198.19.{i // 250}.{i % 250 + 1}"} for i in range(100)]},
            {"address": "198.18.100.2", "port": 80, "protocol": "tcp", "flags": ["lru_bypass"],
             "reals": [{"address": f"198.19.{i // 250}.{i % 250 + 1}"} for i in range(100)]},
        ],
    })
    tables = compile_tables(cfg)
    rows, results = [], []
    for n in [int(x) for x in args.flows.split(",")]:
        dp = UserspaceDatapath(tables)
        syn, lens = make_frames(n, "198.18.100.1", "S")
        ack, _ = make_frames(n, "198.18.100.1", "A")
        byp, _ = make_frames(n, "198.18.100.2", "A")
        dp.process(syn[: min(n, 1000)], lens[: min(n, 1000)], now=1)  # JIT warm-up
        miss = time_batches(dp, syn, lens, args.repeat)
        r = dp.process(ack, lens, now=1)
        hit_ratio = float(r.stats[12]) / n  # lru_hit
        hit = time_batches(dp, ack, lens, args.repeat)
        bypass = time_batches(dp, byp, lens, args.repeat)
        rows.append([f"{n:,}", f"{hit:.1f}", f"{miss:.1f}", f"{bypass:.1f}", f"{hit_ratio:.3f}",
                     f"{1e3 / hit:.2f}"])
        results.append({"flows": n, "hit_ns_per_packet": hit, "miss_ns_per_packet": miss,
                        "bypass_ns_per_packet": bypass, "hit_ratio": hit_ratio})
    report(f"userspace datapath, 64-byte TCP frames, batches of 65,536 frames cycling over the flows, CPU {cpu}",
           ["flows", "hit ns/pkt", "miss (SYN) ns/pkt", "lru_bypass ns/pkt", "hit ratio", "hit Mpps"],
           rows, {"cpu": cpu, "frame_bytes": FRAME, "results": results}, args.json, "datapath.json")


if __name__ == "__main__":
    main()
