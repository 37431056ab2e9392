"""TRex stateless (STL) profile: the flow mixes of bench/bench_xdp.py, for TRex hardware.

For users with a TRex traffic generator in front of a balancer host: the same frames the
XDP benchmark makes with its live-frames generator — IPv4 or IPv6, TCP or UDP, N flows
that differ in source address and source port — so results from a real NIC can be set
beside ``bench/results/xdp.json``. The flows come from TRex's field engine
(``STLVmTupleGen``: the source address runs through its range first, then the source
port steps, ``limit_flows`` = N), so every flow recurs every N packets as in the XDP
benchmark (whose address x port split differs; the flow count and recurrence are what
the connection table sees).

Load it in the TRex console, e.g.::

    start -f bench/trex_profile.py -m 10mpps -t family=6,proto=tcp,flows=100000

Tunables (``-t``; also keyword arguments of ``get_streams``):

    family     4 | 6                              (default 4)
    proto      tcp | udp                          (default tcp)
    flows      number of flows N >= 1             (default 1000)
    vip        lru | lru_bypass | an address      (default lru: bench_xdp's LRU VIP)
    size       frame bytes without FCS            (default 64; IPv6 TCP needs 74)
    dst_mac    the balancer port's MAC            (default: TRex's configured one)
    src_mac                                       (default: TRex's)
    tcp_flags  scapy flag string                  (default "A": ACKs, connection-table hits)
    hw_csum    1: NIC computes L4 checksums       (default 0: left as built, the balancer
                                                   does not check them)

Addresses are bench_xdp's: clients in 198.18.0.0/15 or 2001:db8:1::/64 (the low 32 bits
vary), VIPs 198.19.200.1/.2 and 2001:db8:200::1/::2 port 80. Configure the balancer with
``bench.bench_xdp.bench_config`` (same VIPs and reals).

This module imports without TRex (``HAVE_TREX`` is then False): ``flow_mix`` and the
constants are plain Python. Building streams needs ``trex_stl_lib`` (it ships with TRex,
``trex-core/scripts/automation/trex_control_plane/interactive`` on ``PYTHONPATH``).
"""

from __future__ import annotations

import argparse
import ipaddress
from dataclasses import dataclass
from typing import Any

try:  # TRex's own library (and the scapy it bundles); absent on most machines
    from trex_stl_lib.api import (
        IP,
        TCP,
        UDP,
        CTRexVmInsFixHwCs,
        Ether,
        IPv6,
        STLPktBuilder,
        STLScVmRaw,
        STLStream,
        STLTXCont,
        STLVmFixChecksumHw,
        STLVmFixIpv4,
        STLVmTupleGen,
        STLVmWrFlowVar,
    )

    HAVE_TREX = True
except ImportError:
    HAVE_TREX = False

# The flow mixes of bench/bench_xdp.py (kept literal here: a TRex profile is loaded by
# TRex's own interpreter, which may not have this project's dependencies).
VIPS = {(4, "lru"): "198.19.200.1", (4, "lru_bypass"): "198.19.200.2",
        (6, "lru"): "2001:db8:200::1", (6, "lru_bypass"): "2001:db8:200::2"}
CLIENT_SRC = {4: "198.18.0.1", 6: "2001:db8:1::1"}
CLIENT_NET = {4: ipaddress.ip_network("198.18.0.0/15"), 6: ipaddress.ip_network("2001:db8::/32")}
SPORT0 = 1024
DPORT = 80
MAX_PORTS = 65536 - SPORT0
MIN_FRAME = {(4, "udp"): 64, (4, "tcp"): 64, (6, "udp"): 64, (6, "tcp"): 74}


@dataclass(frozen=True)
class FlowMix:
    """N flows as (addresses x ports): client addresses ``src_min``..``src_max`` (the low
    32 bits vary), source ports ``port_min``..``port_max``; ``flows`` = their product."""

    family: int
    proto: str
    flows: int
    src_min: str
    src_max: str
    port_min: int
    port_max: int
    dst: str
    size: int

    @property
    def addresses(self) -> int:
        return int(ipaddress.ip_address(self.src_max)) - int(ipaddress.ip_address(self.src_min)) + 1

    @property
    def ports(self) -> int:
        return self.port_max - self.port_min + 1


def flow_mix(family: int = 4, proto: str = "tcp", flows: int = 1000, vip: str = "lru",
             size: int = 64) -> FlowMix:
    """The address x port split of ``flows`` flows: as few addresses as possible (ports
    first, at most 64,512), the split exact (addresses x ports == flows)."""
    if family not in (4, 6):
        raise ValueError("family must be 4 or 6")
    if proto not in ("tcp", "udp"):
        raise ValueError("proto must be tcp or udp")
    if flows < 1:
        raise ValueError("flows must be >= 1")
    if size < MIN_FRAME[(family, proto)]:
        raise ValueError(f"IPv{family} {proto.upper()} frames are at least "
                         f"{MIN_FRAME[(family, proto)]} bytes")
    dst = VIPS.get((family, vip), vip)
    if ipaddress.ip_address(dst).version != family:
        raise ValueError(f"VIP {dst} is not IPv{family}")
    addrs = -(-flows // MAX_PORTS)  # ceil
    while flows % addrs:
        addrs += 1
    ports = flows // addrs
    lo = ipaddress.ip_address(CLIENT_SRC[family])
    hi = ipaddress.ip_address(int(lo) + addrs - 1)
    if hi not in CLIENT_NET[family] or (int(lo) & 0xFFFFFFFF) + addrs - 1 > 0xFFFFFFFF:
        raise ValueError(f"{flows} flows need {addrs} client addresses: more than the "
                         "benchmarking range allows")
    return FlowMix(family, proto, flows, str(lo), str(hi), SPORT0, SPORT0 + ports - 1, dst, size)


def _low32(addr: str) -> str:
    """The low 32 bits of an address as a dotted quad (TRex's tuple generator is 32-bit)."""
    return str(ipaddress.IPv4Address(int(ipaddress.ip_address(addr)) & 0xFFFFFFFF))


def build_stream(mix: FlowMix, *, dst_mac: str | None = None, src_mac: str | None = None,
                 tcp_flags: str = "A", hw_csum: bool = False) -> Any:
    """One continuous STL stream for ``mix`` (needs trex_stl_lib)."""
    if not HAVE_TREX:
        raise RuntimeError("trex_stl_lib is not importable: run this profile from TRex")
    eth_kw = {k: v for k, v in (("dst", dst_mac), ("src", src_mac)) if v}
    l3 = (IP(src=mix.src_min, dst=mix.dst) if mix.family == 4
          else IPv6(src=mix.src_min, dst=mix.dst))
    l4 = (TCP(sport=mix.port_min, dport=DPORT, flags=tcp_flags) if mix.proto == "tcp"
          else UDP(sport=mix.port_min, dport=DPORT))
    base = Ether(**eth_kw) / l3 / l4
    pad = max(0, mix.size - len(base)) * b"\0"
    l3_name = "IP" if mix.family == 4 else "IPv6"
    l4_name = mix.proto.upper()
    cmds = []
    if mix.flows > 1:
        cmds += [
            STLVmTupleGen(name="flow", ip_min=_low32(mix.src_min), ip_max=_low32(mix.src_max),
                          port_min=mix.port_min, port_max=mix.port_max, limit_flows=mix.flows),
            # IPv6: the generator's 32-bit value goes to the last 4 bytes of the source
            STLVmWrFlowVar(fv_name="flow.ip", pkt_offset=f"{l3_name}.src",
                           offset_fixup=0 if mix.family == 4 else 12),
            STLVmWrFlowVar(fv_name="flow.port", pkt_offset=f"{l4_name}.sport"),
        ]
        if mix.family == 4:
            cmds.append(STLVmFixIpv4(offset="IP"))
    if hw_csum:  # must be last
        l4_type = CTRexVmInsFixHwCs.L4_TYPE_TCP if mix.proto == "tcp" else CTRexVmInsFixHwCs.L4_TYPE_UDP
        cmds.append(STLVmFixChecksumHw(l3_offset=l3_name, l4_offset=l4_name, l4_type=l4_type))
    vm = STLScVmRaw(cmds) if cmds else None
    return STLStream(packet=STLPktBuilder(pkt=base / pad, vm=vm), mode=STLTXCont())


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trex_profile", description="bench_xdp flow mixes for TRex")
    p.add_argument("--family", type=int, default=4, choices=(4, 6))
    p.add_argument("--proto", default="tcp", choices=("tcp", "udp"))
    p.add_argument("--flows", type=int, default=1000)
    p.add_argument("--vip", default="lru")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--dst_mac", default=None)
    p.add_argument("--src_mac", default=None)
    p.add_argument("--tcp_flags", default="A")
    p.add_argument("--hw_csum", type=int, default=0, choices=(0, 1))
    return p


class BenchXdpProfile:
    """The profile object TRex loads through :func:`register`."""

    def get_streams(self, tunables: list[str] | None = None, direction: int = 0,
                    **kwargs: Any) -> list[Any]:
        """Newer TRex passes ``tunables`` (a list of ``--key value`` strings), older
        versions the ``-t`` values as keyword arguments; both are accepted."""
        args = vars(_parser().parse_args(tunables or []))
        for key in list(args):
            if key in kwargs:
                args[key] = type(args[key])(kwargs[key]) if args[key] is not None else kwargs[key]
        mix = flow_mix(args["family"], args["proto"], args["flows"], args["vip"], args["size"])
        return [build_stream(mix, dst_mac=args["dst_mac"], src_mac=args["src_mac"],
                             tcp_flags=args["tcp_flags"], hw_csum=bool(args["hw_csum"]))]


def register() -> BenchXdpProfile:
    """TRex's entry point for a Python profile."""
    return BenchXdpProfile()
