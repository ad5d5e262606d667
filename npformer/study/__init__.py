"""The softmax study's measurements (issue 19), usable on any decoder-only npformer model.

:mod:`.instrument` runs a model's evaluation forward on a readable copy with hooks on its
module instances; :mod:`.outliers` measures activation outliers (∞-norm, kurtosis) and the
attention's first-token and unassigned mass as Bondarenko et al. (2023) do; :mod:`.quantize`
simulates post-training int8 quantization (W8A8, W8, A8) and reports the loss increase.
"""
