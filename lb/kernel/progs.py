"""BPF programs on raw fds: loading instructions, info, opening by id."""

from __future__ import annotations

import ctypes
import errno
import os
import struct

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


# struct bpf_prog_info: line info (the program's BTF line records) and, per record, the
# address of its first JITed instruction
_NR_LINE_INFO, _LINE_INFO, _JITED_LINE_INFO = 148, 152, 160
_NR_JITED_LINE_INFO, _LINE_INFO_REC_SIZE, _JITED_LINE_INFO_REC_SIZE = 168, 172, 176


def prog_jited_lines(fd: int) -> list[tuple[int, int]]:
    """(kernel address of the first JITed instruction, index of the BPF instruction) of
    each of the program's line-info records, by address; [] for a program without BTF
    line info. With a dump of the translated program (``bpftool prog dump xlated id N
    linum``) this maps a sampled instruction pointer to its source line."""
    buf = ctypes.create_string_buffer(_INFO_LEN)
    _info(fd, buf)
    u32 = lambda raw, off: int.from_bytes(raw[off:off + 4], "little")
    n_lines, n_jited = u32(buf.raw, _NR_LINE_INFO), u32(buf.raw, _NR_JITED_LINE_INFO)
    if not n_lines or n_lines != n_jited:
        return []
    lines = ctypes.create_string_buffer(n_lines * 16)
    addrs = (ctypes.c_uint64 * n_jited)()
    ask = ctypes.create_string_buffer(_INFO_LEN)
    for off, fmt, val in ((_NR_LINE_INFO, "<I", n_lines), (_LINE_INFO, "<Q", ctypes.addressof(lines)),
                          (_LINE_INFO_REC_SIZE, "<I", 16), (_NR_JITED_LINE_INFO, "<I", n_jited),
                          (_JITED_LINE_INFO, "<Q", ctypes.addressof(addrs)),
                          (_JITED_LINE_INFO_REC_SIZE, "<I", 8)):
        struct.pack_into(fmt, ask, off, val)
    _info(fd, ask)
    # struct bpf_line_info: insn_off, file_name_off, line_off, line_col (u32 each)
    return sorted((addrs[i], u32(lines.raw, 16 * i)) for i in range(n_jited))


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
