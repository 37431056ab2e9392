"""Katran's XDP balancer as a program under test in bench/bench_xdp.py (``--katran DIR``).

:func:`katran_tree` finds ``katran/lib`` in a Katran checkout, or exports it from a git
dir (``git archive HEAD katran/lib``); :func:`build_balancer` compiles
``katran/lib/bpf/balancer.bpf.c`` the way Katran's ``Makefile-bpf`` does (clang -O2
-emit-llvm | llc -march=bpf, -I of the tree, -DDEBUG -D__KERNEL__), with the IPIP outer
source prefixes moved into the benchmarking ranges (198.18/16, 2001:db8::/96: the
encapsulated frames never leave the benchmark's namespaces, but every address stays in
198.18.0.0/15 and 2001:db8::/32). :class:`KatranBalancer` loads the object with libbpf,
pins its maps in a directory of its own under /sys/fs/bpf (removed on close, also after
a failure) and fills them for the VIPs and reals of a :class:`lb.datapath_tables.DatapathTables`:
gateway MAC, vip_map, reals, ch_rings (the project's own Maglev rings, so both
balancers send a flow to the same real) and one LRU_HASH per possible CPU in
lru_mapping.

The program is loaded with expected_attach_type 0, as bcc loads the benchmark's
generator, the no-balancer stub and the project's balancer: the kernel lets a prog
array tail-call only programs whose expected_attach_type is that of the array's first
user, and libbpf would give a SEC("xdp") program BPF_XDP (37).
"""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from lb.kernel.cpus import possible_cpus
from lb.kernel.maps import BPF_MAP_TYPE_LRU_HASH, map_create, map_lookup, map_update, map_update_batch
from lb.kernel.objects import BPFFS
from lb.kernel.progs import prog_info

BALANCER_SRC = "katran/lib/bpf/balancer.bpf.c"
PROG_NAME = "balancer_ingress"
# katran/lib/bpf/balancer_consts.h and balancer_structs.h
RING_SIZE = 65537
MAX_VIPS = 512
F_IPV6 = 1 << 0  # real_definition.flags
F_LRU_BYPASS = 1 << 1  # vip_meta.flags
F_QUIC_VIP = 1 << 2
LRU_CNTRS = 0  # stats[MAX_VIPS + LRU_CNTRS]: (VIP frames, frames routed by the ring)
FLOW_KEY_SIZE, REAL_POS_LRU_SIZE = 40, 16
# IPIP outer sources: 198.18.<hash> (IPIP_V4_PREFIX is the first two bytes as a
# little-endian u32) and 2001:db8::<hash> (IPIP_V6_PREFIX1..3: the first 12 bytes)
IPIP_PREFIX_CFLAGS = ("-DIPIP_V4_PREFIX=0x12c6", "-DIPIP_V6_PREFIX1=0xb80d0120",
                      "-DIPIP_V6_PREFIX2=0", "-DIPIP_V6_PREFIX3=0")
CFLAGS = ("-DDEBUG", "-D__KERNEL__", "-Wno-unused-value", "-Wno-pointer-sign",
          "-Wno-compare-distinct-pointer-types", "-O2", "-emit-llvm", "-c", "-g")


def katran_tree(src: Path, work: Path) -> tuple[Path, str]:
    """(the directory that holds ``katran/lib``, a revision label) for a Katran checkout
    or git dir ``src``; a git dir's ``katran/lib`` of HEAD is exported into ``work``."""
    src = Path(src)
    if (src / BALANCER_SRC).is_file():
        rev = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True,
                             text=True).stdout.strip()
        return src, rev or "working tree"
    git = ["git", f"--git-dir={src}"]
    rev = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    archive = subprocess.run([*git, "archive", "HEAD", "katran/lib"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "x", "-C", str(work)], input=archive, check=True)
    return work, rev


def build_balancer(tree: Path, out: Path, clang: str = "clang", llc: str = "llc",
                   defines: tuple[str, ...] = IPIP_PREFIX_CFLAGS) -> Path:
    """Compile Katran's balancer.bpf.c into ``out`` (clang | llc, as Makefile-bpf), with
    ``defines`` (by default the benchmark's IPIP source prefixes)."""
    cc = [clang, f"-I{tree}", *defines, *CFLAGS, str(tree / BALANCER_SRC), "-o", "-"]
    ir = subprocess.run(cc, capture_output=True, check=False)
    if ir.returncode:
        raise RuntimeError(f"clang failed on Katran's balancer:\n{ir.stderr.decode()[-2000:]}")
    obj = subprocess.run([llc, "-march=bpf", "-filetype=obj", "-o", str(out)], input=ir.stdout,
                         capture_output=True, check=False)
    if obj.returncode:
        raise RuntimeError(f"llc failed on Katran's balancer:\n{obj.stderr.decode()[-2000:]}")
    return out


class _Libbpf:
    """The few libbpf 1.x calls the loader needs (Debian's libbpf1)."""

    def __init__(self) -> None:
        lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
        vp, cp, i = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int
        for name, res, args in (
                ("bpf_object__open_file", vp, [cp, vp]),
                ("bpf_object__find_program_by_name", vp, [vp, cp]),
                ("bpf_program__set_expected_attach_type", i, [vp, i]),
                ("bpf_object__load", i, [vp]),
                ("bpf_object__pin_maps", i, [vp, cp]),
                ("bpf_object__find_map_fd_by_name", i, [vp, cp]),
                ("bpf_program__fd", i, [vp]),
                ("bpf_object__close", None, [vp])):
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = res, args
        self.lib = lib


def _check(ret: int, what: str) -> int:
    if ret < 0:
        raise OSError(-ret, f"{what}: {os.strerror(-ret)}")
    return ret


class KatranBalancer:
    """Katran's balancer loaded from ``obj_path``, maps pinned under a fresh
    ``/sys/fs/bpf/lbbk<hex>`` and filled for ``tables``' VIPs and reals, one LRU of
    ``lru_entries`` per possible CPU. ``close()`` (or the context manager) unloads it
    and removes the pin directory."""

    def __init__(self, obj_path: Path, tables: Any, gateway_mac: str, lru_entries: int):
        self._libbpf = _Libbpf()
        lib = self._libbpf.lib
        self.lru_entries = lru_entries
        self.ncpus = possible_cpus()
        self.lru_fds: list[int] = []
        self.pin_dir = os.path.join(BPFFS, "lbbk" + secrets.token_hex(4))
        self.obj = lib.bpf_object__open_file(str(obj_path).encode(), None)
        if not self.obj:
            raise OSError(ctypes.get_errno(), f"libbpf cannot open {obj_path}")
        try:
            prog = lib.bpf_object__find_program_by_name(self.obj, PROG_NAME.encode())
            if not prog:
                raise RuntimeError(f"{obj_path} has no program {PROG_NAME}")
            _check(lib.bpf_program__set_expected_attach_type(prog, 0), "set expected_attach_type")
            _check(lib.bpf_object__load(self.obj), f"load {obj_path}")
            self.prog_fd = _check(lib.bpf_program__fd(prog), "program fd")
            os.makedirs(self.pin_dir)
            _check(lib.bpf_object__pin_maps(self.obj, self.pin_dir.encode()), "pin maps")
            self.fill(tables, gateway_mac)
        except BaseException:
            self.close()
            raise

    def map_fd(self, name: str) -> int:
        return _check(self._libbpf.lib.bpf_object__find_map_fd_by_name(self.obj, name.encode()),
                      f"map {name}")

    def prog_info(self) -> dict[str, int | str]:
        return prog_info(self.prog_fd)

    # --- filling --------------------------------------------------------------------------

    def set_gateway(self, mac: str) -> None:
        """ctl_array[0]: the MAC encapsulated frames are sent to."""
        map_update(self.map_fd("ctl_array"), _u32(0), bytes.fromhex(mac.replace(":", "")) + bytes(2))

    def fill(self, tables: Any, gateway_mac: str) -> None:
        """Gateway MAC, VIPs, reals, rings of ``tables`` (ring size must be Katran's),
        fresh LRUs."""
        if tables.ring_size != RING_SIZE or len(tables.vip_keys) > MAX_VIPS:
            raise ValueError(f"Katran's ring has {RING_SIZE} slots and {MAX_VIPS} VIPs at most")
        if len(getattr(tables, "vip_prefix_keys", ())):
            raise ValueError("CIDR VIPs are not loaded into Katran here (its vip_lpm_map is IPv6 only)")
        self.set_gateway(gateway_mac)
        vips = self.map_fd("vip_map")
        for key, meta in zip(tables.vip_keys, tables.vip_metas):
            # struct vip_definition: address, port (network order), proto, padding
            kkey = bytes(key["addr"]) + int(key["port"]).to_bytes(2, "big") + bytes([int(key["proto"]), 0])
            flags = int(meta["flags"]) & (F_LRU_BYPASS | F_QUIC_VIP)  # same bits as ours
            map_update(vips, kkey, _u32(flags) + _u32(int(meta["vip_num"])))
        reals = self.map_fd("reals")
        for rid in range(1, len(tables.reals)):
            addr = tables.real_address(rid)
            if addr is not None:
                flags = F_IPV6 if addr.version == 6 else 0
                map_update(reals, _u32(rid), addr.packed.ljust(16, b"\0") + bytes([flags]) + bytes(3))
        nums = np.array(sorted(int(m["vip_num"]) for m in tables.vip_metas), dtype=np.uint32)
        slots = np.arange(RING_SIZE, dtype=np.uint32)
        keys = (nums[:, None] * RING_SIZE + slots).ravel()
        map_update_batch(self.map_fd("ch_rings"), keys, tables.rings[nums].astype(np.uint32).ravel())
        self.fresh_lrus()

    def fresh_lrus(self) -> None:
        """Give every CPU a new, empty LRU (the old ones are closed): each measurement
        starts from a fresh map, as the project's connection table does."""
        mapping = self.map_fd("lru_mapping")
        new = [map_create(BPF_MAP_TYPE_LRU_HASH, FLOW_KEY_SIZE, REAL_POS_LRU_SIZE, self.lru_entries,
                          name=f"katran_lru{cpu}") for cpu in range(self.ncpus)]
        for cpu, fd in enumerate(new):
            map_update(mapping, _u32(cpu), _u32(fd))
        for fd in self.lru_fds:
            os.close(fd)
        self.lru_fds = new

    # --- counters ---------------------------------------------------------------------------

    def _stats(self, index: int) -> np.ndarray:
        """stats[index] per CPU as (v1, v2) rows."""
        raw = map_lookup(self.map_fd("stats"), _u32(index), 16 * self.ncpus)
        return np.frombuffer(raw, dtype=np.uint64).reshape(self.ncpus, 2).copy()

    def vip_frames(self, vip_num: int) -> np.ndarray:
        """Frames forwarded for VIP ``vip_num`` so far, per CPU (where Katran ran)."""
        return self._stats(vip_num)[:, 0]

    def lru_misses(self) -> int:
        """Frames routed by the ring so far: connection-table misses, and every frame of
        an LRU-bypass VIP."""
        return int(self._stats(MAX_VIPS + LRU_CNTRS)[:, 1].sum())

    # --- teardown ---------------------------------------------------------------------------

    def close(self) -> None:
        for fd in self.lru_fds:
            os.close(fd)
        self.lru_fds = []
        if self.obj:
            self._libbpf.lib.bpf_object__close(self.obj)
            self.obj = None
        shutil.rmtree(self.pin_dir, ignore_errors=True)

    def __enter__(self) -> KatranBalancer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _u32(v: int) -> bytes:
    return v.to_bytes(4, "little")


def load_katran(src: Path, tables: Any, gateway_mac: str, lru_entries: int) -> tuple[KatranBalancer, dict[str, str]]:
    """Build Katran's balancer from the tree or git dir ``src`` (in a temporary
    directory, removed again) and load it; returns it and {"source", "revision", "object
    bytes"} for the record."""
    with tempfile.TemporaryDirectory(prefix="lbbkatran") as work:
        tree, rev = katran_tree(Path(src), Path(work))
        obj = build_balancer(tree, Path(work) / "balancer.o")
        info = {"source": str(src), "revision": rev, "object_bytes": str(obj.stat().st_size)}
        return KatranBalancer(obj, tables, gateway_mac, lru_entries), info


__all__ = ["KatranBalancer", "build_balancer", "katran_tree", "load_katran"]
