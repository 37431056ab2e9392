"""lbctl's commands of the lb floor: ``simulate``, ``config validate|show``, ``ring``, ``demo``.

Registered first by :func:`lb.cli.build_parser`; the ``config`` group it makes is where
upper floors add their own config actions (``groups["config"]``).
"""

from __future__ import annotations

import argparse
import json
import sys

from lb.cli import load_config_or_exit

__all__ = ["register"]


def cmd_simulate(args: argparse.Namespace) -> int:
    from lb.datapath_tables import compile_tables
    from lb.simulate import FrameFileError, make_simulator, read_hex_frames, read_pcap_frames, simulate, summarize

    cfg = load_config_or_exit(args.config)
    try:
        tables = compile_tables(cfg)
    except ValueError as e:
        print(f"{args.config}: {e}", file=sys.stderr)
        return 2
    frames = read_pcap_frames(args.pcap) if args.pcap else read_hex_frames(args.hex_file)
    try:
        sim = make_simulator(args.datapath, tables)
    except OSError as e:
        print(f"cannot load the {args.datapath} datapath: {e}", file=sys.stderr)
        return 1
    verdicts = []
    try:
        for i, v in enumerate(simulate(sim, frames)):
            verdicts.append(v)
            if args.json:
                print(v.as_json(), flush=True)
            else:
                print(f"{i:5d} {v.action:5s} {v.real or '-':>24s}  {v.output.hex() if args.output else ''}")
    except FrameFileError as e:
        print(e, file=sys.stderr)
        return 2
    finally:
        if hasattr(sim, "close"):
            sim.close()
    if not args.json:
        s = summarize(verdicts)
        print(f"frames: {len(verdicts)}  actions: {s['actions']}  reals: {s['reals']}")
    return 0


def cmd_config_validate(args: argparse.Namespace) -> int:
    cfg = load_config_or_exit(args.file)
    n_reals = len({r.address for v in cfg.vips for r in v.reals})
    print(f"{args.file}: ok ({len(cfg.vips)} VIPs, {n_reals} reals)")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    from lb.config import config_to_dict, dump_config_yaml

    cfg = load_config_or_exit(args.file)
    print(json.dumps(config_to_dict(cfg), indent=2) if args.json else dump_config_yaml(cfg), end="")
    return 0


def cmd_ring(args: argparse.Namespace) -> int:
    import numpy as np

    from lb.datapath_tables import compile_tables

    cfg = load_config_or_exit(args.config)
    tables = compile_tables(cfg)
    rows = []
    for (addr, port, proto), num in tables.vip_nums.items():
        counts = np.bincount(tables.rings[num], minlength=len(tables.real_ids) + 1)
        for ip, rid in tables.real_ids.items():
            if counts[rid]:
                rows.append({"vip": f"{addr}:{port}/{proto}", "real": str(ip), "slots": int(counts[rid]),
                             "share": counts[rid] / tables.ring_size})
        if counts[0]:
            rows.append({"vip": f"{addr}:{port}/{proto}", "real": None, "slots": int(counts[0]), "share": 1.0})
    if args.json:
        for r in rows:
            print(json.dumps(r))
    else:
        for r in rows:
            print(f"{r['vip']:>32s} {r['real'] or '(no real: drop)':>24s} {r['slots']:7d} {r['share']:7.2%}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from lb.demo import print_report, run_demo

    cfg = load_config_or_exit(args.config) if args.config else None
    rep = run_demo(cfg, flows=args.flows)
    print_report(rep, cfg)
    return 0 if rep.split_flows == 0 else 1


def register(commands: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction]) -> None:
    """Add ``simulate``, ``config`` (``validate``, ``show``), ``ring`` and ``demo`` to
    ``commands``; ``groups["config"]`` is the ``config`` group's actions."""
    s = commands.add_parser("simulate", help="run frames through a datapath: where does each flow go?",
                       description="Run frames through one datapath instance, in order (the connection "
                                   "table carries over), and print the action, the real and the output frame.")
    s.add_argument("--config", required=True, help="YAML config file")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--pcap", help="pcap/pcapng file of Ethernet frames")
    src.add_argument("--hex-file", help="text file, one Ethernet frame per line as hex")
    s.add_argument("--datapath", choices=["userspace", "xdp"], default="userspace",
                   help="userspace (numba, default) or xdp (the BPF program via BPF_PROG_TEST_RUN; root)")
    s.add_argument("--json", action="store_true",
                   help='one JSON object per frame: {"action", "real", "output"}')
    s.add_argument("--output", action="store_true", help="also print output frames (hex) in the table")
    s.set_defaults(func=cmd_simulate)

    c = commands.add_parser("config", help="check and show config files",
                       description="Validate or normalise a YAML config file.")
    csub = c.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    groups["config"] = csub
    v = csub.add_parser("validate", help="check a config file; errors name the field",
                        description="Check a config file. Exit 0 if valid, 2 with every problem listed if not.")
    v.add_argument("file")
    v.set_defaults(func=cmd_config_validate)
    sh = csub.add_parser("show", help="print a config file normalised (defaults filled in)",
                         description="Print the config with every default filled in.")
    sh.add_argument("file")
    sh.add_argument("--json", action="store_true", help="JSON instead of YAML")
    sh.set_defaults(func=cmd_config_show)

    r = commands.add_parser("ring", help="show each VIP's Maglev ring: slots per real",
                       description="Build the Maglev rings of a config and print each real's share of slots.")
    r.add_argument("--config", required=True, help="YAML config file")
    r.add_argument("--json", action="store_true", help="one JSON object per (VIP, real)")
    r.set_defaults(func=cmd_ring)

    d = commands.add_parser("demo", help="run the userspace datapath over generated flows and show where they went",
                       description="Generate client flows, run them through the userspace datapath, and print "
                                   "the flows per real, stickiness and counters.")
    d.add_argument("--config", help="YAML config (default: a built-in VIP with 3 reals)")
    d.add_argument("--flows", type=int, default=1000, help="flows per VIP (default 1000)")
    d.set_defaults(func=cmd_demo)
