"""BPF map operations on raw fds: create, open by id, info, elements, batches.

Lookups check the caller's buffer sizes against the map first: the kernel writes whole
keys and values (per-CPU maps: one 8-byte-rounded value per possible CPU), so a short
buffer would be overrun.
"""

from __future__ import annotations

import ctypes
import errno

import numpy as np

from lb.kernel.bpf_attr import BatchAttr, ElemAttr, GetFdByIdAttr, InfoAttr, MapCreateAttr, MapInfo
from lb.kernel.bpf_attr import address_of as _ptr
from lb.kernel.cpus import possible_cpus
from lb.kernel.syscall import (
    BPF_MAP_CREATE,
    BPF_MAP_DELETE_ELEM,
    BPF_MAP_GET_FD_BY_ID,
    BPF_MAP_GET_NEXT_KEY,
    BPF_MAP_LOOKUP_BATCH,
    BPF_MAP_LOOKUP_ELEM,
    BPF_MAP_UPDATE_BATCH,
    BPF_MAP_UPDATE_ELEM,
    BPF_OBJ_GET_INFO_BY_FD,
    bpf_syscall,
)

# Map types (enum bpf_map_type) and map flags.
BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_HASH = 9
BPF_MAP_TYPE_LRU_PERCPU_HASH = 10
BPF_MAP_TYPE_LPM_TRIE = 11
BPF_MAP_TYPE_ARRAY_OF_MAPS = 12
BPF_MAP_TYPE_PERCPU_CGROUP_STORAGE = 21
BPF_MAP_TYPE_RINGBUF = 27
BPF_F_NO_PREALLOC = 1 << 0
BPF_F_NO_COMMON_LRU = 1 << 1
BPF_F_MMAPABLE = 1 << 10

BPF_ANY = 0  # update flag: create or replace

PERCPU_TYPES = {BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY,
                BPF_MAP_TYPE_LRU_PERCPU_HASH, BPF_MAP_TYPE_PERCPU_CGROUP_STORAGE}


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int,
               flags: int = 0, name: str = "") -> int:
    """A new map; its fd."""
    attr = MapCreateAttr(map_type=map_type, key_size=key_size, value_size=value_size,
                         max_entries=max_entries, map_flags=flags,
                         map_name=name.encode()[:15])
    return bpf_syscall(BPF_MAP_CREATE, attr, f"create map {name}")


def map_fd_by_id(map_id: int) -> int:
    """A new fd of the map with id ``map_id``."""
    return bpf_syscall(BPF_MAP_GET_FD_BY_ID, GetFdByIdAttr(id=map_id), f"map fd of id {map_id}")


def map_info(fd: int) -> MapInfo:
    """type, id, key_size, value_size, max_entries, map_flags and name of a map."""
    info = MapInfo()
    attr = InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=_ptr(info))
    bpf_syscall(BPF_OBJ_GET_INFO_BY_FD, attr, "map info")
    return info


def check_buffer_sizes(fd: int, key_size: int, value_size: int) -> None:
    """Raise ValueError unless the map's key size and its value size as lookups return it
    (per-CPU maps: 8-byte-rounded value x possible CPUs) are these: the kernel writes
    whole keys and values, so a short buffer would be overrun."""
    info = map_info(fd)
    size = info.value_size
    if info.type in PERCPU_TYPES:
        size = (size + 7) // 8 * 8 * possible_cpus()
    if value_size != size or key_size != info.key_size:
        raise ValueError(f"map {info.name.decode()!r}: {info.key_size}-byte keys and {size}-byte values"
                         f" (as looked up), not {key_size} and {value_size}")


def _found(cmd: int, attr: ctypes.Structure, what: str) -> bool:
    """bpf_syscall, False where the kernel answers ENOENT (no such key, no next key)."""
    try:
        bpf_syscall(cmd, attr, what)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    return True


def map_update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    """Write ``value`` under ``key``."""
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value, len(value))
    attr = ElemAttr(map_fd=fd, key=_ptr(k), value=_ptr(v), flags=flags)
    bpf_syscall(BPF_MAP_UPDATE_ELEM, attr, "map update")


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    """The value under ``key``, or None. ``value_size`` must be what the kernel writes
    (per-CPU maps: 8-byte-rounded value x possible CPUs); it is checked against the map,
    because a buffer shorter than that would be overrun by the kernel."""
    check_buffer_sizes(fd, len(key), value_size)
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value_size)
    attr = ElemAttr(map_fd=fd, key=_ptr(k), value=_ptr(v))
    return v.raw if _found(BPF_MAP_LOOKUP_ELEM, attr, "map lookup") else None


def map_delete(fd: int, key: bytes) -> bool:
    """Delete ``key``; False if it was not there."""
    k = ctypes.create_string_buffer(key, len(key))
    return _found(BPF_MAP_DELETE_ELEM, ElemAttr(map_fd=fd, key=_ptr(k)), "map delete")


def map_keys(fd: int, key_size: int) -> list[bytes]:
    """All keys of a hash map (get_next_key walk; for small maps)."""
    if key_size != map_info(fd).key_size:
        raise ValueError(f"map has {map_info(fd).key_size}-byte keys, not {key_size}")
    keys = []
    cur = None
    nxt = ctypes.create_string_buffer(key_size)
    while True:
        kbuf = ctypes.create_string_buffer(cur, key_size) if cur is not None else None
        attr = ElemAttr(map_fd=fd, key=_ptr(kbuf) if kbuf is not None else 0, value=_ptr(nxt))
        if not _found(BPF_MAP_GET_NEXT_KEY, attr, "map get_next_key"):
            return keys
        cur = nxt.raw
        keys.append(cur)


def map_update_batch(fd: int, keys: np.ndarray, values: np.ndarray) -> None:
    """BPF_MAP_UPDATE_BATCH: keys and values as contiguous arrays of equal length."""
    keys = np.ascontiguousarray(keys)
    values = np.ascontiguousarray(values)
    n = len(keys)
    done = 0
    while done < n:
        attr = BatchAttr(map_fd=fd, keys=_ptr(keys[done:]), values=_ptr(values[done:]),
                         count=n - done)
        try:
            bpf_syscall(BPF_MAP_UPDATE_BATCH, attr, "map update batch")
        except OSError:
            if attr.count == 0:
                raise
        done += attr.count


def percpu_row_sums(fd: int, words: int) -> tuple[np.ndarray, np.ndarray]:
    """A per-CPU array whose values are ``words`` u64 each, summed over CPUs: (keys,
    uint64[entries, words]) in the map's order."""
    ncpus = possible_cpus()
    keys, values, n = map_lookup_batch(fd, 4, 8 * words * ncpus)
    sums = np.frombuffer(values, dtype=np.uint64, count=n * ncpus * words).reshape(
        n, ncpus, words).sum(axis=1, dtype=np.uint64)
    return np.frombuffer(keys, dtype=np.uint32, count=n), sums


def map_lookup_batch(fd: int, key_size: int, value_size: int, chunk: int = 65536
                     ) -> tuple[bytes, bytes, int]:
    """BPF_MAP_LOOKUP_BATCH over the whole map: (keys, values, count). value_size is the
    size of one value as the syscall returns it (per-CPU maps: all CPUs)."""
    check_buffer_sizes(fd, key_size, value_size)
    keys_out = []
    values_out = []
    total = 0
    in_batch = None
    out_batch = ctypes.create_string_buffer(max(key_size, 8))
    while True:
        kbuf = ctypes.create_string_buffer(key_size * chunk)
        vbuf = ctypes.create_string_buffer(value_size * chunk)
        attr = BatchAttr(map_fd=fd, keys=_ptr(kbuf), values=_ptr(vbuf), count=chunk,
                         in_batch=_ptr(in_batch) if in_batch is not None else 0,
                         out_batch=_ptr(out_batch))
        end = False
        try:
            bpf_syscall(BPF_MAP_LOOKUP_BATCH, attr, "map lookup batch")
        except OSError as e:
            if e.errno == errno.ENOENT:
                end = True
            elif e.errno == errno.ENOSPC and attr.count == 0:
                chunk *= 2  # one hash bucket holds more than chunk entries
                continue
            else:
                raise
        n = attr.count
        keys_out.append(kbuf.raw[: n * key_size])
        values_out.append(vbuf.raw[: n * value_size])
        total += n
        if end:
            return b"".join(keys_out), b"".join(values_out), total
        in_batch = ctypes.create_string_buffer(out_batch.raw, len(out_batch.raw))

