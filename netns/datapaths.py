"""The balancer datapaths a lab can run: ``"xdp"`` (:class:`lb.bpf_loader.XdpBalancer`
attached natively, maps pinned so other processes can read and update them) or
``"userspace"`` (``lb.userspace_io.UserspaceBalancer(tables, ifname, netns)`` with
``start()``, ``stop()``, ``stats()``, imported only when asked for), in the lab's
process or in a runner process of its own (:func:`run_userspace`)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from netns.errors import LabError
from netns.lab_tables import remap_real_ids, with_gateway
from netns.processes import wait_ready
from netns.topology import Host

DATAPATHS = ("xdp", "userspace")


class DatapathUnavailable(LabError):
    """The requested balancer datapath is not available in this tree / on this host."""


class Backend(Protocol):
    """What the lab needs of a balancer's datapath."""

    kind: str
    prog_id: int | None  # its XDP program (recorded for teardown), if it has one

    def load_tables(self, tables: Any) -> None: ...
    def stats(self) -> dict[str, int]: ...
    def real_stats(self) -> Any: ...
    def close(self) -> None: ...
    def release(self) -> None: ...


def check_datapath(kind: str) -> None:
    """Raise DatapathUnavailable unless ``kind`` can be used here."""
    if kind not in DATAPATHS:
        raise DatapathUnavailable(f"datapath must be one of {', '.join(DATAPATHS)}, not {kind!r}")
    if kind == "userspace":
        try:
            from lb.userspace_io import UserspaceBalancer  # noqa: F401
        except ImportError as e:
            raise DatapathUnavailable(
                "datapath 'userspace' needs lb/userspace_io.py with class UserspaceBalancer"
                f"(tables, ifname, netns), which this tree does not have yet ({e})") from e


class XdpBackend:
    """XdpBalancer attached natively to the balancer's link, maps pinned."""

    kind = "xdp"

    def __init__(self, tables: Any, host: Host, pin_dir: str, xdp_mode: str) -> None:
        from lb.bpf_loader import XdpBalancer

        self.bal = XdpBalancer.from_tables(tables, pin_dir=pin_dir)
        try:
            self.bal.attach(host.ifname, xdp_mode, netns=host.ns)
        except BaseException:
            self.bal.close()
            raise
        self.prog_id = int(self.bal.prog_info()["id"])

    def load_tables(self, tables: Any) -> None:
        self.bal.load_tables(tables)

    def update_ring(self, vip_num: int, ring: Any) -> int:
        return self.bal.update_ring(vip_num, ring)

    def stats(self) -> dict[str, int]:
        return dict(self.bal.read_stats().counters)

    def real_stats(self) -> Any:
        return self.bal.read_stats().real

    def close(self) -> None:
        self.bal.close()

    def release(self) -> None:
        """Leave program, attachment and pinned maps in place for other processes."""
        self.bal = None


def read_pinned_balancer(pin_dir: str, max_reals: int) -> tuple[dict[str, int], list[tuple[int, int]]]:
    """Counters of an XdpBalancer from its pinned maps, from any process: (global
    counters by name, per real id (packets, bytes))."""
    from lb import constants as C
    from netns.lab_bpf import read_percpu_array

    glob = read_percpu_array(os.path.join(pin_dir, "stats"), 1, C.N_STATS)
    cols = C.REAL_STAT_COLUMNS
    flat = read_percpu_array(os.path.join(pin_dir, "real_stats"), max_reals, cols)
    reals = [(flat[r * cols + C.VIP_STAT_PACKETS], flat[r * cols + C.VIP_STAT_BYTES])
             for r in range(max_reals)]
    return dict(zip(C.STATS, glob)), reals


class UserspaceBackend:
    """lb.userspace_io.UserspaceBalancer on the balancer's link (AF_PACKET)."""

    kind = "userspace"

    def __init__(self, tables: Any, host: Host) -> None:
        check_datapath("userspace")
        from lb.userspace_io import UserspaceBalancer

        self.bal = UserspaceBalancer(tables, host.ifname, host.ns)
        self.bal.start()
        self.prog_id = None

    def load_tables(self, tables: Any) -> None:
        for name in ("update_tables", "load_tables"):
            fn = getattr(self.bal, name, None)
            if fn is not None:
                fn(tables)
                return
        raise LabError("this UserspaceBalancer cannot take new tables")

    def stats(self) -> dict[str, int]:
        return dict(self.bal.stats())

    def real_stats(self) -> Any:
        fn = getattr(self.bal, "real_stats", None)
        return fn() if fn is not None else None

    def close(self) -> None:
        self.bal.stop()

    def release(self) -> None:
        raise LabError("the userspace datapath runs inside this process; use the runner")


class UserspaceRunner:
    """The userspace datapath in its own process (``python -m netns.lab run-userspace``,
    :func:`run_userspace`), which outlives the process that built the lab; counters
    come through a JSON file it rewrites every second. ``spawn(role, ns, argv, log)``
    starts and records the process (the lab's, so that teardown stops it)."""

    kind = "userspace"

    def __init__(self, host: Host, state_path: str, log_dir: str,
                 spawn: Callable[[str, str | None, list[str], str], subprocess.Popen]) -> None:
        check_datapath("userspace")
        self.stats_path = os.path.join(log_dir, f"{host.name}.stats.json")
        argv = [sys.executable, "-m", "netns.lab", "run-userspace", "--state", state_path,
                "--balancer", host.name]
        log = os.path.join(log_dir, f"{host.name}.log")
        proc = spawn(f"balancer-{host.name}", None, argv, log)
        wait_ready(proc, 60, log, host.name)
        self.prog_id = None

    def load_tables(self, tables: Any) -> None:
        raise LabError("the userspace runner takes its tables at start only")

    def stats(self) -> dict[str, int]:
        try:
            return json.loads(Path(self.stats_path).read_text())
        except (OSError, ValueError):
            return {}

    def real_stats(self) -> Any:
        return None

    def close(self) -> None:
        pass  # a recorded process: teardown_state stops it

    def release(self) -> None:
        pass


def run_userspace(state_path: str, balancer: str) -> int:
    """Run lb.userspace_io.UserspaceBalancer for ``balancer`` of the lab in
    ``state_path`` until SIGTERM/SIGINT; counters go to <log_dir>/<balancer>.stats.json."""
    from lb.config import parse_config
    from lb.datapath_tables import compile_tables

    with open(state_path) as f:
        state = json.load(f)
    host = next(h for h in state["hosts"] if h["name"] == balancer)
    cfg = parse_config(state["config"])
    ids = dict(state["real_ids"])
    tables = with_gateway(remap_real_ids(compile_tables(cfg), ids, cfg.settings.max_reals),
                          host["gw_mac"])
    check_datapath("userspace")
    from lb.userspace_io import UserspaceBalancer

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    bal = UserspaceBalancer(tables, host["ifname"], host["ns"])
    bal.start()
    path = os.path.join(state["log_dir"], f"{balancer}.stats.json")

    def dump() -> None:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({k: int(v) for k, v in bal.stats().items()}, f)
        os.replace(tmp, path)

    try:
        dump()
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)
        while not stop.wait(1.0):
            dump()
    finally:
        bal.stop()
        with contextlib.suppress(OSError):
            dump()
    return 0
