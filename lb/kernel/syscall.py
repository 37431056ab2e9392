"""The raw bpf() syscall through ctypes, and the error every kernel call raises."""

from __future__ import annotations

import ctypes
import os
import platform

# bpf() syscall number per architecture.
_SYS_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "riscv64": 280, "ppc64le": 361}

# bpf commands (include/uapi/linux/bpf.h, enum bpf_cmd)
BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_PROG_LOAD = 5
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_TEST_RUN = 10
BPF_PROG_GET_FD_BY_ID = 13
BPF_MAP_GET_FD_BY_ID = 14
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_MAP_LOOKUP_BATCH = 24
BPF_MAP_LOOKUP_AND_DELETE_BATCH = 25
BPF_MAP_UPDATE_BATCH = 26
BPF_MAP_DELETE_BATCH = 27

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class KernelError(OSError):
    """A kernel call failed. ``errno`` says why, ``what`` which call on what;
    ``str()`` reads ``[Errno N] <what>: <strerror>``."""

    def __init__(self, err: int, what: str) -> None:
        super().__init__(err, f"{what}: {os.strerror(err)}")
        self.what = what


def bpf_syscall(cmd: int, attr: ctypes.Structure, what: str = "") -> int:
    """bpf(cmd, &attr, sizeof(attr)); the result (an fd for commands that make one).
    Raises KernelError (``what``, default "bpf cmd N") on failure."""
    nr = _SYS_BPF.get(platform.machine())
    if nr is None:
        raise OSError(f"bpf(): unknown syscall number on {platform.machine()}")
    ret = _libc.syscall(nr, ctypes.c_int(cmd), ctypes.byref(attr), ctypes.c_uint(ctypes.sizeof(attr)))
    if ret < 0:
        raise KernelError(ctypes.get_errno(), what or f"bpf cmd {cmd}")
    return ret
