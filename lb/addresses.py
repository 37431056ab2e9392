"""The only addresses tests, labs and generated traffic may use (RFC 2544's benchmarking
range and IPv6's documentation prefix): nothing sent there can leave for a real host."""

from __future__ import annotations

import ipaddress

ALLOWED_NETS = (ipaddress.ip_network("198.18.0.0/15"), ipaddress.ip_network("2001:db8::/32"))

Address = (ipaddress.IPv4Address | ipaddress.IPv6Address | ipaddress.IPv4Interface
           | ipaddress.IPv6Interface)


def check_address(addr: str | Address, allow_outside: bool = False) -> None:
    """Raise ValueError unless ``addr`` (an address or an address/prefix) lies in
    198.18.0.0/15 or 2001:db8::/32 (or ``allow_outside`` says anything goes)."""
    if allow_outside:
        return
    ip = ipaddress.ip_interface(str(addr)).ip
    if not any(ip.version == net.version and ip in net for net in ALLOWED_NETS):
        raise ValueError(f"address {ip} is outside 198.18.0.0/15 and 2001:db8::/32")
