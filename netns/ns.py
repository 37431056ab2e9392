"""Network namespaces and veth pairs for tests, benchmarks and the lab (pyroute2).

Everything here is torn down by the context manager that made it, also when the body
raises (assertion, KeyboardInterrupt): :class:`Sandbox` deletes its veths (synchronously) and
then its namespaces, with SIGINT blocked while it does so, so a second Ctrl-C cannot
leave half a topology behind.

Rules this module enforces (see /work/shared/ENVIRONMENT.md):
  * names are ``prefix + 6 random hex chars`` (:func:`unique_name`), so two runs never
    collide;
  * addresses are only from 198.18.0.0/15 and 2001:db8::/32 unless the caller passes
    ``allow_outside=True`` explicitly.

Typical use::

    with Sandbox() as lab:
        gen, sink = lab.netns("pgg"), lab.netns("pgs")
        a, b = lab.veth(gen, sink, addrs=("198.18.0.1/30", "198.18.0.2/30"))
        b.set_threaded(True)
        gen.run(some_function, arg)      # runs in a thread that has entered ``gen``

Code that must run *inside* a namespace (BPF_PROG_TEST_RUN live frames needs an ifindex
of the caller's namespace; XDP attach resolves the interface name in the caller's
namespace) goes through :func:`lb.kernel.netns.run_in_netns`: a fresh thread calls
``setns(2)`` (which changes only the calling thread's namespace) and optionally pins
itself to a CPU. A :class:`Netns` is accepted wherever lb.kernel takes a namespace
(``os.fspath(ns)`` is its path). Files
under /sys/class/net show the namespace of whoever mounted sysfs, so per-device sysfs
knobs of another namespace are written through ``ip netns exec`` (which remounts /sys).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from pyroute2 import IPRoute
from pyroute2 import netns as _prns

from lb.addresses import ALLOWED_NETS, check_address
from lb.kernel.netns import NETNS_RUN_DIR, run_in_netns

IFNAMSIZ = 16  # interface names are at most 15 characters
IFA_F_NODAD = 0x02


class NetnsError(RuntimeError):
    """A namespace/veth operation failed (wraps the underlying error)."""


# ---------------------------------------------------------------------------------------
# names and addresses


def unique_name(prefix: str, maxlen: int = IFNAMSIZ - 1) -> str:
    """``prefix`` + 6 random hex characters; refuses results longer than ``maxlen``."""
    name = f"{prefix}{secrets.token_hex(3)}"
    if len(name) > maxlen:
        raise ValueError(f"name {name!r} is longer than {maxlen} characters (shorten {prefix!r})")
    return name


# ---------------------------------------------------------------------------------------
# running code inside a namespace


def ns_exec(ns: Netns | str | None, argv: Sequence[str], check: bool = True,
            **kwargs: Any) -> subprocess.CompletedProcess:
    """Run a command in ``ns`` through ``ip netns exec`` (fresh /sys for that namespace)."""
    name = ns.name if isinstance(ns, Netns) else ns
    full = list(argv) if name is None else ["ip", "netns", "exec", name, *argv]
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    return subprocess.run(full, check=check, **kwargs)


# ---------------------------------------------------------------------------------------
# namespaces and interfaces


class Netns:
    """One named network namespace (``/var/run/netns/<name>``), created on construction
    unless ``create=False``. Usable as a context manager on its own (deleted on exit)."""

    def __init__(self, prefix: str = "lbns", *, name: str | None = None, create: bool = True):
        self.name = name or unique_name(prefix, maxlen=64)
        self.path = os.path.join(NETNS_RUN_DIR, self.name)
        self._created = False
        if create:
            self.create()

    def __repr__(self) -> str:
        return f"Netns({self.name!r})"

    def __fspath__(self) -> str:
        return self.path

    def create(self) -> None:
        if os.path.exists(self.path):
            raise NetnsError(f"namespace {self.name} already exists")
        _prns.create(self.name)
        self._created = True

    @property
    def exists(self) -> bool:
        return os.path.exists(self.path)

    def delete(self) -> None:
        """Remove the namespace (idempotent). Interfaces in it go with it."""
        if self.exists:
            _prns.remove(self.name)
        self._created = False

    def ipr(self) -> IPRoute:
        """A pyroute2 IPRoute bound to this namespace; use it as ``with ns.ipr() as ipr``."""
        return IPRoute(netns=self.name)

    def run(self, fn: Callable[..., Any], *args: Any, cpu: int | None = None, **kwargs: Any) -> Any:
        return run_in_netns(self, fn, *args, cpu=cpu, **kwargs)

    def exec(self, argv: Sequence[str], check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess:
        return ns_exec(self, argv, check=check, **kwargs)

    def iface(self, name: str) -> Iface:
        return Iface(self, name)

    def __enter__(self) -> Netns:
        return self

    def __exit__(self, *exc: object) -> None:
        with _sigint_blocked():
            self.delete()


@dataclass
class Iface:
    """An interface ``name`` in namespace ``ns`` (None: the caller's namespace)."""

    ns: Netns | None
    name: str
    _index: int | None = field(default=None, repr=False)

    @contextlib.contextmanager
    def _ipr(self) -> Iterator[IPRoute]:
        ipr = self.ns.ipr() if self.ns is not None else IPRoute()
        try:
            yield ipr
        finally:
            ipr.close()

    @property
    def index(self) -> int:
        if self._index is None:
            with self._ipr() as ipr:
                found = ipr.link_lookup(ifname=self.name)
            if not found:
                raise NetnsError(f"no interface {self.name} in {self.ns}")
            self._index = found[0]
        return self._index

    def _link(self) -> Any:
        with self._ipr() as ipr:
            return ipr.get_links(self.index)[0]

    @property
    def mac(self) -> str:
        return self._link().get("IFLA_ADDRESS")

    @property
    def mac_bytes(self) -> bytes:
        return bytes.fromhex(self.mac.replace(":", ""))

    def set_mac(self, mac: str) -> None:
        with self._ipr() as ipr:
            ipr.link("set", index=self.index, address=mac)

    def up(self) -> Iface:
        with self._ipr() as ipr:
            ipr.link("set", index=self.index, state="up")
        return self

    def down(self) -> Iface:
        with self._ipr() as ipr:
            ipr.link("set", index=self.index, state="down")
        return self

    def set_mtu(self, mtu: int) -> None:
        with self._ipr() as ipr:
            ipr.link("set", index=self.index, mtu=mtu)

    def add_address(self, cidr: str, allow_outside: bool = False) -> Iface:
        """Add ``cidr`` (e.g. "198.18.0.1/30", "2001:db8::1/64"); IPv6 without DAD."""
        check_address(cidr, allow_outside)
        ifa = ipaddress.ip_interface(cidr)
        kw: dict[str, Any] = {}
        if ifa.version == 6:
            kw["flags"] = IFA_F_NODAD
        with self._ipr() as ipr:
            ipr.addr("add", index=self.index, address=str(ifa.ip), prefixlen=ifa.network.prefixlen, **kw)
        return self

    def addresses(self) -> list[str]:
        with self._ipr() as ipr:
            return [f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}" for a in ipr.get_addr(index=self.index)]

    def stats(self) -> dict[str, int]:
        """The kernel's 64-bit interface counters (rx_packets, tx_dropped, ...)."""
        s = self._link().get("IFLA_STATS64")
        return {k: int(v) for k, v in dict(s).items()} if s else {}

    def sysctl_path(self, key: str, family: str = "ipv6") -> str:
        return f"/proc/sys/net/{family}/conf/{self.name}/{key}"

    def get_sysctl(self, key: str, family: str = "ipv6") -> str:
        """net.<family>.conf.<dev>.<key>, read from inside the interface's namespace."""
        path = self.sysctl_path(key, family)
        return run_in_netns(self.ns, lambda: open(path).read().strip())

    def set_sysctl(self, key: str, value: str | int, family: str = "ipv6") -> None:
        path = self.sysctl_path(key, family)

        def write() -> None:
            with open(path, "w") as f:
                f.write(str(value))

        run_in_netns(self.ns, write)

    def quiet(self) -> Iface:
        """No IPv6 link-local address autoconfiguration (addr_gen_mode none), so bringing
        the link up does not make the kernel send DAD/router-solicitation/MLD frames that
        a counting sink would see. Addresses added explicitly still work."""
        self.set_sysctl("addr_gen_mode", 1)
        return self

    # --- threaded NAPI -----------------------------------------------------------------

    def sysfs_path(self, attr: str) -> str:
        return f"/sys/class/net/{self.name}/{attr}"

    def read_sysfs(self, attr: str) -> str:
        if self.ns is None:
            with open(self.sysfs_path(attr)) as f:
                return f.read().strip()
        return ns_exec(self.ns, ["cat", self.sysfs_path(attr)]).stdout.strip()

    def write_sysfs(self, attr: str, value: str) -> None:
        if self.ns is None:
            with open(self.sysfs_path(attr), "w") as f:
                f.write(value)
            return
        r = ns_exec(self.ns, ["sh", "-c", f"echo {value} > {self.sysfs_path(attr)}"], check=False)
        if r.returncode:
            raise NetnsError(f"writing {value} to {self.sysfs_path(attr)} in {self.ns}: {r.stderr.strip()}")

    @property
    def threaded(self) -> bool:
        return self.read_sysfs("threaded") not in ("0", "")

    def set_threaded(self, on: bool) -> Iface:
        """Enable/disable threaded NAPI: NAPI then runs in ``napi/<dev>-<id>`` kthreads
        (placeable with :meth:`pin_napi`) instead of softirq on the CPU that scheduled it.
        The device must have NAPI enabled first (veth: an XDP program attached to it, or
        GRO on); otherwise the kernel refuses the write and this raises NetnsError."""
        self.write_sysfs("threaded", "1" if on else "0")
        return self

    def napi_threads(self) -> list[int]:
        """Pids of this device's threaded-NAPI kthreads (comm ``napi/<dev>-<id>``).

        The comm is truncated to 15 characters, so the match is exact only for names of
        at most 9 characters (``napi/`` + name + ``-``); longer names match by prefix."""
        want = f"napi/{self.name}-"[:15]
        pids = []
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/comm") as f:
                    comm = f.read().strip()
            except OSError:
                continue
            if comm.startswith(want):
                pids.append(int(pid))
        return sorted(pids)

    def pin_napi(self, cpus: Iterable[int], wait: float = 2.0) -> list[int]:
        """Pin this device's NAPI kthreads to ``cpus``; returns their pids. The kthreads
        appear when NAPI is enabled (an XDP program attached) and threaded is on."""
        deadline = time.monotonic() + wait
        pids = self.napi_threads()
        while not pids and time.monotonic() < deadline:
            time.sleep(0.02)
            pids = self.napi_threads()
        for pid in pids:
            os.sched_setaffinity(pid, set(cpus))
        return pids


def proc_stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after the command name (index 0 = field 3, the state), or None
    if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()


def napi_thread_cpu(pid: int) -> int | None:
    """CPU a task last ran on (/proc/<pid>/stat field 39)."""
    fields = proc_stat_fields(pid)
    return None if fields is None else int(fields[36])


# ---------------------------------------------------------------------------------------
# a topology that always goes away


@contextlib.contextmanager
def _sigint_blocked() -> Iterator[None]:
    """Block SIGINT/SIGTERM in this thread for the body (a pending one is delivered, as
    KeyboardInterrupt in the main thread, when the mask is restored)."""
    sigs = {signal.SIGINT, signal.SIGTERM}
    if threading.current_thread() is threading.main_thread():
        old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
    else:
        yield


class Sandbox:
    """Namespaces and veth pairs that are deleted when the ``with`` block ends, whatever
    ends it. Teardown order: registered cleanups (LIFO), veths, namespaces. Errors during
    teardown are collected in :attr:`teardown_errors` and do not mask the body's error."""

    def __init__(self) -> None:
        self.namespaces: list[Netns] = []
        self.veths: list[tuple[Iface, Iface]] = []
        self._cleanups: list[Callable[[], Any]] = []
        self.teardown_errors: list[BaseException] = []
        self.closed = False

    def netns(self, prefix: str = "lbns") -> Netns:
        ns = Netns(prefix)
        self.namespaces.append(ns)
        return ns

    def veth(self, a_ns: Netns | None, b_ns: Netns | None, prefix: str = "ve", *,
             names: tuple[str, str] | None = None, addrs: tuple[str | None, str | None] = (None, None),
             up: bool = True, queues: int | None = None, mtu: int | None = None,
             quiet: bool = True, allow_outside: bool = False) -> tuple[Iface, Iface]:
        """A veth pair, end A in ``a_ns`` and end B in ``b_ns`` (None: this namespace).

        Default names: ``prefix`` + 6 hex + "a"/"b" (keep ``prefix`` at 2 characters so
        the threaded-NAPI kthread comm identifies the device, see Iface.napi_threads).
        ``queues`` sets the number of rx/tx queues on both ends (default: the kernel's,
        one per CPU); with 1 queue each end has exactly one NAPI instance. ``quiet``
        (default) turns off IPv6 link-local autoconfiguration on both ends before they
        come up (see Iface.quiet): the kernel then sends nothing on its own."""
        for a in addrs:
            if a is not None:
                check_address(a, allow_outside)
        if names is None:
            base = unique_name(prefix, maxlen=IFNAMSIZ - 2)
            names = (base + "a", base + "b")
        peer: dict[str, Any] = {"ifname": names[1]}
        link_kw: dict[str, Any] = {}
        if queues:
            for d in (peer, link_kw):
                d["num_rx_queues"] = queues
                d["num_tx_queues"] = queues
        if b_ns is not None:
            peer["net_ns_fd"] = b_ns.path
        elif a_ns is not None:
            peer["net_ns_pid"] = os.getpid()  # this process's namespace, not a_ns
        ipr = a_ns.ipr() if a_ns is not None else IPRoute()
        try:
            ipr.link("add", ifname=names[0], kind="veth", peer=peer, **link_kw)
        finally:
            ipr.close()
        pair = (Iface(a_ns, names[0]), Iface(b_ns, names[1]))
        self.veths.append(pair)
        for ifc, addr in zip(pair, addrs):
            if quiet:
                ifc.quiet()
            if mtu:
                ifc.set_mtu(mtu)
            if addr is not None:
                ifc.add_address(addr, allow_outside=allow_outside)
            if up:
                ifc.up()
        return pair

    def on_teardown(self, fn: Callable[[], Any]) -> None:
        """Run ``fn()`` at teardown, before the veths and namespaces go (LIFO)."""
        self._cleanups.append(fn)

    def close(self) -> None:
        if self.closed:
            return
        with _sigint_blocked():
            while self._cleanups:
                fn = self._cleanups.pop()
                try:
                    fn()
                except BaseException as e:  # keep tearing down
                    self.teardown_errors.append(e)
            for a, _b in reversed(self.veths):
                if a.ns is not None and not a.ns.exists:
                    continue  # went with its namespace
                try:
                    with a._ipr() as ipr:
                        ipr.link("del", ifname=a.name)
                except BaseException as e:
                    if getattr(e, "code", None) != errno.ENODEV:  # already gone is fine
                        self.teardown_errors.append(e)
            self.veths.clear()
            for ns in reversed(self.namespaces):
                try:
                    ns.delete()
                except BaseException as e:
                    self.teardown_errors.append(e)
            self.namespaces.clear()
            self.closed = True

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def list_netns() -> list[str]:
    """Names under /var/run/netns."""
    try:
        return sorted(os.listdir(NETNS_RUN_DIR))
    except FileNotFoundError:
        return []
