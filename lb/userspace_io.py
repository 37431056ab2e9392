"""The userspace datapath on a real interface: AF_PACKET ring in, numba datapath, frames out.

``--datapath userspace`` for hosts (or labs) without XDP. :class:`UserspaceBalancer` runs
:func:`lb.datapath.process_batch` over batches of frames read from a TPACKET_V3 ring
(lb/afpacket.py) on the balancer's interface and sends every XDP_TX output frame back out
of the same interface (on a stick, as XDP_TX does). The whole loop — read a batch, take
the clock, process it, ``sendmmsg()`` the output (or fill a TX ring and ``send()``),
``poll()`` when idle — is one numba function compiled with ``nogil=True`` that calls
poll/send/sendmmsg/clock_gettime itself: the thread holds the GIL only to start it and
when it hands back control (stop, table update), so Python threads beside it neither slow
it nor are slowed by it.

How it differs from XDP, and what is done about it
--------------------------------------------------
XDP takes the frame away from the kernel; an AF_PACKET socket gets a *copy* and the
kernel stack of the balancer host still receives the original of every frame:

* PASS: nothing to do; the kernel already has the frame, as XDP_PASS would give it.
* TX / DROP: the original must not be handled by the host. The balancer host does not own
  the VIP, so its stack would drop the frame (forwarding off: no route to a non-local
  address, silently counted as InAddrErrors) or — forwarding on — *route* it: the client's
  packet would leave unencapsulated a second time, with ICMP redirects or unreachables
  to the client. Whether forwarding is off is a namespace-wide setting other software
  may change, so the balancer does not rely on it: with ``guard="tc"`` (the default)
  it installs, on its interface only, tc ingress (clsact) filters that drop frames
  addressed to a VIP address (cls_bpf running *classic* BPF: no eBPF needed, and this
  kernel has no tc drop action). Packet taps (our socket) see a frame before tc
  ingress, the stack after, so the datapath still sees every frame and the stack sees no
  frame addressed to a VIP. The filters follow :meth:`UserspaceBalancer.update_tables`
  (new ones first, old ones after the swap) and are removed on :meth:`stop`.
  What this changes: a frame to a VIP address that the datapath *passes* (a protocol
  or port without a VIP, rows 10/13/14 of docs/datapath.md) is dropped by the filter;
  the host does not own the address, so its stack would have dropped it too.
  Exception: a VIP address with a ``local`` VIP (this host is one of its reals) is not
  filtered, so ``pass_local`` frames reach the local service; the originals of frames the
  datapath encapsulates to the *other* reals then reach it too. ``stats()`` reports such
  addresses as ``guard_unfiltered_vips``; use XDP for local VIPs.
  Frames dropped as malformed (rows 1/3/4) whatever their address reach the stack, which
  drops them too.
* The socket does not see frames the host itself sends (PACKET_IGNORE_OUTGOING), nor
  our own TX frames, as XDP does not.
* A frame the sender left with a partial checksum (veth peers, CHECKSUM_PARTIAL) is
  completed before processing, as a NIC would have on the wire (lb/afpacket.py).
* GSO super-frames (a veth peer with TSO/GSO on: XDP on a veth turns those off on its
  peer, an AF_PACKET socket cannot) and frames longer than the batch stride are not
  processed, only counted (``rx_oversize``); turn TSO/GSO off on the sending side.
* Overload: when every ring block is still ours the kernel drops (``ring_drops``);
  a full TX ring drops (``tx_ring_full``); sendmmsg to a full device queue drops
  (``tx_busy``, ``tx_rejected``); a frame longer than the MTU allows is not sent
  (``tx_oversize``). Every frame is accounted for::

      ring_packets = ring_drops + rx_frames + rx_oversize (+ frames still in the ring)
      rx_frames = rx_packets (datapath)
      tx_encap + tx_icmp_echo_reply = tx_frames + tx_ring_full + tx_oversize
                                      + tx_busy + tx_rejected
      frames on the wire = tx_frames - tx_in_flight (ring slots not yet sent)

Run as a process::

    python -m lb.userspace_io --config FILE --interface IF [--netns NAME]

until SIGINT/SIGTERM (SIGHUP reloads the config); prints the counters on exit.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from typing import Any

import numba as nb
import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from lb import afpacket
from lb import constants as C
from lb.afpacket import PacketSocket, mmsg_fill, rx_drain, tx_fill
from lb.datapath import UserspaceDatapath, process_batch
from lb.datapath_tables import DatapathTables, prefix_tables
from lb.kernel.netns import run_in_netns

__all__ = ["TcGuard", "UserspaceBalancer", "main"]

# --- libc calls from numba -------------------------------------------------------------------
# Declared by name in the generated code and resolved by the JIT linker against the
# process's libc (no ctypes function-pointer constants in the code). Arguments and results
# are int64 in numba; pointers are passed as integers (``arr.ctypes.data``).


def _libc_codegen(name: str, ret_bits: int, arg_bits: tuple[int, ...]):
    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.IntType(ret_bits), [ir.IntType(b) for b in arg_bits])
        fn = cgutils.get_or_insert_function(builder.module, fnty, name)
        vals = [builder.trunc(a, ir.IntType(b)) if b < 64 else a for a, b in zip(args, arg_bits)]
        r = builder.call(fn, vals)
        return builder.sext(r, ir.IntType(64)) if ret_bits < 64 else r

    return codegen


_I64 = types.int64


@intrinsic
def _sys_poll(typingctx, fds, nfds, timeout_ms):
    """int poll(struct pollfd *fds, nfds_t nfds, int timeout)"""
    return _I64(_I64, _I64, _I64), _libc_codegen("poll", 32, (64, 64, 32))


@intrinsic
def _sys_send(typingctx, fd, buf, length, flags):
    """ssize_t send(int fd, const void *buf, size_t len, int flags)"""
    return _I64(_I64, _I64, _I64, _I64), _libc_codegen("send", 64, (32, 64, 64, 32))


@intrinsic
def _sys_sendmmsg(typingctx, fd, msgvec, vlen, flags):
    """int sendmmsg(int fd, struct mmsghdr *msgvec, unsigned int vlen, int flags)"""
    return _I64(_I64, _I64, _I64, _I64), _libc_codegen("sendmmsg", 32, (32, 64, 32, 32))


@intrinsic
def _sys_getsockopt(typingctx, fd, level, optname, optval, optlen):
    """int getsockopt(int fd, int level, int optname, void *optval, socklen_t *optlen)"""
    return _I64(_I64, _I64, _I64, _I64, _I64), _libc_codegen("getsockopt", 32, (32, 32, 32, 64, 64))


@intrinsic
def _sys_errno(typingctx):
    """errno of this thread (*__errno_location())"""

    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.IntType(32).as_pointer(), [])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "__errno_location")
        return builder.sext(builder.load(builder.call(fn, [])), ir.IntType(64))

    return _I64(), codegen


@intrinsic
def _sys_clock_gettime(typingctx, clock_id, tp):
    """int clock_gettime(clockid_t clk_id, struct timespec *tp)"""
    return _I64(_I64, _I64), _libc_codegen("clock_gettime", 32, (32, 64))


CLOCK_MONOTONIC = 1  # the clock of bpf_ktime_get_ns, and of time.monotonic_ns()
MSG_DONTWAIT = 0x40
EAGAIN, ENOBUFS = 11, 105
SOL_SOCKET, SO_ERROR = 1, 4
POLLIN, POLLERR, POLLHUP, POLLNVAL = 0x1, 0x8, 0x10, 0x20
TX_RING, TX_SENDMMSG = 0, 1

# ctl slots (written by Python, read by the loop between batches)
CTL_STOP, CTL_RELOAD, CTL_POLL_MS, CTL_TX_MAX_LEN = 0, 1, 2, 3
# loop counters
LOOP_COUNTERS = ("batches", "polls", "send_retries", "socket_errors")
L_BATCHES, L_POLLS, L_RETRIES, L_SOCK_ERRORS = 0, 1, 2, 3


@nb.njit(nogil=True, cache=True, inline="always")
def _last_queued(tx32, frame_size, frame_count, head):
    """Is the slot filled last still waiting for the kernel (TP_STATUS_SEND_REQUEST)?"""
    last = (head[0] + frame_count - 1) % frame_count
    return tx32[(last * frame_size + afpacket.H_STATUS) >> 2] == afpacket.TP_STATUS_SEND_REQUEST


@nb.njit(nogil=True, cache=False)
def _run(  # the loop's whole state, passed once per start/reload
    ring, ring32, block_size, block_count, rx_state, complete_csum, io_counters,
    tx_mode, tx, tx32, tx_frame_size, tx_frame_count, tx_head, msgs, iovs, fd, pollfds,
    frames, lengths, outs, out_lens, actions, real_ids, dp_state,
    stats, vip_stats, real_stats, ctl, loop, ts,
):
    """Until ctl[CTL_STOP] or ctl[CTL_RELOAD] is set: drain a batch, process it, send the
    TX frames; poll when there is nothing to read. Runs without the GIL."""
    retry = False
    errs = 0  # socket errors in a row
    out_addr = outs.ctypes.data
    out_stride = outs.strides[0]
    while ctl[CTL_STOP] == 0 and ctl[CTL_RELOAD] == 0:
        n = rx_drain(ring, ring32, block_size, block_count, rx_state, frames, lengths,
                     complete_csum, io_counters)
        if n == 0:
            if retry:  # frames left queued by an earlier send(): try again before sleeping
                loop[L_RETRIES] += 1
                io_counters[afpacket.C_TX_CALLS] += 1
                if _sys_send(fd, 0, 0, MSG_DONTWAIT) < 0:
                    io_counters[afpacket.C_TX_ERRORS] += 1
                retry = _last_queued(tx32, tx_frame_size, tx_frame_count, tx_head)
            pollfds[0, 1] = POLLIN
            pollfds[1, 1] = POLLIN
            _sys_poll(pollfds.ctypes.data, 2, 1 if retry else ctl[CTL_POLL_MS])
            loop[L_POLLS] += 1
            if (pollfds[0, 1] >> 16) & (POLLERR | POLLHUP | POLLNVAL):
                # The socket reports an error (its interface went down, ENETDOWN): read it
                # (SO_ERROR clears it; until then poll() keeps returning at once). Should
                # errors keep coming, wait on the wake-up fd alone rather than spin.
                loop[L_SOCK_ERRORS] += 1
                errs += 1
                pollfds[2, 1] = 4
                _sys_getsockopt(fd, SOL_SOCKET, SO_ERROR, pollfds.ctypes.data + 16, pollfds.ctypes.data + 20)
                if errs > 3:
                    pollfds[1, 1] = POLLIN
                    _sys_poll(pollfds.ctypes.data + 8, 1, ctl[CTL_POLL_MS])
            else:
                errs = 0
            continue
        _sys_clock_gettime(CLOCK_MONOTONIC, ts.ctypes.data)
        now = ts[0] * 1_000_000_000 + ts[1]
        process_batch(
            frames[:n], lengths[:n], outs[:n], out_lens[:n], actions[:n], real_ids[:n],
            dp_state, now, stats, vip_stats, real_stats,
        )
        loop[L_BATCHES] += 1
        if tx_mode == TX_RING:
            q = tx_fill(tx, tx32, tx_frame_size, tx_frame_count, tx_head, outs, out_lens, actions,
                        n, ctl[CTL_TX_MAX_LEN], io_counters)
            if q > 0 or retry:
                io_counters[afpacket.C_TX_CALLS] += 1
                if _sys_send(fd, 0, 0, MSG_DONTWAIT) < 0:
                    io_counters[afpacket.C_TX_ERRORS] += 1
                # The kernel stops at a slot it cannot send now (device queue or send
                # buffer full) and leaves it queued; it goes with the next send(), which
                # the idle path makes soon if the last slot we filled is still queued.
                retry = _last_queued(tx32, tx_frame_size, tx_frame_count, tx_head)
        else:
            q = mmsg_fill(msgs, iovs, out_addr, out_stride, outs, out_lens, actions, n,
                          ctl[CTL_TX_MAX_LEN], io_counters)
            done = 0
            while done < q:
                io_counters[afpacket.C_TX_CALLS] += 1
                r = _sys_sendmmsg(fd, msgs.ctypes.data + 64 * done, q - done, MSG_DONTWAIT)
                if r > 0:
                    io_counters[afpacket.C_TX_FRAMES] += r
                    done += r
                    continue
                io_counters[afpacket.C_TX_ERRORS] += 1
                e = _sys_errno()
                if e == EAGAIN or e == ENOBUFS:  # the device queue / veth peer is full
                    io_counters[afpacket.C_TX_BUSY] += q - done
                    break
                io_counters[afpacket.C_TX_REJECTED] += 1  # this frame failed: skip it
                done += 1
    return 0


# --- the kernel-stack guard ----------------------------------------------------------------


# classic BPF (struct sock_filter) opcodes: the guard needs no eBPF, only cls_bpf
_LD_W_ABS, _JEQ_K, _RET_K, _AND_K = 0x20, 0x15, 0x06, 0x54
TC_ACT_SHOT, TC_ACT_UNSPEC = 2, 0xFFFFFFFF  # drop / "not mine, go on"
SKF_NET_OFF = -0x100000 & 0xFFFFFFFF  # load offsets from the network header (cls_bpf runs
# classic BPF with the MAC header pushed, so plain offsets would depend on the L2 length)
# entries per program (at most 4096 instructions): IPv4 addresses take 2, IPv6 addresses 9;
# prefixes (CIDR VIPs) 4 (IPv4), at most 13 (IPv6)
_V4_PER_FILTER, _V6_PER_FILTER = 2000, 450
_V4_NETS_PER_FILTER, _V6_NETS_PER_FILTER = 1000, 300
_NETS = (ipaddress.IPv4Network, ipaddress.IPv6Network)


def _net_entry(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> list[tuple[int, int, int, int]]:
    """Instructions that return TC_ACT_SHOT if the destination lies in ``net`` and fall
    through to the next entry otherwise: per 32-bit word of the address the prefix
    covers, load, mask (unless whole) and compare."""
    base = 16 if net.version == 4 else 24
    mask = struct.unpack(f"!{net.max_prefixlen // 32}I", net.netmask.packed)
    want = struct.unpack(f"!{net.max_prefixlen // 32}I", net.network_address.packed)
    body: list[tuple[int, int, int, int]] = []
    for i, (m, w) in enumerate(zip(mask, want)):
        if m:
            body.append((_LD_W_ABS, 0, 0, SKF_NET_OFF + base + 4 * i))
            if m != 0xFFFFFFFF:
                body.append((_AND_K, 0, 0, m))
            body.append((_JEQ_K, 0, -1, w))  # jf filled in below: past this entry's return
    body.append((_RET_K, 0, 0, TC_ACT_SHOT))
    n = len(body)
    return [(c, t, n - 1 - j if f == -1 else f, k) for j, (c, t, f, k) in enumerate(body)]


def cbpf_drop_program(addresses: list) -> list[tuple[int, int, int, int]]:
    """A classic BPF program for a tc direct-action filter that returns TC_ACT_SHOT for
    packets whose IP destination is one of ``addresses`` or inside one of the prefixes
    among them (CIDR VIPs; all IPv4 or all IPv6: the filter's ``protocol`` selects the
    family) and TC_ACT_UNSPEC otherwise. Loads are relative to the network header
    (SKF_NET_OFF): IPv4 dst at 16, IPv6 dst at 24..39. A packet too short for a load ends
    the program with 0 (TC_ACT_OK: passed)."""
    prog: list[tuple[int, int, int, int]] = []
    exact = [a for a in addresses if not isinstance(a, _NETS)]
    nets = [a for a in addresses if isinstance(a, _NETS)]
    if exact and exact[0].version == 4:
        prog.append((_LD_W_ABS, 0, 0, SKF_NET_OFF + 16))
        for a in exact:
            prog += [(_JEQ_K, 0, 1, int(a)), (_RET_K, 0, 0, TC_ACT_SHOT)]
    else:
        nets = [ipaddress.ip_network(a) for a in exact] + nets
    for net in nets:
        prog += _net_entry(net)
    prog.append((_RET_K, 0, 0, TC_ACT_UNSPEC))
    return prog


class TcGuard:
    """tc ingress filters on ``ifname`` (in ``netns``) dropping frames addressed to given
    IPv4/IPv6 addresses, so the balancer host's stack never handles the originals of
    frames the userspace datapath sends or drops.

    The filters are cls_bpf in direct-action mode running *classic* BPF (no eBPF, no
    action modules: this kernel has no tc drop action, gact, and cls_bpf is in every
    distribution kernel). A clsact qdisc is added if the interface has no ingress qdisc
    (and removed again by :meth:`remove`). Filters use two pairs of preferences, swapped
    on every :meth:`install`, so an update adds the new set before the old set goes."""

    PREFS = ((49152, 49153), (49154, 49155))  # (IPv4, IPv6) per generation

    def __init__(self, ifname: str, netns: str | None = None):
        self.ifname, self.netns = ifname, netns
        self.created_qdisc = False
        self.generation: int | None = None  # index into PREFS of the installed set
        self.addresses: list[str] = []

    def _tc(self, *args: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess:
        cmd = ["tc"] + (["-n", self.netns] if self.netns else []) + list(args)
        r = subprocess.run(cmd, input=stdin, capture_output=True, text=True, check=False)
        if check and r.returncode:
            raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip() or r.stdout.strip()}")
        return r

    def install(self, addresses: list) -> None:
        """Drop frames to ``addresses`` (IPv4/IPv6 addresses, and networks: CIDR VIPs) from
        now on (replacing the previous set)."""
        if self.generation is None and not self.created_qdisc:
            shown = self._tc("qdisc", "show", "dev", self.ifname).stdout
            if "qdisc clsact" not in shown and "qdisc ingress" not in shown:
                self._tc("qdisc", "add", "dev", self.ifname, "clsact")
                self.created_qdisc = True
        gen = 0 if self.generation in (None, 1) else 1
        lines = []
        for pref, proto, family, per, per_net in (
                (self.PREFS[gen][0], "ip", 4, _V4_PER_FILTER, _V4_NETS_PER_FILTER),
                (self.PREFS[gen][1], "ipv6", 6, _V6_PER_FILTER, _V6_NETS_PER_FILTER)):
            mine = [a for a in addresses if a.version == family]
            for addrs, n in (([a for a in mine if not isinstance(a, _NETS)], per),
                             ([a for a in mine if isinstance(a, _NETS)], per_net)):
                for i in range(0, len(addrs), n):
                    prog = cbpf_drop_program(addrs[i:i + n])
                    code = f"{len(prog)}," + ",".join(f"{c} {t} {f} {k}" for c, t, f, k in prog)
                    lines.append(f'filter add dev {self.ifname} ingress pref {pref} protocol {proto} '
                                 f'bpf da bytecode "{code}"')
        self._delete(gen)  # leftovers of a failed earlier update
        if lines:
            self._tc("-batch", "-", stdin="\n".join(lines) + "\n")
        old, self.generation = self.generation, gen
        self.addresses = [str(a) for a in addresses]
        if old is not None:
            self._delete(old)

    def _delete(self, gen: int) -> None:
        for pref, proto in zip(self.PREFS[gen], ("ip", "ipv6")):
            self._tc("filter", "del", "dev", self.ifname, "ingress", "pref", str(pref), "protocol",
                     proto, check=False)

    def dropped(self) -> int:
        """Frames dropped at tc ingress of the interface (the clsact/ingress qdisc's drop
        count: ours, plus any other filter's if the qdisc is shared)."""
        r = self._tc("-s", "-j", "qdisc", "show", "dev", self.ifname, check=False)
        if r.returncode:
            return 0
        try:
            for q in json.loads(r.stdout or "[]"):
                if q.get("kind") in ("clsact", "ingress"):
                    return int(q.get("drops", 0))
        except (ValueError, TypeError):
            pass
        return 0

    def remove(self) -> None:
        for gen in (0, 1):
            self._delete(gen)
        self.generation = None
        self.addresses = []
        if self.created_qdisc:
            self._tc("qdisc", "del", "dev", self.ifname, "clsact", check=False)
            self.created_qdisc = False


def guarded_addresses(tables: DatapathTables) -> tuple[list, list]:
    """(VIP addresses and CIDR VIP prefixes to filter, those left unfiltered because a
    VIP there is flagged ``local``)."""
    local_at = set()
    for key, meta in zip(tables.vip_keys, tables.vip_metas):
        if int(meta["flags"]) & C.F_LOCAL:
            local_at.add((bytes(key["addr"]), int(key["family"])))
    pkeys, pmetas, paddrs = prefix_tables(tables)
    for key, meta in zip(pkeys, pmetas):
        if int(meta["flags"]) & C.F_LOCAL:
            local_at.add((bytes(key["addr"]), int(key["family"]), int(key["prefixlen"])))
    guard, unguarded = [], []
    for key in tables.vip_addr_keys:
        fam = int(key["family"])
        raw = bytes(key["addr"])
        ip = ipaddress.IPv4Address(raw[:4]) if fam == C.FAMILY_V4 else ipaddress.IPv6Address(raw)
        (unguarded if (raw, fam) in local_at else guard).append(ip)
    for key in paddrs:
        fam, raw, plen = int(key["family"]), bytes(key["addr"]), int(key["prefixlen"])
        net = ipaddress.ip_network((raw[:4] if fam == C.FAMILY_V4 else raw, plen - C.VIP_LPM_KEY_HEAD_BITS))
        (unguarded if (raw, fam, plen) in local_at else guard).append(net)
    return guard, unguarded


# --- the balancer ---------------------------------------------------------------------------


def _netns_name(netns: Any) -> str | None:
    if netns is None:
        return None
    return getattr(netns, "name", None) or str(netns)


def _stride_for(max_frame: int) -> int:
    # room for a frame of max_frame + 1 bytes (so "too long for a VIP" is the datapath's
    # decision, drop_oversize) plus a VLAN tag written back, rounded to 64
    return max(2048, (max_frame + 4 + 1 + 63) // 64 * 64)


def _iface_counters(ifname: str) -> dict[str, int]:
    """rx/tx packets and drops of ``ifname`` from /proc/thread-self/net/dev (this thread's
    namespace)."""
    with open("/proc/thread-self/net/dev") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name.strip() == ifname:
                v = [int(x) for x in rest.split()]
                return {"if_rx_packets": v[1], "if_rx_dropped": v[3],
                        "if_tx_packets": v[9], "if_tx_dropped": v[11]}
    return {}


class UserspaceBalancer:
    """The userspace datapath on interface ``ifname`` of network namespace ``netns``
    (a name under /run/netns, a :class:`netns.ns.Netns`, or None: this namespace).

    ``batch``: frames per process_batch call. ``cpu``: pin the loop thread there.
    ``tx_mode``: "sendmmsg" (the default: one sendmmsg(2) per batch, frames copied into
    linear skbs) or "ring" (TPACKET_V3 TX ring, zero-copy: skbs point into the ring).
    Measured with bench/bench_userspace_io.py on veth: sending (with the peer's receive)
    cost ~15% less per 84-byte frame with sendmmsg (the peer has to pull headers out of
    the ring's paged skbs; copying a small frame is cheaper); in the whole pipeline the
    two are within run-to-run noise. sendmmsg also fails like XDP_TX does: a frame the
    device cannot take now is dropped and counted, not left holding a slot. ``guard``: "tc"
    (default; see the module doc) or "none". ``ring_kw``: extra :class:`lb.afpacket.PacketSocket` arguments
    (block_size, block_count, tx_frames, qdisc_bypass, ...).

    Thread-safe: start/stop/stats/update_tables may be called from any thread.
    """

    def __init__(self, tables: DatapathTables, ifname: str, netns: Any = None, batch: int = 256, *,
                 cpu: int | None = None, tx_mode: str = "sendmmsg", guard: str = "tc",
                 poll_ms: int = 100, **ring_kw: Any):
        if batch < 1:
            raise ValueError("batch must be >= 1")
        if guard not in ("tc", "none"):
            raise ValueError("guard must be 'tc' or 'none'")
        if tx_mode not in ("ring", "sendmmsg"):
            raise ValueError("tx_mode must be 'ring' or 'sendmmsg'")
        self.ifname = ifname
        self.netns = _netns_name(netns)
        self.batch = batch
        self.cpu = cpu
        self.tx_mode = tx_mode
        self.guard_mode = guard
        self.ring_kw = ring_kw
        self.dp = UserspaceDatapath(tables)
        self.stride = _stride_for(int(tables.ctl[0]["max_frame"]))
        self.ctl = np.zeros(4, dtype=np.int64)
        self.ctl[CTL_POLL_MS] = poll_ms
        self.loop_counters = np.zeros(len(LOOP_COUNTERS), dtype=np.int64)
        self.sock: PacketSocket | None = None
        self.guard: TcGuard | None = None
        self.guard_unfiltered: list = []
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None
        self.thread_native_id: int | None = None
        self._lock = threading.RLock()  # start/stop/update_tables
        self._pending: DatapathTables | None = None
        self._applied = threading.Condition()
        self._generation = 0  # bumped by the loop after each applied update
        self._wake_fd = -1
        self._started = False
        self._stopped = False

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Open the socket and rings in the namespace, install the guard, compile the loop
        (a few seconds, once per process) and start the loop thread. Returns when frames
        are being read."""
        with self._lock:
            if self._started:
                raise RuntimeError("already started")
            self._started = True
            try:
                self._start()
            except BaseException:
                self._teardown()
                raise

    def _start(self) -> None:
        self.sock = run_in_netns(self.netns, PacketSocket, self.ifname, stride=self.stride,
                                 tx_mode=self.tx_mode, **self.ring_kw)
        self.ctl[CTL_TX_MAX_LEN] = self.sock.tx_max_len
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        # struct pollfd[2] (fd, events | revents << 16), then [SO_ERROR value, its length]
        self.pollfds = np.array([[self.sock.fileno(), POLLIN], [self._wake_fd, POLLIN], [0, 4]],
                                dtype=np.int32)
        self.ts = np.zeros(2, dtype=np.int64)
        self._alloc_batch()
        if self.guard_mode == "tc":
            self.guard = TcGuard(self.ifname, self.netns)
            self._install_guard(self.dp.tables)
        # compile with the real argument types before the thread starts (ctl says stop)
        self.ctl[CTL_STOP] = 1
        self._call_run()
        self.ctl[CTL_STOP] = 0
        ready = threading.Event()
        self.thread = threading.Thread(target=self._thread_main, args=(ready,),
                                       name=f"lb-userspace-{self.ifname}", daemon=True)
        self.thread.start()
        ready.wait()

    def _alloc_batch(self) -> None:
        b, s = self.batch, self.stride
        self.frames = np.zeros((b, s), dtype=np.uint8)
        self.lengths = np.zeros(b, dtype=np.int64)
        self.outs = np.zeros((b, s + C.ENCAP_MAX_OVERHEAD), dtype=np.uint8)
        self.out_lens = np.zeros(b, dtype=np.int64)
        self.actions = np.zeros(b, dtype=np.uint8)
        self.real_ids = np.zeros(b, dtype=np.uint32)

    def _install_guard(self, tables: DatapathTables) -> None:
        assert self.guard is not None
        guard, unguarded = guarded_addresses(tables)
        self.guard.install(guard)
        self.guard_unfiltered = unguarded

    def _call_run(self) -> None:
        s, dp = self.sock, self.dp
        assert s is not None
        msgs = getattr(s, "_msgs", np.zeros((1, 8), dtype=np.uint64))
        iovs = getattr(s, "_iovs", np.zeros((1, 2), dtype=np.uint64))
        _run(
            s.rx_ring, s.rx_ring32, s.block_size, s.block_count, s.rx_state, s.complete_csum, s.counters,
            TX_RING if s.tx_mode == "ring" else TX_SENDMMSG, s.tx_ring, s.tx_ring32,
            s.tx_frame_size, s.tx_frame_count, s.tx_head, msgs, iovs, s.fileno(), self.pollfds,
            self.frames, self.lengths, self.outs, self.out_lens, self.actions, self.real_ids,
            dp.state, dp.stats, dp.vip_stats, dp.real_stats, self.ctl, self.loop_counters, self.ts,
        )

    def _thread_main(self, ready: threading.Event) -> None:
        self.thread_native_id = threading.get_native_id()
        try:
            if self.cpu is not None:
                os.sched_setaffinity(0, {self.cpu})
            ready.set()
            while True:
                self._call_run()
                if self.ctl[CTL_STOP]:
                    break
                if self.ctl[CTL_RELOAD]:
                    self._apply_pending()
        except BaseException as e:  # noqa: BLE001 - kept for stop() to re-raise
            self.error = e
        finally:
            ready.set()
            with self._applied:
                self._applied.notify_all()

    def _apply_pending(self) -> None:
        with self._applied:
            tables, self._pending = self._pending, None
            if tables is not None:
                self.dp.load_tables(tables)
                want = _stride_for(int(tables.ctl[0]["max_frame"]))
                if want > self.stride:
                    self.stride = want
                    self._alloc_batch()
            self.ctl[CTL_RELOAD] = 0
            self._drain_wake()
            self._generation += 1
            self._applied.notify_all()

    def _wake(self) -> None:
        if self._wake_fd >= 0:
            try:
                os.eventfd_write(self._wake_fd, 1)
            except OSError:
                pass

    def _drain_wake(self) -> None:
        try:
            os.eventfd_read(self._wake_fd)
        except (BlockingIOError, OSError):
            pass

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop, close the socket, remove the guard. Idempotent. Re-raises an
        error the loop died of."""
        with self._lock:
            if not self._started or self._stopped:
                return
            self._stopped = True
            self.ctl[CTL_STOP] = 1
            self._wake()
            if self.thread is not None:
                self.thread.join(timeout)
                if self.thread.is_alive():
                    raise RuntimeError("the userspace datapath loop did not stop")
            self._final_stats = self._collect()
            self._teardown()
        if self.error is not None:
            raise RuntimeError(f"the userspace datapath loop failed: {self.error!r}") from self.error

    def _teardown(self) -> None:
        if self.guard is not None:
            try:
                self.guard.remove()
            finally:
                self.guard = None
        if self.sock is not None:
            self.sock.close()
        if self._wake_fd >= 0:
            os.close(self._wake_fd)
            self._wake_fd = -1

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive() and not self._stopped

    # --- tables ----------------------------------------------------------------------------

    def update_tables(self, tables: DatapathTables, timeout: float = 10.0) -> None:
        """Swap VIPs, reals, rings and control values; the connection table and counters
        stay. Takes effect between two batches; returns once it has (or at once when the
        loop is not running). The guard's filters are updated around the swap (new VIP
        addresses filtered before the swap, old ones released after it)."""
        if (tables.max_vips, tables.max_reals) != (self.dp.tables.max_vips, self.dp.tables.max_reals):
            raise ValueError("max_vips / max_reals cannot change without a restart")
        with self._lock:
            if self.guard is not None:
                new_guard, _ = guarded_addresses(tables)
                old_guard, _ = guarded_addresses(self.dp.tables)
                # both sets while the swap happens
                merged = list(dict.fromkeys(old_guard + new_guard))
                self.guard.install(merged)
            if not self.running:
                self.dp.load_tables(tables)
                want = _stride_for(int(tables.ctl[0]["max_frame"]))
                if want > self.stride:
                    self.stride = want
                    self._alloc_batch()
            else:
                with self._applied:
                    gen = self._generation
                    self._pending = tables
                    self.ctl[CTL_RELOAD] = 1
                    self._wake()
                    deadline = time.monotonic() + timeout
                    while self._generation == gen and self.thread is not None and self.thread.is_alive():
                        left = deadline - time.monotonic()
                        if left <= 0:
                            raise TimeoutError("the loop did not take the new tables")
                        self._applied.wait(left)
                    if self._generation == gen:
                        raise RuntimeError(f"the userspace datapath loop is not running: {self.error!r}")
            if self.guard is not None:
                self._install_guard(tables)

    # --- counters --------------------------------------------------------------------------

    def _collect(self) -> dict[str, int]:
        out = self.dp.stats_dict()
        if self.sock is not None:
            out.update(self.sock.stats())
        out.update({f"loop_{k}": int(self.loop_counters[i]) for i, k in enumerate(LOOP_COUNTERS)})
        try:
            out.update(run_in_netns(self.netns, _iface_counters, self.ifname))
        except OSError:
            pass
        out["guard_unfiltered_vips"] = len(self.guard_unfiltered)
        return out

    def stats(self) -> dict[str, int]:
        """Datapath counters by name (lb.constants.STATS) plus the socket's (rx_*, tx_*,
        ring_packets / ring_drops / ring_freezes: lb.afpacket.COUNTERS), the loop's
        (loop_batches, loop_polls, loop_send_retries) and the interface's (if_rx_packets,
        if_rx_dropped, if_tx_packets, if_tx_dropped). After stop(): the final values."""
        with self._lock:
            if self._stopped:
                return dict(self._final_stats)
            return self._collect()

    def vip_stats(self) -> np.ndarray:
        """int64[max_vips, 2]: packets, bytes per VIP number."""
        return self.dp.vip_stats.copy()

    def real_stats(self) -> np.ndarray:
        """int64[max_reals, 2]: packets, bytes per real id."""
        return self.dp.real_stats.copy()

    def guard_dropped(self) -> int:
        """Originals the tc guard kept from the host's stack (0 without a guard)."""
        with self._lock:
            return self.guard.dropped() if self.guard is not None else 0

    def loop_cpu_seconds(self) -> float:
        """CPU time the loop thread has used (from /proc/self/task/<tid>/schedstat)."""
        if self.thread_native_id is None:
            return 0.0
        try:
            with open(f"/proc/self/task/{self.thread_native_id}/schedstat") as f:
                return int(f.read().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            return 0.0

    def __enter__(self) -> UserspaceBalancer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- command line -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    from lb.config import ConfigError, load_config
    from lb.datapath_tables import compile_tables

    ap = argparse.ArgumentParser(prog="python -m lb.userspace_io",
                                 description="Run the userspace datapath on an interface until "
                                             "SIGINT/SIGTERM (SIGHUP: reload the config).")
    ap.add_argument("--config", required=True, help="balancer YAML config")
    ap.add_argument("--interface", required=True, help="the balancer's interface")
    ap.add_argument("--netns", default=None, help="network namespace of the interface (/run/netns name)")
    ap.add_argument("--batch", type=int, default=256, help="frames per datapath call")
    ap.add_argument("--cpu", type=int, default=None, help="pin the datapath loop to this CPU")
    ap.add_argument("--tx-mode", choices=("ring", "sendmmsg"), default="sendmmsg")
    ap.add_argument("--guard", choices=("tc", "none"), default="tc",
                    help="tc: drop VIP-addressed originals before the host stack (default)")
    ap.add_argument("--stats-interval", type=float, default=0.0,
                    help="print counters every N seconds (0: only on exit)")
    ap.add_argument("--json", action="store_true", help="print counters as one JSON object per line")
    args = ap.parse_args(argv)

    try:
        tables = compile_tables(load_config(args.config))
    except (ConfigError, ValueError) as e:
        print(e, file=sys.stderr)
        return 2

    stop = threading.Event()
    reload = threading.Event()

    def on_stop(signum: int, frame: Any) -> None:
        stop.set()

    def on_hup(signum: int, frame: Any) -> None:
        reload.set()

    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGHUP, on_hup)

    def show(counters: dict[str, int], final: bool) -> None:
        if args.json:
            print(json.dumps({"final": final, **counters}), flush=True)
        else:
            width = max(len(k) for k in counters)
            print("\n".join(f"{k:<{width}} {v}" for k, v in counters.items()), flush=True)

    bal = UserspaceBalancer(tables, args.interface, args.netns, args.batch, cpu=args.cpu,
                            tx_mode=args.tx_mode, guard=args.guard)
    try:
        bal.start()
    except Exception as e:  # noqa: BLE001 - reported, exit status 1
        print(f"cannot start on {args.interface}: {e}", file=sys.stderr)
        return 1
    where = f" in netns {args.netns}" if args.netns else ""
    print(f"lb.userspace_io: running on {args.interface}{where}, batch {args.batch}, "
          f"tx {args.tx_mode}, guard {args.guard}, pid {os.getpid()}", flush=True)
    if bal.guard_unfiltered:
        print(f"warning: local VIP addresses not guarded: {[str(a) for a in bal.guard_unfiltered]}",
              file=sys.stderr, flush=True)
    rc = 0
    try:
        last = time.monotonic()
        while not stop.is_set():
            stop.wait(0.2)
            if reload.is_set():
                reload.clear()
                try:
                    bal.update_tables(compile_tables(load_config(args.config)))
                    print("lb.userspace_io: config reloaded", flush=True)
                except (ConfigError, ValueError) as e:
                    print(f"reload refused: {e}", file=sys.stderr, flush=True)
            if not bal.running:
                print(f"the datapath loop stopped: {bal.error!r}", file=sys.stderr, flush=True)
                rc = 1
                break
            if args.stats_interval and time.monotonic() - last >= args.stats_interval:
                last = time.monotonic()
                show(bal.stats(), final=False)
    finally:
        dropped = bal.guard_dropped()
        try:
            bal.stop()
        except RuntimeError as e:
            print(e, file=sys.stderr)
            rc = 1
        show({**bal.stats(), "guard_dropped": dropped}, final=True)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
