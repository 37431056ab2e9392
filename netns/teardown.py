"""Removing a lab from its state file, in the process that built it or any other
(``lbctl lab down``), and checking that nothing of it is left."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Mapping
from typing import Any

from lb.kernel.progs import prog_exists
from lb.kernel.xdp import XDP_FLAGS_DRV_MODE, xdp_detach
from netns.errors import LabError
from netns.lab_state import STATE_DIR, load_state, state_path_for, write_state
from netns.processes import kill, netns_pids, proc_start_time, process_alive, signals_blocked


def remove_tree(path: str) -> None:
    """rm -r for bpffs (pins are unlinked, directories removed bottom-up)."""
    if not os.path.lexists(path):
        return
    if not os.path.isdir(path) or os.path.islink(path):
        os.unlink(path)
        return
    for root, dirs, files in os.walk(path, topdown=False):
        for f in files:
            os.unlink(os.path.join(root, f))
        for d in dirs:
            os.rmdir(os.path.join(root, d))
    os.rmdir(path)


def teardown_state(state: dict[str, Any], state_path: str | None = None) -> list[str]:
    """Remove everything ``state`` lists; returns what failed (empty: all gone). The
    state file is removed only when nothing is left."""
    errors: list[str] = []
    state["status"] = "tearing-down"
    if state_path and os.path.exists(state_path):
        with contextlib.suppress(OSError):
            write_state(state, state_path)
    # 1. processes: the recorded ones, then anything else still inside a lab namespace
    procs = [(int(p["pid"]), p.get("start")) for p in state.get("processes", [])]
    errors += kill(procs)
    stray = []
    for ns in state.get("namespaces", []):
        if os.path.exists(f"/run/netns/{ns}"):
            stray += [(pid, proc_start_time(pid)) for pid in netns_pids(ns)]
    errors += kill(stray)
    # 2. namespaces: every link has one end in the router, so they all go with them. XDP
    #    comes off the router's ends first: a namespace outlives its deletion while
    #    orphaned TCP sockets in it retransmit (a killed server's FIN to a client that is
    #    gone), and with it its links and their programs.
    for gw_ifname, router_ns, *_ in state.get("links", []):
        if os.path.exists(f"/run/netns/{router_ns}"):
            with contextlib.suppress(Exception):
                xdp_detach(gw_ifname, XDP_FLAGS_DRV_MODE, netns=router_ns)
    existing = [ns for ns in state.get("namespaces", []) if os.path.exists(f"/run/netns/{ns}")]
    for ns in existing:
        r = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True, timeout=30,
                           check=False)
        if r.returncode != 0 and os.path.exists(f"/run/netns/{ns}"):
            errors.append(f"deleting namespace {ns}: {r.stderr.strip()}")
    # 3. pinned maps
    pin_root = state.get("pin_root")
    if pin_root:
        try:
            remove_tree(pin_root)
        except OSError as e:
            errors.append(f"removing {pin_root}: {e}")
    # 4. programs are freed once their last attachment/fd is gone (RCU: allow a moment)
    deadline = time.monotonic() + 3
    left = [i for i in state.get("prog_ids", []) if prog_exists(i)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [i for i in left if prog_exists(i)]
    if left:
        errors.append(f"BPF programs still loaded: ids {left}")
    # 5. logs and the state file
    log_dir = state.get("log_dir")
    if not errors:
        if log_dir:
            shutil.rmtree(log_dir, ignore_errors=True)
        if state_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(state_path)
    return errors


def teardown(name: str, state_dir: str = STATE_DIR) -> None:
    """Tear down lab ``name`` from its state file (``lbctl lab down``)."""
    state = load_state(name, state_dir)
    with signals_blocked():
        errors = teardown_state(state, state_path_for(name, state_dir))
    if errors:
        raise LabError(f"lab {name}: teardown incomplete: " + "; ".join(errors))


def leftovers(state: Mapping[str, Any], state_path: str | None = None) -> list[str]:
    """What of a lab still exists: namespaces, links named after it in the root
    namespace, pinned maps, processes, BPF programs, the state file, logs."""
    out = []
    name = state["name"]
    out += [f"namespace {ns}" for ns in state.get("namespaces", []) if os.path.exists(f"/run/netns/{ns}")]
    r = subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True, timeout=30,
                       check=False)
    out += [f"link {link['ifname']}" for link in json.loads(r.stdout or "[]")
            if link.get("ifname", "").startswith(name)]
    if state.get("pin_root") and os.path.lexists(state["pin_root"]):
        out.append(f"pin dir {state['pin_root']}")
    out += [f"process {p['pid']} ({p['role']})" for p in state.get("processes", []) if process_alive(p)]
    out += [f"BPF program {i}" for i in state.get("prog_ids", []) if prog_exists(i)]
    if state_path and os.path.exists(state_path):
        out.append(f"state file {state_path}")
    if state.get("log_dir") and os.path.exists(state["log_dir"]):
        out.append(f"log dir {state['log_dir']}")
    return out
