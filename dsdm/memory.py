"""Process memory: keep freed tensor buffers from staying in the process's RSS.

glibc serves an allocation above its mmap threshold with its own mapping, returned to the
system on free, and everything below it from the heap. The threshold is dynamic by default:
freeing a mapped block raises it to that block's size (up to 32 MiB). Steps that allocate and
free tens of MB per shard (a [4096, T] float64 tau, its sort, feature blocks) then serve those
buffers from the heap, where they fragment and stay resident: on the 147k-example bench slice
datamodel_weights' RSS grew by ~42 MB per shard this way (2.49 GB peak) against ~1 MB per
shard of data actually kept (1.10 GB peak with a fixed threshold; docs/PERFORMANCE.md).
"""

import ctypes
import ctypes.util

#: Allocations from this size up get their own mapping (and go back to the system on free).
MMAP_THRESHOLD_BYTES = 1 << 20
_M_MMAP_THRESHOLD = -3  # mallopt parameter number, glibc's malloc.h


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes for this process (which also stops
    its dynamic growth). Returns False where the C library is not glibc (nothing changes);
    the setting is process-wide and idempotent."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(threshold)))
