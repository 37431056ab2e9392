"""``lbctl serve``: the control-plane daemon.

Start-up, in order:

1. read ``--config`` (the seed) and the saved state of ``--state-dir`` (locked: one
   daemon per directory). The saved state wins over the file: it holds every change made
   through the API since; ``--from-config`` discards it;
2. load the datapath. ``xdp``: compile the program for the state's sizes with its maps
   pinned under ``--pin-dir``; maps a previous daemon pinned there are reused (adopted) —
   their VIPs, rings, counters and connection table. Attaching replaces the program
   already on the interface in one step, so a restarted daemon never interrupts
   forwarding: the old program runs until the new one takes over, on the same maps.
   ``userspace``: the numba datapath on an AF_PACKET socket of the interface (it lives in
   this process: its connection table starts empty after a restart), or with
   ``--no-packet-io`` without touching the interface (tests, dry runs);
3. reconcile the datapath to the desired state (after a restart: zero writes if nothing
   changed while the daemon was down);
4. serve the API on a Unix socket (mode 0600; its directory 0700) or, opt-in, on TCP with
   a bearer token read from a file (and TLS on a non-loopback address, unless
   ``--insecure-http``); run the health checks; tell systemd READY=1.

SIGTERM/SIGINT stop the API and the probes and leave the datapath running (the XDP
program stays attached, maps stay pinned), unless ``--detach-on-exit``. SIGKILL loses
nothing either: every accepted change was saved before it was acknowledged.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("lb.daemon")

DEFAULT_SOCKET = "/run/lb/lbd.sock"
DEFAULT_STATE_ROOT = "/var/lib/lb"
DEFAULT_PIN_ROOT = "/sys/fs/bpf/lb"


class StartupError(Exception):
    """The daemon cannot start; ``code`` is the exit status (2: bad input, 1: failure)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def instance_name(interface: str, netns: str | None) -> str:
    return f"{netns}-{interface}" if netns else interface


def read_token(path: str) -> str:
    """The bearer token: the file's first line (surrounding blanks stripped), at least 16
    characters. Refused if others can read the file."""
    from control.secret_files import private_first_line

    try:
        token = private_first_line(path, "--token-file")
    except ValueError as e:
        raise StartupError(str(e), 2) from None
    if len(token) < 16:
        raise StartupError(f"--token-file {path}: the token (the first line) must be at least 16 characters", 2)
    return token


def check_tls(listen: tuple[str, int] | None, args: argparse.Namespace) -> dict[str, str]:
    """uvicorn's ssl options for ``--tls-cert``/``--tls-key`` (empty: plain HTTP). Plain
    HTTP on TCP only on a loopback address, or with ``--insecure-http``."""
    cert, key = getattr(args, "tls_cert", None), getattr(args, "tls_key", None)
    if bool(cert) != bool(key):
        raise StartupError("--tls-cert and --tls-key go together", 2)
    if cert and listen is None:
        raise StartupError("--tls-cert/--tls-key need --listen (the Unix socket has no TLS)", 2)
    if not cert:
        if listen is not None and not ipaddress.ip_address(listen[0]).is_loopback \
                and not getattr(args, "insecure_http", False):
            raise StartupError(f"--listen {args.listen}: a non-loopback address needs TLS (--tls-cert and "
                               "--tls-key), or --insecure-http to serve plain HTTP anyway", 2)
        return {}
    import ssl

    try:  # fail now, with the file's name, rather than when the first client connects
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise StartupError(f"--tls-cert {cert} / --tls-key {key}: {e}", 2) from None
    return {"ssl_certfile": cert, "ssl_keyfile": key}


def parse_listen(value: str) -> tuple[str, int]:
    """'127.0.0.1:8080', '[::1]:8080' -> (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise StartupError(f"--listen {value!r}: expected HOST:PORT", 2)
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise StartupError(f"--listen {value!r}: HOST must be an IP address", 2) from None
    return host, int(port)


def unix_listener(path: str) -> socket.socket:
    """A listening Unix socket only root can use: directory 0700, socket 0600."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if p.exists() or p.is_symlink():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(p))
        except OSError:
            p.unlink()  # stale, from a daemon that died
        else:
            probe.close()
            raise StartupError(f"{path}: another daemon is listening there")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(p))
    finally:
        os.umask(old)
    os.chmod(p, 0o600)
    sock.listen(128)
    sock.setblocking(False)
    return sock


def tcp_listener(host: str, port: int) -> socket.socket:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(fam, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.setblocking(False)
    return sock


def sd_notify(message: str) -> None:
    """systemd's notify protocol (Type=notify); nothing if not run by systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(message.encode(), addr)


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def build(args: argparse.Namespace) -> dict[str, Any]:
    """Everything up to serving: state, datapath, control plane, app. StartupError on failure."""
    from control.api import create_app
    from control.api.guards import MAX_BODY_BYTES
    from control.datapaths import UserspaceIoPort, UserspacePort, XdpPort
    from control.health_probing import DirectProber, HealthRunner, plain_socket
    from control.metrics import Metrics
    from control.plane import open_plane
    from control.store import StateError, StateLocked, Store
    from control.tables import Sizes
    from control.validation import extra_checks
    from lb.config import ConfigError, load_config

    token = None
    listen = None
    if args.listen:
        listen = parse_listen(args.listen)
        if not args.token_file:
            where = "a loopback" if ipaddress.ip_address(listen[0]).is_loopback else "a non-loopback"
            raise StartupError(f"--listen {args.listen}: TCP needs --token-file (refusing to serve on "
                               f"{where} address without a bearer token)", 2)
        token = read_token(args.token_file)
    tls = check_tls(listen, args)
    max_body = MAX_BODY_BYTES if getattr(args, "max_body_bytes", None) is None else args.max_body_bytes
    if max_body < 1:
        raise StartupError(f"--max-body-bytes {max_body}: must be at least 1", 2)

    seed = None
    if args.config:
        try:
            seed = load_config(args.config)
        except ConfigError as e:
            raise StartupError(str(e), 2) from None
        problems = extra_checks(seed)
        if problems:
            raise StartupError(str(ConfigError(problems, args.config)), 2)

    name = instance_name(args.interface, args.netns)
    from control.etcd_store import open_store

    try:
        store = open_store(getattr(args, "store", None), args.state_dir or os.path.join(DEFAULT_STATE_ROOT, name),
                           args.netns, ca_file=getattr(args, "store_ca", None),
                           user_file=getattr(args, "store_user_file", None),
                           plaintext=getattr(args, "store_plaintext", False))
    except ValueError as e:
        raise StartupError(str(e), 2) from None
    try:
        store.lock()
    except StateLocked as e:
        raise StartupError(str(e)) from None
    gone = store.clean_temporaries()
    if gone:
        log.warning("removed %s left by an interrupted write (the previous state is intact)", ", ".join(gone))
    try:
        loaded = None if args.from_config else store.load()
    except StateError as e:
        raise StartupError(f"{e}\n(move the state directory away, or start with --from-config)") from None
    if loaded is None and seed is None:
        raise StartupError(f"no saved state in {store.dir} and no --config to start from", 2)
    if loaded is not None:
        log.info("loaded state generation %d from %s", loaded.generation, store.state_path)
    settings = (loaded.config if loaded is not None else seed).settings
    sizes = Sizes.of(settings)

    bal = None
    if args.datapath == "xdp":
        from lb.bpf_loader import PinnedMapMismatch, XdpAttachError, XdpBalancer, XdpError

        pin_dir = args.pin_dir or os.path.join(DEFAULT_PIN_ROOT, name)
        adopting = os.path.isdir(pin_dir) and bool(os.listdir(pin_dir))
        t0 = time.monotonic()
        try:
            bal = XdpBalancer(sizes.ring_size, sizes.max_vips, sizes.max_reals, sizes.conn_table_size,
                              pin_dir=pin_dir)
        except PinnedMapMismatch as e:
            raise StartupError(f"{e}\n(the sizes in the state differ from the pinned maps')") from None
        except XdpError as e:
            raise StartupError(str(e)) from None
        log.info("XDP program loaded in %.1f s, maps %s %s", time.monotonic() - t0,
                 "adopted from" if adopting else "pinned under", pin_dir)
        port: Any = XdpPort(bal)
    elif args.no_packet_io:
        port = UserspacePort(sizes)
    else:
        try:
            port = UserspaceIoPort(sizes, args.interface, args.netns)
        except (OSError, ImportError, ValueError) as e:
            raise StartupError(f"the userspace datapath cannot use {args.interface}: {e}") from None

    try:
        plane = open_plane(port, store, seed, from_config=args.from_config, loaded=loaded)
    except StateError as e:
        raise StartupError(str(e)) from None
    core = plane.core
    rec = core.last_reconcile or {}
    log.info("datapath reconciled to generation %d: %s", core.generation,
             ", ".join(f"{k} {v}" for k, v in rec.get("writes", {}).items() if v) or "no writes needed")

    if isinstance(port, UserspaceIoPort):
        try:
            port.start()  # the tables are in: start reading the interface
        except Exception as e:  # noqa: BLE001 - socket, guard, loop: all fatal here
            raise StartupError(f"the userspace datapath could not start on {args.interface}: {e}") from None
        log.info("userspace datapath running on %s%s", args.interface,
                 f" in netns {args.netns}" if args.netns else "")
    if bal is not None:
        # attach after the maps hold the desired state: the new program takes over from a
        # running one atomically, on the same maps
        try:
            bal.attach(args.interface, args.xdp_mode, netns=args.netns)
        except XdpAttachError as e:
            raise StartupError(str(e)) from None
        log.info("XDP attached to %s%s (%s)", args.interface,
                 f" in netns {args.netns}" if args.netns else "", args.xdp_mode)

    if hasattr(store, "attach"):  # a shared store (etcd): follow changes made elsewhere
        store.attach(plane.runtime)
    if args.netns:
        from lb.kernel.netns import run_in_netns

        def factory(fam: int, typ: int) -> socket.socket:
            return run_in_netns(args.netns, plain_socket, fam, typ)
    else:
        factory = plain_socket
    metrics = Metrics(core, getattr(store, "info", None))
    transport = args.probe_transport or ("tunnel" if args.datapath == "xdp" else "direct")
    encap = None
    if transport == "tunnel":
        from control.tunnel_probe import TunnelEncap, TunnelEncapError, TunnelProber

        try:
            encap = TunnelEncap(sizes.max_reals, args.probe_mark_base)
            with core.lock:  # the probes encapsulate as the datapath does, from now on
                encap.set_settings(core.state.config.settings)
                encap.attach(args.interface, args.netns)
                core.on_settings.append(encap.set_settings)
        except (TunnelEncapError, OSError, ValueError) as e:
            if encap is not None:
                encap.close()
            raise StartupError(f"probes through the tunnel: {e}") from None
        log.info("health probes through the tunnel (tc egress on %s, SO_MARK %#x + real id, encap %s)",
                 args.interface, args.probe_mark_base, core.state.config.settings.encap)
        prober: Any = TunnelProber(encap, factory)
    else:
        prober = DirectProber(factory)
    runner = HealthRunner(plane.runtime, prober, observe=metrics.observe_probe)
    info = {"interface": args.interface, "netns": args.netns, "pid": os.getpid(),
            "state_dir": str(store.dir), "pin_dir": getattr(bal, "pin_dir", None),
            "started": time.time(), "store": getattr(store, "info", {"kind": "file"})}
    holder: dict[str, Any] = {}

    def health_details() -> dict[tuple[str, str], dict[str, Any]]:
        loop = holder.get("loop")
        if loop is None:
            return {}

        async def snap() -> list[dict[str, Any]]:
            return runner.registry.snapshot()

        rows = asyncio.run_coroutine_threadsafe(snap(), loop).result(timeout=5)
        return {(r["vip"], r["real"]): r for r in rows}

    app = create_app(plane, token=token, metrics=metrics, health_details=health_details, info=info,
                     max_body=max_body)
    return {"plane": plane, "app": app, "runner": runner, "bal": bal, "store": store,
            "listen": listen, "tls": tls, "holder": holder, "port": port, "encap": encap}


async def _serve(args: argparse.Namespace, parts: dict[str, Any]) -> None:
    import uvicorn

    runtime, runner = parts["plane"].runtime, parts["runner"]
    loop = asyncio.get_running_loop()
    parts["holder"]["loop"] = loop
    if parts["listen"] is not None:
        sock = tcp_listener(*parts["listen"])
        where = f"{'https' if parts['tls'] else 'http'}://{args.listen} (bearer token required)"
    else:
        sock = unix_listener(args.socket)
        where = f"unix:{args.socket}"
    config = uvicorn.Config(parts["app"], log_config=None, access_log=False, lifespan="off",
                            timeout_graceful_shutdown=5, **parts["tls"])
    server = uvicorn.Server(config)
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign] - ours below
    stop = asyncio.Event()

    def on_signal(sig: int) -> None:
        log.info("signal %s: stopping (the datapath keeps running)", signal.Signals(sig).name)
        server.should_exit = True
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)

    tasks = [asyncio.ensure_future(runner.run(stop)), asyncio.ensure_future(runtime.keep_reconciled(stop))]
    log.info("serving the API on %s", where)
    sd_notify("READY=1")
    try:
        await server.serve(sockets=[sock])
    finally:
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        sock.close()
        if parts["listen"] is None:
            with contextlib.suppress(OSError):
                os.unlink(args.socket)


def serve(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level)
    try:
        parts = build(args)
    except StartupError as e:
        print(f"lbctl serve: {e}", file=sys.stderr)
        return e.code
    try:
        asyncio.run(_serve(args, parts))
    except StartupError as e:
        print(f"lbctl serve: {e}", file=sys.stderr)
        return e.code
    finally:
        stop_io = getattr(parts.get("port"), "stop", None)
        if stop_io is not None:  # the userspace datapath lives in this process
            with contextlib.suppress(Exception):
                stop_io()
        encap = parts.get("encap")
        if encap is not None:  # no probes without the daemon: the tc filter goes with it
            with contextlib.suppress(Exception):
                encap.close()
        bal = parts.get("bal")
        if bal is not None and args.detach_on_exit:
            with contextlib.suppress(Exception):
                bal.detach()
                log.info("XDP detached from %s", args.interface)
        parts["store"].unlock()
    sd_notify("STOPPING=1")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--interface", required=True, help="interface to attach the XDP program to")
    p.add_argument("--config", help="YAML config: the starting point when the state directory is empty")
    p.add_argument("--datapath", choices=["xdp", "userspace"], default="xdp",
                   help="xdp (default) or userspace (the numba twin on an AF_PACKET socket; it "
                        "stops with the daemon)")
    p.add_argument("--no-packet-io", action="store_true",
                   help="userspace only: keep the tables in the numba twin without opening the "
                        "interface (tests, dry runs, simulate)")
    p.add_argument("--state-dir", help=f"desired state and health (default {DEFAULT_STATE_ROOT}/[NETNS-]IF)")
    p.add_argument("--store", help="where the desired state lives: file (default: --state-dir) or "
                                   "etcds://HOST:PORT/PREFIX (etcd over TLS, shared by a fleet; see docs/fleet.md)")
    p.add_argument("--store-ca", help="etcds://: PEM file of the CA that signed etcd's certificate "
                                      "(default: the system's CAs)")
    p.add_argument("--store-user-file", help="etcd user and password, the first line USER:PASSWORD (file mode 600)")
    p.add_argument("--store-plaintext", action="store_true",
                   help="allow etcd:// (no TLS) to a non-loopback address")
    p.add_argument("--pin-dir", help=f"bpffs directory of the pinned maps (default {DEFAULT_PIN_ROOT}/[NETNS-]IF)")
    p.add_argument("--netns", help="network namespace (under /run/netns) the interface is in; "
                                   "health probes are sent from there too")
    p.add_argument("--xdp-mode", choices=["native", "generic"], default="native", help="XDP attach mode")
    p.add_argument("--socket", default=DEFAULT_SOCKET, help=f"Unix socket of the API (default {DEFAULT_SOCKET})")
    p.add_argument("--listen", metavar="HOST:PORT", help="serve the API on TCP instead (needs --token-file)")
    p.add_argument("--token-file", help="bearer token for --listen (first line; file mode 600)")
    p.add_argument("--tls-cert", help="--listen over HTTPS: the certificate chain (PEM)")
    p.add_argument("--tls-key", help="--listen over HTTPS: the certificate's private key (PEM)")
    p.add_argument("--insecure-http", action="store_true",
                   help="allow plain HTTP on a non-loopback --listen address (default: refused without TLS)")
    p.add_argument("--max-body-bytes", type=int, default=None,
                   help="largest request body the API accepts (default 1 MiB; larger: 413)")
    p.add_argument("--from-config", action="store_true",
                   help="discard the saved state and start from --config")
    p.add_argument("--detach-on-exit", action="store_true",
                   help="detach the XDP program on SIGTERM (default: keep forwarding)")
    p.add_argument("--probe-transport", choices=["tunnel", "direct"], default=None,
                   help="health probes: tunnel (to the VIP, SO_MARK, encapsulated by a tc egress "
                        "program towards the real; default with --datapath xdp) or direct (to the "
                        "real's own address; default with userspace)")
    p.add_argument("--probe-mark-base", type=lambda v: int(v, 0), default=0x4C420000,
                   help="tunnel probes: SO_MARK = this + real id (default 0x4c420000)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
