"""The connection table (xdp/maps.h ``conn_table``; docs/datapath.md, real selection
step 1): one set-associative LRU table per datapath instance.

``tags[bucket, way]`` (one 64-byte line per bucket; 0 = empty) is checked first, so a
lookup touches the tag line plus the one matching entry: ``ent[bucket, way]`` = 8 words:
flow key (5), real id, atime (ns), LRU stamp. ``clock[0]`` numbers the uses, for the LRU.
``rate`` is the flood guard's state of this instance's CPU (xdp/maps.h ``conn_rates``):
``[RATE_START]`` = the current window's start (ns), ``[RATE_COUNT]`` = new connections in it.
"""

from __future__ import annotations

from typing import NamedTuple

import numba as nb
import numpy as np

from lb import constants as C
from lb.datapath.routing import EMPTY, mix

E_REAL, E_ATIME, E_STAMP = 5, 6, 7  # entry words after the flow key
RATE_START, RATE_COUNT = 0, 1  # words of ConnTable.rate
_M64 = 0xFFFFFFFFFFFFFFFF


class ConnTable(NamedTuple):
    tags: np.ndarray  # uint64[buckets, ways]
    ent: np.ndarray  # uint64[buckets, ways, 8]
    mask: int  # buckets - 1
    clock: np.ndarray  # uint64[1]
    rate: np.ndarray  # int64[2]: RATE_START, RATE_COUNT


def new_conn_table(entries: int, ways: int) -> ConnTable:
    """An empty table of at least ``entries`` entries, ``ways`` per bucket."""
    buckets = 1 << max(0, (max(1, entries // ways) - 1).bit_length())
    return ConnTable(np.zeros((buckets, ways), dtype=np.uint64),
                     np.zeros((buckets, ways, 8), dtype=np.uint64), buckets - 1,
                     np.zeros(1, dtype=np.uint64), np.zeros(2, dtype=np.int64))


# The helpers take the table's arrays, not the ConnTable: a tuple of arrays passed into
# inlined code costs reference-count updates per array at every pass (a several times
# slower loop), and so does every array argument that numba cannot prove is released.


@nb.njit(inline="always")
def slot(mask, fk):
    """(bucket, tag) of the flow key ``fk`` (5 words) in a table of ``mask + 1`` buckets."""
    h = np.uint64(0)
    for i in range(5):
        h = mix(h, fk[i])
    return np.int64(h & np.uint64(mask)), (h >> np.uint64(32)) | np.uint64(1)


@nb.njit(inline="always")
def find(tags, ent, b, tag, fk):
    """The way of bucket ``b`` holding ``fk``, or -1."""
    for w in range(tags.shape[1]):
        if tags[b, w] == tag:
            if (ent[b, w, 0] == fk[0] and ent[b, w, 1] == fk[1] and ent[b, w, 2] == fk[2]
                    and ent[b, w, 3] == fk[3] and ent[b, w, 4] == fk[4]):
                return w
    return -1


@nb.njit(inline="always")
def insert(tags, ent, b, tag, fk, real_id, now, stamp):
    """Write ``fk -> (real_id, atime = now)``, LRU ``stamp``, into bucket ``b``: over its
    own entry, else a free way, else the least recently used one."""
    w = find(tags, ent, b, tag, fk)
    if w < 0:
        oldest = np.uint64(_M64)
        for j in range(tags.shape[1]):
            if tags[b, j] == EMPTY:
                w = j
                break
            if ent[b, j, E_STAMP] < oldest:
                oldest = ent[b, j, E_STAMP]
                w = j
    for i in range(5):
        ent[b, w, i] = fk[i]
    tags[b, w] = tag
    ent[b, w, E_REAL] = np.uint64(real_id)
    ent[b, w, E_ATIME] = np.uint64(now)
    ent[b, w, E_STAMP] = stamp


@nb.njit(inline="always")
def flood(rate, max_rate, now):
    """The flood guard (xdp/balancer.c ``conn_flood``): count one new connection at
    ``now`` (ns) and say whether this CPU is over ``max_rate`` in the current window
    (constants.CONN_RATE_WINDOW_NS; a new window starts with its first connection).
    ``max_rate`` 0: off, nothing counted."""
    if max_rate == 0:
        return False
    if now - rate[RATE_START] > C.CONN_RATE_WINDOW_NS:
        rate[RATE_START] = now
        rate[RATE_COUNT] = 1
        return False
    rate[RATE_COUNT] += 1
    return rate[RATE_COUNT] > max_rate
