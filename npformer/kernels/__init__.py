"""Numba kernels, each beside the plain NumPy reference it is tested against.

- :mod:`.erf`: the error function (exact GeLU), with ``erf_reference``, and the
  vectorisable ``erf_float64`` of the fused kernels;
- :mod:`._exp`: the vectorisable exp shared by the kernels (numba has no vector exp here);
- :mod:`.activations`: fused GeLU / SiLU / gated-FFN middle, twins of
  :mod:`npformer.functional.gelu`, :mod:`~npformer.functional.silu` and ``glu``;
- :mod:`.flash_attention`: fused attention forward/backward (tiled online softmax, no T × S
  matrix), with its twin :mod:`.flash_attention_reference`;
- :mod:`.rope`: rotary position embedding in one pass, twin of :mod:`npformer.functional.rope`;
- :mod:`.residual_dropout`: ``x + dropout(b)`` and dropout's backward in one pass each, twin
  of :mod:`npformer.functional.dropout` (the same masks, bit for bit);
- :mod:`.norms`: LayerNorm and RMSNorm, forward and backward one pass per row, twins of
  :mod:`npformer.functional.layernorm` and :mod:`~npformer.functional.rmsnorm`;
- :mod:`.embedding`: the embedding's scatter-add backward, twin of
  :mod:`npformer.functional.embedding`;
- :mod:`.cross_entropy`: the softmax–cross-entropy head, loss and ``p − onehot(y)`` in one
  pass (in place over the logits), twin of :mod:`npformer.functional.cross_entropy`;
- :mod:`.optimizer`: AdamW, the gradient norm and clipping over flat buffers, twins of
  :mod:`npformer.optim`.

The models use them through ``ModelConfig.layer_impl="numba"`` (the default) and the
attention kernels through ``attention_impl="numba"``; ``"numpy"`` selects the readable twins.

``NUMBA_DISABLE_JIT=1`` turns every kernel into ordinary Python: slower, same results.

Idle threads sleep (``OMP_WAIT_POLICY=PASSIVE`` unless you set it)
------------------------------------------------------------------
The parallel kernels run on numba's OpenMP thread pool, and the rest of a training step
runs NumPy matrix products on OpenBLAS's own threads. By default OpenMP threads keep
spinning on the cores for a while after each parallel loop, so the matrix products that
follow share the 2 cores with two busy-waiting threads. Measured on the default
``npformer train`` step (gpt2, 16 × 128): 300–340 ms per step with spinning threads, 245–275
ms with sleeping ones (the NumPy attention path: 300–340 ms). GNU OpenMP reads the policy
when numba first starts its pool, so it is set here, before any kernel runs, and only if
the environment does not already choose one.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
