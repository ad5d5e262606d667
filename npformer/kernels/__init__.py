"""Numba kernels, each beside the plain NumPy reference it is tested against.

- :mod:`.erf`: the error function (exact GeLU), with ``erf_reference``;
- :mod:`.flash_attention`: fused attention forward/backward (tiled online softmax, no T × S
  matrix), with its twin :mod:`.flash_attention_reference`.

``NUMBA_DISABLE_JIT=1`` turns every kernel into ordinary Python: slower, same results.
"""
