"""BPF_PROG_TEST_RUN: run a loaded program on a frame, ordinarily or as live frames.

The program fd can come from anywhere (bcc's ``fn.fd``, ``XdpBalancer.prog_fd``).

* ``test_run(prog_fd, frame)`` runs a program (XDP, or tc for the decap tests) once, or
  ``repeat`` times, on a copy of ``frame`` and returns what it did to it.
* ``live_frames(...)`` is XDP live-frames mode (BPF_F_TEST_XDP_LIVE_FRAMES), the
  project's packet generator: the kernel builds ``count`` frames from ``frame`` in a
  page pool (recycled *without* restoring their contents), runs the program on each,
  and really transmits those it returns XDP_TX for, out of ``ifindex`` -- resolved in the
  calling thread's network namespace (see lb/pktgen.py). The calling thread's CPU is
  the CPU the frames are generated on. ctypes releases the GIL around the syscall, so
  several threads can generate at once.
"""

from __future__ import annotations

import ctypes
from typing import NamedTuple

from lb.kernel.bpf_attr import TestRunAttr
from lb.kernel.syscall import BPF_PROG_TEST_RUN, bpf_syscall

BPF_F_TEST_XDP_LIVE_FRAMES = 1 << 1
TEST_XDP_MAX_BATCH = 256  # kernel limit on batch_size in live mode

# Room test_run leaves after the input frame in the output buffer: the largest outer
# header (40) plus margin for programs that grow the tail.
OUTPUT_MARGIN = 40 + 256


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


class SkBuffHead(ctypes.Structure):
    """The first fields of struct __sk_buff as ctx_in for tc programs: the kernel zero-fills
    the rest and refuses anything but zeros before ``mark``."""

    _fields_ = [
        ("len", ctypes.c_uint32),
        ("pkt_type", ctypes.c_uint32),
        ("mark", ctypes.c_uint32),
    ]


class TestRunResult(NamedTuple):
    """What one BPF_PROG_TEST_RUN did."""

    action: int  # the program's return value (XDP_* for XDP, TC_ACT_* for tc)
    output: bytes  # the frame as the program left it (whatever the action)
    duration_ns: int  # mean per run, as the kernel measured it

    __test__ = False  # not a pytest test class when imported into a test module


def test_run(prog_fd: int, frame: bytes, repeat: int = 1, *, ifindex: int = 0, rx_queue: int = 0,
             out_size: int | None = None, mark: int = 0) -> TestRunResult:
    """Run a program on ``frame`` with BPF_PROG_TEST_RUN (ordinary, not live, mode).

    With ``repeat > 1`` the kernel runs the program again on the same buffer without
    resetting it, so a program that rewrites or grows the frame sees its own output;
    the returned bytes are those of the last run. Use ``repeat=1`` for correctness and
    larger values for timing only. The kernel refuses XDP frames shorter than 14 bytes
    (EINVAL) and frames that do not fit one page with headroom and tailroom.
    ``ifindex`` (XDP only) sets the receiving interface in the context; ``mark`` (tc
    only) sets ``skb->mark``.
    """
    if repeat < 1:
        raise ValueError("repeat must be >= 1")
    n = len(frame)
    data_in = ctypes.create_string_buffer(bytes(frame), n)
    size = out_size if out_size is not None else n + OUTPUT_MARGIN
    data_out = ctypes.create_string_buffer(size)
    attr = TestRunAttr(prog_fd=prog_fd, data_size_in=n, data_size_out=size,
                       data_in=ctypes.addressof(data_in), data_out=ctypes.addressof(data_out),
                       repeat=repeat)
    if ifindex:
        md = XdpMd(data=0, data_end=n, ingress_ifindex=ifindex, rx_queue_index=rx_queue)
        attr.ctx_in = ctypes.addressof(md)
        attr.ctx_size_in = ctypes.sizeof(md)
    if mark:
        if ifindex:
            raise ValueError("ifindex is for XDP programs, mark for tc programs")
        skb = SkBuffHead(mark=mark)
        attr.ctx_in = ctypes.addressof(skb)
        attr.ctx_size_in = ctypes.sizeof(skb)
    bpf_syscall(BPF_PROG_TEST_RUN, attr, "BPF_PROG_TEST_RUN")
    return TestRunResult(attr.retval, data_out.raw[: min(attr.data_size_out, size)], attr.duration)


test_run.__test__ = False  # not a pytest test when imported into a test module


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
    data_in = ctypes.create_string_buffer(bytes(frame), n)
    md = XdpMd(data=0, data_end=n, ingress_ifindex=ifindex, rx_queue_index=rx_queue)
    attr = TestRunAttr(prog_fd=prog_fd, data_size_in=n, data_in=ctypes.addressof(data_in),
                       repeat=count, ctx_in=ctypes.addressof(md), ctx_size_in=ctypes.sizeof(md),
                       flags=BPF_F_TEST_XDP_LIVE_FRAMES, batch_size=batch_size)
    bpf_syscall(BPF_PROG_TEST_RUN, attr, "BPF_PROG_TEST_RUN")
    return attr.duration
