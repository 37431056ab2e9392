"""Vectors taken from Katran itself: frames run through Katran's own XDP program and
what it answered, for tests/test_katran_vectors.py to hold both our datapaths to.

``python -m bench.katran_vectors --katran DIR`` builds ``katran/lib/bpf/balancer.bpf.c``
from a Katran checkout or git dir twice (bench/katran.py): as it is (IPIP; Katran's own
IPIP source prefixes, 172.16/16 and 0100::/16) and with ``-DGUE_ENCAP``, loads each with
the maps filled for :data:`CONFIG` (our Maglev rings, so the hash and ring lookup are
Katran's code on the same ring), runs every case of :func:`cases` by BPF_PROG_TEST_RUN
(each from empty LRUs, frames in order) and writes the actions and output frames to
``tests/data/katran_vectors.json`` with Katran's revision. Nothing is sent anywhere.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path
from typing import Any

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Raw, raw

from bench.katran import KatranBalancer, build_balancer, katran_tree
from lb.config import parse_config
from lb.datapath_tables import compile_tables
from lb.kernel.maps import map_update
from lb.kernel.testrun import test_run

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "katran_vectors.json"
LB_MAC, ROUTER_MAC, GW_MAC = "02:00:00:00:00:01", "02:00:00:00:00:fe", "00:00:de:ad:be:af"
VIP4, VIP6, QUIC_VIP = "198.18.0.100", "2001:db8::100", "198.18.0.101"
REALS4 = ["198.19.0.1", "198.19.0.2", "198.19.0.3"]
REALS6 = ["2001:db8:1::1", "2001:db8:1::2", "2001:db8:1::3"]
GUE_SRC4, GUE_SRC6 = "198.18.0.254", "2001:db8:fffe::254"
QUIC_IDS = {1000: "198.19.0.1", 1001: "198.19.0.2", 1002: "198.19.0.3"}
GUE_PORT = 6080  # Katran's GUE_DPORT


def config(encap: str) -> dict[str, Any]:
    """The config both Katran's maps and our tables are made from."""
    return {
        "settings": {"gateway_mac": GW_MAC, "encap": encap,
                     "gue": {"port": GUE_PORT, "source_v4": GUE_SRC4, "source_v6": GUE_SRC6}},
        "vips": [
            {"address": VIP4, "port": 80, "protocol": "tcp", "reals": [{"address": a} for a in REALS4]},
            {"address": VIP6, "port": 80, "protocol": "tcp", "reals": [{"address": a} for a in REALS6]},
            {"address": VIP4, "port": 81, "protocol": "tcp", "reals": [{"address": a} for a in REALS6]},
            {"address": QUIC_VIP, "port": 443, "protocol": "udp", "flags": ["quic"],
             "reals": [{"address": a} for a in REALS4]},
        ],
        "quic_servers": [{"id": i, "real": a} for i, a in QUIC_IDS.items()],
    }


def _eth(l3) -> bytes:
    return raw(Ether(dst=LB_MAC, src=ROUTER_MAC) / l3)


def _short(server_id: int | None) -> bytes:
    """A QUIC short-header payload: CID v1 carrying ``server_id``; None: no CID at all."""
    if server_id is None:
        return b"\x41"
    cid = bytes([0x40 | (server_id >> 10), (server_id >> 2) & 0xFF, ((server_id & 3) << 6) | 0x15]) + b"\x5a" * 5
    return b"\x41" + cid + b"\xa5" * 24


INITIAL = b"\xc0\x00\x00\x00\x01\x08" + b"\x11" * 8 + b"\x00" + b"\xa5" * 24


def _quic(payload: bytes, sport: int) -> bytes:
    return _eth(IP(src="198.18.7.7", dst=QUIC_VIP) / UDP(sport=sport, dport=443) / Raw(payload))


def cases() -> list[tuple[str, list[bytes]]]:
    """(name, frames run in order from empty LRUs)."""
    rnd = random.Random(17)
    out: list[tuple[str, list[bytes]]] = []
    for i in range(150):  # new flows: the real Katran's hash picks, the IPIP / GUE bytes
        src4 = f"198.18.{rnd.randrange(256)}.{rnd.randrange(1, 255)}"
        src6 = f"2001:db8:{rnd.randrange(65536):x}::{rnd.randrange(1, 65536):x}"
        sport, tos = rnd.randrange(1, 65536), rnd.choice([0, 0x28, 0xB8])
        pay = bytes(rnd.randrange(256) for _ in range(rnd.randrange(0, 40)))
        out.append((f"tcp4 flow {i}", [_eth(IP(src=src4, dst=VIP4, tos=tos) / TCP(sport=sport, dport=80) / pay)]))
        out.append((f"tcp6 flow {i}", [_eth(IPv6(src=src6, dst=VIP6, tc=tos) / TCP(sport=sport, dport=80) / pay)]))
        if i < 50:
            out.append((f"tcp4 to IPv6 reals {i}",
                        [_eth(IP(src=src4, dst=VIP4, tos=tos) / TCP(sport=sport, dport=81) / pay)]))
    # echo replies, the checksum's edges (docs/datapath.md row 11)
    # (request checksums: 0xF7FF, 0xF7FF, 0xFFFE, 0xF8FF (Katran's update is wrong there), ...)
    for name, ident in [("all zero", 0), ("sums to zero", 0xFFFF), ("carry", 0xF800),
                        ("request checksum 0xF8FF", 0xFEFF), ("plain", 7)]:
        out.append((f"echo4 {name}", [_eth(IP(src="198.18.7.7", dst=VIP4) / ICMP(id=ident, seq=0))]))
    base6 = IPv6(src="2001:db8::7", dst=VIP6) / ICMPv6EchoRequest(id=0)
    zero_check = IPv6(raw(base6))[ICMPv6EchoRequest].cksum  # as the id: request checksum 0
    for name, ident in [("all zero", 0), ("plain", 7), ("borrow", 0x1234),
                        ("request checksum 0x0000", zero_check)]:
        out.append((f"echo6 {name}", [_eth(IPv6(src="2001:db8::7", dst=VIP6) / ICMPv6EchoRequest(id=ident))]))
    # QUIC: what the server-id route writes into the LRU, and who reads it
    for sport in (40001, 40002, 40003):
        out.append((f"quic {sport}: Initial, routed, no CID, id 0, unknown id",
                    [_quic(p, sport) for p in (INITIAL, _short(1001), _short(None), _short(0), _short(4242))]))
        out.append((f"quic {sport}: routed on empty LRUs, then no CID",
                    [_quic(p, sport) for p in (_short(1002), _short(None))]))
    return out


def record(src: Path) -> dict[str, Any]:
    """Run :func:`cases` through Katran's IPIP and GUE builds; the JSON document."""
    doc: dict[str, Any] = {"cases": []}
    with tempfile.TemporaryDirectory(prefix="lbbkvec") as work:
        tree, rev = katran_tree(src, Path(work))
        doc["katran_revision"] = rev
        for build, defines in (("ipip", ()), ("gue", ("-DGUE_ENCAP",))):
            cfg = config(build)
            doc[f"config_{build}"] = cfg
            obj = build_balancer(tree, Path(work) / f"{build}.o", defines=defines)
            with KatranBalancer(obj, compile_tables(parse_config(cfg)), GW_MAC, 4096) as kat:
                _fill_extra(kat, cfg)
                for name, frames in cases():
                    kat.fresh_lrus()
                    results = [test_run(kat.prog_fd, f) for f in frames]
                    doc["cases"].append({"build": build, "name": name, "frames": [f.hex() for f in frames],
                                         "actions": [r.action for r in results],
                                         "outputs": [r.output.hex() for r in results]})
    return doc


def _fill_extra(kat: KatranBalancer, cfg: dict[str, Any]) -> None:
    """What bench/katran.py does not fill: QUIC server ids, and GUE's outer sources."""
    tables = compile_tables(parse_config(cfg))
    for q in tables.quic_servers:
        map_update(kat.map_fd("server_id_map"), int(q["server_id"]).to_bytes(4, "little"),
                   int(q["real_id"]).to_bytes(4, "little"))
    if cfg["settings"]["encap"] == "gue":
        import ipaddress

        srcs = kat.map_fd("pckt_srcs")
        for index, addr in ((0, GUE_SRC4), (1, GUE_SRC6)):  # V4_SRC_INDEX, V6_SRC_INDEX
            ip = ipaddress.ip_address(addr)
            flags = 1 if ip.version == 6 else 0
            map_update(srcs, index.to_bytes(4, "little"), ip.packed.ljust(16, b"\0") + bytes([flags, 0, 0, 0]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--katran", type=Path, required=True, help="Katran checkout or git dir")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    doc = record(args.katran)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"{len(doc['cases'])} cases from Katran {doc['katran_revision']} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
