"""Raw bpf() for the lab: a 2-instruction XDP program, XDP attach in a namespace,
program/map lookups by id, pinning a program's map, summing a pinned per-CPU array."""

from __future__ import annotations

import ctypes
import errno
import os

from netns.errors import LabError

XDP_FLAGS_DRV_MODE = 1 << 2
BPF_PROG_LOAD = 5
BPF_PROG_GET_FD_BY_ID = 13
BPF_MAP_GET_FD_BY_ID = 14
BPF_PROG_TYPE_XDP = 6
XDP_DROP, XDP_PASS = 1, 2


class _ProgLoadAttr(ctypes.Structure):
    _fields_ = [("prog_type", ctypes.c_uint32), ("insn_cnt", ctypes.c_uint32),
                ("insns", ctypes.c_uint64), ("license", ctypes.c_uint64),
                ("log_level", ctypes.c_uint32), ("log_size", ctypes.c_uint32),
                ("log_buf", ctypes.c_uint64), ("kern_version", ctypes.c_uint32),
                ("prog_flags", ctypes.c_uint32), ("prog_name", ctypes.c_char * 16),
                ("_rest", ctypes.c_uint8 * 64)]


class _GetFdAttr(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint32), ("next_id", ctypes.c_uint32),
                ("open_flags", ctypes.c_uint32)]


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32),
                ("info", ctypes.c_uint64)]


def load_xdp_action(action: int, name: str) -> int:
    """Load ``r0 = action; exit`` as XDP program ``name`` and return its fd. No compiler
    needed."""
    from lb.bpf_testrun import bpf_syscall

    insns = bytes([0xb7, 0, 0, 0]) + action.to_bytes(4, "little") + bytes.fromhex("9500000000000000")
    buf = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(b"GPL")
    attr = _ProgLoadAttr(prog_type=BPF_PROG_TYPE_XDP, insn_cnt=2, insns=ctypes.addressof(buf),
                         license=ctypes.addressof(lic), prog_name=name.encode())
    what = {XDP_PASS: "XDP_PASS", XDP_DROP: "XDP_DROP"}.get(action, str(action))
    return bpf_syscall(BPF_PROG_LOAD, attr, f"load the {what} program")


def attach_xdp_fd(ns: str, ifname: str, fd: int, flags: int = XDP_FLAGS_DRV_MODE) -> None:
    """Attach program ``fd`` to ``ifname`` in namespace ``ns`` (netlink, through libbcc)."""
    from bcc.libbcc import lib

    from netns.ns import run_in_netns

    def attach() -> None:
        if lib.bpf_attach_xdp(ifname.encode(), fd, flags) < 0:
            err = ctypes.get_errno()
            raise LabError(f"attaching XDP to {ifname} in {ns}: {os.strerror(err)}")

    run_in_netns(ns, attach)


def prog_exists(prog_id: int) -> bool:
    """Whether a BPF program with this id is still loaded."""
    from lb.bpf_testrun import bpf_syscall

    try:
        fd = bpf_syscall(BPF_PROG_GET_FD_BY_ID, _GetFdAttr(id=prog_id), "prog by id")
    except OSError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    os.close(fd)
    return True


def prog_id(fd: int) -> int:
    """The kernel's id of program ``fd``."""
    from lb.bpf_loader import prog_info

    return int(prog_info(fd)["id"])


def pin_prog_map(prog_fd: int, map_name: str, path: str) -> None:
    """Pin the map called ``map_name`` that program ``prog_fd`` uses (found through the
    program's map ids, so no loader internals are needed)."""
    from lb.bpf_loader import map_info, obj_pin
    from lb.bpf_testrun import BPF_OBJ_GET_INFO_BY_FD, bpf_syscall

    ids = (ctypes.c_uint32 * 64)()
    info = ctypes.create_string_buffer(256)
    # struct bpf_prog_info: nr_map_ids (u32) at 52, map_ids (u64 pointer) at 56
    ctypes.memmove(ctypes.addressof(info) + 52, ctypes.byref(ctypes.c_uint32(64)), 4)
    ctypes.memmove(ctypes.addressof(info) + 56, ctypes.byref(ctypes.c_uint64(ctypes.addressof(ids))), 8)
    bpf_syscall(BPF_OBJ_GET_INFO_BY_FD, _InfoAttr(bpf_fd=prog_fd, info_len=256,
                                                  info=ctypes.addressof(info)), "prog info")
    n = int.from_bytes(info.raw[52:56], "little")
    for map_id in ids[:min(n, 64)]:
        fd = bpf_syscall(BPF_MAP_GET_FD_BY_ID, _GetFdAttr(id=map_id), "map by id")
        try:
            if map_info(fd).name.decode() == map_name:
                obj_pin(fd, path)
                return
        finally:
            os.close(fd)
    raise LabError(f"program has no map named {map_name}")


def read_percpu_array(path: str, n: int) -> list[int]:
    """A pinned per-CPU array of u64 (``n`` slots), summed over CPUs."""
    from lb.bpf_loader import map_lookup_batch, obj_get, possible_cpus

    ncpus = possible_cpus()
    fd = obj_get(path)
    try:
        keys, values, count = map_lookup_batch(fd, 4, 8 * ncpus)
    finally:
        os.close(fd)
    out = [0] * n
    for i in range(count):
        k = int.from_bytes(keys[4 * i:4 * i + 4], "little")
        row = values[8 * ncpus * i:8 * ncpus * (i + 1)]
        if k < n:
            out[k] = sum(int.from_bytes(row[8 * c:8 * c + 8], "little") for c in range(ncpus))
    return out
