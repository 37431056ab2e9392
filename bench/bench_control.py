"""Control-plane cost at scale: a cold start of V VIPs x R reals, and one weight change.

Run: .venv/bin/python -m bench.bench_control [--vips 500] [--reals 100] [--datapath xdp|userspace]
                                             [--changes 30] [--no-fsync] [--json PATH]

Cold start (seconds), from nothing to a datapath holding the whole config, in stages:
  parse     the YAML-equivalent dict through lb.config.parse_config (every field checked)
  load      the XDP program compiled and loaded (bcc; xdp only) / the userspace datapath made
  open      open_plane: allocate numbers, build every Maglev ring (65,537 slots),
            plan against the empty maps, write them, save the state file (fsync)
Weight change (milliseconds), one real of one VIP, repeated:
  ring      from the call to the moment the changed slots are written to the memory the
            datapath reads (XDP: the mmap'ed ch_rings map): validation, allocation, one
            ring rebuilt, plan, writes. A second mapping of the map then confirms them
  ack       to the return of the call: + the state file written and fsynced
  api       the same change through the HTTP API (httpx -> ASGI app, in process), to the
            response
Reals are drawn from a pool of 4,000 addresses (max_reals is 4,096), each VIP taking R
of them, so most reals serve several VIPs as in a real deployment.
"""

from __future__ import annotations

import argparse
import ipaddress
import mmap
import os
import statistics
import tempfile
import time
from typing import Any

import numpy as np

from bench.api_client import ApiClient
from bench.common import report
from control.api import create_app
from control.datapaths import UserspacePort, XdpPort
from control.plane import open_plane
from control.reconcile import WriteRing
from control.store import Store
from control.tables import Sizes
from lb.config import parse_config

POOL = 4000
CONN = 65536  # per CPU; the control plane never reads it here (Katran's 1M only slows the load)


def config_dict(n_vips: int, n_reals: int) -> dict[str, Any]:
    base4 = ipaddress.IPv4Address("198.19.0.1")
    vips = []
    for i in range(n_vips):
        reals = [{"address": str(base4 + (i * 37 + j) % POOL), "weight": 1 + (j % 3)} for j in range(n_reals)]
        vips.append({"address": str(ipaddress.IPv4Address("198.18.0.1") + i), "port": 80,
                     "protocol": "tcp", "reals": reals})
    return {"settings": {"gateway_mac": "00:00:5e:00:53:01", "conn_table_size": CONN}, "vips": vips}


class RingReader:
    """A second mapping of the pinned ring array: what the XDP program reads."""

    def __init__(self, bal: Any) -> None:
        fd = bal.map_fd("ch_rings")
        size = bal.max_vips * bal.ring_size * 8
        self.mm = mmap.mmap(fd, (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE, mmap.MAP_SHARED,
                            mmap.PROT_READ)
        words = np.frombuffer(self.mm, dtype=np.uint32, count=size // 4)
        self.rings = words.reshape(bal.max_vips, bal.ring_size, 2)[:, :, 0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vips", type=int, default=500)
    ap.add_argument("--reals", type=int, default=100)
    ap.add_argument("--datapath", choices=["xdp", "userspace"],
                    default="xdp" if os.geteuid() == 0 else "userspace")
    ap.add_argument("--changes", type=int, default=30, help="weight changes to time")
    ap.add_argument("--no-fsync", action="store_true", help="state file without fsync (not for production)")
    ap.add_argument("--json", help="where to write the results (default bench/results/control.json)")
    args = ap.parse_args()

    data = config_dict(args.vips, args.reals)
    t0 = time.perf_counter()
    cfg = parse_config(data)
    t_parse = time.perf_counter() - t0
    sizes = Sizes.of(cfg.settings)

    t0 = time.perf_counter()
    bal = None
    if args.datapath == "xdp":
        from lb.bpf_loader import XdpBalancer

        bal = XdpBalancer(sizes.ring_size, sizes.max_vips, sizes.max_reals, sizes.conn_table_size)
        port: Any = XdpPort(bal)
        reader = RingReader(bal)
        read = lambda n, s: int(reader.rings[n, s])  # noqa: E731
    else:
        port = UserspacePort(sizes)
        read = lambda n, s: int(port.dp.rings[n, s])  # noqa: E731
    t_load = time.perf_counter() - t0

    state_dir = tempfile.mkdtemp(prefix="lbc-bench-")
    store = Store(state_dir, fsync=not args.no_fsync)
    t0 = time.perf_counter()
    ctl = open_plane(port, store, cfg)
    t_open = time.perf_counter() - t0
    rec = ctl.core.last_reconcile
    state_mb = store.state_path.stat().st_size / 1e6

    # time a restart onto the same (populated) datapath: the adopt path
    t0 = time.perf_counter()
    again = open_plane(port, Store(state_dir, fsync=not args.no_fsync), None, loaded=store.load())
    t_adopt = time.perf_counter() - t0
    assert sum(again.core.last_reconcile["writes"].values()) == 0
    ctl = again

    # weight changes: VIP k, real j. The ring is visible to the datapath the moment the
    # WriteRing op returns (XDP: the mmap'ed map the program reads; userspace: the array
    # its loop reads), so that moment is stamped; afterwards a second reader (XDP: a second
    # mapping of the map) confirms the new slots are there.
    ring_ms, ack_ms, slots = [], [], []
    stamps: dict[str, float] = {}
    orig_apply = port.apply

    def spy(op: Any) -> None:
        orig_apply(op)
        if isinstance(op, WriteRing):
            stamps["ring"] = time.perf_counter()

    port.apply = spy  # type: ignore[method-assign]
    for i in range(args.changes):
        key = cfg.vips[(i * 7) % len(cfg.vips)].key
        num = ctl.core.state.ids.vips[key]
        cur = next(v for v in ctl.core.state.config.vips if v.key == key)
        real = cur.reals[i % len(cur.reals)]
        new_w = real.weight + 5 if real.weight < 20 else 1
        stamps.clear()
        t0 = time.perf_counter()
        res = ctl.commands.update_real(key, real.address, {"weight": new_w})
        t_ack = time.perf_counter()
        want = ctl.core.tables.rings[num]
        assert all(read(num, int(j)) == int(want[j]) for j in range(0, len(want), 997)), "reader disagrees"
        if "ring" not in stamps:
            continue  # this change moved no slot
        ring_ms.append((stamps["ring"] - t0) * 1e3)
        ack_ms.append((t_ack - t0) * 1e3)
        slots.append(res.writes["ring_slots"])
    port.apply = orig_apply  # type: ignore[method-assign]

    api_ms = []
    with ApiClient(create_app(ctl)) as api:
        vip = cfg.vips[1]
        real = vip.reals[0].address
        url = f"/v1/vips/{vip.address}/{vip.port}/{vip.protocol}/reals/{real}"
        for i in range(args.changes):
            t0 = time.perf_counter()
            r = api.patch(url, json={"weight": 2 + i % 7})
            api_ms.append((time.perf_counter() - t0) * 1e3)
            assert r.status_code == 200, r.text

    def med(x: list[float]) -> float:
        return round(statistics.median(x), 2)

    def p90(x: list[float]) -> float:
        return round(sorted(x)[int(0.9 * (len(x) - 1))], 2)

    rows = [
        ["cold start: parse config", f"{t_parse:.2f} s", ""],
        [f"cold start: load {args.datapath} datapath", f"{t_load:.2f} s", ""],
        ["cold start: open_plane (rings, writes, save)", f"{t_open:.2f} s",
         f"{rec['writes']['ring_slots']:,} slots, {rec['writes']['reals']} reals, {state_mb:.1f} MB state"],
        ["cold start total", f"{t_parse + t_load + t_open:.2f} s", ""],
        ["restart onto populated maps (adopt)", f"{t_adopt:.2f} s", "0 writes"],
        ["weight change -> ring visible", f"{med(ring_ms)} ms",
         f"p90 {p90(ring_ms)} ms, median {int(statistics.median(slots))} slots"],
        ["weight change -> acknowledged (state saved)", f"{med(ack_ms)} ms", f"p90 {p90(ack_ms)} ms"],
        ["weight change via HTTP API -> response", f"{med(api_ms)} ms", f"p90 {p90(api_ms)} ms"],
    ]
    result = {
        "benchmark": "control_plane", "datapath": args.datapath, "vips": args.vips, "reals_per_vip": args.reals,
        "distinct_reals": len(ctl.core.state.ids.reals), "ring_size": sizes.ring_size, "fsync": not args.no_fsync,
        "cold_start_s": {"parse": t_parse, "load_datapath": t_load, "open": t_open,
                         "total": t_parse + t_load + t_open},
        "open_writes": rec["writes"], "state_file_mb": state_mb, "adopt_s": t_adopt,
        "weight_change_ms": {"ring_visible_median": med(ring_ms), "ring_visible_p90": p90(ring_ms),
                             "ack_median": med(ack_ms), "ack_p90": p90(ack_ms),
                             "api_median": med(api_ms), "api_p90": p90(api_ms),
                             "ring_slots_median": statistics.median(slots), "n": len(ring_ms)},
    }
    report(f"control plane: {args.vips} VIPs x {args.reals} reals, {args.datapath} datapath",
           ["what", "time", "notes"], rows, result, args.json, "control.json")
    if bal is not None:
        bal.close()


if __name__ == "__main__":
    main()
