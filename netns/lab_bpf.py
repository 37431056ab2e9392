"""The lab's own BPF objects, made with :mod:`lb.kernel`: a two-instruction XDP program
that returns one action, a program's map pinned by name, a pinned per-CPU array read
back summed over CPUs."""

from __future__ import annotations

import os

from lb.kernel.maps import map_fd_by_id, map_info, percpu_row_sums
from lb.kernel.objects import obj_get, obj_pin
from lb.kernel.progs import BPF_PROG_TYPE_XDP, prog_load, prog_map_ids
from netns.errors import LabError


def load_xdp_action(action: int, name: str) -> int:
    """Load ``r0 = action; exit`` (an lb.constants XDP_* action) as XDP program ``name``
    and return its fd. No compiler needed."""
    mov_r0 = bytes([0xb7, 0, 0, 0]) + action.to_bytes(4, "little")  # mov64 r0, action
    return prog_load(BPF_PROG_TYPE_XDP, mov_r0 + bytes.fromhex("9500000000000000"), name)  # exit


def pin_prog_map(prog_fd: int, map_name: str, path: str) -> None:
    """Pin the map called ``map_name`` that program ``prog_fd`` uses (found through the
    program's map ids, so no loader internals are needed)."""
    for map_id in prog_map_ids(prog_fd):
        fd = map_fd_by_id(map_id)
        try:
            if map_info(fd).name.decode() == map_name:
                obj_pin(fd, path)
                return
        finally:
            os.close(fd)
    raise LabError(f"program has no map named {map_name}")


def read_percpu_array(path: str, n: int, words: int = 1) -> list[int]:
    """A pinned per-CPU array of ``n`` entries of ``words`` u64 each, summed over CPUs:
    entry k's word j at ``k * words + j``."""
    fd = obj_get(path)
    try:
        keys, sums = percpu_row_sums(fd, words)
    finally:
        os.close(fd)
    out = [0] * (n * words)
    for k, row in zip(keys.tolist(), sums.tolist()):
        if k < n:
            out[k * words:(k + 1) * words] = row
    return out
