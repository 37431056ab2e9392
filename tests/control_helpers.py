"""Helpers shared by the control plane's tests.

* small configs in the allowed address ranges (198.18.0.0/15, 2001:db8::/32);
* :func:`problems`: an API error body as {path: message};
* :func:`check_live_consistency`: the invariants a live datapath must keep after every
  single write (used to check the reconciler's write order).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

import httpx
import numpy as np

from lb.config import Config, parse_config

__all__ = ["GW", "small_settings", "make_config", "vip_dict", "real_addr", "tables_for",
           "check_live_consistency", "problems"]

GW = "00:00:5e:00:53:01"
SMALL = {"ring_size": 13, "max_vips": 8, "max_reals": 32, "conn_table_size": 64}


def small_settings(**over: Any) -> dict[str, Any]:
    return {"gateway_mac": GW, **SMALL, **over}


def real_addr(i: int, v6: bool = False) -> str:
    """The i-th real address: 198.19.0.0/16 or 2001:db8:1::/48."""
    if v6:
        return str(ipaddress.IPv6Address("2001:db8:1::") + i + 1)
    return str(ipaddress.IPv4Address("198.19.0.0") + i + 1)


def tables_for(cfg: Config, ids: Any = None, **kw: Any) -> tuple[Any, Any]:
    """(desired tables, ids) for ``cfg``: ids allocated on top of ``ids`` (None: fresh),
    then control.tables.build_tables(cfg, ids, **kw) (e.g. ``prev=``)."""
    from control.ids import EMPTY, allocate
    from control.tables import build_tables

    s = cfg.settings
    ids = allocate(ids or EMPTY, [v.key for v in cfg.vips], [r.address for v in cfg.vips for r in v.reals],
                   s.max_vips, s.max_reals)
    return build_tables(cfg, ids, **kw), ids


def vip_dict(i: int, reals: Iterable[int | tuple[int, int]] = (), port: int = 80, protocol: str = "tcp",
             v6: bool = False, **extra: Any) -> dict[str, Any]:
    """VIP number i: 198.18.100.<i+1> (or 2001:db8:100::<i+1>); reals by index or (index, weight)."""
    addr = str(ipaddress.IPv6Address("2001:db8:100::1") + i) if v6 else str(ipaddress.IPv4Address("198.18.100.1") + i)
    rs = []
    for r in reals:
        j, w = r if isinstance(r, tuple) else (r, 1)
        rs.append({"address": real_addr(j, v6), "weight": w})
    return {"address": addr, "port": port, "protocol": protocol, "reals": rs, **extra}


def make_config(vips: Iterable[dict[str, Any]], quic_servers: Iterable[dict[str, Any]] = (),
                source_routes: Iterable[dict[str, Any]] = (), **settings: Any) -> Config:
    return parse_config({"settings": small_settings(**settings), "vips": list(vips),
                         "quic_servers": list(quic_servers), "source_routes": list(source_routes)})


def problems(response: httpx.Response) -> dict[str, str]:
    """An API error body (control.api.models.ErrorBody, validated) as {path: message}."""
    from control.api.models import ErrorBody

    body = response.json()
    ErrorBody.model_validate(body)
    return {p["path"]: p["message"] for p in body["problems"]}


def check_live_consistency(port: Any) -> list[str]:
    """What a packet could trip over in a MemoryPort right now: a VIP whose address is
    not in the address set, a ring slot of a live VIP or a routing entry (QUIC server id,
    source route) naming an empty real entry, a live VIP whose ring names a real that is
    down for it (flagged REAL_F_DOWN, its bit in the down set: a flow moved off the real
    could be hashed back onto it)."""
    from lb.constants import REAL_F_DOWN
    from lb.datapath_tables import down_bit

    problems = []
    addrs = port.addrs
    flat = port.down.reshape(-1)
    for key, meta in port.vips.items():
        if key[:16] + bytes([key[19]]) + bytes(3) not in addrs:
            problems.append(f"VIP {key.hex()} without its address entry")
        num = int.from_bytes(meta[4:8], "little")
        ids = np.unique(port.rings[num])
        for rid in ids[ids != 0]:
            if port.reals[int(rid)]["family"] == 0:
                problems.append(f"VIP {num} ring names empty real {int(rid)}")
            word, bit = down_bit(num, int(rid), len(port.reals))
            if port.reals[int(rid)]["flags"] & REAL_F_DOWN and int(flat[word]) & bit:
                problems.append(f"VIP {num} ring names real {int(rid)}, which is down for it")
    for table, entries in port.routing.items():
        for key, value in entries.items():
            if port.reals[int.from_bytes(value, "little")]["family"] == 0:
                problems.append(f"{table} entry {key.hex()} names empty real {int.from_bytes(value, 'little')}")
    return problems
