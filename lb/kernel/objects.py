"""Pinning BPF objects (maps, programs) in bpffs and opening pins."""

from __future__ import annotations

import ctypes

from lb.kernel.bpf_attr import ObjAttr, address_of
from lb.kernel.syscall import BPF_OBJ_GET, BPF_OBJ_PIN, bpf_syscall

BPFFS = "/sys/fs/bpf"


def obj_pin(fd: int, path: str) -> None:
    """Pin the object behind ``fd`` at ``path`` (in bpffs)."""
    p = ctypes.create_string_buffer(path.encode())
    bpf_syscall(BPF_OBJ_PIN, ObjAttr(pathname=address_of(p), bpf_fd=fd), f"pin {path}")


def obj_get(path: str) -> int:
    """A new fd of the object pinned at ``path``."""
    p = ctypes.create_string_buffer(path.encode())
    return bpf_syscall(BPF_OBJ_GET, ObjAttr(pathname=address_of(p)), f"open pinned {path}")
