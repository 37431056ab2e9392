"""Configuring the lab's namespaces from outside: ``ip -batch`` runs, link listings,
net.* sysctls, the tx checksum offload of a veth end."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping, Sequence

from lb.kernel.netns import run_in_netns
from netns.errors import LabError


def ip_batch(ns: str | None, commands: Sequence[str], what: str) -> None:
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


def link_macs(ns: str) -> dict[str, str]:
    """Interface name -> MAC address of every link in ``ns``."""
    r = subprocess.run(["ip", "-n", ns, "-j", "link", "show"], capture_output=True, text=True,
                       timeout=30, check=False)
    if r.returncode != 0:
        raise LabError(f"listing links in {ns}: {r.stderr.strip()}")
    return {link["ifname"]: link.get("address", "") for link in json.loads(r.stdout or "[]")}


def write_sysctls(ns: str, values: Mapping[str, str | int]) -> None:
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
