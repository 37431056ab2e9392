"""BPF_PROG_TEST_RUN (and a few other bpf() commands) through ctypes on the raw syscall.

No libbpf, no bcc: the program fd can come from anywhere (``XdpBalancer.prog_fd``).
``test_run(prog_fd, frame)`` runs an XDP program once (or ``repeat`` times) on a copy
of ``frame`` and returns what the program did to it.
"""

from __future__ import annotations

import ctypes
import os
import platform

# bpf() syscall number per architecture.
_SYS_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "riscv64": 280, "ppc64le": 361}

# bpf commands (include/uapi/linux/bpf.h, enum bpf_cmd)
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_TEST_RUN = 10
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_MAP_LOOKUP_BATCH = 24
BPF_MAP_UPDATE_BATCH = 26

BPF_ANY = 0
XDP_PACKET_HEADROOM = 256
# Room test_run leaves after the input frame in the output buffer: the largest outer
# header (40) plus margin for programs that grow the tail.
OUTPUT_MARGIN = 40 + 256

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _TestRunAttr(ctypes.Structure):
    """The ``test`` member of ``union bpf_attr`` (BPF_PROG_TEST_RUN)."""

    _fields_ = [
        ("prog_fd", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("data_in", ctypes.c_uint64),
        ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32),
        ("duration", ctypes.c_uint32),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_uint64),
        ("ctx_out", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
    ]


def bpf_syscall(cmd: int, attr: ctypes.Structure, what: str = "") -> int:
    """bpf(cmd, &attr, sizeof(attr)); raises OSError with the errno text on failure."""
    nr = _SYS_BPF.get(platform.machine())
    if nr is None:
        raise OSError(f"bpf(): unknown syscall number on {platform.machine()}")
    ret = _libc.syscall(nr, ctypes.c_int(cmd), ctypes.byref(attr), ctypes.c_uint(ctypes.sizeof(attr)))
    if ret < 0:
        err = ctypes.get_errno()
        label = what or f"bpf cmd {cmd}"
        raise OSError(err, f"{label}: {os.strerror(err)}")
    return ret


def test_run(prog_fd: int, frame: bytes, repeat: int = 1) -> tuple[int, bytes, int]:
    """Run an XDP program on ``frame`` with BPF_PROG_TEST_RUN.

    Returns ``(action, output_bytes, duration_ns)``: the XDP action (XDP_DROP=1,
    XDP_PASS=2, XDP_TX=3, ...), the frame as the program left it (whatever the action)
    and the kernel's mean run time per repetition.

    With ``repeat > 1`` the kernel runs the program again on the same buffer without
    resetting it, so a program that rewrites or grows the frame sees its own output;
    the returned bytes are those of the last run. Use ``repeat=1`` for correctness and
    larger values for timing only. The kernel refuses frames shorter than 14 bytes
    (EINVAL) and frames that do not fit one page with headroom and tailroom.
    """
    if repeat < 1:
        raise ValueError("repeat must be >= 1")
    data_in = ctypes.create_string_buffer(bytes(frame), len(frame))
    out_size = len(frame) + OUTPUT_MARGIN
    data_out = ctypes.create_string_buffer(out_size)
    attr = _TestRunAttr()
    attr.prog_fd = prog_fd
    attr.data_size_in = len(frame)
    attr.data_size_out = out_size
    attr.data_in = ctypes.addressof(data_in)
    attr.data_out = ctypes.addressof(data_out)
    attr.repeat = repeat
    bpf_syscall(BPF_PROG_TEST_RUN, attr, "BPF_PROG_TEST_RUN")
    n = min(attr.data_size_out, out_size)
    return attr.retval, data_out.raw[:n], attr.duration
