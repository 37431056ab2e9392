"""An AF_PACKET socket with TPACKET_V3 rings: batched raw frame I/O on one interface.

The socket lives in the network namespace of the thread that creates it (enter another
one first, e.g. with :func:`lb.kernel.netns.run_in_netns`); once made, any thread may use it.

RX: a TPACKET_V3 ring of ``block_count`` blocks of ``block_size`` bytes, mmap'd. The
kernel fills a block with frames back to back and hands it over (``block_status`` gets
TP_STATUS_USER) when it is full or ``retire_ms`` after its first frame; ``poll`` wakes
then. :meth:`PacketSocket.recv_into` copies up to ``len(frames)`` frames into the caller's
``uint8[n, stride]`` batch (one copy, done by numba without the GIL) and gives blocks back
as soon as they are read. Frames come out as they were on the wire:

* the kernel moves an 802.1Q/802.1ad tag into the ring header (TP_STATUS_VLAN_VALID);
  it is written back into the frame;
* a frame whose L4 checksum the sender left to the "hardware" (TP_STATUS_CSUMNOTREADY:
  veth peers and the local stack do that) gets its TCP/UDP checksum completed, as a NIC
  would have before the frame hit the wire (``complete_csum``);
* our own and every other outgoing frame is skipped (PACKET_IGNORE_OUTGOING, and the
  ring header's packet type as a second check);
* a frame that does not fit ``stride``, or that the ring truncated (bigger than a block,
  or a GSO super-frame), is not handed out and is counted in ``rx_oversize``.

TX, ``tx_mode="ring"``: a TPACKET_V3 TX ring (kernel >= 4.11) of fixed-size slots in the
same mmap. :meth:`PacketSocket.queue` copies frames into free slots (a slot is free again
once the kernel has freed the skb that used it: the skb points into the ring) and
:meth:`PacketSocket.flush` sends every queued slot with one ``send()``. A full TX ring
drops and counts (``tx_ring_full``); PACKET_LOSS makes the kernel skip a slot it cannot
send at all rather than stop the ring at it. ``tx_mode="sendmmsg"``: frames are copied
into new skbs by one sendmmsg(2) per batch on the same socket. In both modes a frame
longer than the interface takes (MTU + Ethernet header, +4 with an 802.1Q tag) is not
sent but counted (``tx_oversize``), and with ``qdisc_bypass`` (PACKET_QDISC_BYPASS)
frames go straight to the driver: no qdisc, and no copy to packet taps.

The two differ when the device (or a veth peer) cannot take a frame now: the TX ring
keeps the slot queued and the kernel retries it on the next ``send()`` (backpressure: the
ring fills, then ``tx_ring_full``); sendmmsg drops the frame and the rest of the batch
(``tx_busy``). The device's own tx_dropped counts every refused attempt in both modes,
so with the ring it counts retries, not lost frames.

Counters (:meth:`PacketSocket.stats`) are this module's plus the kernel's
PACKET_STATISTICS (``ring_drops``: frames the kernel could not put in the RX ring because
every block was still ours; ``ring_freezes``).

The ring walkers (:func:`rx_drain`, :func:`tx_fill`) are numba functions taking plain
arrays, so a caller's own ``nogil`` loop (lb/userspace_io.py) can call them directly.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import mmap
import select
import socket
import struct
import threading

import numba as nb
import numpy as np
from numba.core import types
from numba.extending import intrinsic

from lb.constants import ENCAP_MAX_OVERHEAD, XDP_TX

# --- kernel ABI (linux/if_packet.h, linux/if_ether.h) -------------------------------------
SOL_PACKET = 263
PACKET_RX_RING = 5
PACKET_STATISTICS = 6
PACKET_VERSION = 10
PACKET_TX_RING = 13
PACKET_LOSS = 14
PACKET_QDISC_BYPASS = 20
PACKET_IGNORE_OUTGOING = 23
TPACKET_V3 = 2
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4  # sockaddr_ll.sll_pkttype

# RX block / frame status bits
TP_STATUS_KERNEL = 0
TP_STATUS_USER = 1 << 0
TP_STATUS_LOSING = 1 << 2
TP_STATUS_CSUMNOTREADY = 1 << 3
TP_STATUS_VLAN_VALID = 1 << 4
TP_STATUS_BLK_TMO = 1 << 5
TP_STATUS_VLAN_TPID_VALID = 1 << 6
# TX frame status
TP_STATUS_AVAILABLE = 0
TP_STATUS_SEND_REQUEST = 1 << 0
TP_STATUS_SENDING = 1 << 1
TP_STATUS_WRONG_FORMAT = 1 << 2

TPACKET_ALIGNMENT = 16
SO_SNDBUFFORCE = 32
SIOCETHTOOL = 0x8946
SIOCGIFMTU = 0x8921
ETHTOOL_GGRO, ETHTOOL_SGRO = 0x2B, 0x2C
ETHTOOL_GTSO, ETHTOOL_STSO = 0x1E, 0x1F
ETHTOOL_GGSO, ETHTOOL_SGSO = 0x23, 0x24
ETHTOOL_GTXCSUM, ETHTOOL_STXCSUM = 0x16, 0x17


class TpacketReq3(ctypes.Structure):
    """struct tpacket_req3: the ring geometry given to PACKET_RX_RING / PACKET_TX_RING."""

    _fields_ = [
        ("tp_block_size", ctypes.c_uint32),  # bytes per block, a multiple of the page size
        ("tp_block_nr", ctypes.c_uint32),
        ("tp_frame_size", ctypes.c_uint32),  # TX: bytes per slot; RX (V3): only checked
        ("tp_frame_nr", ctypes.c_uint32),  # = block_size / frame_size * block_nr
        ("tp_retire_blk_tov", ctypes.c_uint32),  # RX: ms before a non-full block is handed over
        ("tp_sizeof_priv", ctypes.c_uint32),  # per-block private area (unused: 0)
        ("tp_feature_req_word", ctypes.c_uint32),  # TP_FT_REQ_FILL_RXHASH (unused: 0)
    ]


class TpacketBdTs(ctypes.Structure):
    _fields_ = [("ts_sec", ctypes.c_uint32), ("ts_nsec", ctypes.c_uint32)]


class TpacketHdrV1(ctypes.Structure):
    """struct tpacket_hdr_v1: the block header the kernel fills."""

    _fields_ = [
        ("block_status", ctypes.c_uint32),  # TP_STATUS_KERNEL (0) or TP_STATUS_USER | ...
        ("num_pkts", ctypes.c_uint32),
        ("offset_to_first_pkt", ctypes.c_uint32),  # from the block start
        ("blk_len", ctypes.c_uint32),
        ("seq_num", ctypes.c_uint64),  # __aligned_u64
        ("ts_first_pkt", TpacketBdTs),
        ("ts_last_pkt", TpacketBdTs),
    ]


class TpacketBlockDesc(ctypes.Structure):
    """struct tpacket_block_desc: at the start of every RX block."""

    _fields_ = [("version", ctypes.c_uint32), ("offset_to_priv", ctypes.c_uint32), ("hdr", TpacketHdrV1)]


class TpacketHdrVariant1(ctypes.Structure):
    _fields_ = [
        ("tp_rxhash", ctypes.c_uint32),
        ("tp_vlan_tci", ctypes.c_uint32),  # valid with TP_STATUS_VLAN_VALID
        ("tp_vlan_tpid", ctypes.c_uint16),  # valid with TP_STATUS_VLAN_TPID_VALID
        ("tp_padding", ctypes.c_uint16),
    ]


class Tpacket3Hdr(ctypes.Structure):
    """struct tpacket3_hdr: before every frame, in both rings."""

    _fields_ = [
        ("tp_next_offset", ctypes.c_uint32),  # RX: to the next frame of the block (0: last); TX: must be 0
        ("tp_sec", ctypes.c_uint32),
        ("tp_nsec", ctypes.c_uint32),
        ("tp_snaplen", ctypes.c_uint32),  # bytes present in the ring
        ("tp_len", ctypes.c_uint32),  # bytes of the frame on the wire (TX: bytes to send)
        ("tp_status", ctypes.c_uint32),
        ("tp_mac", ctypes.c_uint16),  # RX: offset of the frame from this header
        ("tp_net", ctypes.c_uint16),
        ("hv1", TpacketHdrVariant1),
        ("tp_padding", ctypes.c_uint8 * 8),
    ]


class SockaddrLl(ctypes.Structure):
    """struct sockaddr_ll: follows the (aligned) tpacket3_hdr of every RX frame."""

    _fields_ = [
        ("sll_family", ctypes.c_uint16),
        ("sll_protocol", ctypes.c_uint16),  # network byte order
        ("sll_ifindex", ctypes.c_int32),
        ("sll_hatype", ctypes.c_uint16),
        ("sll_pkttype", ctypes.c_uint8),  # PACKET_HOST, ..., PACKET_OUTGOING
        ("sll_halen", ctypes.c_uint8),
        ("sll_addr", ctypes.c_uint8 * 8),
    ]


class TpacketStatsV3(ctypes.Structure):
    """struct tpacket_stats_v3 (PACKET_STATISTICS; reading it resets it)."""

    _fields_ = [("tp_packets", ctypes.c_uint32), ("tp_drops", ctypes.c_uint32),
                ("tp_freeze_q_cnt", ctypes.c_uint32)]


def _align(n: int, a: int = TPACKET_ALIGNMENT) -> int:
    return (n + a - 1) & ~(a - 1)


# Offsets the numba walkers use, taken from the ctypes structs (one source).
_BD = TpacketBlockDesc.hdr.offset
BLK_STATUS = _BD + TpacketHdrV1.block_status.offset
BLK_NUM_PKTS = _BD + TpacketHdrV1.num_pkts.offset
BLK_FIRST = _BD + TpacketHdrV1.offset_to_first_pkt.offset
H_NEXT = Tpacket3Hdr.tp_next_offset.offset
H_SNAPLEN = Tpacket3Hdr.tp_snaplen.offset
H_LEN = Tpacket3Hdr.tp_len.offset
H_STATUS = Tpacket3Hdr.tp_status.offset
H_MAC = Tpacket3Hdr.tp_mac.offset
H_VLAN_TCI = Tpacket3Hdr.hv1.offset + TpacketHdrVariant1.tp_vlan_tci.offset
H_VLAN_TPID = Tpacket3Hdr.hv1.offset + TpacketHdrVariant1.tp_vlan_tpid.offset
H_PKTTYPE = _align(ctypes.sizeof(Tpacket3Hdr)) + SockaddrLl.sll_pkttype.offset
# TPACKET3_HDRLEN = aligned header + sockaddr_ll; TX data starts at HDRLEN - sizeof(sockaddr_ll)
TPACKET3_HDRLEN = _align(ctypes.sizeof(Tpacket3Hdr)) + ctypes.sizeof(SockaddrLl)
TX_DATA_OFF = TPACKET3_HDRLEN - ctypes.sizeof(SockaddrLl)

# Counter slots of PacketSocket.counters (int64); the numba walkers add to them.
COUNTERS = (
    "rx_frames",  # frames handed out
    "rx_blocks",  # ring blocks read
    "rx_oversize",  # frames larger than the stride, or truncated by the ring (not handed out)
    "rx_outgoing",  # outgoing frames skipped (only if PACKET_IGNORE_OUTGOING is unavailable)
    "rx_vlan_restored",  # frames whose VLAN tag was written back from the ring header
    "rx_csum_completed",  # frames whose partial TCP/UDP checksum was completed
    "tx_frames",  # frames handed to the kernel (TX ring: slots queued; sendmmsg: sent)
    "tx_ring_full",  # frames dropped: no free TX slot (sendmmsg: more than a batch)
    "tx_oversize",  # frames dropped: longer than a TX slot or than MTU + 14 (+4 if tagged)
    "tx_rejected",  # frames the kernel refused (sendmmsg error; ring slot left WRONG_FORMAT)
    "tx_send_calls",  # send()/sendmmsg() calls
    "tx_send_errors",  # send()/sendmmsg() calls that returned an error
    "tx_busy",  # sendmmsg: frames dropped because the device/peer queue was full (ENOBUFS/EAGAIN)
)
CNT = {name: i for i, name in enumerate(COUNTERS)}
C_RX_FRAMES, C_RX_BLOCKS, C_RX_OVERSIZE, C_RX_OUTGOING, C_RX_VLAN, C_RX_CSUM = range(6)
C_TX_FRAMES, C_TX_RING_FULL, C_TX_OVERSIZE, C_TX_REJECTED, C_TX_CALLS, C_TX_ERRORS, C_TX_BUSY = range(6, 13)

# rx_state slots: current block, frames left in it (-1: not opened yet), next frame offset
RX_BLOCK, RX_LEFT, RX_OFF = 0, 1, 2


# --- numba: memory ordering against the kernel ------------------------------------------


@intrinsic
def _fence_acquire(typingctx):
    """LLVM ``fence acquire``: later loads stay after the status load (no CPU fence on x86)."""

    def codegen(context, builder, sig, args):
        builder.fence("acquire")
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic
def _fence_release(typingctx):
    """LLVM ``fence release``: earlier loads/stores complete before the status store."""

    def codegen(context, builder, sig, args):
        builder.fence("release")
        return context.get_dummy_value()

    return types.void(), codegen


# --- numba: RX ---------------------------------------------------------------------------


@nb.njit(cache=True, inline="always")
def _u32(m32, off):
    return np.int64(m32[off >> 2])


@nb.njit(cache=True, inline="always")
def _be16(p, off):
    return (np.int64(p[off]) << 8) | np.int64(p[off + 1])


@nb.njit(cache=True)
def complete_l4_csum(p, n):
    """Complete the TCP/UDP checksum of frame ``p[:n]`` whose checksum field holds only the
    pseudo-header sum (CHECKSUM_PARTIAL): sum the L4 bytes, complement. Ethernet, one
    optional VLAN tag, IPv4 (not a fragment) or IPv6 with TCP/UDP as next header. Returns
    True if a checksum was written."""
    l3 = 14
    if n < l3:
        return False
    et = _be16(p, 12)
    if et == 0x8100 or et == 0x88A8:
        l3 = 18
        if n < l3:
            return False
        et = _be16(p, 16)
    if et == 0x0800:
        if n < l3 + 20:
            return False
        ihl = np.int64(p[l3] & 0xF) * 4
        tot = _be16(p, l3 + 2)
        if ihl < 20 or tot < ihl or l3 + tot > n or (_be16(p, l3 + 6) & 0x3FFF) != 0:
            return False
        proto = p[l3 + 9]
        l4 = l3 + ihl
        end = l3 + tot
    elif et == 0x86DD:
        if n < l3 + 40:
            return False
        proto = p[l3 + 6]
        l4 = l3 + 40
        end = l4 + _be16(p, l3 + 4)
        if end > n:
            return False
    else:
        return False
    if proto == 6:
        coff = l4 + 16
        if end < l4 + 20:
            return False
    elif proto == 17:
        coff = l4 + 6
        if end < l4 + 8:
            return False
    else:
        return False
    s = np.int64(0)
    k = l4
    while k + 1 < end:
        s += (np.int64(p[k]) << 8) | np.int64(p[k + 1])
        k += 2
    if k < end:
        s += np.int64(p[k]) << 8
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    c = (~s) & 0xFFFF
    if proto == 17 and c == 0:
        c = 0xFFFF
    p[coff] = c >> 8
    p[coff + 1] = c & 0xFF
    return True


@nb.njit(cache=True, nogil=True)
def rx_drain(ring, ring32, block_size, block_count, state, frames, lengths, complete_csum, counters):
    """Copy up to ``frames.shape[0]`` frames out of the RX ring into ``frames[i, :lengths[i]]``;
    give every fully read block back to the kernel. Returns the number of frames."""
    max_n = frames.shape[0]
    stride = frames.shape[1]
    n = 0
    while n < max_n:
        base = state[RX_BLOCK] * block_size
        if state[RX_LEFT] < 0:
            if (_u32(ring32, base + BLK_STATUS) & TP_STATUS_USER) == 0:
                break  # the kernel still owns it
            _fence_acquire()
            state[RX_LEFT] = _u32(ring32, base + BLK_NUM_PKTS)
            state[RX_OFF] = _u32(ring32, base + BLK_FIRST)
            counters[C_RX_BLOCKS] += 1
        if state[RX_LEFT] == 0:
            _fence_release()
            ring32[(base + BLK_STATUS) >> 2] = TP_STATUS_KERNEL
            state[RX_BLOCK] = (state[RX_BLOCK] + 1) % block_count
            state[RX_LEFT] = -1
            continue
        h = base + state[RX_OFF]
        state[RX_LEFT] -= 1
        state[RX_OFF] += _u32(ring32, h + H_NEXT)
        if ring[h + H_PKTTYPE] == PACKET_OUTGOING:
            counters[C_RX_OUTGOING] += 1
            continue
        snap = _u32(ring32, h + H_SNAPLEN)
        wire = _u32(ring32, h + H_LEN)
        st = _u32(ring32, h + H_STATUS)
        mac = h + (np.int64(ring[h + H_MAC]) | (np.int64(ring[h + H_MAC + 1]) << 8))
        vlan = (st & TP_STATUS_VLAN_VALID) != 0 and snap >= 12
        out_len = snap + 4 if vlan else snap
        if snap < wire or out_len > stride:
            counters[C_RX_OVERSIZE] += 1
            continue
        row = frames[n]
        if vlan:
            for k in range(12):
                row[k] = ring[mac + k]
            tpid = 0x8100
            if st & TP_STATUS_VLAN_TPID_VALID:
                tpid = np.int64(ring[h + H_VLAN_TPID]) | (np.int64(ring[h + H_VLAN_TPID + 1]) << 8)
            tci = _u32(ring32, h + H_VLAN_TCI)
            row[12] = (tpid >> 8) & 0xFF
            row[13] = tpid & 0xFF
            row[14] = (tci >> 8) & 0xFF
            row[15] = tci & 0xFF
            for k in range(12, snap):
                row[k + 4] = ring[mac + k]
            counters[C_RX_VLAN] += 1
        else:
            for k in range(snap):
                row[k] = ring[mac + k]
        if complete_csum and (st & TP_STATUS_CSUMNOTREADY) != 0 and complete_l4_csum(row, out_len):
            counters[C_RX_CSUM] += 1
        lengths[n] = out_len
        n += 1
    # hand a fully read block back now rather than on the next call
    if state[RX_LEFT] == 0:
        _fence_release()
        ring32[(state[RX_BLOCK] * block_size + BLK_STATUS) >> 2] = TP_STATUS_KERNEL
        state[RX_BLOCK] = (state[RX_BLOCK] + 1) % block_count
        state[RX_LEFT] = -1
    counters[C_RX_FRAMES] += n
    return n


# --- numba: TX ---------------------------------------------------------------------------


@nb.njit(cache=True, inline="always")
def _tx_limit(row, max_len):
    # the kernel allows 4 more bytes for an 802.1Q-tagged frame (packet_extra_vlan_len_allowed)
    if row[12] == 0x81 and row[13] == 0x00:
        return max_len + 4
    return max_len


@nb.njit(cache=True, nogil=True)
def tx_fill(tx, tx32, frame_size, frame_count, head, outs, out_lens, actions, n, max_len, counters):
    """Queue ``outs[i, :out_lens[i]]`` for every ``i < n`` with ``actions[i] == XDP_TX``
    into free TX ring slots from ``head[0]`` on, each marked TP_STATUS_SEND_REQUEST.
    ``max_len``: the longest frame the interface takes (MTU + Ethernet header); longer
    ones are dropped and counted (the kernel would refuse them). Returns the number queued."""
    room = frame_size - TX_DATA_OFF
    q = 0
    for i in range(n):
        if actions[i] != XDP_TX:
            continue
        ln = out_lens[i]
        row = outs[i]
        if ln > room or ln > _tx_limit(row, max_len):
            counters[C_TX_OVERSIZE] += 1
            continue
        f = head[0] * frame_size
        st = _u32(tx32, f + H_STATUS)
        if st == TP_STATUS_WRONG_FORMAT:
            counters[C_TX_REJECTED] += 1
        elif st != TP_STATUS_AVAILABLE:
            counters[C_TX_RING_FULL] += 1
            continue
        _fence_acquire()
        d = f + TX_DATA_OFF
        for k in range(ln):
            tx[d + k] = row[k]
        tx32[(f + H_NEXT) >> 2] = 0
        tx32[(f + H_SNAPLEN) >> 2] = ln
        tx32[(f + H_LEN) >> 2] = ln
        _fence_release()
        tx32[(f + H_STATUS) >> 2] = TP_STATUS_SEND_REQUEST
        head[0] = (head[0] + 1) % frame_count
        q += 1
    counters[C_TX_FRAMES] += q
    return q


@nb.njit(cache=True, nogil=True)
def mmsg_fill(msgs, iovs, outs_addr, out_stride, outs, out_lens, actions, n, max_len, counters):
    """sendmmsg mode: point one mmsghdr/iovec per TX frame at its row of ``outs`` (which
    is at address ``outs_addr``, rows ``out_stride`` bytes apart). ``msgs`` is
    uint64[m, 8] (struct mmsghdr, msg_iov pointing at row k of ``iovs``), ``iovs``
    uint64[m, 2] (struct iovec). Returns the count; the sender counts what was sent."""
    q = 0
    for i in range(n):
        if actions[i] != XDP_TX:
            continue
        if out_lens[i] > _tx_limit(outs[i], max_len):
            counters[C_TX_OVERSIZE] += 1
            continue
        if q >= msgs.shape[0]:
            counters[C_TX_RING_FULL] += 1
            continue
        iovs[q, 0] = np.uint64(outs_addr + i * out_stride)
        iovs[q, 1] = np.uint64(out_lens[i])
        q += 1
    return q


# --- the socket ----------------------------------------------------------------------------

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
_libc.sendmmsg.restype = ctypes.c_int


def _page_round(n: int) -> int:
    return (n + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE


class PacketSocket:
    """AF_PACKET socket on ``ifname`` (in the calling thread's namespace) with a TPACKET_V3
    RX ring and a TX path. Not thread-safe: one thread receives and sends.

    ``stride``: the longest frame :meth:`recv_into` hands out (a VLAN tag written back
    included); longer ones are counted in ``rx_oversize``. ``tx_frame_size`` defaults to
    the smallest power of two that holds ``stride + 40`` (the encapsulation overhead)
    after the slot header.
    """

    def __init__(self, ifname: str, *, stride: int = 2048, block_size: int = 1 << 18,
                 block_count: int = 64, retire_ms: int = 1, tx_mode: str = "ring",
                 tx_frames: int = 4096, tx_frame_size: int | None = None,
                 qdisc_bypass: bool = True, complete_csum: bool = True, rx: bool = True):
        if tx_mode not in ("ring", "sendmmsg"):
            raise ValueError("tx_mode must be 'ring' or 'sendmmsg'")
        if block_size % mmap.PAGESIZE or block_size < 2 * mmap.PAGESIZE:
            raise ValueError(f"block_size must be a multiple of {mmap.PAGESIZE}, >= 2 pages")
        if stride < 64 or stride + 128 > block_size:
            raise ValueError("stride must be 64 .. block_size - 128")
        self.ifname = ifname
        self.stride = stride
        self.block_size, self.block_count = block_size, block_count
        self.tx_mode = tx_mode
        self.complete_csum = complete_csum
        self.counters = np.zeros(len(COUNTERS), dtype=np.int64)
        self.rx_state = np.array([0, -1, 0], dtype=np.int64)
        self.tx_head = np.zeros(1, dtype=np.int64)
        self._kstats = {"ring_drops": 0, "ring_packets": 0, "ring_freezes": 0}
        self._kstats_lock = threading.Lock()
        self._mm: mmap.mmap | None = None
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # no frames until bind
        try:
            self._setup(rx, retire_ms, tx_frames, tx_frame_size, qdisc_bypass)
        except BaseException:
            self.close()
            raise

    def _setup(self, rx: bool, retire_ms: int, tx_frames: int, tx_frame_size: int | None,
               qdisc_bypass: bool) -> None:
        s = self.sock
        s.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
        # PACKET_LOSS (before any ring): a TX slot the kernel cannot send is skipped and
        # freed; without it the kernel leaves it TP_STATUS_WRONG_FORMAT and stops there
        s.setsockopt(SOL_PACKET, PACKET_LOSS, 1)
        try:
            s.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
            self.ignore_outgoing = True
        except OSError:  # kernel < 4.20: rx_drain skips PACKET_OUTGOING frames itself
            self.ignore_outgoing = False
        self.qdisc_bypass = False
        if qdisc_bypass:
            try:
                s.setsockopt(SOL_PACKET, PACKET_QDISC_BYPASS, 1)
                self.qdisc_bypass = True
            except OSError:
                pass
        # Every sent frame's skb is charged to the socket until the receiver frees it; with
        # the default send buffer (~200 KiB) a send() stops after ~240 frames in flight.
        # Room for a full TX ring (SO_SNDBUFFORCE: root may exceed net.core.wmem_max).
        want = max(1 << 22, tx_frames * (min(tx_frame_size or 4096, 1 << 16) + 1024))
        try:
            s.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, want)
        except OSError:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, want)
        rx_bytes = 0
        if rx:
            req = TpacketReq3(self.block_size, self.block_count, 2048,
                              self.block_size // 2048 * self.block_count, retire_ms, 0, 0)
            s.setsockopt(SOL_PACKET, PACKET_RX_RING, bytes(req))
            rx_bytes = self.block_size * self.block_count
        self.tx_frame_size = tx_frame_size or 1 << (TX_DATA_OFF + self.stride + ENCAP_MAX_OVERHEAD - 1).bit_length()
        self.tx_frame_count = tx_frames
        tx_bytes = 0
        if self.tx_mode == "ring":
            fs = self.tx_frame_size
            tx_block = max(_page_round(fs), mmap.PAGESIZE)
            if tx_block % fs:
                raise ValueError("tx_frame_size must divide the TX block size")
            per_block = tx_block // fs
            nblocks = -(-tx_frames // per_block)
            self.tx_frame_count = nblocks * per_block
            req = TpacketReq3(tx_block, nblocks, fs, self.tx_frame_count, 0, 0, 0)
            s.setsockopt(SOL_PACKET, PACKET_TX_RING, bytes(req))
            tx_bytes = tx_block * nblocks
        if rx_bytes + tx_bytes:
            self._mm = mmap.mmap(s.fileno(), rx_bytes + tx_bytes, mmap.MAP_SHARED,
                                 mmap.PROT_READ | mmap.PROT_WRITE)
            whole = np.frombuffer(self._mm, dtype=np.uint8)
        else:
            whole = np.zeros(16, dtype=np.uint8)
        self.rx_ring = whole[:rx_bytes] if rx_bytes else np.zeros(16, dtype=np.uint8)
        self.rx_ring32 = self.rx_ring.view(np.uint32)
        self.tx_ring = whole[rx_bytes:rx_bytes + tx_bytes] if tx_bytes else np.zeros(16, dtype=np.uint8)
        self.tx_ring32 = self.tx_ring.view(np.uint32)
        if self.tx_mode == "sendmmsg":
            m = tx_frames
            self._msgs = np.zeros((m, 8), dtype=np.uint64)  # struct mmsghdr (64 bytes)
            self._iovs = np.zeros((m, 2), dtype=np.uint64)  # struct iovec
            iov0 = self._iovs.ctypes.data
            self._msgs[:, 2] = iov0 + 16 * np.arange(m, dtype=np.uint64)  # msg_iov
            self._msgs[:, 3] = 1  # msg_iovlen
        # bind last: frames arrive only from now on, and only from this interface
        s.bind((self.ifname, ETH_P_ALL if rx else 0))
        self.ifindex = socket.if_nametoindex(self.ifname)
        self.refresh_mtu()
        self._poll = select.poll()
        self._poll.register(s.fileno(), select.POLLIN | select.POLLERR)

    # --- RX --------------------------------------------------------------------------------

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv_into(self, frames: np.ndarray, lengths: np.ndarray) -> int:
        """Copy up to ``len(frames)`` ready frames into ``frames[i, :lengths[i]]``
        (uint8[n, stride'], int64[n]; frames longer than ``stride'`` are counted in
        rx_oversize). Returns how many; 0 if no block is ready (see :meth:`wait`)."""
        return rx_drain(self.rx_ring, self.rx_ring32, self.block_size, self.block_count,
                        self.rx_state, frames, lengths, self.complete_csum, self.counters)

    def wait(self, timeout: float | None) -> bool:
        """Block until a block is ready or ``timeout`` seconds pass; True if ready."""
        if self.rx_ready():
            return True
        ms = -1 if timeout is None else max(0, int(timeout * 1000))
        return bool(self._poll.poll(ms))

    def rx_ready(self) -> bool:
        base = int(self.rx_state[RX_BLOCK]) * self.block_size
        if self.rx_state[RX_LEFT] > 0:
            return True
        return bool(int(self.rx_ring32[(base + BLK_STATUS) >> 2]) & TP_STATUS_USER)

    def recv(self, max_frames: int = 256, timeout: float | None = 0.0) -> list[bytes]:
        """Convenience: up to ``max_frames`` frames as bytes, waiting up to ``timeout``."""
        frames = np.zeros((max_frames, self.stride), dtype=np.uint8)
        lengths = np.zeros(max_frames, dtype=np.int64)
        n = self.recv_into(frames, lengths)
        if n == 0 and timeout != 0.0 and self.wait(timeout):
            n = self.recv_into(frames, lengths)
        return [frames[i, :lengths[i]].tobytes() for i in range(n)]

    # --- TX --------------------------------------------------------------------------------

    def refresh_mtu(self) -> int:
        """Read the interface MTU; frames longer than MTU + 14 are not sent (tx_oversize)."""
        ifr = bytearray(struct.pack("16si", self.ifname.encode(), 0).ljust(40, b"\0"))
        fcntl.ioctl(self.sock.fileno(), SIOCGIFMTU, ifr)
        self.mtu = struct.unpack_from("i", ifr, 16)[0]
        self.tx_max_len = self.mtu + 14
        return self.mtu

    def queue(self, outs: np.ndarray, out_lens: np.ndarray, actions: np.ndarray, n: int) -> int:
        """Queue frame ``i`` (``outs[i, :out_lens[i]]``) for every ``i < n`` whose action is
        XDP_TX. Returns the number queued; :meth:`flush` sends them."""
        if self.tx_mode == "ring":
            return tx_fill(self.tx_ring, self.tx_ring32, self.tx_frame_size, self.tx_frame_count,
                           self.tx_head, outs, out_lens, actions, n, self.tx_max_len, self.counters)
        self._pending = mmsg_fill(self._msgs, self._iovs, outs.ctypes.data, outs.strides[0], outs,
                                  out_lens, actions, n, self.tx_max_len, self.counters)
        return self._pending

    def flush(self, queued: int = 1) -> None:
        """Send what :meth:`queue` queued (``queued``: how many; 0 does nothing)."""
        if queued <= 0:
            return
        if self.tx_mode == "ring":
            self._flush_ring(queued)
        else:
            self._flush_mmsg()

    def _flush_ring(self, queued: int) -> None:
        # After an error the kernel has moved past the bad slot (or stopped at a slot it
        # could not send yet); call again so the rest goes out now, at most queued times.
        for _ in range(queued):
            self.counters[C_TX_CALLS] += 1
            try:
                self.sock.send(b"", socket.MSG_DONTWAIT)
                return
            except BlockingIOError:
                return  # slots stay queued: the next flush sends them
            except OSError as e:
                self.counters[C_TX_ERRORS] += 1
                if e.errno not in (errno.EMSGSIZE, errno.EINVAL, errno.ENOBUFS, errno.ENETDOWN,
                                   errno.ENXIO):
                    raise

    def _flush_mmsg(self) -> None:
        k, base = int(self._pending), 0
        addr = self._msgs.ctypes.data
        while base < k:
            self.counters[C_TX_CALLS] += 1
            r = _libc.sendmmsg(self.sock.fileno(), addr + 64 * base, k - base, socket.MSG_DONTWAIT)
            if r <= 0:
                self.counters[C_TX_ERRORS] += 1
                if ctypes.get_errno() in (errno.EAGAIN, errno.ENOBUFS):
                    self.counters[C_TX_BUSY] += k - base  # the queue is full: the rest goes too
                    break
                self.counters[C_TX_REJECTED] += 1  # this frame failed (EMSGSIZE...): go on
                base += 1
                continue
            self.counters[C_TX_FRAMES] += r
            base += r
        self._pending = 0

    def send_frames(self, frames: list[bytes]) -> int:
        """Convenience: queue and send ``frames``; returns how many were queued."""
        if not frames:
            return 0
        width = max(len(f) for f in frames)
        outs = np.zeros((len(frames), width), dtype=np.uint8)
        for i, f in enumerate(frames):
            outs[i, :len(f)] = np.frombuffer(f, dtype=np.uint8)
        lens = np.array([len(f) for f in frames], dtype=np.int64)
        acts = np.full(len(frames), XDP_TX, dtype=np.uint8)
        q = self.queue(outs, lens, acts, len(frames))
        self.flush(q)
        return q

    def tx_pending(self) -> int:
        """TX ring slots not yet given back by the kernel (queued or in flight)."""
        if self.tx_mode != "ring" or self._mm is None:
            return 0
        fs = self.tx_frame_size
        st = self.tx_ring32[(np.arange(self.tx_frame_count) * fs + H_STATUS) >> 2]
        return int(np.count_nonzero((st != TP_STATUS_AVAILABLE) & (st != TP_STATUS_WRONG_FORMAT)))

    # --- counters / lifetime ---------------------------------------------------------------

    def kernel_stats(self) -> dict[str, int]:
        """PACKET_STATISTICS, accumulated (the kernel resets them on every read)."""
        with self._kstats_lock:
            if self.sock.fileno() >= 0:
                raw = self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, ctypes.sizeof(TpacketStatsV3))
                st = TpacketStatsV3.from_buffer_copy(raw)
                self._kstats["ring_packets"] += st.tp_packets
                self._kstats["ring_drops"] += st.tp_drops
                self._kstats["ring_freezes"] += st.tp_freeze_q_cnt
            return dict(self._kstats)

    def stats(self) -> dict[str, int]:
        """This socket's counters (COUNTERS), ring_packets / ring_drops / ring_freezes
        (PACKET_STATISTICS; ring_packets counts the dropped ones too) and tx_in_flight (TX
        slots queued or sent but not yet freed by the kernel)."""
        out = {name: int(self.counters[i]) for i, name in enumerate(COUNTERS)}
        out.update(self.kernel_stats())
        out["tx_in_flight"] = self.tx_pending()
        return out

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            try:
                self.kernel_stats()  # keep the last kernel counts
            except OSError:
                pass
        # numpy views of the mapping must go before it can be closed
        for name in ("rx_ring", "rx_ring32", "tx_ring", "tx_ring32"):
            if hasattr(self, name):
                setattr(self, name, np.zeros(16, dtype=np.uint8).view(
                    np.uint32 if name.endswith("32") else np.uint8))
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass  # a caller still holds a view; the mapping goes with the last one
            self._mm = None
        self.sock.close()

    def __enter__(self) -> PacketSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- interface offloads (legacy ethtool ioctls; the caller's namespace) -------------------


def _ethtool(ifname: str, cmd: int, value: int | None = None) -> int:
    data = ctypes.create_string_buffer(struct.pack("II", cmd, value or 0))
    ifr = bytearray(struct.pack("16sQ", ifname.encode(), ctypes.addressof(data)).ljust(40, b"\0"))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s.fileno(), SIOCETHTOOL, ifr)
    return struct.unpack("II", data.raw[:8])[1]


_FEATURES = {"gro": (ETHTOOL_GGRO, ETHTOOL_SGRO), "tso": (ETHTOOL_GTSO, ETHTOOL_STSO),
             "gso": (ETHTOOL_GGSO, ETHTOOL_SGSO), "tx-checksum": (ETHTOOL_GTXCSUM, ETHTOOL_STXCSUM)}


def get_offload(ifname: str, feature: str) -> bool:
    """Whether offload ``feature`` (gro, tso, gso, tx-checksum) is on for ``ifname``."""
    return bool(_ethtool(ifname, _FEATURES[feature][0]))


def set_offload(ifname: str, feature: str, on: bool) -> None:
    """``ethtool -K ifname <feature> on|off`` without ethtool. On a veth, ``gro on``
    enables NAPI, which the peer's XDP_TX / live frames need to reach it without an XDP
    program of its own; ``tso``/``gso off`` on a sender stops GSO super-frames."""
    _ethtool(ifname, _FEATURES[feature][1], 1 if on else 0)


__all__ = [
    "COUNTERS",
    "PacketSocket",
    "Tpacket3Hdr",
    "TpacketBlockDesc",
    "TpacketReq3",
    "TpacketStatsV3",
    "complete_l4_csum",
    "get_offload",
    "mmsg_fill",
    "rx_drain",
    "set_offload",
    "tx_fill",
]
