"""The lab's topology: the addressing plan (docs/lab.md), its hosts and VIPs, and what
each role's namespace needs (addresses, routes, sysctls) as data.

Pure: nothing here touches the system; :mod:`netns.lab` runs what these functions return.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lb.addresses import ALLOWED_NETS, check_address
from netns.errors import LabError

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


@dataclass(frozen=True)
class VipSpec:
    address: str
    port: int
    protocol: str  # tcp | udp
    hash: str = "maglev_v2"
    flags: tuple[str, ...] = ()

    @property
    def version(self) -> int:
        return self.network.version

    @property
    def network(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        """The VIP's addresses: its prefix (a CIDR VIP) or its one address."""
        return ipaddress.ip_network(self.address)

    @property
    def is_prefix(self) -> bool:
        return "/" in self.address


DEFAULT_VIPS = (VipSpec(VIP4, HTTP_PORT, "tcp"), VipSpec(VIP4, UDP_PORT, "udp"),
                VipSpec(VIP6, HTTP_PORT, "tcp"), VipSpec(VIP6, UDP_PORT, "udp"))


def make_hosts(lab_name: str, clients: int, balancers: int, reals: int) -> list[Host]:
    """The hosts of lab ``lab_name``: clients, balancers, reals, each on its segment."""
    hosts = []
    for role, count, seg0, mtu in (("client", clients, CLIENT_SEG0, EDGE_MTU),
                                   ("balancer", balancers, BALANCER_SEG0, INNER_MTU),
                                   ("real", reals, REAL_SEG0, INNER_MTU)):
        short = {"client": "c", "balancer": "lb", "real": "r"}[role]
        letter = {"client": "c", "balancer": "b", "real": "r"}[role]
        for i in range(1, count + 1):
            ifname = f"{lab_name}{letter}{i}"
            hosts.append(Host(role, f"{short}{i}", f"{lab_name}-{short}{i}", ifname,
                              ifname + "g", seg0 + i, mtu))
    return hosts


def vips_and_reals(config: Any) -> tuple[tuple[VipSpec, ...], list[tuple[str | None, str | None]]]:
    """VIP specs and real hosts' (v4, v6) addresses from a user config (an
    lb.config.Config, or None for the default VIPs): the distinct real addresses of
    each family, in order of appearance, are paired into hosts."""
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


def check_addresses(hosts: Sequence[Host], vips: Sequence[VipSpec]) -> None:
    """Every address in the plan; config addresses must not fall into link subnets
    (other than as the very host's own link address)."""
    nets = []
    for h in hosts:
        nets += [(seg_net4(h.seg), h), (seg_net6(h.seg), h)]
    for v in vips:
        check_address(v.address)
        vnet = v.network
        if not any(vnet.version == n.version and vnet.subnet_of(n) for n in ALLOWED_NETS):
            raise LabError(f"VIP {v.address} is not inside 198.18.0.0/15 or 2001:db8::/32")
        for net, h in nets:
            if vnet.version == net.version and vnet.overlaps(net):
                raise LabError(f"VIP {v.address} overlaps {h.name}'s link subnet {net}")
        if v.is_prefix and v.protocol != "tcp":
            # the servers answer a prefix from a wildcard socket: right for TCP only (a
            # UDP reply would leave from the real's own address)
            raise LabError(f"CIDR VIP {v.address} port {v.port} {v.protocol}: the lab serves CIDR VIPs over tcp only")
    for h in hosts:
        if h.role != "real":
            continue
        for a, own in ((h.real4, h.addr4), (h.real6, h.addr6)):
            check_address(a)
            ip = ipaddress.ip_address(a)
            if a == own:
                continue
            for net, other in nets:
                if ip.version == net.version and ip in net:
                    raise LabError(f"real address {a} (host {h.name}) lies in "
                                   f"{other.name}'s link subnet {net}")
            if any(ip.version == v.version and ip in v.network for v in vips):
                raise LabError(f"real address {a} is also a VIP")


def role_sysctls(role: str) -> dict[str, int]:
    """The net.* sysctls a namespace of ``role`` ("router", "client", "balancer",
    "real") gets before its links exist."""
    values = {
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
    return values


def host_commands(h: Host, vips: Sequence[VipSpec]) -> tuple[list[str], list[str]]:
    """``ip`` commands (without the leading ``ip``) that configure host ``h``: (in the
    host's namespace, in the router's namespace)."""
    router = [f"addr add {h.gw4}/24 dev {h.gw_ifname}",
              f"addr add {h.gw6}/64 dev {h.gw_ifname} nodad",
              f"link set {h.gw_ifname} up"]
    cmds = ["link set lo up",
            f"addr add {h.addr4}/24 dev {h.ifname}",
            f"addr add {h.addr6}/64 dev {h.ifname} nodad",
            f"link set {h.ifname} up"]
    if h.role != "balancer":  # the balancer only needs to be reachable on its link
        cmds += [f"route add default via {h.gw4}", f"route add default via {h.gw6}"]
    if h.role == "real":
        for v in sorted({v.address for v in vips}):
            if "/" in v:  # a CIDR VIP: every address of the prefix is local
                cmds.append(f"route add local {v} dev lo")
                continue
            plen = 128 if ":" in v else 32
            cmds.append(f"addr add {v}/{plen} dev lo" + (" nodad" if ":" in v else ""))
        for a, own in ((h.real4, h.addr4), (h.real6, h.addr6)):
            if a != own:  # a config's real address: on the link, routed by the router
                plen = 128 if ":" in a else 32
                cmds.append(f"addr add {a}/{plen} dev {h.ifname}"
                            + (" nodad" if ":" in a else ""))
                router.append(f"route add {a}/{plen} dev {h.gw_ifname}")
    return cmds, router


def vip_route_commands(vips: Sequence[VipSpec], balancers: Sequence[Host]) -> list[str]:
    """The router's static routes for the VIPs: via the balancer, ECMP over several."""
    cmds = []
    for addr in sorted({v.address for v in vips}):
        v6 = ":" in addr
        gws = [h.addr6 if v6 else h.addr4 for h in balancers]
        dst = addr if "/" in addr else f"{addr}/{128 if v6 else 32}"
        if len(gws) == 1:
            cmds.append(f"route add {dst} via {gws[0]}")
        else:
            cmds.append(f"route add {dst} " + " ".join(f"nexthop via {g}" for g in gws))
    return cmds
