"""tc clsact: one cls_bpf filter in direct-action mode on ingress or egress (pyroute2)."""

from __future__ import annotations

import contextlib
import errno

from lb.kernel.netns import NetnsRef, in_netns
from lb.kernel.syscall import KernelError

TC_INGRESS_PARENT = 0xFFFFFFF2  # clsact ingress ("ffff:fff2")
TC_EGRESS_PARENT = 0xFFFFFFF3  # clsact egress ("ffff:fff3")
TC_PARENTS = {"ingress": TC_INGRESS_PARENT, "egress": TC_EGRESS_PARENT}


def tc_attach(ifindex: int, prog_fd: int, prog_name: str, prio: int, *,
              direction: str = "ingress", handle: int = 1, replace: bool = False,
              netns: NetnsRef | None = None) -> bool:
    """Add a clsact qdisc to ``ifindex`` if it has none and one ``bpf`` filter (direct
    action, ``handle``, priority ``prio``) running ``prog_fd`` on ``direction``. With
    ``replace`` a filter already at that handle and priority (e.g. one a killed process
    left) is removed first. Returns whether the qdisc was added here (then
    :func:`tc_detach` may remove it again). Raises KernelError; a qdisc added here is
    removed again if the filter fails."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    parent = TC_PARENTS[direction]
    created = False
    with in_netns(netns), IPRoute() as ipr:
        try:
            ipr.tc("add", "clsact", ifindex)
            created = True
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise KernelError(e.code, f"adding clsact to ifindex {ifindex}") from e
        if replace:
            with contextlib.suppress(NetlinkError):
                ipr.tc("del-filter", "bpf", ifindex, f":{handle}", parent=parent, prio=prio)
        try:
            ipr.tc("add-filter", "bpf", ifindex, f":{handle}", fd=prog_fd, name=prog_name,
                   parent=parent, classid=1, direct_action=True, prio=prio)
        except NetlinkError as e:
            if created:
                with contextlib.suppress(NetlinkError):
                    ipr.tc("del", "clsact", ifindex)
            raise KernelError(e.code, f"adding the tc {direction} filter on ifindex {ifindex}"
                                      f" (priority {prio} taken?)") from e
    return created


def tc_detach(ifindex: int, prio: int, *, direction: str = "ingress", handle: int = 1,
              remove_qdisc: bool = False, netns: NetnsRef | None = None) -> None:
    """Remove the ``direction`` filter at ``handle`` and priority ``prio`` (already gone
    is fine); with ``remove_qdisc``, also the clsact qdisc once no filter is left on it."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with in_netns(netns), IPRoute() as ipr:
        try:
            ipr.tc("del-filter", "bpf", ifindex, f":{handle}", parent=TC_PARENTS[direction],
                   prio=prio)
        except NetlinkError as e:
            if e.code not in (errno.ENOENT, errno.EINVAL):
                raise KernelError(e.code, f"removing the tc filter on ifindex {ifindex}") from e
        if not remove_qdisc:
            return
        left = 0
        for parent in TC_PARENTS.values():
            with contextlib.suppress(NetlinkError):
                left += len(list(ipr.get_filters(index=ifindex, parent=parent)))
        if left == 0:
            with contextlib.suppress(NetlinkError):
                ipr.tc("del", "clsact", ifindex)
