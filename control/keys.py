"""The names of things in URLs: a VIP (address, port, protocol), a real's address, a QUIC
server id, a source route's prefix. Each parser returns the canonical key the desired
state uses, or raises :class:`~control.errors.Invalid` naming the part of the URL."""

from __future__ import annotations

import ipaddress
from typing import Any

from control.errors import Invalid
from control.ids import VipKey
from lb import constants as C
from lb.config import (  # the config's own rules, for URLs
    _canonical_prefix,
    _canonical_vip_address,
)

__all__ = ["ROUTING_SECTIONS", "parse_vip_key", "parse_real_address", "parse_quic_id", "parse_prefix",
           "routing_key"]

# routing table (config section) -> the field that keys its entries
ROUTING_SECTIONS = {"quic_servers": "id", "source_routes": "prefix"}


def parse_vip_key(address: str, port: str | int, protocol: str) -> VipKey:
    """(address, port, protocol) from a URL, canonical; Invalid naming the part. The
    address may be a CIDR VIP's prefix ('198.18.64.0/24'), checked as the config checks it."""
    problems = []
    try:
        addr = (_canonical_vip_address(str(address)) if "/" in str(address)
                else str(ipaddress.ip_address(str(address))))
    except ValueError as e:
        problems.append(("address", str(e) if "/" in str(address)
                         else f"not an IPv4 or IPv6 address: {address!r}"))
        addr = str(address)
    try:
        p = int(port)
        if not 0 <= p <= 65535:
            raise ValueError
    except (TypeError, ValueError):
        problems.append(("port", f"must be 0..65535 (got {port!r})"))
        p = -1
    if protocol not in ("tcp", "udp"):
        problems.append(("protocol", f"must be one of: 'tcp', 'udp' (got {protocol!r})"))
    if problems:
        raise Invalid(problems, "invalid VIP in the URL")
    return (addr, p, protocol)


def parse_real_address(address: str) -> str:
    """A real's address from a URL, canonical; Invalid naming ``real``."""
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        raise Invalid([("real", f"not an IPv4 or IPv6 address: {address!r}")], "invalid real in the URL") from None


def parse_quic_id(text: str | int) -> int:
    """A QUIC server id from a URL; Invalid naming ``id``."""
    try:
        v = int(text)
        if not 1 <= v <= C.MAX_QUIC_SERVER_ID:
            raise ValueError
    except (TypeError, ValueError):
        raise Invalid([("id", f"must be an integer 1..{C.MAX_QUIC_SERVER_ID} (got {text!r})")],
                      "invalid QUIC server id in the URL") from None
    return v


def parse_prefix(text: str) -> str:
    """A client prefix from a URL ('198.18.64.0/24'), canonical; Invalid naming ``prefix``."""
    try:
        return _canonical_prefix(text)
    except ValueError as e:
        raise Invalid([("prefix", str(e))], "invalid prefix in the URL") from None


def routing_key(section: str, item: Any) -> Any:
    """The key (QUIC id, canonical prefix) of a routing entry, a model or a request body;
    None if the body's key is not valid (the validation reports it)."""
    field = ROUTING_SECTIONS[section]
    v = getattr(item, field) if not isinstance(item, dict) else item.get(field)
    if section == "quic_servers":
        return v if isinstance(v, int) and not isinstance(v, bool) else None
    try:
        return _canonical_prefix(v)
    except ValueError:
        return None
