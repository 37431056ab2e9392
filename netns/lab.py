"""The network-namespace lab: clients, a router, balancers on a stick, reals with DSR.

One call builds the whole topology (see docs/lab.md for the diagram and the addressing
plan)::

    with Lab(reals=3) as lab:                     # built on enter, torn down on exit
        results = http_requests(lab.client().ns, VIP4, 80, n=1000)

* **client** namespaces (``c1``..) with a 1500-byte link to the router;
* one **router** namespace that routes VIP/32 and VIP/128 to the balancer(s) (ECMP if
  there are several) and the tunnel traffic (outer destination = a real) to the reals;
* **balancer** namespaces (``lb1``..), each "on a stick": one 1600-byte link to the
  router; the datapath encapsulates and sends the packet back out of that link
  (XDP_TX), towards ``gateway_mac`` = the router's MAC on that link;
* **real** namespaces (``r1``..): the VIPs on loopback, the decap program (XDP, native)
  on the router-facing link, the real servers (:mod:`netns.servers`) bound to the VIPs,
  default route via the router, so replies go straight to the client (DSR).

Everything the lab creates is recorded, *before* it is created, in a state file
``/run/lb-lab/<name>.json``. :meth:`Lab.teardown` (and :func:`teardown` for another
process, e.g. ``lbctl lab down``) removes everything listed there: processes, XDP
programs, namespaces (and with them every link: all links have one end in the router),
pinned maps under ``/sys/fs/bpf/<name>/``, logs, the state file. A ``with Lab()`` block
tears down on any exception, KeyboardInterrupt included, with SIGINT/SIGTERM blocked
while it does; :meth:`Lab.release` instead leaves the lab running after the process
exits (``lbctl lab up``).

The balancer's datapath is a parameter: ``"xdp"`` (:class:`lb.bpf_loader.XdpBalancer`,
maps pinned so other processes can read and update them) or ``"userspace"``
(``lb.userspace_io.UserspaceBalancer(tables, ifname, netns)`` with ``start()``,
``stop()``, ``stats()``, imported only when asked for).

Real ids are kept stable across :meth:`Lab.apply` calls, as Katran does: a real keeps
its id while it is configured, a removed real's id is not handed out again in this lab,
so connection-table entries never point at the wrong real after a change.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Self

STATE_DIR = "/run/lb-lab"
BPFFS = "/sys/fs/bpf"
NAME_PREFIX = "lbl"
REPO = Path(__file__).resolve().parent.parent

# ---- addressing plan (docs/lab.md) -----------------------------------------------------
# Link ("segment") s: IPv4 198.18.s.0/24, IPv6 2001:db8:0:s::/64 (s written with the same
# digits), router .1 / ::1, host .2 / ::2. Segment 0 holds the VIPs.
VIP4 = "198.18.0.100"
VIP6 = "2001:db8::100"
HTTP_PORT = 80
UDP_PORT = 7
CLIENT_SEG0 = 0  # client k (1..9): segment k
BALANCER_SEG0 = 10  # balancer b (1..9): segment 10 + b
REAL_SEG0 = 100  # real i (1..154): segment 100 + i
MAX_CLIENTS, MAX_BALANCERS, MAX_REALS = 9, 9, 154
EDGE_MTU = 1500  # client links: what the Internet gives us
INNER_MTU = 1600  # router-balancer and router-real links: room for the 20/40-byte tunnel
LAB_CONN_TABLE_SIZE = 65536  # per CPU; Katran's 1M per CPU would take seconds to allocate
DATAPATHS = ("xdp", "userspace")

XDP_FLAGS_DRV_MODE = 1 << 2
BPF_PROG_LOAD = 5
BPF_PROG_GET_FD_BY_ID = 13
BPF_MAP_GET_FD_BY_ID = 14
BPF_PROG_TYPE_XDP = 6


def run_in_netns(ns: str | None, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """netns.ns.run_in_netns, imported on first use (pyroute2 is slow to import and
    ``lbctl`` builds its parser, this module's constants included, on every call)."""
    from netns.ns import run_in_netns as run

    return run(ns, fn, *args, **kwargs)


class LabError(RuntimeError):
    """Building, changing or tearing down a lab failed."""


class DatapathUnavailable(LabError):
    """The requested balancer datapath is not available in this tree / on this host."""


def seg4(seg: int, host: int) -> str:
    return f"198.18.{seg}.{host}"


def seg6(seg: int, host: int) -> str:
    return f"2001:db8:0:{seg}::{host}"


def seg_net4(seg: int) -> ipaddress.IPv4Network:
    return ipaddress.ip_network(f"198.18.{seg}.0/24")


def seg_net6(seg: int) -> ipaddress.IPv6Network:
    return ipaddress.ip_network(f"2001:db8:0:{seg}::/64")


@dataclass
class Host:
    """One namespace hanging off the router by one veth pair."""

    role: str  # "client" | "balancer" | "real"
    name: str  # c1, lb1, r1, ...
    ns: str  # namespace name
    ifname: str  # the host's end of the link
    gw_ifname: str  # the router's end
    seg: int  # link segment number (addresses)
    mtu: int
    addr4: str = ""  # the host's link addresses
    addr6: str = ""
    gw4: str = ""  # the router's link addresses
    gw6: str = ""
    mac: str = ""  # the host's MAC on the link
    gw_mac: str = ""  # the router's MAC on the link
    real4: str | None = None  # reals: the addresses the balancer sends to (tunnel dst)
    real6: str | None = None

    def __post_init__(self) -> None:
        self.addr4, self.addr6 = seg4(self.seg, 2), seg6(self.seg, 2)
        self.gw4, self.gw6 = seg4(self.seg, 1), seg6(self.seg, 1)


# ---- small system helpers ------------------------------------------------------------------

def _ip_batch(ns: str | None, commands: Sequence[str], what: str) -> None:
    """Run ``ip`` commands (one per line, without the leading ``ip``) in ``ns`` in one
    process; stop at the first failure."""
    if not commands:
        return
    argv = ["ip"] + (["-n", ns] if ns else []) + ["-batch", "-"]
    r = subprocess.run(argv, input="\n".join(commands) + "\n", capture_output=True, text=True,
                       timeout=60, check=False)
    if r.returncode != 0:
        raise LabError(f"{what}: ip -batch failed in {ns or 'the root namespace'}: "
                       f"{(r.stderr or r.stdout).strip()}")


def _links_json(ns: str) -> list[dict]:
    r = subprocess.run(["ip", "-n", ns, "-j", "link", "show"], capture_output=True, text=True,
                       timeout=30, check=False)
    if r.returncode != 0:
        raise LabError(f"listing links in {ns}: {r.stderr.strip()}")
    return json.loads(r.stdout or "[]")


def _write_sysctls(ns: str, values: Mapping[str, str | int]) -> None:
    """Write net.* sysctls inside ``ns`` (a thread that has entered it opens the files:
    /proc/sys/net follows the opener's namespace)."""

    def write() -> None:
        for key, value in values.items():
            path = "/proc/sys/" + key.replace(".", "/")
            with open(path, "w") as f:
                f.write(str(value))

    run_in_netns(ns, write)


def tx_checksum_off(ns: str, ifname: str) -> None:
    """``ethtool -K <ifname> tx off`` inside ``ns`` (pyroute2's ioctl, no ethtool binary).

    Why: a veth sends TCP/UDP with the checksum left to "hardware" (CHECKSUM_PARTIAL),
    and XDP sees the packet before anyone fills it in; a frame the balancer sends on
    with XDP_TX has lost that note and reaches the real with a wrong checksum. Without
    the offload the kernel completes the checksum before the frame leaves the router,
    as a real NIC would on the wire. (TSO goes off with it.)"""
    from pyroute2.ethtool import Ethtool

    def run() -> None:
        et = Ethtool()
        try:
            feats = et.get_features(ifname)
            for name in ("tx-checksum-ip-generic", "tx-checksum-ipv4", "tx-checksum-ipv6"):
                if name in feats.features:
                    feats.features[name].enable = False
            et.set_features(ifname, feats)
        finally:
            et.close()

    run_in_netns(ns, run)


def _proc_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (/proc/<pid>/stat field 22), so a
    recorded pid is never confused with a later process that reused the number."""
    from netns.ns import proc_stat_fields

    fields = proc_stat_fields(pid)
    if fields is None:
        return None
    if fields[0] == "Z":
        return None  # a zombie has finished; only its parent's wait() is missing
    return int(fields[19])


def process_alive(entry: Mapping[str, Any]) -> bool:
    return _proc_start_time(int(entry["pid"])) == entry.get("start")


def _netns_pids(ns: str) -> list[int]:
    r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=30,
                       check=False)
    return [int(p) for p in r.stdout.split()] if r.returncode == 0 else []


def _kill(pids_starts: Iterable[tuple[int, int | None]], grace: float = 3.0) -> list[str]:
    """SIGTERM, wait up to ``grace`` s, SIGKILL; only processes whose start time still
    matches. Returns the ones that would not die."""
    me = os.getpid()
    targets = [(p, s) for p, s in pids_starts if p != me and s is not None
               and _proc_start_time(p) == s]
    for pid, _ in targets:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        for pid, _ in targets:  # reap our own children
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)
        targets = [(p, s) for p, s in targets if _proc_start_time(p) == s]
        if not targets:
            return []
        time.sleep(0.02)
    for pid, _ in targets:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    time.sleep(0.1)
    for pid, _ in targets:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
    return [f"process {p} did not exit" for p, s in targets if _proc_start_time(p) == s]


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    """SIGINT/SIGTERM held back for the body (delivered when it ends), main thread only."""
    sigs = {signal.SIGINT, signal.SIGTERM}
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# ---- raw bpf(): a 2-instruction XDP_PASS program, prog/map lookups by id ---------------------

class _ProgLoadAttr(ctypes.Structure):
    _fields_ = [("prog_type", ctypes.c_uint32), ("insn_cnt", ctypes.c_uint32),
                ("insns", ctypes.c_uint64), ("license", ctypes.c_uint64),
                ("log_level", ctypes.c_uint32), ("log_size", ctypes.c_uint32),
                ("log_buf", ctypes.c_uint64), ("kern_version", ctypes.c_uint32),
                ("prog_flags", ctypes.c_uint32), ("prog_name", ctypes.c_char * 16),
                ("_rest", ctypes.c_uint8 * 64)]


class _GetFdAttr(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint32), ("next_id", ctypes.c_uint32),
                ("open_flags", ctypes.c_uint32)]


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32),
                ("info", ctypes.c_uint64)]


def load_xdp_pass() -> int:
    """Load ``r0 = XDP_PASS; exit`` and return its fd. No compiler needed.

    Why: veth delivers XDP_TX'd frames only to a peer whose NAPI runs, i.e. that has an
    XDP program (or GRO, which needs ethtool). The router's end of every balancer link
    gets this one, so the balancer's XDP_TX reaches the router."""
    from lb.bpf_testrun import bpf_syscall

    insns = bytes.fromhex("b700000002000000" "9500000000000000")  # mov64 r0, 2; exit
    buf = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(b"GPL")
    attr = _ProgLoadAttr(prog_type=BPF_PROG_TYPE_XDP, insn_cnt=2, insns=ctypes.addressof(buf),
                         license=ctypes.addressof(lic), prog_name=b"lab_xdp_pass")
    return bpf_syscall(BPF_PROG_LOAD, attr, "load the XDP_PASS program")


def attach_xdp_fd(ns: str, ifname: str, fd: int, flags: int = XDP_FLAGS_DRV_MODE) -> None:
    """Attach program ``fd`` to ``ifname`` in namespace ``ns`` (netlink, through libbcc)."""
    from bcc.libbcc import lib

    def attach() -> None:
        if lib.bpf_attach_xdp(ifname.encode(), fd, flags) < 0:
            err = ctypes.get_errno()
            raise LabError(f"attaching XDP to {ifname} in {ns}: {os.strerror(err)}")

    run_in_netns(ns, attach)


def prog_exists(prog_id: int) -> bool:
    """Whether a BPF program with this id is still loaded."""
    from lb.bpf_testrun import bpf_syscall

    try:
        fd = bpf_syscall(BPF_PROG_GET_FD_BY_ID, _GetFdAttr(id=prog_id), "prog by id")
    except OSError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    os.close(fd)
    return True


def _prog_id(fd: int) -> int:
    from lb.bpf_loader import prog_info

    return int(prog_info(fd)["id"])


def pin_prog_map(prog_fd: int, map_name: str, path: str) -> None:
    """Pin the map called ``map_name`` that program ``prog_fd`` uses (found through the
    program's map ids, so no loader internals are needed)."""
    from lb.bpf_loader import map_info, obj_pin
    from lb.bpf_testrun import BPF_OBJ_GET_INFO_BY_FD, bpf_syscall

    ids = (ctypes.c_uint32 * 64)()
    info = ctypes.create_string_buffer(256)
    # struct bpf_prog_info: nr_map_ids (u32) at 52, map_ids (u64 pointer) at 56
    ctypes.memmove(ctypes.addressof(info) + 52, ctypes.byref(ctypes.c_uint32(64)), 4)
    ctypes.memmove(ctypes.addressof(info) + 56, ctypes.byref(ctypes.c_uint64(ctypes.addressof(ids))), 8)
    bpf_syscall(BPF_OBJ_GET_INFO_BY_FD, _InfoAttr(bpf_fd=prog_fd, info_len=256,
                                                  info=ctypes.addressof(info)), "prog info")
    n = int.from_bytes(info.raw[52:56], "little")
    for map_id in ids[:min(n, 64)]:
        fd = bpf_syscall(BPF_MAP_GET_FD_BY_ID, _GetFdAttr(id=map_id), "map by id")
        try:
            if map_info(fd).name.decode() == map_name:
                obj_pin(fd, path)
                return
        finally:
            os.close(fd)
    raise LabError(f"program has no map named {map_name}")


def read_percpu_array(path: str, n: int) -> list[int]:
    """A pinned per-CPU array of u64 (``n`` slots), summed over CPUs."""
    from lb.bpf_loader import map_lookup_batch, obj_get, possible_cpus

    ncpus = possible_cpus()
    fd = obj_get(path)
    try:
        keys, values, count = map_lookup_batch(fd, 4, 8 * ncpus)
    finally:
        os.close(fd)
    out = [0] * n
    for i in range(count):
        k = int.from_bytes(keys[4 * i:4 * i + 4], "little")
        row = values[8 * ncpus * i:8 * ncpus * (i + 1)]
        if k < n:
            out[k] = sum(int.from_bytes(row[8 * c:8 * c + 8], "little") for c in range(ncpus))
    return out


def read_pinned_balancer(pin_dir: str, max_reals: int) -> tuple[dict[str, int], list[tuple[int, int]]]:
    """Counters of an XdpBalancer from its pinned maps, from any process: (global
    counters by name, per real id (packets, bytes))."""
    from lb import constants as C

    glob = read_percpu_array(os.path.join(pin_dir, "stats"), C.N_STATS)
    cols = max(C.VIP_STAT_PACKETS, C.VIP_STAT_BYTES) + 1
    flat = read_percpu_array(os.path.join(pin_dir, "real_stats"), max_reals * cols)
    reals = [(flat[r * cols + C.VIP_STAT_PACKETS], flat[r * cols + C.VIP_STAT_BYTES])
             for r in range(max_reals)]
    return dict(zip(C.STATS, glob)), reals


def remove_tree(path: str) -> None:
    """rm -r for bpffs (pins are unlinked, directories removed bottom-up)."""
    if not os.path.lexists(path):
        return
    if not os.path.isdir(path) or os.path.islink(path):
        os.unlink(path)
        return
    for root, dirs, files in os.walk(path, topdown=False):
        for f in files:
            os.unlink(os.path.join(root, f))
        for d in dirs:
            os.rmdir(os.path.join(root, d))
    os.rmdir(path)


# ---- configuration -----------------------------------------------------------------------

@dataclass(frozen=True)
class VipSpec:
    address: str
    port: int
    protocol: str  # tcp | udp
    hash: str = "maglev_v2"
    flags: tuple[str, ...] = ()

    @property
    def version(self) -> int:
        return ipaddress.ip_address(self.address).version


DEFAULT_VIPS = (VipSpec(VIP4, HTTP_PORT, "tcp"), VipSpec(VIP4, UDP_PORT, "udp"),
                VipSpec(VIP6, HTTP_PORT, "tcp"), VipSpec(VIP6, UDP_PORT, "udp"))


def remap_real_ids(tables: Any, ids: dict[str, int], max_reals: int) -> Any:
    """Give every real of ``tables`` (lb.datapath_tables.DatapathTables) the id recorded in ``ids``
    (address -> id; new addresses get the next unused id, recorded in ``ids``). Ids of
    removed reals are never reused. Returns the same tables object, rewritten."""
    import numpy as np

    old_to_new = np.zeros(max(tables.real_ids.values(), default=0) + 1, dtype=np.uint32)
    next_id = max(ids.values(), default=0) + 1
    new_real_ids = {}
    for ip, old in tables.real_ids.items():
        key = str(ip)
        if key not in ids:
            if next_id >= max_reals:
                raise LabError(f"out of real ids (max_reals {max_reals}): this lab has used "
                               f"{len(ids)} distinct real addresses")
            ids[key] = next_id
            next_id += 1
        old_to_new[old] = ids[key]
        new_real_ids[ip] = ids[key]
    reals = np.zeros_like(tables.reals)
    for ip, old in tables.real_ids.items():
        reals[new_real_ids[ip]] = tables.reals[old]
    n = len(tables.vip_keys)
    tables.rings[:n] = old_to_new[tables.rings[:n]]
    for name in ("quic_servers", "src_routes_v4", "src_routes_v6"):
        table = getattr(tables, name, None)
        if table is not None and len(table):
            table = table.copy()
            table["real_id"] = old_to_new[table["real_id"]]
            setattr(tables, name, table)
    tables.reals = reals
    tables.real_ids = new_real_ids
    return tables


def with_gateway(tables: Any, mac: str) -> Any:
    """A shallow copy of ``tables`` whose ctl carries gateway MAC ``mac``."""
    import copy

    import numpy as np

    t = copy.copy(tables)
    t.ctl = tables.ctl.copy()
    t.ctl[0]["gw_mac"] = np.frombuffer(bytes.fromhex(mac.replace(":", "")), dtype=np.uint8)
    return t


# ---- balancer backends ---------------------------------------------------------------------

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


class _XdpBackend:
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


class _UserspaceBackend:
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


class _UserspaceRunner:
    """The userspace datapath in its own process (``python -m netns.lab run-userspace``),
    which outlives the process that built the lab; counters come through a JSON file
    it rewrites every second."""

    kind = "userspace"

    def __init__(self, lab: Lab, host: Host) -> None:
        check_datapath("userspace")
        self.stats_path = os.path.join(lab.log_dir, f"{host.name}.stats.json")
        argv = [sys.executable, "-m", "netns.lab", "run-userspace", "--state", lab.state_path,
                "--balancer", host.name]
        proc = lab._spawn(f"balancer-{host.name}", None, argv,
                          os.path.join(lab.log_dir, f"{host.name}.log"))
        _wait_ready(proc, 60, os.path.join(lab.log_dir, f"{host.name}.log"), host.name)
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


def _wait_ready(proc: subprocess.Popen, timeout: float, log: str, what: str) -> None:
    """Wait for the child's first stdout line, which must start with "ready"."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    line = b""
    while time.monotonic() < deadline and not line.endswith(b"\n"):
        r, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not r:
            break
        chunk = os.read(proc.stdout.fileno(), 256)
        if not chunk:
            break
        line += chunk
    proc.stdout.close()
    if not line.startswith(b"ready"):
        tail = Path(log).read_text(errors="replace")[-2000:] if os.path.exists(log) else ""
        raise LabError(f"{what} did not start (exit {proc.poll()}): {tail}")


# ---- the lab ---------------------------------------------------------------------------------

class Lab:
    """A whole lab; see the module docstring.

    reals / clients / balancers: how many of each namespace.
    datapath: "xdp" or "userspace".
    config: an lb.config.Config whose VIPs and reals the lab serves (addresses must fit
        the addressing plan; gateway_mac is replaced by the router's MAC). Default: the
        VIPs VIP4 and VIP6, HTTP on port 80 and UDP echo on port 7, every real weight 1.
    weights: real name -> weight for the default config; reals left out are built (and
        serve) but are not in the balancer's config yet (add them later with
        :meth:`set_weights`).
    balancer_processes: run a userspace datapath in its own process (the runner,
        ``python -m netns.lab run-userspace``) instead of in this one, so the lab can
        outlive this process (``lbctl lab up``). XDP needs no process either way.
    on_stage: called with each stage name as the build reaches it (tests raise there).
    """

    STAGES = ("namespaces", "links", "addresses", "decap", "servers", "balancer", "routes",
              "ready")
    name_prefix = NAME_PREFIX  # subclasses (netns/fleet.py) name their labs differently

    def __init__(self, reals: int = 3, *, clients: int = 1, balancers: int = 1,
                 datapath: str = "xdp", config: Any = None,
                 weights: Mapping[str, int] | None = None, state_dir: str = STATE_DIR,
                 xdp_mode: str = "native", balancer_processes: bool = False,
                 on_stage: Callable[[str], None] | None = None) -> None:
        if not 1 <= clients <= MAX_CLIENTS:
            raise ValueError(f"clients must be 1..{MAX_CLIENTS}")
        if not 1 <= balancers <= MAX_BALANCERS:
            raise ValueError(f"balancers must be 1..{MAX_BALANCERS}")
        self.datapath = datapath
        self.xdp_mode = xdp_mode
        self.balancer_processes = balancer_processes
        self.state_dir = state_dir
        self.on_stage = on_stage
        self._user_config = config
        self.vips, real_addrs = self._vips_and_reals(config)
        n_reals = max(reals, len(real_addrs))
        if not 1 <= n_reals <= MAX_REALS:
            raise ValueError(f"reals must be 1..{MAX_REALS}")
        self.name = self._new_name()
        self.router_ns = f"{self.name}-rt"
        self.hosts: list[Host] = []
        for role, count, seg0, mtu in (("client", clients, CLIENT_SEG0, EDGE_MTU),
                                       ("balancer", balancers, BALANCER_SEG0, INNER_MTU),
                                       ("real", n_reals, REAL_SEG0, INNER_MTU)):
            short = {"client": "c", "balancer": "lb", "real": "r"}[role]
            letter = {"client": "c", "balancer": "b", "real": "r"}[role]
            for i in range(1, count + 1):
                ifname = f"{self.name}{letter}{i}"
                self.hosts.append(Host(role, f"{short}{i}", f"{self.name}-{short}{i}", ifname,
                                       ifname + "g", seg0 + i, mtu))
        for h, (a4, a6) in zip(self.reals(), real_addrs + [(None, None)] * n_reals):
            h.real4 = a4 or h.addr4
            h.real6 = a6 or h.addr6
        self._check_addresses()
        if config is None:
            names = [h.name for h in self.reals()]
            self.weights = dict(weights) if weights is not None else {n: 1 for n in names}
            unknown = set(self.weights) - set(names)
            if unknown:
                raise ValueError(f"weights for reals this lab does not have: {sorted(unknown)}")
        else:
            if weights is not None:
                raise ValueError("give weights or a config, not both")
            self.weights = None
        self.state_path = os.path.join(state_dir, f"{self.name}.json")
        self.pin_root = os.path.join(BPFFS, self.name)
        self.log_dir = os.path.join(state_dir, self.name)
        self.state: dict[str, Any] = {
            "version": 1, "name": self.name, "datapath": datapath, "created": time.time(),
            "owner_pid": os.getpid(), "owner_start": _proc_start_time(os.getpid()),
            "status": "new", "router_ns": self.router_ns, "namespaces": [], "links": [],
            "hosts": [], "vips": [asdict(v) for v in self.vips], "pin_root": self.pin_root,
            "pin_dirs": {}, "processes": [], "prog_ids": [], "log_dir": self.log_dir,
            "config": None, "real_ids": {}, "max_reals": None,
        }
        self.real_ids: dict[str, int] = self.state["real_ids"]
        self.config = None  # the lb.config.Config in force
        self.tables = None  # its lb.datapath_tables.DatapathTables (lab real ids)
        self._backends: dict[str, Any] = {}
        self._decap = None
        self._procs: dict[str, subprocess.Popen] = {}
        self._closed = False
        self.timings: dict[str, float] = {}

    # ---- naming and checks --------------------------------------------------------------

    def _new_name(self) -> str:
        from netns.ns import list_netns, unique_name

        taken = set(list_netns())
        for _ in range(20):
            name = unique_name(self.name_prefix, maxlen=9)
            if (not any(n.startswith(name) for n in taken)
                    and not os.path.exists(os.path.join(self.state_dir, f"{name}.json"))
                    and not os.path.exists(os.path.join(BPFFS, name))):
                return name
        raise LabError("could not find an unused lab name")

    @staticmethod
    def _vips_and_reals(config: Any) -> tuple[tuple[VipSpec, ...], list[tuple[str | None, str | None]]]:
        """VIP specs and real hosts' (v4, v6) addresses from a user config: the distinct
        real addresses of each family, in order of appearance, are paired into hosts."""
        if config is None:
            return DEFAULT_VIPS, []
        vips = tuple(VipSpec(str(v.address), v.port, v.protocol, v.hash, tuple(v.flags))
                     for v in config.vips)
        v4: list[str] = []
        v6: list[str] = []
        for v in config.vips:
            for r in v.reals:
                a = str(ipaddress.ip_address(str(r.address)))
                lst = v4 if ":" not in a else v6
                if a not in lst:
                    lst.append(a)
        n = max(len(v4), len(v6))
        pairs = [(v4[i] if i < len(v4) else None, v6[i] if i < len(v6) else None)
                 for i in range(n)]
        return vips, pairs

    def _check_addresses(self) -> None:
        """Every address in the plan; config addresses must not fall into link subnets
        (other than as the very host's own link address)."""
        from netns.ns import check_address

        nets = []
        for h in self.hosts:
            nets += [(seg_net4(h.seg), h), (seg_net6(h.seg), h)]
        for v in self.vips:
            check_address(v.address)
            ip = ipaddress.ip_address(v.address)
            for net, h in nets:
                if ip.version == net.version and ip in net:
                    raise LabError(f"VIP {v.address} lies in {h.name}'s link subnet {net}")
        for h in self.reals():
            for a, own in ((h.real4, h.addr4), (h.real6, h.addr6)):
                check_address(a)
                ip = ipaddress.ip_address(a)
                if a == own:
                    continue
                for net, other in nets:
                    if ip.version == net.version and ip in net:
                        raise LabError(f"real address {a} (host {h.name}) lies in "
                                       f"{other.name}'s link subnet {net}")
                if any(ip == ipaddress.ip_address(v.address) for v in self.vips):
                    raise LabError(f"real address {a} is also a VIP")

    # ---- hosts -----------------------------------------------------------------------------

    def _role(self, role: str) -> list[Host]:
        return [h for h in self.hosts if h.role == role]

    def clients(self) -> list[Host]:
        return self._role("client")

    def balancers(self) -> list[Host]:
        return self._role("balancer")

    def reals(self) -> list[Host]:
        return self._role("real")

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(name)

    def client(self, k: int = 1) -> Host:
        return self.host(f"c{k}")

    def real_by_address(self, addr: str) -> Host:
        ip = ipaddress.ip_address(addr)
        for h in self.reals():
            if ip in (ipaddress.ip_address(h.real4), ipaddress.ip_address(h.real6)):
                return h
        raise KeyError(addr)

    @property
    def namespaces(self) -> list[str]:
        return [self.router_ns] + [h.ns for h in self.hosts]

    # ---- state file ------------------------------------------------------------------------

    def _save(self) -> None:
        self.state["hosts"] = [asdict(h) for h in self.hosts]
        os.makedirs(self.state_dir, exist_ok=True)
        tmp = self.state_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.state, f, indent=1)
        os.replace(tmp, self.state_path)

    def _stage(self, name: str) -> None:
        self.state["status"] = f"building:{name}"
        self._save()
        if self.on_stage is not None:
            self.on_stage(name)

    # ---- build -----------------------------------------------------------------------------

    def __enter__(self) -> Self:
        self.build()
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def build(self) -> Lab:
        """Build everything; on any failure (Ctrl-C included) tear down and re-raise."""
        check_datapath(self.datapath)
        try:
            self._build()
        except BaseException:
            try:
                self.teardown()
            except LabError as e:  # keep the build's error; say what was left
                print(f"lab {self.name}: teardown after a failed build: {e}", file=sys.stderr)
            raise
        return self

    def _timed(self, what: str, t0: float) -> float:
        now = time.monotonic()
        self.timings[what] = round(now - t0, 3)
        return now

    def _build(self) -> None:
        t = t_start = time.monotonic()
        os.makedirs(self.log_dir, exist_ok=True)
        self._stage("namespaces")
        self.state["namespaces"] = list(self.namespaces)
        self._save()  # recorded before they exist: a crash in between leaves nothing unknown
        _ip_batch(None, [f"netns add {ns}" for ns in self.namespaces], "creating namespaces")
        self._sysctls(self.router_ns, "router")
        for h in self.hosts:
            self._sysctls(h.ns, h.role)
        t = self._timed("namespaces", t)

        self._stage("links")
        self.state["links"] = [[h.gw_ifname, self.router_ns, h.ifname, h.ns] for h in self.hosts]
        self._save()
        _ip_batch(self.router_ns, [
            f"link add {h.gw_ifname} mtu {h.mtu} type veth peer name {h.ifname} netns {h.ns} "
            f"mtu {h.mtu}" for h in self.hosts], "creating links")
        t = self._timed("links", t)

        self._stage("addresses")
        self._addresses()
        t = self._timed("addresses", t)

        self._stage("decap")
        self._attach_decap()
        t = self._timed("decap", t)

        self._stage("servers")
        self._start_servers()
        t = self._timed("servers", t)

        self._stage("balancer")
        self._start_balancers()
        t = self._timed("balancer", t)

        self._stage("routes")
        self._vip_routes()
        t = self._timed("routes", t)
        self.timings["total"] = round(t - t_start, 3)
        self._stage("ready")
        self.state["status"] = "ready"
        self.state["timings"] = self.timings
        self._save()

    def _sysctls(self, ns: str, role: str) -> None:
        values: dict[str, Any] = {
            # No duplicate address detection: addresses are usable at once (set on
            # "default" before the links exist, so they inherit it).
            "net.ipv6.conf.all.accept_dad": 0, "net.ipv6.conf.default.accept_dad": 0,
            "net.ipv6.conf.default.accept_ra": 0, "net.ipv6.conf.all.accept_ra": 0,
        }
        if role == "router":
            values.update({
                "net.ipv4.ip_forward": 1, "net.ipv6.conf.all.forwarding": 1,
                # The router sees tunnel packets from 172.16.x.y (Katran's outer source,
                # not routable here) and DSR replies from the VIP arriving from a real
                # while the VIP's route points at a balancer: reverse-path filtering off.
                "net.ipv4.conf.all.rp_filter": 0, "net.ipv4.conf.default.rp_filter": 0,
                "net.ipv4.conf.all.send_redirects": 0, "net.ipv4.conf.default.send_redirects": 0,
                # ECMP over several balancers by 5-tuple, not just addresses.
                "net.ipv4.fib_multipath_hash_policy": 1, "net.ipv6.fib_multipath_hash_policy": 1,
            })
        elif role == "real":
            values.update({
                # DSR: the VIP is on lo; never answer ARP for it on the wire
                # (arp_ignore=1: only for addresses of the receiving interface) nor use
                # it as the source of our own ARP requests (arp_announce=2). IPv6 needs
                # nothing: the kernel answers neighbour solicitations only for addresses
                # of the interface they arrive on.
                "net.ipv4.conf.all.arp_ignore": 1, "net.ipv4.conf.all.arp_announce": 2,
                "net.ipv4.conf.default.arp_ignore": 1, "net.ipv4.conf.default.arp_announce": 2,
                # Strict reverse-path filtering stays possible: decapsulated packets come
                # from the client through the link the default route uses.
                "net.ipv4.conf.all.rp_filter": 1, "net.ipv4.conf.default.rp_filter": 1,
            })
        elif role == "balancer":
            # The balancer host does not route: VIP packets its datapath passes up (not
            # ours: wrong port, protocol) are dropped silently, not forwarded back.
            values.update({"net.ipv4.ip_forward": 0, "net.ipv6.conf.all.forwarding": 0})
        _write_sysctls(ns, values)

    def _addresses(self) -> None:
        router = ["link set lo up"]
        for h in self.hosts:
            router += [f"addr add {h.gw4}/24 dev {h.gw_ifname}",
                       f"addr add {h.gw6}/64 dev {h.gw_ifname} nodad",
                       f"link set {h.gw_ifname} up"]
            cmds = ["link set lo up",
                    f"addr add {h.addr4}/24 dev {h.ifname}",
                    f"addr add {h.addr6}/64 dev {h.ifname} nodad",
                    f"link set {h.ifname} up"]
            if h.role != "balancer":  # the balancer only needs to be reachable on its link
                cmds += [f"route add default via {h.gw4}", f"route add default via {h.gw6}"]
            if h.role == "real":
                for v in sorted({v.address for v in self.vips}):
                    plen = 128 if ":" in v else 32
                    cmds.append(f"addr add {v}/{plen} dev lo" + (" nodad" if ":" in v else ""))
                for a, own in ((h.real4, h.addr4), (h.real6, h.addr6)):
                    if a != own:  # a config's real address: on the link, routed by the router
                        plen = 128 if ":" in a else 32
                        cmds.append(f"addr add {a}/{plen} dev {h.ifname}"
                                    + (" nodad" if ":" in a else ""))
                        router.append(f"route add {a}/{plen} dev {h.gw_ifname}")
            _ip_batch(h.ns, cmds, f"configuring {h.name}")
        # router routes for config real addresses need the links up first
        _ip_batch(self.router_ns, router, "configuring the router")
        for h in self.balancers():
            tx_checksum_off(self.router_ns, h.gw_ifname)
        macs = {link["ifname"]: link.get("address", "") for link in _links_json(self.router_ns)}
        for h in self.hosts:
            h.gw_mac = macs[h.gw_ifname]
            h.mac = {link["ifname"]: link.get("address", "") for link in _links_json(h.ns)}[h.ifname]
        self._save()

    def _attach_decap(self) -> None:
        from lb.decap_loader import DecapProgram

        # One program for every real (compiling takes seconds); its counters are the sum
        # over reals. Per-real figures come from the balancer and the servers.
        self._decap = DecapProgram("xdp", xdp_mode=self.xdp_mode)
        self.state["prog_ids"].append(_prog_id(self._decap.prog_fd))
        self._save()
        for h in self.reals():
            self._decap.attach(h.ifname, netns=h.ns)
        os.makedirs(self.pin_root, exist_ok=True)
        path = os.path.join(self.pin_root, "decap_stats")
        pin_prog_map(self._decap.prog_fd, "decap_stats", path)
        self.state["pin_dirs"]["decap_stats"] = path
        self._save()

    def _server_argv(self, h: Host) -> list[str]:
        from netns.servers import ADMIN_PORT, format_endpoint

        argv = [sys.executable, "-m", "netns.servers", "--name", h.name, "--addr4", h.real4,
                "--addr6", h.real6, "--admin", format_endpoint(h.addr4, ADMIN_PORT),
                "--admin", format_endpoint(h.addr6, ADMIN_PORT)]
        for v in self.vips:
            port = v.port or (HTTP_PORT if v.protocol == "tcp" else UDP_PORT)
            kind = "quic" if "quic" in v.flags else v.protocol
            argv += [f"--{kind}", format_endpoint(v.address, port)]
        for q in (self._user_config.quic_servers if self._user_config is not None else ()):
            if q.real in (h.real4, h.real6):
                argv += ["--quic-id", f"{q.real}={q.id}"]
        return argv

    def _spawn(self, role: str, ns: str | None, argv: list[str], log: str) -> subprocess.Popen:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        full = ["ip", "netns", "exec", ns, *argv] if ns else argv
        with open(log, "ab") as logf:
            proc = subprocess.Popen(full, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=logf, cwd=str(REPO), env=env,
                                    start_new_session=True)  # Ctrl-C on a terminal: not theirs
        # `ip netns exec` execs the command, so the pid is the server's.
        self.state["processes"].append({"role": role, "ns": ns, "pid": proc.pid,
                                        "start": _proc_start_time(proc.pid), "argv": argv})
        self._procs[role] = proc
        self._save()
        return proc

    def _start_servers(self) -> None:
        procs = [(h, self._spawn(f"server-{h.name}", h.ns, self._server_argv(h),
                                 os.path.join(self.log_dir, f"{h.name}.log")))
                 for h in self.reals()]  # all start at once, then wait for each
        for h, p in procs:
            _wait_ready(p, 20, os.path.join(self.log_dir, f"{h.name}.log"), f"the server on {h.name}")

    def _start_balancers(self) -> None:
        # The router's end of each balancer link runs XDP_PASS: veth hands XDP_TX'd
        # frames only to a peer whose NAPI is on.
        fd = load_xdp_pass()
        try:
            self.state["prog_ids"].append(_prog_id(fd))
            self._save()
            for h in self.balancers():
                attach_xdp_fd(self.router_ns, h.gw_ifname, fd)
                if self.datapath == "userspace":
                    # XDP on the balancer's end makes the router's end segment GSO packets
                    # in software: the AF_PACKET datapath then sees wire-size frames.
                    attach_xdp_fd(h.ns, h.ifname, fd)
        finally:
            os.close(fd)  # the attachments hold the program
        cfg = self._initial_config()
        self.state["max_reals"] = cfg.settings.max_reals
        tables = self._compile(cfg)
        self._set_config(cfg, tables)  # before the balancers: the runner reads it
        for h in self.balancers():
            t = with_gateway(tables, h.gw_mac)
            if self.datapath == "xdp":
                pin_dir = os.path.join(self.pin_root, h.name)
                self.state["pin_dirs"][h.name] = pin_dir
                self._save()
                backend = _XdpBackend(t, h, pin_dir, self.xdp_mode)
            elif self.balancer_processes:
                backend = _UserspaceRunner(self, h)
            else:
                backend = _UserspaceBackend(t, h)
            self._backends[h.name] = backend
            if backend.prog_id is not None:
                self.state["prog_ids"].append(backend.prog_id)
            self._save()

    def _vip_routes(self) -> None:
        cmds = []
        for addr in sorted({v.address for v in self.vips}):
            v6 = ":" in addr
            gws = [h.addr6 if v6 else h.addr4 for h in self.balancers()]
            dst = f"{addr}/{128 if v6 else 32}"
            if len(gws) == 1:
                cmds.append(f"route add {dst} via {gws[0]}")
            else:
                cmds.append(f"route add {dst} " + " ".join(f"nexthop via {g}" for g in gws))
        _ip_batch(self.router_ns, cmds, "routing the VIPs to the balancers")

    # ---- configuration ---------------------------------------------------------------------

    def _initial_config(self) -> Any:
        if self._user_config is not None:
            from lb.config import config_to_dict, parse_config

            data = config_to_dict(self._user_config)
            data["settings"]["gateway_mac"] = self.balancers()[0].gw_mac
            return parse_config(data)
        return self.config_for(self.weights)

    def config_for(self, weights: Mapping[str, int]) -> Any:
        """The lab's VIPs with the named reals (name -> weight) behind every VIP of each
        real's family; settings as in force (or the lab's defaults)."""
        from lb.config import config_to_dict, parse_config

        if self.config is not None:
            settings = config_to_dict(self.config)["settings"]
        elif self._user_config is not None:
            settings = config_to_dict(self._user_config)["settings"]
        else:
            settings = {"conn_table_size": LAB_CONN_TABLE_SIZE}
        settings["gateway_mac"] = self.balancers()[0].gw_mac or "02:00:00:00:00:01"
        vips = []
        for v in self.vips:
            reals = []
            for name, w in weights.items():
                h = self.host(name)
                reals.append({"address": h.real6 if v.version == 6 else h.real4, "weight": int(w)})
            vips.append({"address": v.address, "port": v.port, "protocol": v.protocol,
                         "hash": v.hash, "flags": list(v.flags), "reals": reals})
        return parse_config({"settings": settings, "vips": vips})

    def _compile(self, cfg: Any) -> Any:
        from lb.datapath_tables import compile_tables

        return remap_real_ids(compile_tables(cfg), self.real_ids, cfg.settings.max_reals)

    def _set_config(self, cfg: Any, tables: Any) -> None:
        from lb.config import config_to_dict

        self.config = cfg
        self.tables = tables
        self.state["config"] = config_to_dict(cfg)
        self._save()

    def apply(self, cfg: Any) -> int | None:
        """Load config ``cfg`` into every balancer: real ids kept stable, gateway MAC set
        per balancer, sizes as loaded. When only weights changed (same reals, same VIPs)
        just the ring slots that differ are rewritten (``update_ring``) and their number
        is returned; otherwise the whole tables go in (``load_tables``) and None is
        returned."""
        import numpy as np

        tables = self._compile(cfg)
        old = self.tables
        rings_only = (old is not None and np.array_equal(old.reals, tables.reals)
                      and np.array_equal(old.vip_keys, tables.vip_keys)
                      and np.array_equal(old.vip_metas, tables.vip_metas)
                      and np.array_equal(old.ctl, tables.ctl))  # settings (encap, mtu) too
        changed: int | None = 0 if rings_only else None
        for h in self.balancers():
            b = self._backends[h.name]
            if rings_only and hasattr(b, "update_ring"):
                for num in range(len(tables.vip_keys)):
                    changed += b.update_ring(num, tables.rings[num])
            else:
                b.load_tables(with_gateway(tables, h.gw_mac))
                changed = None
        self._set_config(cfg, tables)
        return changed

    def set_weights(self, weights: Mapping[str, int]) -> int | None:
        """Put exactly the named reals (name -> weight) behind the lab's VIPs; returns
        what :meth:`apply` returns."""
        self.weights = dict(weights)
        return self.apply(self.config_for(weights))

    def backend(self, name: str = "lb1") -> Any:
        """The in-process balancer handle (``.bal`` is the XdpBalancer / UserspaceBalancer)."""
        return self._backends[name]

    # ---- reading -------------------------------------------------------------------------

    def balancer_stats(self, name: str | None = None) -> dict[str, int]:
        """Global counters of one balancer, or summed over all of them."""
        names = [name] if name else [h.name for h in self.balancers()]
        total: dict[str, int] = {}
        for n in names:
            for k, v in self._backends[n].stats().items():
                total[k] = total.get(k, 0) + int(v)
        return total

    def real_packets(self) -> dict[str, int]:
        """Packets each real address received from the balancers (XDP: per-real
        counters; keyed by real address)."""
        from lb import constants as C

        out: dict[str, int] = {}
        for h in self.balancers():
            arr = self._backends[h.name].real_stats()
            if arr is None:
                continue
            for addr, rid in self.real_ids.items():
                out[addr] = out.get(addr, 0) + int(arr[rid, C.VIP_STAT_PACKETS])
        return out

    def expected_real(self, vip: str, port: int, protocol: str, client: str, sport: int) -> str | None:
        """Name of the real Katran's hashing picks for a new flow (client, sport) ->
        (vip, port, protocol) under the config in force: the flow hash of
        docs/datapath.md on the ring of that VIP. (VIPs without flags.)"""
        from lb import constants as C
        from lb.jhash import jhash_2words, jhash_bytes

        t = self.tables
        num = t.vip_nums[(ipaddress.ip_address(vip), port, protocol)]
        ip = ipaddress.ip_address(client)
        ports = int.from_bytes(sport.to_bytes(2, "big") + port.to_bytes(2, "big"), "little")
        src = (int.from_bytes(ip.packed, "little") if ip.version == 4
               else jhash_bytes(ip.packed, t.max_vips))
        h = jhash_2words(src, ports, C.ch_rings_size(t.max_vips, t.ring_size))
        addr = t.real_address(int(t.rings[num][h % t.ring_size]))
        return None if addr is None else self.real_by_address(str(addr)).name

    def decap_stats(self) -> dict[str, int]:
        """The reals' decap counters (one program for all reals: summed)."""
        assert self._decap is not None
        return self._decap.read_stats()

    def server_stats(self) -> dict[str, dict]:
        """Each real server's own counters (from its admin endpoint)."""
        from netns.servers import admin_stats

        return {h.name: admin_stats(self.router_ns, h.addr4) for h in self.reals()}

    # ---- lifetime --------------------------------------------------------------------------

    def release(self) -> str:
        """Leave the lab running after this process exits (``lbctl lab up``): XDP programs
        stay attached, maps pinned, servers running. Returns the state file's path."""
        for b in self._backends.values():
            b.release()
        self._backends.clear()
        self._decap = None  # attachments and the pinned counters outlive the handle
        for p in self._procs.values():
            p.returncode = 0  # not ours to wait for any more (no ResourceWarning)
        self._procs.clear()
        self.state["owner_pid"] = None
        self.state["owner_start"] = None
        self._save()
        self._closed = True
        return self.state_path

    def teardown(self) -> None:
        """Remove everything; raise LabError listing what could not be removed."""
        if self._closed:
            return
        with _signals_blocked():
            errors = []
            for name, b in list(self._backends.items()):
                try:
                    b.close()
                except Exception as e:  # noqa: BLE001 - keep tearing down, report it
                    errors.append(f"closing balancer {name}: {e}")
            self._backends.clear()
            if self._decap is not None:
                try:
                    self._decap.close()
                except Exception as e:  # noqa: BLE001 - keep tearing down, report it
                    errors.append(f"closing the decap program: {e}")
                self._decap = None
            errors += teardown_state(self.state, self.state_path)
            for p in self._procs.values():
                with contextlib.suppress(Exception):
                    p.wait(timeout=0.1)
            self._procs.clear()
            self._closed = True
        if errors:
            raise LabError(f"lab {self.name}: teardown incomplete: " + "; ".join(errors))


# ---- teardown and inspection from the state file (any process) -------------------------------

def teardown_state(state: dict[str, Any], state_path: str | None = None) -> list[str]:
    """Remove everything ``state`` lists; returns what failed (empty: all gone). The
    state file is removed only when nothing is left."""
    errors: list[str] = []
    state["status"] = "tearing-down"
    if state_path and os.path.exists(state_path):
        with contextlib.suppress(OSError):
            tmp = state_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(state, f, indent=1)
            os.replace(tmp, state_path)
    # 1. processes: the recorded ones, then anything else still inside a lab namespace
    procs = [(int(p["pid"]), p.get("start")) for p in state.get("processes", [])]
    errors += _kill(procs)
    stray = []
    for ns in state.get("namespaces", []):
        if os.path.exists(f"/run/netns/{ns}"):
            stray += [(pid, _proc_start_time(pid)) for pid in _netns_pids(ns)]
    errors += _kill(stray)
    # 2. namespaces: every link has one end in the router, so they all go with them
    existing = [ns for ns in state.get("namespaces", []) if os.path.exists(f"/run/netns/{ns}")]
    for ns in existing:
        r = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True, timeout=30,
                           check=False)
        if r.returncode != 0 and os.path.exists(f"/run/netns/{ns}"):
            errors.append(f"deleting namespace {ns}: {r.stderr.strip()}")
    # 3. pinned maps
    pin_root = state.get("pin_root")
    if pin_root:
        try:
            remove_tree(pin_root)
        except OSError as e:
            errors.append(f"removing {pin_root}: {e}")
    # 4. programs are freed once their last attachment/fd is gone (RCU: allow a moment)
    deadline = time.monotonic() + 3
    left = [i for i in state.get("prog_ids", []) if prog_exists(i)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [i for i in left if prog_exists(i)]
    if left:
        errors.append(f"BPF programs still loaded: ids {left}")
    # 5. logs and the state file
    log_dir = state.get("log_dir")
    if not errors:
        if log_dir:
            shutil.rmtree(log_dir, ignore_errors=True)
        if state_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(state_path)
    return errors


def state_path_for(name: str, state_dir: str = STATE_DIR) -> str:
    return os.path.join(state_dir, f"{name}.json")


def load_state(name: str, state_dir: str = STATE_DIR) -> dict[str, Any]:
    path = state_path_for(name, state_dir)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise LabError(f"no lab named {name} (no {path})") from None


def list_labs(state_dir: str = STATE_DIR) -> list[str]:
    try:
        names = os.listdir(state_dir)
    except FileNotFoundError:
        return []
    return sorted(n[:-5] for n in names if n.endswith(".json"))


def owner_alive(state: Mapping[str, Any]) -> bool:
    """Whether the process that built (and owns) an in-process lab still runs."""
    pid = state.get("owner_pid")
    return pid is not None and _proc_start_time(int(pid)) == state.get("owner_start")


def teardown(name: str, state_dir: str = STATE_DIR) -> None:
    """Tear down lab ``name`` from its state file (``lbctl lab down``)."""
    state = load_state(name, state_dir)
    with _signals_blocked():
        errors = teardown_state(state, state_path_for(name, state_dir))
    if errors:
        raise LabError(f"lab {name}: teardown incomplete: " + "; ".join(errors))


def leftovers(state: Mapping[str, Any], state_path: str | None = None) -> list[str]:
    """What of a lab still exists: namespaces, links named after it in the root
    namespace, pinned maps, processes, BPF programs, the state file, logs."""
    out = []
    name = state["name"]
    out += [f"namespace {ns}" for ns in state.get("namespaces", []) if os.path.exists(f"/run/netns/{ns}")]
    r = subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True, timeout=30,
                       check=False)
    out += [f"link {link['ifname']}" for link in json.loads(r.stdout or "[]")
            if link.get("ifname", "").startswith(name)]
    if state.get("pin_root") and os.path.lexists(state["pin_root"]):
        out.append(f"pin dir {state['pin_root']}")
    out += [f"process {p['pid']} ({p['role']})" for p in state.get("processes", []) if process_alive(p)]
    out += [f"BPF program {i}" for i in state.get("prog_ids", []) if prog_exists(i)]
    if state_path and os.path.exists(state_path):
        out.append(f"state file {state_path}")
    if state.get("log_dir") and os.path.exists(state["log_dir"]):
        out.append(f"log dir {state['log_dir']}")
    return out


def describe(state: Mapping[str, Any]) -> dict[str, Any]:
    """Status of a lab from its state file and its pinned maps (any process)."""
    from lb.decap_loader import DECAP_STATS
    from netns.servers import format_endpoint

    out: dict[str, Any] = {"name": state["name"], "datapath": state["datapath"],
                           "status": state.get("status"),
                           "created": state.get("created"),
                           "owner": ("persistent" if state.get("owner_pid") is None
                                     else f"pid {state['owner_pid']}"
                                     + ("" if owner_alive(state) else " (gone)")),
                           "namespaces": {ns: os.path.exists(f"/run/netns/{ns}")
                                          for ns in state.get("namespaces", [])},
                           "hosts": state.get("hosts", []),
                           "processes": [{**p, "alive": process_alive(p)}
                                         for p in state.get("processes", [])],
                           "vips": [], "balancers": {}, "decap": None}
    cfg = state.get("config") or {}
    for v in cfg.get("vips", []):
        out["vips"].append({"vip": f"{format_endpoint(v['address'], v['port'])}/{v['protocol']}",
                            "reals": {r["address"]: r.get("weight", 1) for r in v.get("reals", [])}})
    ids = state.get("real_ids", {})
    for bname, pin_dir in state.get("pin_dirs", {}).items():
        if bname == "decap_stats":
            try:
                vals = read_percpu_array(pin_dir, len(DECAP_STATS))
                out["decap"] = dict(zip(DECAP_STATS, vals))
            except OSError as e:
                out["decap"] = {"error": str(e)}
            continue
        try:
            counters, per_real = read_pinned_balancer(pin_dir, int(state.get("max_reals") or 0))
            out["balancers"][bname] = {
                "pin_dir": pin_dir, "counters": counters,
                "reals": {addr: {"packets": per_real[i][0], "bytes": per_real[i][1]}
                          for addr, i in ids.items() if i < len(per_real)}}
        except OSError as e:
            out["balancers"][bname] = {"pin_dir": pin_dir, "error": str(e)}
    stats_dir = state.get("log_dir")
    if state.get("datapath") == "userspace" and stats_dir:
        for h in state.get("hosts", []):
            if h["role"] == "balancer":
                p = os.path.join(stats_dir, f"{h['name']}.stats.json")
                with contextlib.suppress(OSError, ValueError):
                    out["balancers"][h["name"]] = {"counters": json.loads(Path(p).read_text())}
    return out


# ---- the userspace runner (a process per balancer, for labs that outlive their builder) -----

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


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m netns.lab")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run-userspace", help="run the userspace datapath of one lab balancer")
    r.add_argument("--state", required=True)
    r.add_argument("--balancer", required=True)
    args = p.parse_args(argv)
    return run_userspace(args.state, args.balancer)


if __name__ == "__main__":
    sys.exit(main())
