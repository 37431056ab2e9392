"""``lbctl serve`` and the commands that talk to the daemon: ``vip``, ``real``, ``quic``,
``route``, ``stats``, ``health``, ``config export`` / ``config apply``.

Tables for people (rich), ``--json`` for scripts. Exit status: 0 success; 1 the daemon is
unreachable or failed (5xx); 2 the request was refused (4xx: the message names the field)
or bad usage.

Registered in lbctl by :func:`register` (entry point ``lbctl.commands``, see lb/cli.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

__all__ = ["register"]


def _client(args: argparse.Namespace) -> Any:
    import ssl

    from control.client import Client
    from control.daemon import StartupError, read_token

    token = read_token(args.token_file) if getattr(args, "token_file", None) else None
    try:
        return Client(socket=args.socket, url=args.url, token=token, ca_file=getattr(args, "ca_file", None))
    except (OSError, ssl.SSLError) as e:
        raise StartupError(f"--ca-file {args.ca_file}: {e}", 2) from None


def _vip(text: str) -> tuple[str, int, str]:
    from control.client import parse_vip

    try:
        return parse_vip(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _run(fn: Callable[[argparse.Namespace, Any], int]) -> Callable[[argparse.Namespace], int]:
    """Wrap a client command: connection, error reporting, exit status."""

    def wrapped(args: argparse.Namespace) -> int:
        from control.client import ApiError, Unavailable
        from control.daemon import StartupError

        try:
            with _client(args) as c:
                return fn(args, c)
        except StartupError as e:
            print(f"lbctl: {e}", file=sys.stderr)
            return 2
        except Unavailable as e:
            print(f"lbctl: {e}", file=sys.stderr)
            return 1
        except ApiError as e:
            if getattr(args, "json", False):
                print(json.dumps(e.body), file=sys.stderr)
            else:
                print(f"lbctl: {e.body.get('error', e)}", file=sys.stderr)
            return 2 if e.caller_fault else 1

    return wrapped


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2))


def _table(title: str | None, columns: list[str], rows: list[list[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for c in columns:
        t.add_column(c, justify="left" if c in ("VIP", "real", "state", "detail", "flags", "check") else "right")
    for r in rows:
        t.add_row(*["-" if x is None else str(x) for x in r])
    Console().print(t)


def _human(n: float) -> str:
    for unit in ("", "k", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}P"


# --- vip ----------------------------------------------------------------------------------------


def _vip_rows(vips: list[dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for v in vips:
        up = sum(1 for r in v["reals"] if (r["effective_weight"] or 0) > 0)
        hc = v.get("healthcheck")
        rows.append([v["id"], v["vip_num"], v["hash"], ",".join(v["flags"]) or "-",
                     f"{up}/{len(v['reals'])}", hc["type"] if hc else "-",
                     "ALL DOWN" if v["all_reals_down"] else ""])
    return rows


def _real_rows(reals: list[dict[str, Any]]) -> list[list[Any]]:
    return [[r["address"], r["real_id"], r["weight"], r["effective_weight"],
             "yes" if r["drained"] else "", {True: "up", False: "down", None: "-"}[r["healthy"]]]
            for r in reals]


_REAL_COLS = ["real", "id", "weight", "effective", "drained", "health"]
_VIP_COLS = ["VIP", "num", "hash", "flags", "in ring", "check", ""]


def cmd_vip_list(args: argparse.Namespace, c: Any) -> int:
    vips = c.vips()
    if args.json:
        _print_json(vips)
    else:
        _table(None, _VIP_COLS, _vip_rows(vips))
    return 0


def cmd_vip_show(args: argparse.Namespace, c: Any) -> int:
    v = c.vip(args.vip)
    if args.json:
        _print_json(v)
    else:
        _table(None, _VIP_COLS, _vip_rows([v]))
        _table(None, _REAL_COLS, _real_rows(v["reals"]))
    return 0


def _real_arg(text: str) -> dict[str, Any]:
    """ADDRESS or ADDRESS=WEIGHT."""
    addr, sep, w = text.partition("=")
    if sep:
        try:
            return {"address": addr, "weight": int(w)}
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: weight must be an integer") from None
    return {"address": addr}


def _json_arg(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None


def cmd_vip_add(args: argparse.Namespace, c: Any) -> int:
    a, p, proto = args.vip
    body: dict[str, Any] = {"address": a, "port": p, "protocol": proto}
    if args.hash:
        body["hash"] = args.hash
    if args.flag:
        body["flags"] = args.flag
    if args.real:
        body["reals"] = args.real
    if args.healthcheck is not None:
        body["healthcheck"] = args.healthcheck
    v = c.create_vip(body, if_match=args.if_match)
    _print_json(v) if args.json else print(f"created {v['id']} (vip_num {v['vip_num']})")
    return 0


def cmd_vip_set(args: argparse.Namespace, c: Any) -> int:
    body: dict[str, Any] = {}
    if args.hash:
        body["hash"] = args.hash
    if args.flags is not None:
        body["flags"] = [f for f in args.flags.split(",") if f]
    if args.healthcheck is not None:
        body["healthcheck"] = args.healthcheck
    if args.no_healthcheck:
        body["healthcheck"] = None
    if not body:
        print("lbctl vip set: nothing to change (--hash, --flags, --healthcheck, --no-healthcheck)",
              file=sys.stderr)
        return 2
    v = c.patch_vip(args.vip, body, if_match=args.if_match)
    _print_json(v) if args.json else print(f"changed {v['id']}")
    return 0


def cmd_vip_del(args: argparse.Namespace, c: Any) -> int:
    c.delete_vip(args.vip, if_match=args.if_match)
    if not args.json:
        print("deleted")
    return 0


def cmd_vip_where(args: argparse.Namespace, c: Any) -> int:
    a, p, proto = args.vip
    dst = args.dst or a.partition("/")[0]
    r = c.simulate({"src": args.src, "sport": args.sport, "dst": dst, "dport": p, "protocol": proto,
                    "tcp_flags": args.tcp_flags})
    if args.json:
        _print_json(r)
    else:
        print(f"{r['action']} -> {r['real'] or '(no real)'}" + (f" (real id {r['real_id']})" if r["real_id"] else ""))
    return 0


# --- real ----------------------------------------------------------------------------------------


def cmd_real_list(args: argparse.Namespace, c: Any) -> int:
    v = c.vip(args.vip)
    if args.json:
        _print_json(v["reals"])
    else:
        _table(v["id"], _REAL_COLS, _real_rows(v["reals"]))
    return 0


def cmd_real_add(args: argparse.Namespace, c: Any) -> int:
    body: dict[str, Any] = {"address": args.address}
    if args.weight is not None:
        body["weight"] = args.weight
    r = c.add_real(args.vip, body, if_match=args.if_match)
    _print_json(r) if args.json else print(f"added {r['address']} to {r['vip']} (real id {r['real_id']})")
    return 0


def cmd_real_set(args: argparse.Namespace, c: Any) -> int:
    r = c.patch_real(args.vip, args.address, {"weight": args.weight}, if_match=args.if_match)
    _print_json(r) if args.json else print(f"{r['address']} of {r['vip']}: weight {r['weight']}")
    return 0


def _drain(on: bool) -> Callable[[argparse.Namespace, Any], int]:
    def cmd(args: argparse.Namespace, c: Any) -> int:
        r = c.patch_real(args.vip, args.address, {"drain": on}, if_match=args.if_match)
        _print_json(r) if args.json else print(f"{r['address']} of {r['vip']}: "
                                               f"{'drained (no new flows)' if on else 'back in the ring'}")
        return 0

    return cmd


def cmd_real_del(args: argparse.Namespace, c: Any) -> int:
    c.delete_real(args.vip, args.address, if_match=args.if_match)
    if not args.json:
        print("removed")
    return 0


# --- quic / route ----------------------------------------------------------------------------------

_ROUTING = {  # command -> (table, key field, column title, what)
    "quic": ("quic_servers", "id", "id", "QUIC server id"),
    "route": ("source_routes", "prefix", "prefix", "source route"),
}


def _routing_list(cmd: str) -> Callable[[argparse.Namespace, Any], int]:
    table, field, title, _ = _ROUTING[cmd]

    def run(args: argparse.Namespace, c: Any) -> int:
        rows = c.routing(table)
        if args.json:
            _print_json(rows)
        else:
            _table(None, [title, "real", "real id", "active"],
                   [[r[field], r["real"], r["real_id"], "yes" if r["active"] else "no (real down)"] for r in rows])
        return 0

    return run


def _routing_add(cmd: str) -> Callable[[argparse.Namespace, Any], int]:
    table, field, _, what = _ROUTING[cmd]

    def run(args: argparse.Namespace, c: Any) -> int:
        r = c.add_routing(table, {field: getattr(args, field), "real": args.real}, if_match=args.if_match)
        _print_json(r) if args.json else print(f"added {what} {r[field]} -> {r['real']} (real id {r['real_id']})")
        return 0

    return run


def _routing_del(cmd: str) -> Callable[[argparse.Namespace, Any], int]:
    table, field, _, what = _ROUTING[cmd]

    def run(args: argparse.Namespace, c: Any) -> int:
        c.delete_routing(table, getattr(args, field), if_match=args.if_match)
        if not args.json:
            print(f"deleted {what} {getattr(args, field)}")
        return 0

    return run


def _quic_id(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a QUIC server id is an integer (e.g. 1025 or 0x401)") from None


def _prefix(text: str) -> str:
    if "/" not in text:
        raise argparse.ArgumentTypeError(f"{text!r}: expected ADDRESS/LENGTH (e.g. 198.18.64.0/24)")
    return text


# --- stats / health / config ------------------------------------------------------------------------


def _stats_tables(s: dict[str, Any], prev: dict[str, Any] | None, dt: float) -> Any:
    from rich.console import Group
    from rich.table import Table

    def rate(now: int, before: int | None) -> str:
        return "" if before is None or dt <= 0 else _human((now - before) / dt) + "/s"

    g = Table(title=f"datapath (generation {s['generation']}, conn table {s['conn_table']['entries']} entries)")
    for col in ("counter", "value", "rate"):
        g.add_column(col, justify="left" if col == "counter" else "right")
    pc = prev["counters"] if prev else {}
    for k, v in s["counters"].items():
        if v or k == "rx_packets":
            g.add_row(k, f"{v:,}", rate(v, pc.get(k)))
    v_t = Table(title="per VIP")
    for col in ("VIP", "packets", "bytes", "pps", "bps"):
        v_t.add_column(col, justify="left" if col == "VIP" else "right")
    pv = {x["vip"]: x for x in prev["vips"]} if prev else {}
    for x in s["vips"]:
        old = pv.get(x["vip"], {})
        v_t.add_row(x["vip"], f"{x['packets']:,}", _human(x["bytes"]) + "B", rate(x["packets"], old.get("packets")),
                    rate(8 * x["bytes"], 8 * old["bytes"] if "bytes" in old else None))
    r_t = Table(title="per real")
    for col in ("real", "id", "packets", "bytes", "pps", "new flows (misses)", "misses/s"):
        r_t.add_column(col, justify="left" if col == "real" else "right")
    pr = {x["real"]: x for x in prev["reals"]} if prev else {}
    for x in s["reals"]:
        old = pr.get(x["real"], {})
        r_t.add_row(x["real"], str(x["real_id"]), f"{x['packets']:,}", _human(x["bytes"]) + "B",
                    rate(x["packets"], old.get("packets")), f"{x['lru_misses']:,}",
                    rate(x["lru_misses"], old.get("lru_misses")))
    return Group(g, v_t, r_t)


def cmd_stats(args: argparse.Namespace, c: Any) -> int:
    if args.watch is None:
        s = c.stats()
        if args.json:
            _print_json(s)
        else:
            from rich.console import Console

            Console().print(_stats_tables(s, None, 0))
        return 0
    from rich.console import Console
    from rich.live import Live

    prev, t_prev = None, time.monotonic()
    try:
        with Live(console=Console(), auto_refresh=False) as live:
            while True:
                s = c.stats()
                now = time.monotonic()
                if args.json:
                    print(json.dumps(s), flush=True)
                else:
                    live.update(_stats_tables(s, prev, now - t_prev), refresh=True)
                prev, t_prev = s, now
                time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0


def cmd_health(args: argparse.Namespace, c: Any) -> int:
    rows = c.health()
    if args.json:
        _print_json(rows)
        return 0
    out = []
    for r in rows:
        last = r.get("last_result") or {}
        lat = last.get("latency_ms")
        out.append([r["vip"], r["real"], f"{r['check']}:{r['port']}", r["state"].upper(),
                    f"{r.get('consecutive_successes', '-')}/{r.get('consecutive_failures', '-')}",
                    last.get("detail"), None if lat is None else f"{lat:.1f} ms",
                    ("ALL DOWN: " + r["on_all_down"]) if r["all_reals_down"] else ""])
    _table(None, ["VIP", "real", "check", "state", "ok/fail", "detail", "latency", ""], out)
    return 0


def cmd_config_export(args: argparse.Namespace, c: Any) -> int:
    if args.json:
        _print_json(c.config())
    else:
        print(c.config_yaml(), end="")
    return 0


def cmd_config_apply(args: argparse.Namespace, c: Any) -> int:
    import yaml

    from lb.config import ConfigError, load_config

    try:
        load_config(args.file)  # the file's own errors, with line-free paths, before sending
        data = yaml.safe_load(open(args.file, encoding="utf-8"))
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    r = c.put_config(data, if_match=args.if_match)
    print(f"applied: generation {r['generation']}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from control.daemon import serve

    return serve(args)


# --- parsers -------------------------------------------------------------------------------------------


def _client_args(p: argparse.ArgumentParser, changes: bool = False) -> None:
    from control.daemon import DEFAULT_SOCKET

    g = p.add_argument_group("daemon")
    g.add_argument("--socket", help=f"API socket (default $LBCTL_SOCKET or {DEFAULT_SOCKET})")
    g.add_argument("--url", help="http(s)://HOST:PORT of a daemon serving on TCP (with --token-file)")
    g.add_argument("--token-file", help="file holding the bearer token for --url")
    g.add_argument("--ca-file", help="PEM file of the CA that signed an https --url's certificate")
    p.add_argument("--json", action="store_true", help="JSON output for scripts")
    if changes:
        p.add_argument("--if-match", type=int, metavar="GEN",
                       help="only if the desired state is still at generation GEN (else exit 2)")


def register(sub: argparse._SubParsersAction, groups: dict[str, argparse._SubParsersAction]) -> None:
    """Add ``serve``, ``vip``, ``real``, ``quic``, ``route``, ``stats``, ``health``, ``capture`` to lbctl's subcommands and
    ``export``/``apply`` to its ``config`` subcommands (``groups["config"]``, made by lb.commands)."""
    from control.capture_cli import register_capture
    from control.daemon import add_arguments

    s = sub.add_parser("serve", help="run the control-plane daemon (datapath, API, health checks)",
                       description="Load or adopt the datapath, apply the desired state, serve the API "
                                   "and run the health checks. See docs/api.md.")
    add_arguments(s)
    s.set_defaults(func=cmd_serve)

    # vip
    v = sub.add_parser("vip", help="list, show, add, change, delete VIPs (daemon)",
                       description="VIPs of the running daemon. VIP = ADDRESS:PORT/tcp|udp, [IPv6]:PORT/udp; "
                                   "a CIDR VIP: 198.18.64.0/24:80/tcp, [2001:db8:64::/48]:53/udp.")
    vs = v.add_subparsers(dest="vip_command", required=True, metavar="ACTION")
    x = vs.add_parser("list", help="all VIPs")
    _client_args(x)
    x.set_defaults(func=_run(cmd_vip_list))
    x = vs.add_parser("show", help="one VIP and its reals")
    x.add_argument("vip", type=_vip)
    _client_args(x)
    x.set_defaults(func=_run(cmd_vip_show))
    x = vs.add_parser("add", help="create a VIP")
    x.add_argument("vip", type=_vip)
    x.add_argument("--hash", choices=["maglev", "maglev_v2"])
    x.add_argument("--flag", action="append", help="VIP flag (repeatable)")
    x.add_argument("--real", action="append", type=_real_arg, metavar="ADDR[=WEIGHT]", help="a real (repeatable)")
    x.add_argument("--healthcheck", type=_json_arg, metavar="JSON", help='e.g. \'{"type": "tcp", "interval": 2}\'')
    _client_args(x, changes=True)
    x.set_defaults(func=_run(cmd_vip_add))
    x = vs.add_parser("set", help="change a VIP's hash, flags or health check")
    x.add_argument("vip", type=_vip)
    x.add_argument("--hash", choices=["maglev", "maglev_v2"])
    x.add_argument("--flags", metavar="A,B", help="the complete flag list, comma-separated ('' for none)")
    x.add_argument("--healthcheck", type=_json_arg, metavar="JSON")
    x.add_argument("--no-healthcheck", action="store_true", help="remove the health check")
    _client_args(x, changes=True)
    x.set_defaults(func=_run(cmd_vip_set))
    x = vs.add_parser("del", help="delete a VIP")
    x.add_argument("vip", type=_vip)
    _client_args(x, changes=True)
    x.set_defaults(func=_run(cmd_vip_del))
    x = vs.add_parser("where", help="which real would a new flow from SRC:SPORT go to?")
    x.add_argument("vip", type=_vip)
    x.add_argument("--src", required=True, help="client address")
    x.add_argument("--sport", required=True, type=int, help="client port")
    x.add_argument("--tcp-flags", default="S", help="TCP flags of the packet (default S)")
    x.add_argument("--dst", help="destination address (default: the VIP's; a CIDR VIP: its prefix's first)")
    _client_args(x)
    x.set_defaults(func=_run(cmd_vip_where))

    # real
    r = sub.add_parser("real", help="reals of a VIP: add, set weight, drain, remove (daemon)",
                       description="Reals of one VIP of the running daemon.")
    rs = r.add_subparsers(dest="real_command", required=True, metavar="ACTION")
    x = rs.add_parser("list", help="the reals of a VIP")
    x.add_argument("vip", type=_vip)
    _client_args(x)
    x.set_defaults(func=_run(cmd_real_list))
    x = rs.add_parser("add", help="add a real")
    x.add_argument("vip", type=_vip)
    x.add_argument("address")
    x.add_argument("--weight", type=int)
    _client_args(x, changes=True)
    x.set_defaults(func=_run(cmd_real_add))
    x = rs.add_parser("set", help="set a real's weight")
    x.add_argument("vip", type=_vip)
    x.add_argument("address")
    x.add_argument("--weight", type=int, required=True)
    _client_args(x, changes=True)
    x.set_defaults(func=_run(cmd_real_set))
    for name, on, text in (("drain", True, "no new flows to the real; existing ones finish (weight kept)"),
                           ("undrain", False, "put a drained real back")):
        x = rs.add_parser(name, help=text)
        x.add_argument("vip", type=_vip)
        x.add_argument("address")
        _client_args(x, changes=True)
        x.set_defaults(func=_run(_drain(on)))
    x = rs.add_parser("del", help="remove a real from a VIP (its flows re-hash; drain first to let them finish)")
    x.add_argument("vip", type=_vip)
    x.add_argument("address")
    _client_args(x, changes=True)
    x.set_defaults(func=_run(cmd_real_del))

    # quic, route
    for cmd, helptext, desc, key_help, key_type in (
        ("quic", "QUIC server ids -> reals: list, add, delete (daemon)",
         ("QUIC server ids of the running daemon: on VIPs flagged quic, a packet whose connection id "
          "carries server id ID goes to REAL (before the connection table and the ring). An entry "
          "whose real is down for every VIP it serves is inactive (left out of the datapath)."),
         "QUIC server id (1..4294967295; 0x.. accepted)", _quic_id),
        ("route", "source routes (client prefix -> real): list, add, delete (daemon)",
         ("Source routes of the running daemon: on VIPs flagged src_routing, a new flow from a client "
          "in PREFIX goes to REAL (longest prefix wins) instead of the ring. An entry whose real is down "
          "for every VIP it serves is inactive (left out of the datapath)."),
         "client prefix ADDRESS/LENGTH, host bits zero (198.18.64.0/24, 2001:db8:5::/48)", _prefix),
    ):
        _, field, _, what = _ROUTING[cmd]
        q = sub.add_parser(cmd, help=helptext, description=desc)
        qs = q.add_subparsers(dest=f"{cmd}_command", required=True, metavar="ACTION")
        x = qs.add_parser("list", help=f"every {what}", description=f"Every {what}, its real and real id, "
                                                                     "and whether it is active.")
        _client_args(x)
        x.set_defaults(func=_run(_routing_list(cmd)))
        x = qs.add_parser("add", help=f"add a {what}", description=f"Add a {what}; REAL must be a real of "
                                                                    "some VIP.")
        x.add_argument(field, metavar=field.upper(), type=key_type, help=key_help)
        x.add_argument("real", metavar="REAL", help="address of a real of some VIP")
        _client_args(x, changes=True)
        x.set_defaults(func=_run(_routing_add(cmd)))
        x = qs.add_parser("del", help=f"delete a {what}", description=f"Delete a {what}.")
        x.add_argument(field, metavar=field.upper(), type=key_type, help=key_help)
        _client_args(x, changes=True)
        x.set_defaults(func=_run(_routing_del(cmd)))

    # stats, health
    x = sub.add_parser("stats", help="datapath counters, per VIP and per real (daemon)",
                       description="Counters of the running daemon's datapath.")
    x.add_argument("--watch", nargs="?", type=float, const=1.0, metavar="SECONDS",
                   help="refresh every SECONDS (default 1) with rates, until Ctrl-C")
    _client_args(x)
    x.set_defaults(func=_run(cmd_stats))
    x = sub.add_parser("health", help="health-check state of every checked real (daemon)",
                       description="Health-check verdicts, counts and last results.")
    _client_args(x)
    x.set_defaults(func=_run(cmd_health))
    register_capture(sub)

    config = groups["config"]
    x = config.add_parser("export", help="print the running daemon's desired config (YAML)",
                          description="The daemon's desired config as YAML (a valid config file), "
                                      "or with --json the generation and config as JSON.")
    _client_args(x)
    x.set_defaults(func=_run(cmd_config_export))
    x = config.add_parser("apply", help="replace the running daemon's config with a file",
                          description="Validate FILE, then replace the daemon's desired config with it "
                                      "(sizes must stay; drained reals still present stay drained).")
    x.add_argument("file")
    _client_args(x, changes=True)
    x.set_defaults(func=_run(cmd_config_apply))
