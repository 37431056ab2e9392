"""Frames for ``simulate``: one TCP or UDP packet of a flow, built by hand (no scapy in
the daemon). Checksums are filled in where the datapath or a reader would look: the IPv4
header checksum; L4 checksums are left 0 (the datapath does not read them)."""

from __future__ import annotations

import ipaddress
import struct

from pydantic import BaseModel, ConfigDict, Field, field_validator

from lb.checksum import internet_checksum

__all__ = ["FlowQuery", "flow_frame"]

LB_MAC = bytes.fromhex("020000000001")
CLIENT_MAC = bytes.fromhex("0200000000fe")
_TCP_FLAGS = {"F": 0x01, "S": 0x02, "R": 0x04, "P": 0x08, "A": 0x10, "U": 0x20}


class FlowQuery(BaseModel):
    """A packet of a client flow to ask the datapath about."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    src: str = Field(description="client address")
    dst: str = Field(description="VIP address")
    sport: int = Field(ge=0, le=65535, description="client port")
    dport: int = Field(ge=0, le=65535, description="VIP port")
    protocol: str = Field(pattern="^(tcp|udp)$")
    tcp_flags: str = Field("S", description="TCP flags as letters (F S R P A U); 'S' = a new connection")
    size: int = Field(64, ge=60, le=9216, description="frame size in bytes (padding after the headers)")

    @field_validator("src", "dst")
    @classmethod
    def _addr(cls, v: str) -> str:
        try:
            return str(ipaddress.ip_address(v))
        except ValueError:
            raise ValueError(f"not an IPv4 or IPv6 address: {v!r}") from None

    @field_validator("tcp_flags")
    @classmethod
    def _flags(cls, v: str) -> str:
        bad = [c for c in v.upper() if c not in _TCP_FLAGS]
        if bad:
            raise ValueError(f"unknown TCP flag(s) {''.join(bad)!r}; use letters of FSRPAU")
        return v.upper()


def flow_frame(q: FlowQuery) -> bytes:
    """Ethernet + IP + TCP/UDP (+ zero padding up to ``q.size``)."""
    src, dst = ipaddress.ip_address(q.src), ipaddress.ip_address(q.dst)
    if src.version != dst.version:
        raise ValueError("src and dst must be of the same IP version")
    if q.protocol == "tcp":
        flags = 0
        for c in q.tcp_flags:
            flags |= _TCP_FLAGS[c]
        l4 = struct.pack("!HHIIBBHHH", q.sport, q.dport, 1, 0, 5 << 4, flags, 65535, 0, 0)
        proto = 6
    else:
        l4 = struct.pack("!HHHH", q.sport, q.dport, 8, 0)
        proto = 17
    if src.version == 4:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0, 0x4000, 64, proto, 0, src.packed, dst.packed)
        ip = ip[:10] + struct.pack("!H", internet_checksum(ip)) + ip[12:]
        frame = LB_MAC + CLIENT_MAC + b"\x08\x00" + ip + l4
    else:
        ip = struct.pack("!IHBB16s16s", 6 << 28, len(l4), proto, 64, src.packed, dst.packed)
        frame = LB_MAC + CLIENT_MAC + b"\x86\xdd" + ip + l4
    return frame + bytes(max(0, q.size - len(frame)))
