"""Gradient check: ``embedding`` (the weight gradient, with repeated ids)."""

import numpy as np

from ..functional.embedding import embedding_backward, embedding_forward
from ..gradcheck import check_pair, register_check


@register_check("embedding")
def check_embedding():
    rng = np.random.default_rng(21)
    # weight (V=7, C=5); ids (B=2, T=6) where token 3 occurs four times and token 5 twice,
    # so a scatter that drops repeated contributions fails; tokens 0 and 6 never occur
    ids = np.array([[3, 1, 3, 5, 2, 3], [4, 5, 3, 1, 2, 2]])
    inputs = {"ids": ids, "weight": rng.standard_normal((7, 5)) * 0.8 + 0.2}
    return check_pair("embedding", embedding_forward, embedding_backward, inputs, ("weight",))
