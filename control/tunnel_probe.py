"""Health probes through the tunnel, as Katran does them.

:class:`TunnelEncap` loads ``xdp/hc_encap.c`` (a tc egress program, clsact,
direct-action) on the balancer's interface; it encapsulates every packet whose
``skb->mark`` is ``mark_base + real id`` towards that real exactly as the XDP datapath
would, with the encapsulation the balancer is configured for
(:meth:`TunnelEncap.set_settings`, from ``settings.encap`` / ``settings.gue``): IPIP /
IPv4-in-IPv6 / IP6IP6 with Katran's outer source, or GUE (outer IP from
``gue.source_v4/v6``, UDP to ``gue.port``; an IPv6 VIP may then have IPv4 reals), TTL 64.
Its map ``hc_reals`` holds mark -> real address (family), written by the prober; ``hc_ctl``
holds the settings as the balancer's own ctl entry (layout.CTL). Until the settings are
set, probes use IPIP.

:class:`TunnelProber` is a :class:`control.health_probing.Prober`: for each probe it makes sure
the real's entry is in ``hc_reals``, opens the socket (in the datapath's namespace) with
``SO_MARK`` = ``mark_base + real id`` and connects to the **VIP** address on the probed
port (the check's ``port``, default the VIP's) — TCP connect, HTTP GET (``Host``: the
check's host or the VIP address) or UDP request/response, as :class:`DirectProber`. So a
probe succeeds only if the real decapsulates, has the VIP on its loopback, serves on it
and answers from it (DSR): a real that lost its VIP or its decap program fails even
though its own address answers.

Return path: the real answers from VIP:port to the balancer's address:ephemeral port, an
ordinary reply for the connected socket; the balancer's XDP program passes it (its
destination is not a VIP address). The balancer needs a route to the VIP (its default
route, on a one-armed balancer): the stack resolves the gateway's MAC for it, and the
outer packet goes to that same gateway (see xdp/hc_encap.c).
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import socket
import sys
from pathlib import Path
from typing import Self

from control.health_probing import DirectProber, SocketFactory, Target, plain_socket
from lb import constants
from lb.c_header import c_flags
from lb.config import Settings
from lb.constants import HC_STATS
from lb.datapath_tables import ctl_array
from lb.kernel.netns import in_netns, netns_path
from lb.kernel.syscall import KernelError
from lb.kernel.tc import tc_attach, tc_detach

__all__ = ["DEFAULT_MARK_BASE", "HC_STATS", "TC_PRIORITY", "TunnelEncap", "TunnelProber"]

XDP_DIR = Path(__file__).resolve().parent.parent / "xdp"
SOURCE = XDP_DIR / "hc_encap.c"
PROG_NAME = b"hc_encap_tc"
DEFAULT_MARK_BASE = 0x4C420000  # "LB" << 16: SO_MARK = base + real id
TC_PRIORITY = 0x4C42
TC_HANDLE = 1
SO_MARK = getattr(socket, "SO_MARK", 36)


class TunnelEncapError(RuntimeError):
    """Compiling, loading or attaching xdp/hc_encap.c failed."""


class TunnelEncap:
    """The loaded tc program and its mark -> real map; attached to one interface."""

    def __init__(self, max_reals: int = constants.MAX_REALS, mark_base: int = DEFAULT_MARK_BASE) -> None:
        if not 0 < mark_base + max_reals <= 0xFFFFFFFF:
            raise ValueError(f"mark_base {mark_base:#x} + max_reals {max_reals} must fit in 32 bits")
        self.mark_base = mark_base
        self.max_reals = max_reals
        from bcc import BPF

        try:
            self._bpf = BPF(text=SOURCE.read_bytes(),
                            cflags=c_flags(max_reals=max_reals, hc_mark_base=mark_base))
            self._fn = self._bpf.load_func(PROG_NAME, BPF.SCHED_CLS)
        except Exception as e:  # bcc raises bare Exception
            raise TunnelEncapError(f"could not compile/load {SOURCE.name}: {e}") from e
        self._reals = self._bpf[b"hc_reals"]
        self._stats = self._bpf[b"hc_stats"]
        self._ctl = self._bpf[b"hc_ctl"]
        self._known: dict[int, str] = {}
        self._settings: tuple[object, bytes] | None = None  # (Settings, its ctl record) last written
        self._attached: tuple[str, str | None, int] | None = None

    @property
    def prog_fd(self) -> int:
        return self._fn.fd

    def mark(self, real_id: int) -> int:
        if not 0 <= real_id < self.max_reals:
            raise ValueError(f"real id {real_id} out of 0..{self.max_reals - 1}")
        return self.mark_base + real_id

    # ---- the maps ---------------------------------------------------------------------

    def set_settings(self, settings: Settings) -> bool:
        """Encapsulate as the balancer does under ``settings`` (its ``encap`` and ``gue``):
        hc_ctl[0] = the balancer's ctl entry for them. Cheap when unchanged; True if the
        map was written."""
        last = self._settings
        if last is not None and last[0] is settings:
            return False
        record = ctl_array(settings).tobytes()
        if last is not None and last[1] == record:
            self._settings = (settings, record)
            return False
        leaf = self._ctl.Leaf()
        ctypes.memmove(ctypes.addressof(leaf), record, len(record))
        self._ctl[self._ctl.Key(0)] = leaf
        self._settings = (settings, record)
        return True

    def set_real(self, real_id: int, address: str) -> int:
        """hc_reals[mark(real_id)] = address; returns the mark. Cheap when unchanged."""
        mark = self.mark(real_id)
        if self._known.get(mark) == address:
            return mark
        ip = ipaddress.ip_address(address)
        family = constants.FAMILY_V4 if ip.version == 4 else constants.FAMILY_V6
        raw = ip.packed.ljust(16, b"\0") + bytes([family, 0, 0, 0])  # struct real_def
        leaf = self._reals.Leaf()
        ctypes.memmove(ctypes.addressof(leaf), raw, len(raw))
        self._reals[self._reals.Key(mark)] = leaf
        self._known[mark] = address
        return mark

    def remove_real(self, real_id: int) -> None:
        mark = self.mark(real_id)
        with contextlib.suppress(KeyError):
            del self._reals[self._reals.Key(mark)]
        self._known.pop(mark, None)

    def reals(self) -> dict[int, str]:
        out = {}
        for k, v in self._reals.items():
            raw = bytes(v)
            addr = ipaddress.ip_address(raw[:4] if raw[16] == constants.FAMILY_V4 else raw[:16])
            out[int(k.value)] = str(addr)
        return out

    def read_stats(self) -> dict[str, int]:
        return {name: int(sum(self._stats.getvalue(self._stats.Key(i)))) for i, name in enumerate(HC_STATS)}

    # ---- attach / detach ----------------------------------------------------------------

    def attach(self, ifname: str, netns: str | None = None) -> None:
        """tc egress of ``ifname`` (in ``netns``): a clsact qdisc if missing, our filter at
        priority TC_PRIORITY (one left by a previous, killed daemon is replaced)."""
        with in_netns(netns):
            ifindex = socket.if_nametoindex(ifname)
            try:
                tc_attach(ifindex, self._fn.fd, self._fn.name.decode(), TC_PRIORITY,
                          direction="egress", handle=TC_HANDLE, replace=True)
            except KernelError as e:
                raise TunnelEncapError(f"{ifname}: {e}") from e
        self._attached = (ifname, netns, ifindex)

    def detach(self) -> None:
        if self._attached is None:
            return
        ifname, netns, ifindex = self._attached
        self._attached = None
        if netns is not None and not os.path.exists(netns_path(netns)):
            return  # the namespace went, and the filter with it
        with in_netns(netns):
            try:
                if socket.if_nametoindex(ifname) != ifindex:
                    return
            except OSError:
                return
            with contextlib.suppress(KernelError):
                tc_detach(ifindex, TC_PRIORITY, direction="egress", handle=TC_HANDLE)

    def close(self) -> None:
        try:
            self.detach()
        finally:
            if self._bpf is not None:
                self._bpf.cleanup()
                self._bpf = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TunnelProber(DirectProber):
    """Probes the VIP address with SO_MARK = the real's mark: through the tunnel."""

    def __init__(self, encap: TunnelEncap, socket_factory: SocketFactory = plain_socket) -> None:
        super().__init__(socket_factory)
        self.encap = encap

    def endpoint(self, t: Target) -> tuple[str, int]:
        return t.vip_address, t.port

    def make_socket(self, t: Target, family: int, type_: int) -> socket.socket:
        mark = self.encap.set_real(t.real_id, t.real_address)
        sock = self.socket_factory(family, type_)
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        except BaseException:
            sock.close()
            raise
        return sock


if __name__ == "__main__":  # pragma: no cover - compile check: python -m control.tunnel_probe
    with TunnelEncap() as enc:
        print(f"{SOURCE.name} loaded, prog fd {enc.prog_fd}", file=sys.stderr)
