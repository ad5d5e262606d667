"""Numba kernels, each beside the plain NumPy reference it is tested against.

``NUMBA_DISABLE_JIT=1`` turns every kernel into ordinary Python: slower, same results.
"""
