"""QUIC-shaped UDP for the lab: servers that put their server id in the connection ids
they hand out (Katran's layouts, docs/datapath.md "Real selection" step 0), and a client
that keeps a connection while its source port changes (NAT rebinding, migration).

This is not a QUIC implementation: no crypto, no streams. It is exactly the part of
QUIC a balancer sees — long-header Initial / Handshake packets and short-header packets
with a destination connection id (DCID) — so a lab test can show that a connection
stays on its real when the client's address or port changes.

* Client -> VIP: Initial (long header, type 0, random DCID, the client's SCID, padded to
  1200 bytes as QUIC requires). The balancer hashes it to some real.
* Real -> client: Handshake (long header, type 2) whose SCID is the server's new
  connection id, carrying its server id; payload ``real=<name> sid=<id>``.
* Client -> VIP: Handshake / short-header packets with DCID = that id, from any source
  port; the balancer routes them by the server id.
* Real -> client: a short-header packet, payload ``real=<name> sid=<id in the DCID>``
  + the client's payload, or ``... foreign`` if the DCID carries another server's id
  (a real QUIC server could not decrypt such a packet).
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from lb import constants as C

CID_LEN = 8
QUIC_VERSION = 1
INITIAL_SIZE = 1200  # a client's Initial datagram must be at least this long (RFC 9000)
FIXED_BIT = 0x40
LONG_INITIAL = C.QUIC_LONG_HEADER | FIXED_BIT | 0x00
LONG_HANDSHAKE = C.QUIC_LONG_HEADER | FIXED_BIT | C.QUIC_HANDSHAKE
SHORT = FIXED_BIT


# ---- connection ids (Katran's layouts) ------------------------------------------------

def cid_version_for(server_id: int) -> int:
    """The smallest layout that holds ``server_id``: v1 16 bits, v2 24, v3 32."""
    if not 0 < server_id <= C.MAX_QUIC_SERVER_ID:
        raise ValueError(f"server id must be 1..{C.MAX_QUIC_SERVER_ID} (got {server_id})")
    if server_id < 1 << 16:
        return C.QUIC_CID_V1
    return C.QUIC_CID_V2 if server_id < 1 << 24 else C.QUIC_CID_V3


def encode_cid(server_id: int, version: int | None = None, rand: bytes | None = None) -> bytes:
    """An 8-byte connection id carrying ``server_id`` in layout ``version``; the bits the
    layout leaves free are random (``rand``, 8 bytes, for reproducible ids)."""
    version = cid_version_for(server_id) if version is None else version
    cid = bytearray(rand if rand is not None else os.urandom(CID_LEN))
    if version == C.QUIC_CID_V1:
        if server_id >= 1 << 16:
            raise ValueError(f"server id {server_id} needs more than v1's 16 bits")
        cid[0] = (C.QUIC_CID_V1 << 6) | (server_id >> 10)
        cid[1] = (server_id >> 2) & 0xFF
        cid[2] = ((server_id & 0x3) << 6) | (cid[2] & 0x3F)
    elif version == C.QUIC_CID_V2:
        if server_id >= 1 << 24:
            raise ValueError(f"server id {server_id} needs more than v2's 24 bits")
        cid[0] = (C.QUIC_CID_V2 << 6) | (cid[0] & 0x3F)
        cid[1:4] = server_id.to_bytes(3, "big")
    elif version == C.QUIC_CID_V3:
        cid[0] = (C.QUIC_CID_V3 << 6) | (cid[0] & 0x3F)
        cid[1:5] = server_id.to_bytes(4, "big")
    else:
        raise ValueError(f"CID version must be 1, 2 or 3 (got {version})")
    return bytes(cid)


def server_id_of(cid: bytes) -> int:
    """The server id in ``cid`` (0: none, e.g. version 0)."""
    version = cid[0] >> 6
    if version == C.QUIC_CID_V1:
        return ((cid[0] & 0x3F) << 10) | (cid[1] << 2) | (cid[2] >> 6)
    if version == C.QUIC_CID_V2:
        return int.from_bytes(cid[1:4], "big")
    if version == C.QUIC_CID_V3:
        return int.from_bytes(cid[1:5], "big")
    return 0


# ---- packets --------------------------------------------------------------------------

def long_packet(first: int, dcid: bytes, scid: bytes, payload: bytes, pad_to: int = 0) -> bytes:
    """flags, version, DCID length + DCID, SCID length + SCID, payload (zero-padded)."""
    head = (bytes([first]) + QUIC_VERSION.to_bytes(4, "big") + bytes([len(dcid)]) + dcid
            + bytes([len(scid)]) + scid)
    body = head + payload
    return body + bytes(max(0, pad_to - len(body)))


def short_packet(dcid: bytes, payload: bytes) -> bytes:
    return bytes([SHORT]) + dcid + payload


@dataclass
class Parsed:
    long: bool
    ptype: int  # long header packet type bits (0x00 Initial ... 0x30 Retry); 0 for short
    dcid: bytes
    scid: bytes
    payload: bytes


def parse(data: bytes) -> Parsed | None:
    """Our packets only (8-byte CIDs); None for anything else."""
    if not data:
        return None
    if data[0] & C.QUIC_LONG_HEADER:
        if len(data) < 7:
            return None
        dl = data[5]
        dcid = data[6:6 + dl]
        if len(data) < 7 + dl:
            return None
        sl = data[6 + dl]
        scid = data[7 + dl:7 + dl + sl]
        return Parsed(True, data[0] & C.QUIC_PACKET_TYPE_MASK, dcid, scid,
                      data[7 + dl + sl:].rstrip(b"\0"))
    if len(data) < 1 + CID_LEN:
        return None
    return Parsed(False, 0, data[1:1 + CID_LEN], b"", data[1 + CID_LEN:])


# ---- server ---------------------------------------------------------------------------

class QuicEcho(asyncio.DatagramProtocol):
    """The server side on one VIP socket; ``server_id``: this real's id for the VIP's
    family (0: the real has none, so it hands out version-0 ids, which are hashed)."""

    def __init__(self, name: str, server_id: int, stats: Counter[str]) -> None:
        self.name = name
        self.server_id = server_id
        self.stats = stats
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:  # type: ignore[override]
        assert self.transport is not None
        pkt = parse(data)
        if pkt is None:
            self.stats["quic_bad"] += 1
            return
        if pkt.long and pkt.ptype == 0x00:  # Initial: hand out our connection id
            self.stats["quic_initial"] += 1
            mine = (encode_cid(self.server_id) if self.server_id
                    else bytes([os.urandom(1)[0] & 0x3F]) + os.urandom(CID_LEN - 1))
            reply = long_packet(LONG_HANDSHAKE, pkt.scid, mine,
                                f"real={self.name} sid={self.server_id}".encode())
            self.transport.sendto(reply, addr)
            return
        self.stats["quic_routed"] += 1
        sid = server_id_of(pkt.dcid)
        tail = "" if sid == self.server_id else " foreign"
        self.transport.sendto(short_packet(bytes(CID_LEN), f"real={self.name} sid={sid}{tail} ".encode()
                                           + pkt.payload), addr)


def parse_quic_ids(items: Sequence[str]) -> dict[str, int]:
    """``ADDR=ID`` options -> {address: server id}."""
    out = {}
    for item in items:
        addr, _, sid = item.partition("=")
        out[addr] = int(sid, 0)
    return out


# ---- client ---------------------------------------------------------------------------

@dataclass
class QuicSession:
    """What one client connection saw: the real that answered the Initial, and for each
    source port the reals named in the replies (None: no reply)."""

    initial_real: str | None
    server_cid: bytes
    by_port: dict[int, list[str | None]] = field(default_factory=dict)


def _real_of(payload: bytes) -> str | None:
    words = payload.split()
    if not words or not words[0].startswith(b"real=") or b"foreign" in words[:3]:
        return None
    return words[0][5:].decode()


def quic_session(host: str, port: int, sports: Sequence[int], per_port: int = 3,
                 timeout: float = 2.0) -> QuicSession:
    """One QUIC-shaped connection to ``host:port``: Initial and a Handshake from the
    first of ``sports``, then ``per_port`` packets (short header) from each source port
    in turn (0 = any free port). Call it inside the client's namespace."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    wildcard = "::" if fam == socket.AF_INET6 else "0.0.0.0"
    my_cid = os.urandom(CID_LEN)
    socks: list[socket.socket] = []
    try:
        for sport in sports:
            s = socket.socket(fam, socket.SOCK_DGRAM)
            socks.append(s)
            s.settimeout(timeout)
            s.bind((wildcard, sport))
        first = socks[0]
        first.sendto(long_packet(LONG_INITIAL, os.urandom(CID_LEN), my_cid, b"hello",
                                 pad_to=INITIAL_SIZE), (host, port))
        data, _ = first.recvfrom(65536)
        reply = parse(data)
        if reply is None or not reply.long or reply.dcid != my_cid:
            raise RuntimeError(f"unexpected reply to the Initial: {data[:40].hex()}")
        session = QuicSession(_real_of(reply.payload), reply.scid)
        for k, s in enumerate(socks):
            sport = s.getsockname()[1]
            names: list[str | None] = []
            for j in range(per_port):
                payload = f"port {sport} packet {j}".encode()
                if k == 0 and j == 0:  # the rest of the handshake, then 1-RTT packets
                    pkt = long_packet(LONG_HANDSHAKE, session.server_cid, my_cid, payload)
                else:
                    pkt = short_packet(session.server_cid, payload)
                s.sendto(pkt, (host, port))
                try:
                    data, _ = s.recvfrom(65536)
                except TimeoutError:
                    names.append(None)
                    continue
                got = parse(data)
                names.append(_real_of(got.payload) if got and got.payload.endswith(payload) else None)
            session.by_port[sport] = names
        return session
    finally:
        for s in socks:
            s.close()
