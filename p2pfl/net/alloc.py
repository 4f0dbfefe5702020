"""Allocator settings for a process that receives large messages (a peer, a benchmark arm).

libzmq reads every message larger than its 8 KiB batch buffer into a fresh ``malloc`` block on its
I/O thread; the peer frees it once the message is decoded and applied. Under glibc's defaults
(a dynamic mmap threshold, a trim threshold of twice that) the freed top of the I/O thread's heap
goes back to the kernel after most messages, and the next message faults its pages back in, zeroed:
dozens of minor faults a message, a large share of the receiver's system time, and a cache flush
that slows the decoding that follows. Fixed thresholds keep those pages for the next message.
The cost is resident memory: up to ``trim`` bytes of freed heap stay mapped per arena.
`bench/gossip_throughput.py` measures the difference (``alloc_speedup``; figures in
docs/benchmarks.md).
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger("p2pfl.alloc")

M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_MMAP_THRESHOLD = -3


def keep_message_memory(mmap_threshold: int = 32 << 20, trim: int = 256 << 20) -> bool:
    """Serve blocks under ``mmap_threshold`` from the heap and return freed heap to the kernel only
    past ``trim`` bytes. True if the C library took both settings; False where there is no glibc
    ``mallopt`` (macOS; musl's is a no-op) or it refused a value. A thread arena's heap is 64 MiB,
    so larger blocks are mapped on their own whatever the threshold."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        log.debug("no mallopt in this C library: allocator left as it is")
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1 and mallopt(M_TRIM_THRESHOLD, trim) == 1
    log.debug("mallopt(mmap_threshold=%d, trim_threshold=%d): %s", mmap_threshold, trim, "taken" if ok else "refused")
    return ok
