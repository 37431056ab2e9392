"""BPF programs on raw fds: loading instructions, info, opening by id."""

from __future__ import annotations

import ctypes
import errno
import os

from lb.kernel.bpf_attr import GetFdByIdAttr, InfoAttr, ProgLoadAttr, address_of
from lb.kernel.syscall import BPF_OBJ_GET_INFO_BY_FD, BPF_PROG_GET_FD_BY_ID, BPF_PROG_LOAD, bpf_syscall

BPF_PROG_TYPE_XDP = 6

# struct bpf_prog_info offsets (include/uapi/linux/bpf.h)
_INFO_LEN = 256
_ID, _JITED_LEN, _XLATED_LEN, _NR_MAP_IDS, _MAP_IDS, _NAME, _VERIFIED = 4, 16, 20, 52, 56, 64, 216


def prog_load(prog_type: int, insns: bytes, name: str, license: str = "GPL") -> int:
    """Load raw BPF instructions (8 bytes each) as a program of ``prog_type``; its fd."""
    buf = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(license.encode())
    attr = ProgLoadAttr(prog_type=prog_type, insn_cnt=len(insns) // 8, insns=address_of(buf),
                        license=address_of(lic), prog_name=name.encode()[:15])
    return bpf_syscall(BPF_PROG_LOAD, attr, f"load program {name}")


def prog_fd_by_id(prog_id: int) -> int:
    """A new fd of the program with id ``prog_id`` (KernelError ENOENT: none)."""
    return bpf_syscall(BPF_PROG_GET_FD_BY_ID, GetFdByIdAttr(id=prog_id), f"prog fd of id {prog_id}")


def prog_exists(prog_id: int) -> bool:
    """Whether a program with id ``prog_id`` is still loaded."""
    try:
        fd = prog_fd_by_id(prog_id)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    os.close(fd)
    return True


def _info(fd: int, buf: ctypes.Array) -> int:
    attr = InfoAttr(bpf_fd=fd, info_len=len(buf), info=address_of(buf))
    bpf_syscall(BPF_OBJ_GET_INFO_BY_FD, attr, "prog info")
    return attr.info_len


def prog_info(fd: int) -> dict[str, int | str]:
    """id, name, xlated_insns (instructions after verification/rewrites), jited_bytes,
    verified_insns (instructions the verifier processed, kernel >= 5.16)."""
    buf = ctypes.create_string_buffer(_INFO_LEN)
    info_len = _info(fd, buf)
    raw = buf.raw
    u32 = lambda off: int.from_bytes(raw[off:off + 4], "little")  # noqa: E731
    return {
        "id": u32(_ID),
        "name": raw[_NAME:_NAME + 16].split(b"\0")[0].decode(),
        "jited_bytes": u32(_JITED_LEN),
        "xlated_insns": u32(_XLATED_LEN) // 8,
        "verified_insns": u32(_VERIFIED) if info_len >= _VERIFIED + 4 else -1,
    }


def prog_map_ids(fd: int, max_maps: int = 64) -> list[int]:
    """Ids of the maps program ``fd`` uses (at most ``max_maps``)."""
    ids = (ctypes.c_uint32 * max_maps)()
    buf = ctypes.create_string_buffer(_INFO_LEN)
    # ask for the ids: nr_map_ids = room, map_ids = where
    ctypes.memmove(ctypes.addressof(buf) + _NR_MAP_IDS, ctypes.byref(ctypes.c_uint32(max_maps)), 4)
    ctypes.memmove(ctypes.addressof(buf) + _MAP_IDS,
                   ctypes.byref(ctypes.c_uint64(ctypes.addressof(ids))), 8)
    _info(fd, buf)
    n = int.from_bytes(buf.raw[_NR_MAP_IDS:_NR_MAP_IDS + 4], "little")
    return list(ids[:min(n, max_maps)])
