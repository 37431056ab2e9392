"""Attaching XDP programs to interfaces (netlink, through libbcc's bpf_attach_xdp)."""

from __future__ import annotations

import ctypes

from lb.kernel.netns import NetnsRef, in_netns
from lb.kernel.syscall import KernelError

# XDP attach flags (include/uapi/linux/if_link.h)
XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
# Attach modes by name: the driver's ("native"), the generic skb path, or whichever the
# kernel picks ("auto": native where the driver has it).
XDP_MODE_FLAGS = {"auto": 0, "generic": XDP_FLAGS_SKB_MODE, "native": XDP_FLAGS_DRV_MODE}


def _attach(ifname: str, prog_fd: int, flags: int, what: str, netns: NetnsRef | None) -> None:
    from bcc.libbcc import lib  # Debian's python3-bpfcc, imported late: lb imports without it

    with in_netns(netns):
        if lib.bpf_attach_xdp(ifname.encode(), prog_fd, flags) < 0:
            raise KernelError(ctypes.get_errno(), what)


def xdp_attach(ifname: str, prog_fd: int, flags: int = 0, netns: NetnsRef | None = None) -> None:
    """Attach program ``prog_fd`` to ``ifname`` (in ``netns``; default the calling
    thread's), replacing the program there unless ``flags`` has
    XDP_FLAGS_UPDATE_IF_NOEXIST. The swap is atomic: no frame sees "no program".
    Raises KernelError (EOPNOTSUPP: the mode is not supported by the device)."""
    _attach(ifname, prog_fd, flags, f"attaching XDP to {ifname}", netns)


def xdp_detach(ifname: str, flags: int = 0, netns: NetnsRef | None = None) -> None:
    """Remove the XDP program attached to ``ifname`` in the mode ``flags`` names."""
    _attach(ifname, -1, flags, f"detaching XDP from {ifname}", netns)
