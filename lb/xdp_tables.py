"""The XDP program's helper-free tables, the pure part: the hashes of the VIP index and
of the connection table's sets, mirrored from xdp/lookup.h, and the VIP index builder
(lb/xdp_maps.py reads and writes the maps themselves).

The XDP program finds a VIP without a helper call: ``vip_slots`` is an array map of
:data:`lb.layout.VIP_SLOT` entries with open addressing (linear probing, at most
``constants.VIP_PROBES`` slots from a key's home slot), in two halves of
``constants.vip_slots(max_vips)`` slots. The control plane builds the whole index into
the half the program is not reading and then switches ``lb_runtime.vip_index``: a reader sees
the old index or the new one, never a mix. The canonical VIP set stays in ``vip_map``.

Both hashes are the multiply-xorshift :func:`mix` over little-endian 64-bit words of a
key; xdp/lookup.h computes the same. They are internal (never on the wire, not Katran's)
and seeded, so the connection table's sets can't be aimed at from outside.
"""

from __future__ import annotations

import numpy as np

from lb import constants as C
from lb import layout

_M64 = (1 << 64) - 1
MIX_K = C.MIX_K


class VipIndexError(ValueError):
    """No seed places every VIP within VIP_PROBES slots of its home slot."""


def mix(h: int, w: int) -> int:
    """One multiply-xorshift step (xdp/lookup.h lb_mix)."""
    h = ((h ^ w) * MIX_K) & _M64
    return h ^ (h >> 29)


def _words(raw: bytes, n64: int, tail32: bool) -> list[int]:
    words = [int.from_bytes(raw[8 * i:8 * i + 8], "little") for i in range(n64)]
    if tail32:
        words.append(int.from_bytes(raw[8 * n64:8 * n64 + 4], "little"))
    return words


def vip_hash(key: bytes, seed: int) -> int:
    """Hash of a 20-byte VIP_KEY: words addr[0:8], addr[8:16], (port, proto, family)."""
    h = seed
    for w in _words(key, 2, True):
        h = mix(h, w)
    return h


def conn_set_hash(flow_key: bytes, seed: int) -> int:
    """Hash of a 40-byte FLOW_KEY (five 64-bit words) choosing its connection-table set."""
    h = seed
    for w in _words(flow_key, 5, False):
        h = mix(h, w)
    return h


def conn_set_index(flow_key: bytes, seed: int, nsets: int) -> int:
    """The set of a flow among ``nsets``: the hash's high 32 bits scaled to nsets."""
    return ((conn_set_hash(flow_key, seed) >> 32) * nsets) >> 32


def conn_tag(h: int, real_id: int) -> int:
    """The tag of a connection-table entry without its key slot (xdp/lookup.h conn_tag)."""
    return (h ^ (real_id * MIX_K)) & _M64 & ~C.CONN_KEY_SLOT_MASK


def build_vip_slots(keys: list[bytes], metas: list[bytes], nslots: int,
                    max_seeds: int = 256) -> tuple[np.ndarray, int]:
    """The index of ``keys`` -> ``metas`` in ``nslots`` slots: (VIP_SLOT array, seed).

    Tries seeds 0, 1, ... until every key sits within VIP_PROBES slots of its home slot
    (at most half full, the first seed nearly always does)."""
    if len(keys) != len(metas):
        raise ValueError("keys and metas differ in length")
    if nslots & (nslots - 1) or len(keys) * 2 > nslots:
        raise ValueError(f"{len(keys)} VIPs need a power of two >= {2 * len(keys)} slots, "
                         f"not {nslots}")
    raw = np.zeros(nslots, dtype=layout.VIP_SLOT)
    view = raw.view(np.uint8).reshape(nslots, layout.VIP_SLOT.itemsize)
    key_size, meta_off = layout.VIP_KEY.itemsize, layout.VIP_SLOT.fields["meta"][1]
    for seed in range(max_seeds):
        view[:] = 0
        used = np.zeros(nslots, dtype=bool)
        for key, meta in zip(keys, metas):
            home = vip_hash(key, seed) & (nslots - 1)
            for step in range(C.VIP_PROBES):
                i = (home + step) & (nslots - 1)
                if not used[i]:
                    used[i] = True
                    view[i, :key_size] = np.frombuffer(key, dtype=np.uint8)
                    view[i, meta_off:meta_off + len(meta)] = np.frombuffer(meta, dtype=np.uint8)
                    break
            else:
                break  # this seed leaves a key too far from home: try the next
        else:
            return raw, seed
    raise VipIndexError(f"no seed below {max_seeds} places {len(keys)} VIPs in {nslots} "
                        f"slots within {C.VIP_PROBES} probes")
