"""Loader for the real servers' decapsulation program (xdp/decap.c).

A real behind the balancer receives its traffic encapsulated (IPv4-in-IPv4, IPv6-in-IPv6,
IPv4-in-IPv6, or GUE) and this host has no ipip/ip6tnl/fou modules, so a BPF program strips
the outer headers and hands the inner packet, unchanged, to the kernel, which delivers it
to the VIP configured on the loopback.

    prog = DecapProgram(mode="xdp")          # or mode="tc"
    prog.attach("eth0")                      # or attach("veth0", netns="ns1")
    prog.set_allowed_destinations([])        # optional allow-list of outer destinations
    prog.read_stats()                        # {"v4_in_v4": 12, ..., "passed": 3, ...}
    prog.close()                             # detaches everywhere, frees the program

Network namespaces: ``attach(ifname)`` works on the namespace the calling thread is in,
so a process started with ``ip netns exec NS ...`` just names its interface. With
``netns="NS"`` (a name under /run/netns or a path to a netns file) the calling thread
enters that namespace with setns(2) for the duration of the netlink calls and comes back
(:func:`lb.kernel.netns.in_netns`). This is in-process, needs no helper binary and
leaves the rest of the process alone.

tc mode adds a clsact qdisc if the device has none (and removes it again on detach if it
added it and no other filter is left) and one ``bpf`` filter in direct-action mode on
ingress, priority ``tc_priority``, handle 1.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lb.c_header import c_flags as shared_c_flags
from lb.config import GUE_DEFAULT_PORT
from lb.constants import DECAP_ALLOW_MAX, DECAP_STATS
from lb.kernel.netns import in_netns, netns_path
from lb.kernel.syscall import KernelError
from lb.kernel.tc import tc_attach, tc_detach
from lb.kernel.xdp import XDP_FLAGS_UPDATE_IF_NOEXIST, XDP_MODE_FLAGS, xdp_attach, xdp_detach

XDP_DIR = Path(__file__).resolve().parent.parent / "xdp"
DECAP_SOURCE = XDP_DIR / "decap.c"


class DecapError(RuntimeError):
    """Compiling, loading, attaching or detaching the decap program failed."""


def c_flags(gue_port: int = GUE_DEFAULT_PORT, extra: Iterable[str] = ()) -> list[str]:
    """cflags for xdp/decap.c: lb.c_header's with this GUE port, quieter kernel headers."""
    if not 1 <= int(gue_port) <= 65535:
        raise ValueError(f"gue_port must be 1..65535, got {gue_port}")
    flags = shared_c_flags(gue_port=int(gue_port))
    # Kernel headers are built for the host; these warnings are theirs, not ours.
    flags += ["-Wno-unused-value", "-Wno-pointer-sign", "-Wno-compare-distinct-pointer-types",
              "-Wno-gnu-variable-sized-type-not-at-end", "-Wno-address-of-packed-member",
              "-Wno-tautological-compare", "-Wno-unknown-warning-option"]
    return flags + list(extra)


# ---- the program ----------------------------------------------------------------------

@dataclass
class _Attachment:
    ifname: str
    netns: str | None
    ifindex: int
    xdp_flags: int = 0
    tc_prio: int = 0
    tc_created_qdisc: bool = False


class DecapProgram:
    """The decap program, compiled with bcc for one mode ("xdp" or "tc")."""

    def __init__(self, mode: str = "xdp", gue_port: int = GUE_DEFAULT_PORT, *,
                 xdp_mode: str = "auto", tc_priority: int = 1,
                 extra_cflags: Iterable[str] = ()) -> None:
        if mode not in ("xdp", "tc"):
            raise ValueError(f'mode must be "xdp" or "tc", got {mode!r}')
        if xdp_mode not in XDP_MODE_FLAGS:
            raise ValueError(f"xdp_mode must be one of {sorted(XDP_MODE_FLAGS)}, got {xdp_mode!r}")
        if not 1 <= tc_priority <= 0xFFFF:
            raise ValueError(f"tc_priority must be 1..65535, got {tc_priority}")
        self.mode = mode
        self.gue_port = int(gue_port)
        self.xdp_mode = xdp_mode
        self.tc_priority = tc_priority
        self.cflags = c_flags(self.gue_port, extra_cflags)
        self._attachments: list[_Attachment] = []
        self._bpf = None
        from bcc import BPF  # Debian's python3-bpfcc, imported late: lb imports without it

        try:
            self._bpf = BPF(src_file=str(DECAP_SOURCE).encode(), cflags=self.cflags)
            if mode == "xdp":
                self._fn = self._bpf.load_func(b"decap_xdp", BPF.XDP)
            else:
                self._fn = self._bpf.load_func(b"decap_tc", BPF.SCHED_CLS)
        except Exception as e:  # bcc raises bare Exception
            raise DecapError(f"could not compile/load xdp/decap.c ({mode}): {e}") from e
        self._stats = self._bpf[b"decap_stats"]
        self._config = self._bpf[b"decap_config"]
        self._allow_v4 = self._bpf[b"decap_allow_v4"]
        self._allow_v6 = self._bpf[b"decap_allow_v6"]

    # ---- program handle ---------------------------------------------------------------

    @property
    def prog_fd(self) -> int:
        """File descriptor of the loaded program (e.g. for BPF_PROG_TEST_RUN)."""
        return self._fn.fd

    @property
    def attachments(self) -> list[tuple[str, str | None]]:
        return [(a.ifname, a.netns) for a in self._attachments]

    # ---- attach / detach --------------------------------------------------------------

    def attach(self, ifname: str, netns: str | None = None) -> None:
        """Attach to interface ``ifname`` (in namespace ``netns``, default: the calling
        thread's). XDP refuses to replace a program someone else attached."""
        with in_netns(netns):
            ifindex = socket.if_nametoindex(ifname)
            try:
                if self.mode == "xdp":
                    flags = XDP_MODE_FLAGS[self.xdp_mode]
                    xdp_attach(ifname, self.prog_fd, flags | XDP_FLAGS_UPDATE_IF_NOEXIST)
                    att = _Attachment(ifname, netns, ifindex, xdp_flags=flags)
                else:
                    created = tc_attach(ifindex, self.prog_fd, self._fn.name.decode(),
                                        self.tc_priority)
                    att = _Attachment(ifname, netns, ifindex, tc_prio=self.tc_priority,
                                      tc_created_qdisc=created)
            except KernelError as e:
                raise DecapError(f"{self.mode} attach to {ifname} failed: {e}") from e
        self._attachments.append(att)

    def detach(self, ifname: str | None = None, netns: str | None = None) -> None:
        """Detach from ``ifname`` (in ``netns``), or from every interface if ifname is
        None. An interface or namespace that is already gone counts as detached."""
        keep, errors = [], []
        for att in self._attachments:
            if ifname is not None and (att.ifname, att.netns) != (ifname, netns):
                keep.append(att)
                continue
            try:
                self._detach_one(att)
            except KernelError as e:
                errors.append(f"{self.mode} detach from {att.ifname} failed: {e}")
        self._attachments = keep
        if errors:
            raise DecapError("; ".join(errors))

    def _detach_one(self, att: _Attachment) -> None:
        if att.netns is not None and not os.path.exists(netns_path(att.netns)):
            return  # namespace deleted: its interfaces and their programs are gone
        with in_netns(att.netns):
            try:
                ifindex = socket.if_nametoindex(att.ifname)
            except OSError:
                return  # interface deleted, program went with it
            if ifindex != att.ifindex:
                return  # a new interface with the same name: not ours
            if self.mode == "xdp":
                xdp_detach(att.ifname, att.xdp_flags)
            else:
                tc_detach(att.ifindex, att.tc_prio, remove_qdisc=att.tc_created_qdisc)

    # ---- allow-list -------------------------------------------------------------------

    def set_allowed_destinations(self, addresses: Iterable[str]) -> None:
        """Decapsulate only tunnel packets whose outer destination is one of
        ``addresses`` (IPv4 and/or IPv6). An empty list turns the restriction off: every
        tunnel packet is decapsulated (the default). Tunnel packets to other
        destinations are passed to the kernel untouched (counter passed_not_allowed)."""
        v4, v6 = [], []
        for a in addresses:
            ip = ipaddress.ip_address(a)
            (v4 if ip.version == 4 else v6).append(ip)
        if len(v4) > DECAP_ALLOW_MAX or len(v6) > DECAP_ALLOW_MAX:
            raise ValueError(f"at most {DECAP_ALLOW_MAX} addresses per family")
        on_key = self._config.Key(0)
        if not v4 and not v6:
            self._config[on_key] = self._config.Leaf(0)  # off first, then empty the maps
            self._allow_v4.clear()
            self._allow_v6.clear()
            return
        # New entries first, then the flag; stale entries go last.
        for ip in v4:
            self._allow_v4[self._allow_v4.Key(int.from_bytes(ip.packed, sys.byteorder))] = \
                self._allow_v4.Leaf(1)
        for ip in v6:
            self._allow_v6[self._allow_v6.Key.from_buffer_copy(ip.packed)] = self._allow_v6.Leaf(1)
        self._config[on_key] = self._config.Leaf(1)
        want4 = {int.from_bytes(ip.packed, sys.byteorder) for ip in v4}
        want6 = {ip.packed for ip in v6}
        for k in list(self._allow_v4.keys()):
            if k.value not in want4:
                del self._allow_v4[k]
        for k in list(self._allow_v6.keys()):
            if bytes(k) not in want6:
                del self._allow_v6[k]

    def allowed_destinations(self) -> list[str]:
        out = [str(ipaddress.IPv4Address(int(k.value).to_bytes(4, sys.byteorder)))
               for k in self._allow_v4.keys()]
        out += [str(ipaddress.IPv6Address(bytes(k))) for k in self._allow_v6.keys()]
        return sorted(out)

    # ---- counters ---------------------------------------------------------------------

    def read_stats(self) -> dict[str, int]:
        """Every counter, summed over CPUs."""
        out = {}
        for i, name in enumerate(DECAP_STATS):
            out[name] = int(sum(self._stats.getvalue(self._stats.Key(i))))
        return out

    def reset_stats(self) -> None:
        self._stats.clear()  # array maps: zeroes every slot

    # ---- lifetime ---------------------------------------------------------------------

    def close(self) -> None:
        """Detach everywhere and release the program and its maps."""
        try:
            self.detach()
        finally:
            if self._bpf is not None:
                self._bpf.cleanup()
                self._bpf = None

    def __enter__(self) -> "DecapProgram":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

