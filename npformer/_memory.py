"""Reusing freed memory across training steps (glibc's malloc), instead of a workspace.

A training step allocates the same arrays every step: each layer's activations (kept for
the backward) and its gradients, a few MB each. glibc serves allocations above
``M_MMAP_THRESHOLD`` (128 KiB at start, raised adaptively up to 32 MiB) with fresh ``mmap``
pages and trims the heap top above ``M_TRIM_THRESHOLD``, so a step's arrays keep arriving as
new pages: every first touch of a 4 KiB page is a minor page fault (the kernel zeroes it).
Measured on the default gpt2 step: ~760 faults per step.

Raising both thresholds makes freed blocks go back to malloc's free lists, where the next
step's arrays of the same sizes find them: the effect of a preallocated workspace per model
and batch shape, without threading ``out=`` buffers through every layer. Measured: ~100
faults per step, the same peak RSS (the memory is the step's own, held between steps
instead of returned and faulted back).

Only the training process calls this (``npformer.train.Trainer``); it changes the
allocator of the whole process, which is what a training run wants and a library import
should not do. Elsewhere than glibc (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 2**30  # arrays up to 1 GiB come from the heap and are reused
TRIM_THRESHOLD = 2**31 - 1  # never give the heap top back between steps

_applied = None


def keep_freed_memory_for_reuse() -> bool:
    """Set glibc's thresholds once per process; True if they are in effect."""
    global _applied
    if _applied is None:
        _applied = False
        path = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(path) if path else None
            mallopt = getattr(libc, "mallopt", None)
        except OSError:
            mallopt = None
        if mallopt is not None:
            mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
            _applied = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
                mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied
