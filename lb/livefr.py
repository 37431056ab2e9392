"""BPF_PROG_TEST_RUN from Python (ctypes on the raw bpf(2) syscall), including XDP
live-frames mode (BPF_F_TEST_XDP_LIVE_FRAMES), the project's packet generator.

``test_run`` is the ordinary mode: run the program on one frame ``repeat`` times and
return the action, the output frame and the mean run time. ``live_frames`` is the live
mode: the kernel builds ``count`` frames from ``frame`` (in a page pool, recycled
without restoring their contents), runs the program on each, and really sends the
frames the program returns XDP_TX (out of ``ifindex``) or XDP_REDIRECT for. ``ifindex``
is resolved in the *calling thread's* network namespace; see lb/pktgen.py for running it
in another one. The calling thread's CPU is the CPU the frames are generated on.

ctypes releases the GIL around the syscall, so several threads can generate at once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from typing import NamedTuple

BPF_PROG_TEST_RUN = 10
BPF_F_TEST_RUN_ON_CPU = 1 << 0
BPF_F_TEST_XDP_LIVE_FRAMES = 1 << 1
TEST_XDP_MAX_BATCH = 256  # kernel limit on batch_size in live mode

_SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine(), 321)
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _TestAttr(ctypes.Structure):
    """The BPF_PROG_TEST_RUN member of union bpf_attr (include/uapi/linux/bpf.h)."""

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


class XdpMd(ctypes.Structure):
    """struct xdp_md as ctx_in: offsets into data_in, plus the receiving interface."""

    _fields_ = [
        ("data", ctypes.c_uint32),
        ("data_end", ctypes.c_uint32),
        ("data_meta", ctypes.c_uint32),
        ("ingress_ifindex", ctypes.c_uint32),
        ("rx_queue_index", ctypes.c_uint32),
        ("egress_ifindex", ctypes.c_uint32),
    ]


class TestRunResult(NamedTuple):
    action: int  # the program's return value (XDP_* for XDP)
    output: bytes  # the frame as the program left it
    duration_ns: int  # mean per run, as the kernel measured it


def _bpf_test_run(attr: _TestAttr) -> None:
    ret = _libc.syscall(_SYS_BPF, BPF_PROG_TEST_RUN, ctypes.byref(attr), ctypes.sizeof(attr))
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"BPF_PROG_TEST_RUN: {os.strerror(e)}")


def test_run(prog_fd: int, frame: bytes, repeat: int = 1, *, ifindex: int = 0,
             rx_queue: int = 0, out_size: int | None = None) -> TestRunResult:
    """Run ``prog_fd`` on ``frame`` ``repeat`` times (ordinary, not live, mode)."""
    n = len(frame)
    buf_in = ctypes.create_string_buffer(bytes(frame), n)
    out_n = out_size if out_size is not None else n + 256  # room for pushed headers
    buf_out = ctypes.create_string_buffer(out_n)
    attr = _TestAttr(prog_fd=prog_fd, data_size_in=n, data_in=ctypes.addressof(buf_in),
                     data_size_out=out_n, data_out=ctypes.addressof(buf_out), repeat=repeat)
    if ifindex:
        md = XdpMd(data=0, data_end=n, ingress_ifindex=ifindex, rx_queue_index=rx_queue)
        attr.ctx_in = ctypes.addressof(md)
        attr.ctx_size_in = ctypes.sizeof(md)
    _bpf_test_run(attr)
    return TestRunResult(attr.retval, buf_out.raw[: attr.data_size_out], attr.duration)


def live_frames(prog_fd: int, frame: bytes, count: int, ifindex: int, *, rx_queue: int = 0,
                batch_size: int = 0) -> int:
    """Run ``prog_fd`` in live-frames mode on ``count`` frames built from ``frame``,
    received on ``ifindex`` (of the calling thread's namespace). Returns the kernel's
    mean time per frame in ns. Raises OSError (EINTR if a signal arrived)."""
    if not 0 < count <= 0xFFFFFFFF:
        raise ValueError("count must be 1..2**32-1")
    if batch_size > TEST_XDP_MAX_BATCH:
        raise ValueError(f"batch_size must be <= {TEST_XDP_MAX_BATCH}")
    n = len(frame)
    buf_in = ctypes.create_string_buffer(bytes(frame), n)
    md = XdpMd(data=0, data_end=n, ingress_ifindex=ifindex, rx_queue_index=rx_queue)
    attr = _TestAttr(prog_fd=prog_fd, data_size_in=n, data_in=ctypes.addressof(buf_in),
                     repeat=count, ctx_in=ctypes.addressof(md), ctx_size_in=ctypes.sizeof(md),
                     flags=BPF_F_TEST_XDP_LIVE_FRAMES, batch_size=batch_size)
    _bpf_test_run(attr)
    return attr.duration


test_run.__test__ = False  # not a pytest test when imported into a test module
