"""A lab's state file, ``/run/lb-lab/<name>.json``: everything the lab creates is
recorded there before it is created. Writing, finding and loading it, and describing a
lab from it (and its pinned maps) in any process."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from netns.errors import LabError
from netns.processes import proc_start_time, process_alive

STATE_DIR = "/run/lb-lab"


def write_state(state: Mapping[str, Any], path: str) -> None:
    """Replace the state file at ``path`` atomically."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(state, f, indent=1)
    os.replace(tmp, path)


def state_path_for(name: str, state_dir: str = STATE_DIR) -> str:
    return os.path.join(state_dir, f"{name}.json")


def load_state(name: str, state_dir: str = STATE_DIR) -> dict[str, Any]:
    path = state_path_for(name, state_dir)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise LabError(f"no lab named {name} (no {path})") from None


def list_labs(state_dir: str = STATE_DIR) -> list[str]:
    try:
        names = os.listdir(state_dir)
    except FileNotFoundError:
        return []
    return sorted(n[:-5] for n in names if n.endswith(".json"))


def owner_alive(state: Mapping[str, Any]) -> bool:
    """Whether the process that built (and owns) an in-process lab still runs."""
    pid = state.get("owner_pid")
    return pid is not None and proc_start_time(int(pid)) == state.get("owner_start")


def describe(state: Mapping[str, Any]) -> dict[str, Any]:
    """Status of a lab from its state file and its pinned maps (any process)."""
    from lb.decap_loader import DECAP_STATS
    from netns.datapaths import read_pinned_balancer
    from netns.lab_bpf import read_percpu_array
    from netns.servers import format_endpoint

    out: dict[str, Any] = {"name": state["name"], "datapath": state["datapath"],
                           "status": state.get("status"),
                           "created": state.get("created"),
                           "owner": ("persistent" if state.get("owner_pid") is None
                                     else f"pid {state['owner_pid']}"
                                     + ("" if owner_alive(state) else " (gone)")),
                           "namespaces": {ns: os.path.exists(f"/run/netns/{ns}")
                                          for ns in state.get("namespaces", [])},
                           "hosts": state.get("hosts", []),
                           "processes": [{**p, "alive": process_alive(p)}
                                         for p in state.get("processes", [])],
                           "vips": [], "balancers": {}, "decap": None}
    cfg = state.get("config") or {}
    for v in cfg.get("vips", []):
        out["vips"].append({"vip": f"{format_endpoint(v['address'], v['port'])}/{v['protocol']}",
                            "reals": {r["address"]: r.get("weight", 1) for r in v.get("reals", [])}})
    ids = state.get("real_ids", {})
    for bname, pin_dir in state.get("pin_dirs", {}).items():
        if bname == "decap_stats":
            try:
                vals = read_percpu_array(pin_dir, len(DECAP_STATS))
                out["decap"] = dict(zip(DECAP_STATS, vals))
            except OSError as e:
                out["decap"] = {"error": str(e)}
            continue
        try:
            counters, per_real = read_pinned_balancer(pin_dir, int(state.get("max_reals") or 0))
            out["balancers"][bname] = {
                "pin_dir": pin_dir, "counters": counters,
                "reals": {addr: {"packets": per_real[i][0], "bytes": per_real[i][1]}
                          for addr, i in ids.items() if i < len(per_real)}}
        except OSError as e:
            out["balancers"][bname] = {"pin_dir": pin_dir, "error": str(e)}
    stats_dir = state.get("log_dir")
    if state.get("datapath") == "userspace" and stats_dir:
        for h in state.get("hosts", []):
            if h["role"] == "balancer":
                p = os.path.join(stats_dir, f"{h['name']}.stats.json")
                with contextlib.suppress(OSError, ValueError):
                    out["balancers"][h["name"]] = {"counters": json.loads(Path(p).read_text())}
    return out
