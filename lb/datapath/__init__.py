"""The userspace datapath: docs/datapath.md in numba, frame by frame, mirroring xdp/.

Pure: frames and tables in, actions, output frames and counter updates out. The only
state it keeps between calls is the connection table (as the XDP program's LRU map) and
the flood guard's new-connection count beside it, and the only clock is the ``now``
argument.

One module per C file it mirrors: :mod:`.balancer` (xdp/balancer.c: the batch loop, row
by row, with xdp/encap.h's encapsulation inline), :mod:`.parsing`, :mod:`.csum`,
:mod:`.icmp`, :mod:`.quic` (the headers of the same names), :mod:`.conntable` and :mod:`.routing` (the connection table,
the VIP tables and real selection), :mod:`.maps` (xdp/maps.h: the state, built from the
tables); :mod:`.userspace` is the Python face and :mod:`.jitcache` keeps the compiled
loop on disk.
"""

from lb.datapath.balancer import process_batch
from lb.datapath.maps import Maps
from lb.datapath.userspace import BatchResult, UserspaceDatapath

__all__ = ["BatchResult", "Maps", "UserspaceDatapath", "process_batch"]
