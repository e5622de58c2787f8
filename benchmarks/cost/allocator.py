"""The host allocator: keep freed memory in the process, so that a step's CPU time is its work, not page faults.

With glibc's defaults, a block of more than ``M_MMAP_THRESHOLD`` (at most 32 MiB; MiniLM's word-embedding gradient is 47
MiB) is mapped for each allocation and unmapped when freed, and the heap's free top is returned to the system past
``M_TRIM_THRESHOLD``. Every new allocation then faults its pages in again, zeroed by the kernel, and how many depends on
what the steps before it freed (the allocator's history, not the step's work). Measured on one thread (MiniLM-L6, 16x48,
AMD EPYC, 3 steps x 3 rounds): a plain step took 11,000-34,000 minor faults and 800-1,370 ms with glibc's defaults, 0
faults and 720-760 ms with :func:`retain_freed_memory`; the loop's R-Drop step 38,000-70,000 faults and 1,640-2,510 ms,
against 0-3,800 and 1,400-1,500 ms. :func:`retain_freed_memory` sets ``M_MMAP_MAX = 0`` (no mapped blocks: everything
from the heap) and ``M_TRIM_THRESHOLD`` to its maximum (the heap is not given back), as CUDA's caching allocator keeps
device memory and as jemalloc or tcmalloc (PyTorch's CPU performance guide) keep host memory; after warm-up a step
faults almost no page in. It changes where memory comes from, not what any variant computes or allocates, and applies to
every variant alike. ``--malloc system`` keeps glibc's defaults.

Example::

    >>> from cost.allocator import configure, minor_faults
    >>> configure("system").startswith("glibc's defaults")
    True
    >>> before = minor_faults()
    >>> minor_faults() >= before
    True
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
from typing import Optional

M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_MMAP_MAX = -4
INT_MAX = 2**31 - 1

MODES = ("retain", "system")
DESCRIPTIONS = {
    "retain": "glibc `M_MMAP_MAX=0`, `M_TRIM_THRESHOLD=2^31-1`: freed memory stays in the process (no page faults "
              "from the allocator's history; `benchmarks/cost/allocator.py`)",
    "system": "glibc's defaults (blocks over 32 MiB mapped and unmapped per allocation, the heap trimmed: steps "
              "fault pages in depending on what earlier steps freed)",
}


def minor_faults() -> int:
    """The process's minor page faults so far (``getrusage``): pages the kernel mapped (and zeroed) on first touch."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def retain_freed_memory() -> Optional[str]:
    """Tell glibc's ``malloc`` to keep freed memory (``mallopt``); returns None, or why it could not (not glibc)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return f"no glibc mallopt in {name!r}"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not (mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, INT_MAX)):
        return "mallopt refused M_MMAP_MAX / M_TRIM_THRESHOLD"
    return None


def configure(mode: str) -> str:
    """Apply ``mode`` (``"retain"`` or ``"system"``) at the start of the process; returns what the report says."""
    if mode not in MODES:
        raise ValueError(f"--malloc {mode!r}: choose among {', '.join(MODES)}")
    if mode == "system":
        return DESCRIPTIONS["system"]
    why = retain_freed_memory()
    return DESCRIPTIONS["retain"] if why is None else f"the system's ({why}; `--malloc retain` had no effect)"
