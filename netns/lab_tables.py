"""The lab's datapath tables: real ids kept stable across configs (as Katran does) and
each balancer's copy carrying its own gateway MAC."""

from __future__ import annotations

from typing import Any

from netns.errors import LabError


def remap_real_ids(tables: Any, ids: dict[str, int], max_reals: int) -> Any:
    """Give every real of ``tables`` (lb.datapath_tables.DatapathTables) the id recorded
    in ``ids`` (address -> id; new addresses get the next unused id, recorded in
    ``ids``). Ids of removed reals are never reused. Returns the same tables object,
    rewritten."""
    import numpy as np

    old_to_new = np.zeros(max(tables.real_ids.values(), default=0) + 1, dtype=np.uint32)
    next_id = max(ids.values(), default=0) + 1
    new_real_ids = {}
    for ip, old in tables.real_ids.items():
        key = str(ip)
        if key not in ids:
            if next_id >= max_reals:
                raise LabError(f"out of real ids (max_reals {max_reals}): this lab has used "
                               f"{len(ids)} distinct real addresses")
            ids[key] = next_id
            next_id += 1
        old_to_new[old] = ids[key]
        new_real_ids[ip] = ids[key]
    reals = np.zeros_like(tables.reals)
    for ip, old in tables.real_ids.items():
        reals[new_real_ids[ip]] = tables.reals[old]
    n = len(tables.vip_keys) + len(tables.vip_prefix_keys)  # VIP numbers 0..n-1, CIDR VIPs included
    tables.rings[:n] = old_to_new[tables.rings[:n]]
    for name in ("quic_servers", "src_routes_v4", "src_routes_v6"):
        table = getattr(tables, name, None)
        if table is not None and len(table):
            table = table.copy()
            table["real_id"] = old_to_new[table["real_id"]]
            setattr(tables, name, table)
    tables.reals = reals
    tables.real_ids = new_real_ids
    return tables


def with_gateway(tables: Any, mac: str) -> Any:
    """A shallow copy of ``tables`` whose ctl carries gateway MAC ``mac``."""
    import copy

    import numpy as np

    t = copy.copy(tables)
    t.ctl = tables.ctl.copy()
    t.ctl[0]["gw_mac"] = np.frombuffer(bytes.fromhex(mac.replace(":", "")), dtype=np.uint8)
    return t
