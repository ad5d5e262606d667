"""Named finite-difference checks, registered with :func:`npformer.gradcheck.register_check`.

One module per area; :data:`npformer.gradcheck.CHECK_MODULES` lists them. Every check builds
float64 inputs with unusual random values (not zeros or ones, which hide bugs; away from
kinks such as ReLU at 0), odd shapes and leading batch dimensions, and returns the reports
of :func:`npformer.gradcheck.check_pair` or :func:`npformer.gradcheck.check_gradients`.
"""

# The fused-kernel checks register on import of this package: importing any checks module
# (as gradcheck.registered_checks does) also registers kernel_causal, kernel_window, ...
from . import kernels  # noqa: E402,F401
