"""``lbctl lab``: build, inspect, tear down and demonstrate the network-namespace lab.

``register(subparsers, groups)`` adds the ``lab`` command to lbctl's parser (entry point
``lbctl.commands``); ``python -m netns.lab_cli ...`` runs the same commands on their own.

* ``lab up``     builds a lab that stays after the command exits; prints its name.
* ``lab status`` what a lab has, and its counters (read from the pinned maps).
* ``lab down``   tears a lab down (``--all``: every lab whose builder is gone).
* ``lab demo``   builds a lab, sends a few thousand HTTP requests (a new TCP connection
  each), UDP flows and pings through it, prints where they went, tears it down.

Exit status: 0 success, 1 failure, 2 bad usage, 130 interrupted (the lab being built
is torn down first).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any


class _Interrupts:
    """Ctrl-C and SIGTERM end a build: the lab is torn down, nothing is left.

    The handler raises KeyboardInterrupt, and also records the signal, because Python
    drops an exception raised inside a weakref callback or ``__del__`` ("Exception
    ignored in ...", e.g. while an import lock is released): the build checks the
    record at every stage, so a swallowed Ctrl-C still stops it."""

    def __init__(self) -> None:
        self.seen: int | None = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(sig) is not signal.SIG_IGN:  # nohup & co: leave it
                signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        self.seen = signum
        raise KeyboardInterrupt

    def check(self, *_: object) -> None:
        if self.seen is not None:
            raise KeyboardInterrupt


def _load_config(path: str | None):
    from lb.cli import load_config_or_exit

    return None if path is None else load_config_or_exit(path)


# ---- up / down / status ---------------------------------------------------------------------

def cmd_up(args: argparse.Namespace) -> int:
    from netns.errors import LabError
    from netns.lab import Lab

    interrupts = _Interrupts()
    cfg = _load_config(args.config)
    try:
        reals = args.reals if args.reals is not None else (0 if cfg is not None else 3)
        if args.bgp or args.etcd:
            # the fleet lab: BIRD on the router (ECMP over BGP), lbctl serve + BIRD +
            # announcer on every balancer, optionally the desired state in etcd
            from netns.fleet import FleetLab

            lab = FleetLab(reals, balancers=max(args.balancers, 2), etcd=args.etcd, clients=args.clients,
                           datapath=args.datapath, config=cfg, state_dir=args.state_dir,
                           on_stage=interrupts.check)
        else:
            lab = Lab(reals=reals, clients=args.clients, balancers=args.balancers,
                      datapath=args.datapath, config=cfg, balancer_processes=True,
                      state_dir=args.state_dir, on_stage=interrupts.check)
    except (ValueError, LabError) as e:
        print(f"lbctl lab up: {e}", file=sys.stderr)
        return 2
    print(f"building lab {lab.name} ({len(lab.reals())} reals, datapath {args.datapath}) ...",
          file=sys.stderr, flush=True)
    try:
        lab.build()
        interrupts.check()
    except LabError as e:
        print(f"lbctl lab up: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        lab.teardown()  # no-op if the build already did
        raise
    path = lab.release()
    if args.json:
        print(json.dumps({"name": lab.name, "state": path, "timings": lab.timings}))
    else:
        print(lab.name)
        print(f"lab {lab.name} is up (built in {lab.timings.get('total', 0):.1f} s); state {path}",
              file=sys.stderr)
        print(f"  client:   ip netns exec {lab.client().ns} curl http://{lab.vips[0].address}/",
              file=sys.stderr)
        print(f"  counters: lbctl lab status {lab.name}", file=sys.stderr)
        print(f"  remove:   lbctl lab down {lab.name}", file=sys.stderr)
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from netns.errors import LabError
    from netns.lab_state import list_labs, load_state, owner_alive
    from netns.teardown import teardown

    if args.all == bool(args.names):
        print("lbctl lab down: give lab names or --all", file=sys.stderr)
        return 2
    names = args.names or list_labs(args.state_dir)
    status = 0
    for name in names:
        try:
            state = load_state(name, args.state_dir)
        except LabError as e:
            print(f"lbctl lab down: {e}", file=sys.stderr)
            status = 1
            continue
        if args.all and owner_alive(state) and not args.force:
            # A test or demo in another process is using it and will tear it down.
            print(f"{name}: skipped, owned by running process {state['owner_pid']} "
                  f"(--force to remove it anyway)", file=sys.stderr)
            continue
        try:
            teardown(name, args.state_dir)
            print(f"{name}: torn down")
        except LabError as e:
            print(f"lbctl lab down: {e}", file=sys.stderr)
            status = 1
    return status


def _fmt_age(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def print_status(d: dict[str, Any]) -> None:
    age = _fmt_age(time.time() - d["created"]) if d.get("created") else "?"
    print(f"lab {d['name']}: {d['status']}, datapath {d['datapath']}, {d['owner']}, up {age}")
    missing = [ns for ns, ok in d["namespaces"].items() if not ok]
    if missing:
        print(f"  MISSING namespaces: {' '.join(missing)}")
    procs = {p["role"]: p for p in d["processes"]}
    print(f"  {'host':6} {'namespace':18} {'link':15} {'IPv4':14} {'IPv6':22} {'MAC':17}  notes")
    for h in d["hosts"]:
        notes = ""
        if h["role"] == "real":
            p = procs.get(f"server-{h['name']}")
            alive = "running" if p and p["alive"] else "NOT RUNNING"
            notes = f"real {h['real4']} {h['real6']}; server pid {p['pid'] if p else '-'} {alive}"
        elif h["role"] == "balancer":
            notes = f"gateway_mac {h['gw_mac']} (router end {h['gw_ifname']})"
        print(f"  {h['name']:6} {h['ns']:18} {h['ifname']:15} {h['addr4']:14} {h['addr6']:22} "
              f"{h['mac']:17}  {notes}")
    for v in d["vips"]:
        reals = ", ".join(f"{a} (w{w})" for a, w in v["reals"].items()) or "no reals"
        print(f"  VIP {v['vip']:24} -> {reals}")
    for name, b in d["balancers"].items():
        print(f"  balancer {name}" + (f" (pinned maps {b['pin_dir']})" if b.get("pin_dir") else ""))
        if "error" in b:
            print(f"    cannot read counters: {b['error']}")
            continue
        nz = {k: v for k, v in b["counters"].items() if v}
        print("    " + ("  ".join(f"{k} {v}" for k, v in nz.items()) or "all counters 0"))
        for addr, r in b.get("reals", {}).items():
            print(f"    to real {addr:22} {r['packets']:>10} packets {r['bytes']:>12} bytes")
    if d.get("decap"):
        nz = {k: v for k, v in d["decap"].items() if v}
        print("  decap (all reals): " + ("  ".join(f"{k} {v}" for k, v in nz.items()) or "all 0"))


def cmd_capture(args: argparse.Namespace) -> int:
    """``lbctl capture`` on a lab balancer's pinned maps."""
    from control.capture_cli import run_capture
    from netns.errors import LabError
    from netns.lab_state import load_state

    try:
        state = load_state(args.name, args.state_dir)
    except LabError as e:
        print(f"lbctl lab capture: {e}", file=sys.stderr)
        return 2
    pins = {k: v for k, v in state.get("pin_dirs", {}).items() if k != "decap_stats"}
    if not pins:
        print(f"lbctl lab capture: lab {args.name} has no XDP balancer (datapath "
              f"{state.get('datapath')}); capture needs the XDP datapath", file=sys.stderr)
        return 2
    name = args.balancer or (next(iter(pins)) if len(pins) == 1 else None)
    if name not in pins:
        print(f"lbctl lab capture: give --balancer, one of {', '.join(sorted(pins))}", file=sys.stderr)
        return 2
    return run_capture(pins[name], args)


def cmd_status(args: argparse.Namespace) -> int:
    from netns.errors import LabError
    from netns.lab_state import describe, list_labs, load_state

    names = args.names or list_labs(args.state_dir)
    if not names:
        print("no labs" if not args.json else "[]")
        return 0
    out, status = [], 0
    for name in names:
        try:
            out.append(describe(load_state(name, args.state_dir)))
        except LabError as e:
            print(f"lbctl lab status: {e}", file=sys.stderr)
            status = 1
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        for d in out:
            print_status(d)
    return status


# ---- demo --------------------------------------------------------------------------------------

def run_demo(requests: int = 3000, reals: int = 3, datapath: str = "xdp",
             concurrency: int = 32, udp_flows_per_family: int = 100,
             interrupts: _Interrupts | None = None) -> dict[str, Any]:
    """Build a lab, drive traffic through it, tear it down; returns the figures and
    prints them as it goes."""
    from rich.console import Console
    from rich.table import Table

    from netns.lab import Lab
    from netns.servers import http_requests, ping, udp_flows
    from netns.teardown import leftovers
    from netns.topology import HTTP_PORT, UDP_PORT, VIP4, VIP6

    con = Console(highlight=False, width=None if sys.stdout.isatty() else 100)
    t0 = time.monotonic()
    report: dict[str, Any] = {}
    lab = Lab(reals=reals, datapath=datapath,
              on_stage=interrupts.check if interrupts is not None else None)
    con.print(f"building lab [bold]{lab.name}[/]: 1 client, 1 router, 1 balancer ({datapath}), "
              f"{reals} reals; VIPs {VIP4} and {VIP6} (HTTP :{HTTP_PORT}, UDP echo :{UDP_PORT})")
    with lab:
        con.print(f"built in {lab.timings['total']:.1f} s "
                  f"(decap program {lab.timings['decap']:.1f} s, balancer {lab.timings['balancer']:.1f} s)")
        c = lab.client()
        results = {}
        t = time.monotonic()
        half = requests // 2
        for vip, n in ((VIP4, half), (VIP6, requests - half)):
            results[vip] = http_requests(c.ns, vip, HTTP_PORT, n=n, concurrency=concurrency)
        http_s = time.monotonic() - t
        ok = {vip: [r for r in rs if r.real] for vip, rs in results.items()}
        errors = sum(len(rs) - len(ok[vip]) for vip, rs in results.items())
        katran = sum(r.real == lab.expected_real(vip, HTTP_PORT, "tcp",
                                                 c.addr6 if ":" in vip else c.addr4, r.sport)
                     for vip, rs in ok.items() for r in rs)
        t = Table(title=f"{requests} HTTP requests, a new TCP connection each "
                        f"({http_s:.1f} s, {requests / http_s:.0f} connections/s)")
        for col in ("real", "weight", f"via {VIP4}", f"via {VIP6}", "total", "share"):
            t.add_column(col, justify="right")
        per = {vip: Counter(r.real for r in rs) for vip, rs in ok.items()}
        total_ok = sum(len(v) for v in ok.values())
        for h in lab.reals():
            n4, n6 = per[VIP4][h.name], per[VIP6][h.name]
            t.add_row(h.name, str(lab.weights.get(h.name, 0)), str(n4), str(n6), str(n4 + n6),
                      f"{(n4 + n6) / max(total_ok, 1):.1%}")
        con.print(t)
        con.print(f"{total_ok} answered, {errors} failed; {katran}/{total_ok} on the real our model of "
                  f"Katran's hash picks for their flow; replies went real -> router -> client (DSR)")
        report["http"] = {"requests": requests, "ok": total_ok, "errors": errors,
                          "seconds": round(http_s, 2), "katran_match": katran,
                          "per_real": {h.name: per[VIP4][h.name] + per[VIP6][h.name]
                                       for h in lab.reals()}}

        udp_per_real: Counter[str] = Counter()
        split = lost = 0
        for vip in (VIP4, VIP6):
            flows = udp_flows(c.ns, vip, UDP_PORT, flows=udp_flows_per_family, per_flow=3)
            for names in flows.values():
                got = {n for n in names if n}
                lost += names.count(None)
                if len(got) == 1:
                    udp_per_real[got.pop()] += 1
                elif len(got) > 1:
                    split += 1
        con.print(f"UDP echo: {2 * udp_flows_per_family} flows x 3 datagrams; per real "
                  + ", ".join(f"{h.name} {udp_per_real[h.name]}" for h in lab.reals())
                  + f"; {split} flows split across reals, {lost} datagrams lost")
        pings = {vip: ping(c.ns, vip, count=3) for vip in (VIP4, VIP6)}
        con.print("ICMP echo to the VIPs (answered by the balancer itself): "
                  + ", ".join(f"{vip} {n}/3" for vip, n in pings.items()))
        report["udp"] = {"per_real": dict(udp_per_real), "split": split, "lost": lost}
        report["ping"] = pings

        stats = lab.balancer_stats()
        decap = lab.decap_stats() if lab._decap is not None else {}
        t = Table(title=f"balancer counters ({datapath})")
        t.add_column("counter")
        t.add_column("value", justify="right")
        for k, v in stats.items():
            if v:
                t.add_row(k, str(v))
        con.print(t)
        con.print("decap on the reals: " + ", ".join(f"{k} {v}" for k, v in decap.items() if v))
        report["balancer"] = stats
        report["decap"] = decap
        state, path = lab.state, lab.state_path
        t_down = time.monotonic()
    down_s = time.monotonic() - t_down
    left = leftovers(state, path)
    con.print(f"lab {lab.name} torn down in {down_s:.1f} s: "
              + ("nothing left behind" if not left else f"LEFT BEHIND: {left}"))
    report["teardown_s"] = round(down_s, 2)
    report["total_s"] = round(time.monotonic() - t0, 1)
    report["leftovers"] = left
    con.print(f"demo took {report['total_s']:.1f} s")
    return report


def cmd_demo(args: argparse.Namespace) -> int:
    from netns.errors import LabError

    interrupts = _Interrupts()
    try:
        rep = run_demo(args.requests, args.reals, args.datapath, args.concurrency,
                       interrupts=interrupts)
    except LabError as e:
        print(f"lbctl lab demo: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(rep))
    good = (rep["http"]["errors"] == 0 and rep["http"]["katran_match"] == rep["http"]["ok"]
            and rep["udp"]["split"] == 0 and not rep["leftovers"])
    return 0 if good else 1


# ---- parser ----------------------------------------------------------------------------------

def register(subparsers: Any, groups: dict[str, Any]) -> argparse.ArgumentParser:
    """Add ``lab`` (up|down|status|capture|demo) to an argparse subparsers object. ``groups``:
    lbctl's shared command groups (see lb/cli.py); the lab adds to none."""
    from control.capture_cli import add_capture_arguments
    from netns.datapaths import DATAPATHS
    from netns.lab_state import STATE_DIR
    from netns.topology import MAX_REALS

    lab = subparsers.add_parser(
        "lab", help="network-namespace lab: clients, router, balancer, reals (DSR)",
        description="Build, inspect and tear down the network-namespace lab (docs/lab.md). "
                    "Needs root.")
    sub = lab.add_subparsers(dest="lab_command", required=True, metavar="ACTION")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--state-dir", default=STATE_DIR, help=argparse.SUPPRESS)

    up = sub.add_parser("up", help="build a lab that stays up; prints its name",
                        description="Build a lab and leave it running (state in "
                                    f"{STATE_DIR}/<name>.json). Ctrl-C while building "
                                    "removes what was built.")
    up.add_argument("--reals", type=int, help=f"real servers, 1..{MAX_REALS} (default 3, or as many as "
                                              "the --config has real addresses of one family)")
    up.add_argument("--clients", type=int, default=1, help="client namespaces (default 1)")
    up.add_argument("--balancers", type=int, default=1,
                    help="balancer namespaces; more than one: ECMP at the router (default 1)")
    up.add_argument("--bgp", action="store_true",
                    help="fleet lab: the balancers run lbctl serve and announce the VIPs over BGP to a "
                         "BIRD router that spreads flows by ECMP (at least 2 balancers; docs/fleet.md)")
    up.add_argument("--etcd", action="store_true",
                    help="fleet lab with the balancers' desired state in etcd (implies --bgp)")
    up.add_argument("--datapath", choices=DATAPATHS, default="xdp", help="balancer datapath (default xdp)")
    up.add_argument("--config", help="YAML config whose VIPs and reals the lab serves "
                                     "(gateway_mac is replaced by the router's MAC)")
    up.add_argument("--json", action="store_true", help="print {name, state, timings} as JSON")
    common(up)
    up.set_defaults(func=cmd_up)

    st = sub.add_parser("status", help="show labs and their counters",
                        description="Namespaces, addresses, processes, VIPs and the balancer's "
                                    "counters (read from the pinned maps) of each lab.")
    st.add_argument("names", nargs="*", metavar="NAME", help="labs to show (default: all)")
    st.add_argument("--json", action="store_true")
    common(st)
    st.set_defaults(func=cmd_status)

    ca = sub.add_parser("capture", help="lbctl capture on a lab balancer",
                        description="Frames behind the balancer's datapath events (connection-table "
                                    "misses, too-big, unknown QUIC ids, drops) into a pcapng file, as "
                                    "lbctl capture does (XDP datapath).")
    ca.add_argument("name", metavar="NAME", help="the lab")
    ca.add_argument("--balancer", help="balancer host (default: the lab's only one)")
    add_capture_arguments(ca)
    common(ca)
    ca.set_defaults(func=cmd_capture)

    dn = sub.add_parser("down", help="tear labs down",
                        description="Stop the servers, remove namespaces (and their links), "
                                    "pinned maps, logs and the state file.")
    dn.add_argument("names", nargs="*", metavar="NAME")
    dn.add_argument("--all", action="store_true",
                    help="every lab, except those still owned by a running process")
    dn.add_argument("--force", action="store_true", help="with --all: also labs owned by a running process")
    common(dn)
    dn.set_defaults(func=cmd_down)

    de = sub.add_parser("demo", help="build a lab, send real traffic through it, tear it down",
                        description="Build a lab (VIPs v4 and v6, 3 reals), send HTTP requests "
                                    "(a new TCP connection each), UDP flows and pings through "
                                    "the balancer, print where they went and the counters, "
                                    "tear down.")
    de.add_argument("--requests", type=int, default=3000, help="HTTP requests, half per VIP (default 3000)")
    de.add_argument("--reals", type=int, default=3)
    de.add_argument("--datapath", choices=DATAPATHS, default="xdp")
    de.add_argument("--concurrency", type=int, default=32, help="connections in flight (default 32)")
    de.add_argument("--json", action="store_true", help="also print the figures as JSON")
    de.set_defaults(func=cmd_demo)
    return lab


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m netns.lab_cli")
    sub = p.add_subparsers(dest="command", required=True)
    register(sub, {})
    args = p.parse_args(["lab", *(sys.argv[1:] if argv is None else argv)])
    if os.geteuid() != 0:
        print("the lab needs root (namespaces, XDP, bpffs)", file=sys.stderr)
        return 1
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
