"""``lbctl capture``: the frames behind datapath events (connection-table misses, too-big,
unknown QUIC server ids, drops) into a pcapng file, from the XDP balancer's ring buffer.

The command opens the balancer's pinned maps itself (lb/capture.py): it asks the daemon
only where they are (``/v1/status``'s ``pin_dir``), or takes ``--pin-dir`` (a daemon's
``--pin-dir``, a lab balancer's, see ``lbctl lab status``). Needs root, like every bpf()
call. The userspace datapath has no capture: the command says so.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any

from lb import constants as C

__all__ = ["add_capture_arguments", "register_capture", "run_capture"]


def _events(text: str) -> list[str]:
    return [e for e in text.split(",") if e]


def add_capture_arguments(p: argparse.ArgumentParser) -> None:
    """The capture options shared by ``lbctl capture`` and ``lbctl lab capture``."""
    from lb.capture import DEFAULT_RATE

    names = "|".join([*C.CAPTURE_EVENTS, "all"])
    p.add_argument("-w", "--write", required=True, metavar="FILE", help="pcapng file to write")
    p.add_argument("--event", action="append", type=_events, metavar=names,
                   help="event(s) to capture, repeatable or comma-separated (default all)")
    p.add_argument("-c", "--count", type=int, metavar="N", help="stop after N packets")
    p.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")
    p.add_argument("--rate", type=float, default=DEFAULT_RATE, metavar="R",
                   help=f"at most R packets/s per CPU, bursts of {C.CAPTURE_BURST} (default {DEFAULT_RATE:g})")
    p.add_argument("--force", action="store_true",
                   help="take over from another capture (or one that was killed) still switched on")
    p.add_argument("-q", "--quiet", action="store_true", help="no line per packet on stderr")


def run_capture(pin_dir: str, args: argparse.Namespace) -> int:
    """Capture from the balancer whose maps are pinned under ``pin_dir``; exit status."""
    from lb.capture import CaptureError, CaptureMaps, capture, parse_events
    from lb.kernel.syscall import KernelError

    try:
        events = parse_events([e for group in (args.event or [["all"]]) for e in group])
        maps = CaptureMaps.pinned(pin_dir)
    except CaptureError as e:
        print(f"lbctl: {e}", file=sys.stderr)
        return 2
    except KernelError as e:
        print(f"lbctl: {pin_dir}: {e}", file=sys.stderr)
        return 1

    def show(ev: Any, comment: str) -> None:
        if not args.quiet:
            print(f"{ev.frame_len:5d} bytes  {comment}", file=sys.stderr, flush=True)

    # Ctrl-C / SIGTERM end the capture between two polls (never inside the ring buffer's
    # callback, where an exception would be lost): the file is closed and the events off.
    stopping = threading.Event()
    handlers = {sig: signal.signal(sig, lambda *_: stopping.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with maps:
            print(f"capturing {', '.join(sorted(n for n, c in C.CAPTURE_EVENTS.items() if c in events))} "
                  f"from {pin_dir} into {args.write} (Ctrl-C to stop)", file=sys.stderr, flush=True)
            r = capture(maps, args.write, events, rate=args.rate, count=args.count,
                        duration=args.duration, force=args.force, stop=stopping.is_set, on_event=show)
    except CaptureError as e:
        print(f"lbctl: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"lbctl: {e}", file=sys.stderr)
        return 1
    finally:
        for sig, h in handlers.items():
            signal.signal(sig, h)
    per = ", ".join(f"{k} {v}" for k, v in sorted(r.by_event.items())) or "none"
    print(f"{r.written} packets written to {args.write} ({per}); held back by the rate limit: "
          f"{r.limited}, lost to a full ring: {r.lost}", file=sys.stderr)
    return 0


def cmd_capture(args: argparse.Namespace) -> int:
    pin_dir = args.pin_dir
    if pin_dir is None:
        from control.cli import _client
        from control.client import ApiError, Unavailable

        try:
            with _client(args) as c:
                st = c.status()
        except (Unavailable, ApiError) as e:
            print(f"lbctl: {e} (or give --pin-dir)", file=sys.stderr)
            return 1
        pin_dir = st.get("pin_dir")
        if not pin_dir:
            print(f"lbctl: the daemon runs the {st.get('datapath', 'userspace')} datapath; capture "
                  f"needs the XDP datapath (its maps pinned in bpffs)", file=sys.stderr)
            return 2
    return run_capture(pin_dir, args)


def register_capture(sub: argparse._SubParsersAction) -> None:
    from control.daemon import DEFAULT_SOCKET

    p = sub.add_parser(
        "capture", help="frames behind datapath events (misses, too-big, unknown QUIC ids, drops) into pcapng",
        description="Switch the XDP balancer's capture events on, write the first "
                    f"{C.CAPTURE_SNAPLEN} bytes of each frame behind them to a pcapng file (the "
                    "event, reason, CPU, VIP and real as the packet comment), and switch them off "
                    "again. Off, capture costs nothing on the forwarding path. Needs root.")
    add_capture_arguments(p)
    g = p.add_argument_group("where the balancer is")
    g.add_argument("--pin-dir", help="bpffs directory of its maps (default: ask the daemon)")
    g.add_argument("--socket", help=f"API socket (default $LBCTL_SOCKET or {DEFAULT_SOCKET})")
    g.add_argument("--url", help="http://HOST:PORT of a daemon serving on TCP (with --token-file)")
    g.add_argument("--token-file", help="file holding the bearer token for --url")
    p.set_defaults(func=cmd_capture)
