"""QUIC connection-id parsing (xdp/quic.h; docs/datapath.md, real selection step 0): the
server id a real embedded in the destination connection id. Pure parsing: the server-id
table is looked up in :mod:`lb.datapath.routing`."""

from __future__ import annotations

import numba as nb
import numpy as np

from lb import constants as C


@nb.njit(inline="always")
def quic_server_id(p, pl, plen):
    """Server id in the DCID of the UDP payload ``p[pl:pl+plen]``; 0 = no id (fallback)."""
    if plen < 1:
        return 0
    b0 = np.int64(p[pl])
    if b0 & C.QUIC_LONG_HEADER:
        if (plen < C.QUIC_LONG_CID_OFFSET + C.QUIC_MIN_CONNID_LEN
                or (b0 & C.QUIC_PACKET_TYPE_MASK) < C.QUIC_HANDSHAKE
                or p[pl + C.QUIC_LONG_CID_OFFSET - 1] < C.QUIC_MIN_CONNID_LEN):
            return 0
        d = pl + C.QUIC_LONG_CID_OFFSET
    else:
        if plen < C.QUIC_SHORT_CID_OFFSET + C.QUIC_MIN_CONNID_LEN:
            return 0
        d = pl + C.QUIC_SHORT_CID_OFFSET
    version = np.int64(p[d]) >> 6
    if version == C.QUIC_CID_V1:
        return ((np.int64(p[d]) & 0x3F) << 10) | (np.int64(p[d + 1]) << 2) | (np.int64(p[d + 2]) >> 6)
    if version == C.QUIC_CID_V2:
        return (np.int64(p[d + 1]) << 16) | (np.int64(p[d + 2]) << 8) | np.int64(p[d + 3])
    if version == C.QUIC_CID_V3:
        return ((np.int64(p[d + 1]) << 24) | (np.int64(p[d + 2]) << 16) | (np.int64(p[d + 3]) << 8)
                | np.int64(p[d + 4]))
    return 0
