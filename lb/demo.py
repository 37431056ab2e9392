"""`lbctl demo`: the userspace datapath over a generated packet stream.

Builds a stream of client flows (TCP handshakes and data, UDP datagrams, a ping), runs
it through the datapath twice in a shuffled order, and reports where each flow went:
which real served how many flows, that every packet of a flow reached the same real,
and the datapath's counters. The network-namespace lab replaces this with real
clients and servers once it exists.
"""

from __future__ import annotations

import ipaddress
import random
import struct
from collections import Counter, defaultdict
from dataclasses import dataclass

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import raw
from scapy.utils import checksum

from lb import constants as C
from lb.config import Config, parse_config
from lb.datapath import UserspaceDatapath
from lb.datapath_tables import compile_tables

DEFAULT_DEMO_CONFIG = {
    "settings": {"gateway_mac": "02:00:00:00:00:fe"},
    "vips": [
        {"address": "198.18.100.1", "port": 80, "protocol": "tcp",
         "reals": [{"address": "198.19.0.1", "weight": 1}, {"address": "198.19.0.2", "weight": 1},
                   {"address": "198.19.0.3", "weight": 2}]},
        {"address": "198.18.100.1", "port": 53, "protocol": "udp",
         "reals": [{"address": "198.19.0.1"}, {"address": "198.19.0.2"}]},
    ],
}
_L3, _IP_CSUM, _IP_PROTO, _IP_SRC, _L4 = 14, 24, 23, 26, 34  # offsets in an IPv4 frame
LB_MAC = "02:00:00:00:00:01"
CLIENT_MAC = "02:00:00:00:00:02"


@dataclass
class DemoReport:
    flows_per_real: dict[str, Counter]  # vip label -> real -> flows
    sticky_flows: int
    split_flows: int
    packets: int
    stats: dict[str, int]


def _vip_label(vip) -> str:
    return f"{vip.address}:{vip.port}/{vip.protocol}"


def _frames_of(dst: str, protocol: str) -> list[bytes]:
    """The 3 frames of a flow to ``dst`` (TCP: SYN, ACK, PSH-ACK; UDP: 1-byte datagrams
    0, 1, 2) from 0.0.0.0 port 0 to port 0, as scapy builds them: templates for
    :func:`_retarget`."""
    ip = Ether(dst=LB_MAC, src=CLIENT_MAC) / IP(src="0.0.0.0", dst=dst)
    if protocol == "tcp":
        return [raw(ip / TCP(sport=0, dport=0, flags=flags)) for flags in ("S", "A", "PA")]
    return [raw(ip / UDP(sport=0, dport=0) / bytes([n])) for n in range(3)]


def _retarget(template: bytes, client: str, sport: int, dport: int) -> bytes:
    """``template`` (Ethernet + IPv4 + TCP/UDP) from ``client`` port ``sport`` to port
    ``dport``, both checksums recomputed as scapy computes them: what building the frame
    with scapy gives, at a hundredth of the cost."""
    f = bytearray(template)
    f[_IP_SRC:_IP_SRC + 4] = ipaddress.IPv4Address(client).packed
    struct.pack_into("!H", f, _IP_CSUM, 0)
    struct.pack_into("!H", f, _IP_CSUM, checksum(bytes(f[_L3:_L4])))
    proto = f[_IP_PROTO]
    struct.pack_into("!HH", f, _L4, sport, dport)
    at = _L4 + (16 if proto == C.IPPROTO_TCP else 6)
    struct.pack_into("!H", f, at, 0)
    pseudo = bytes(f[_IP_SRC:_IP_SRC + 8]) + struct.pack("!BBH", 0, proto, len(f) - _L4)
    c = checksum(pseudo + bytes(f[_L4:]))
    struct.pack_into("!H", f, at, 0xFFFF if c == 0 and proto == C.IPPROTO_UDP else c)
    return bytes(f)


def build_stream(cfg: Config, flows: int, seed: int = 1) -> list[tuple[str, tuple, bytes]]:
    """(vip label, flow id, frame) for ``flows`` flows per VIP: 3 packets each."""
    rng = random.Random(seed)
    out = []
    for vip in cfg.vips:
        label = _vip_label(vip)
        templates = _frames_of(str(vip.ip), vip.protocol) if vip.ip.version == 4 else []
        for _ in range(flows):
            client = f"198.18.{rng.randrange(0, 100)}.{rng.randrange(1, 255)}"
            sport = rng.randrange(1024, 65535)
            dport = vip.port or rng.randrange(1, 65535)
            if not templates:
                continue  # the demo's generator speaks IPv4 only
            fid = (label, client, sport)
            out += [(label, fid, _retarget(t, client, sport, dport)) for t in templates]
    first = str(cfg.vips[0].address) if cfg.vips else "198.18.100.1"
    out.append(("ping", ("ping",), raw(Ether(dst=LB_MAC, src=CLIENT_MAC) / IP(src="198.18.0.9", dst=first) / ICMP())))
    return out


def run_demo(cfg: Config | None = None, flows: int = 1000, seed: int = 1) -> DemoReport:
    """Run the stream through one datapath instance and check stickiness."""
    cfg = cfg or parse_config(DEFAULT_DEMO_CONFIG)
    tables = compile_tables(cfg)
    dp = UserspaceDatapath(tables)
    stream = build_stream(cfg, flows, seed)
    # keep each flow's packets in order but interleave flows
    rng = random.Random(seed)
    by_flow: dict[tuple, list[tuple[str, bytes]]] = defaultdict(list)
    for label, fid, frame in stream:
        by_flow[fid].append((label, frame))
    order = [fid for fid, pkts in by_flow.items() for _ in pkts]
    rng.shuffle(order)
    cursor: dict[tuple, int] = defaultdict(int)
    seq = []
    for fid in order:
        seq.append((fid, *by_flow[fid][cursor[fid]]))
        cursor[fid] += 1
    r = dp.process_frames([f for _, _, f in seq], now=0)
    reals_of_flow: dict[tuple, set] = defaultdict(set)
    for i, (fid, label, _) in enumerate(seq):
        if int(r.actions[i]) == C.XDP_TX and int(r.real_ids[i]):
            reals_of_flow[(label, fid)].add(str(tables.real_address(int(r.real_ids[i]))))
    per_vip: dict[str, Counter] = defaultdict(Counter)
    sticky = split = 0
    for (label, _), reals in reals_of_flow.items():
        if label == "ping":
            continue
        if len(reals) == 1:
            sticky += 1
            per_vip[label][next(iter(reals))] += 1
        else:
            split += 1
    return DemoReport(dict(per_vip), sticky, split, len(seq), dp.stats_dict())


def print_report(rep: DemoReport, cfg: Config | None = None) -> None:
    """Tables for people (rich)."""
    from rich.console import Console
    from rich.table import Table

    cfg = cfg or parse_config(DEFAULT_DEMO_CONFIG)
    weights = {(_vip_label(v), str(r.address)): r.weight for v in cfg.vips for r in v.reals}
    con = Console()
    t = Table(title="where the flows went (userspace datapath)")
    for col in ("VIP", "real", "weight", "flows", "share"):
        t.add_column(col, justify="right")
    for label, reals in rep.flows_per_real.items():
        total = sum(reals.values())
        for real, n in sorted(reals.items()):
            t.add_row(label, real, str(weights.get((label, real), "?")), str(n), f"{n / total:.1%}")
    con.print(t)
    con.print(f"{rep.packets} packets; {rep.sticky_flows} flows stayed on one real, "
              f"{rep.split_flows} were split across reals")
    c = Table(title="datapath counters")
    c.add_column("counter")
    c.add_column("value", justify="right")
    for k, v in rep.stats.items():
        if v:
            c.add_row(k, str(v))
    con.print(c)
