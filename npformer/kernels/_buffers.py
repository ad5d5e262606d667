"""Fresh output arrays that keep their distance from every other array.

LLVM vectorises a kernel loop such as ``y[i] = f(x[i])`` behind a runtime check that the
written array does not overlap the arrays it reads; when the check fails it runs a scalar
copy of the loop. The check is conservative at the edges: an output that starts less than
64 bytes after the end of an input takes the scalar loop although nothing overlaps.
glibc's malloc puts consecutive blocks 16 bytes apart, so in a training step, where a
kernel's output is allocated right after its input, that was the common case. Measured on
the tanh GeLU kernel, (2048, 512) float32, Intel Xeon (AVX-512): 1.1 ms with the output
64 bytes or more away, 5.7–8.1 ms with it 8–48 bytes after the input's end (the scalar
loop); the same ~6× inside the default gpt2 training step.

:func:`empty_apart` allocates 64 bytes more on each side and hands out the 64-byte aligned
middle, so no other array can end or start within 64 bytes of it.
"""

from __future__ import annotations

import numpy as np

GAP_BYTES = 64  # one cache line, the reach of the vectoriser's overlap check seen above


def empty_apart(shape, dtype) -> np.ndarray:
    """``np.empty(shape, dtype)``, C-contiguous, 64-byte aligned, with ≥ GAP_BYTES of its
    own unused allocation before and after it."""
    dtype = np.dtype(dtype)
    size = int(np.prod(shape, dtype=np.int64))
    pad = -(-GAP_BYTES // dtype.itemsize)  # elements in one gap
    raw = np.empty(size + 3 * pad, dtype=dtype)  # gap, alignment slack, array, gap
    start = pad + (-(raw.ctypes.data + pad * dtype.itemsize) % GAP_BYTES) // dtype.itemsize
    return raw[start:start + size].reshape(shape)
