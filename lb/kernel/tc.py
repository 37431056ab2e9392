"""tc clsact ingress: a cls_bpf filter in direct-action mode (pyroute2 netlink)."""

from __future__ import annotations

import contextlib
import errno

from lb.kernel.netns import NetnsRef, in_netns
from lb.kernel.syscall import KernelError

TC_INGRESS_PARENT = 0xFFFFFFF2  # clsact ingress ("ffff:fff2")
TC_EGRESS_PARENT = 0xFFFFFFF3


def tc_attach_ingress(ifindex: int, prog_fd: int, prog_name: str, prio: int,
                      netns: NetnsRef | None = None) -> bool:
    """Add a clsact qdisc to ``ifindex`` if it has none and one ``bpf`` filter (handle 1,
    direct action, priority ``prio``) running ``prog_fd`` on ingress. Returns whether the
    qdisc was added here (then :func:`tc_detach_ingress` may remove it again). Raises
    KernelError; the qdisc added here is removed again if the filter fails."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    created = False
    with in_netns(netns), IPRoute() as ipr:
        try:
            ipr.tc("add", "clsact", ifindex)
            created = True
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise KernelError(e.code, f"adding clsact to ifindex {ifindex}") from e
        try:
            ipr.tc("add-filter", "bpf", ifindex, ":1", fd=prog_fd, name=prog_name,
                   parent=TC_INGRESS_PARENT, classid=1, direct_action=True, prio=prio)
        except NetlinkError as e:
            if created:
                with contextlib.suppress(NetlinkError):
                    ipr.tc("del", "clsact", ifindex)
            raise KernelError(e.code, f"adding the tc ingress filter on ifindex {ifindex}"
                                      f" (priority {prio} taken?)") from e
    return created


def tc_detach_ingress(ifindex: int, prio: int, remove_qdisc: bool,
                      netns: NetnsRef | None = None) -> None:
    """Remove the ingress filter of priority ``prio`` (already gone is fine); with
    ``remove_qdisc``, also the clsact qdisc once no filter is left on it."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with in_netns(netns), IPRoute() as ipr:
        try:
            ipr.tc("del-filter", "bpf", ifindex, ":1", parent=TC_INGRESS_PARENT, prio=prio)
        except NetlinkError as e:
            if e.code not in (errno.ENOENT, errno.EINVAL):
                raise KernelError(e.code, f"removing the tc filter on ifindex {ifindex}") from e
        if not remove_qdisc:
            return
        left = 0
        for parent in (TC_INGRESS_PARENT, TC_EGRESS_PARENT):
            with contextlib.suppress(NetlinkError):
                left += len(list(ipr.get_filters(index=ifindex, parent=parent)))
        if left == 0:
            with contextlib.suppress(NetlinkError):
                ipr.tc("del", "clsact", ifindex)
