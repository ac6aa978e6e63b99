"""Keep freed host memory for reuse, as PyTorch's caching allocator does on a GPU.

glibc returns every freed block above 32 MB to the kernel at once, so on a CPU each evaluation of a
large structure maps its activations afresh and the kernel zero-fills them page by page: for the
1008-atom Cu cell in float64 that was 0.8 M page faults and half of every evaluation's wall time.
Raising glibc's mmap threshold and switching off its trimming keeps those blocks in the heap: the
resident size stays at its peak (as on a GPU), and repeated evaluations of similar structures, an
MD run, stop faulting.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

OPT_OUT = "MLIP_RETAIN_HOST_MEMORY"  # "0": leave the C library's allocator as it is
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)
_MMAP_ABOVE = 2**31 - 1  # bytes: only blocks above 2 GB get their own mapping (mallopt takes an int)
_NEVER = -1  # M_TRIM_THRESHOLD -1: never give the heap's free top back (a 2 GB threshold did, above 2 GB peaks)
_retained = False


def retain_freed_host_memory() -> bool:
    """Make glibc keep freed blocks (up to 2 GB each) for reuse, once per process; True if it now does.

    Does nothing where the C library is not glibc (macOS, musl) or when ``MLIP_RETAIN_HOST_MEMORY=0``.
    """
    global _retained
    if _retained or os.environ.get(OPT_OUT, "1") == "0":
        return _retained
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    _retained = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_ABOVE)) and bool(mallopt(_M_TRIM_THRESHOLD, _NEVER))
    return _retained


def glibc_environment() -> dict[str, str]:
    """The same settings as environment variables, for a process that does not call this module (set before it starts).

    The trim threshold is a size there, not an int: 2**62 bytes stands for "never".
    """
    return {"MALLOC_MMAP_THRESHOLD_": str(_MMAP_ABOVE), "MALLOC_TRIM_THRESHOLD_": str(2**62)}
