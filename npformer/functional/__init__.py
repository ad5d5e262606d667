"""Pure forward/backward pairs, one concept per file, no state.

Every pair has the form ``y, cache = NAME_forward(...)`` and ``grads = NAME_backward(dy, cache)``;
the derivation is in each module's docstring, and the backward restates the forward line it
differentiates.
"""

from .attention import attention_backward, attention_forward
from .attention_gate import head_gate_backward, head_gate_forward
from .attention_mask import attention_mask
from .cross_entropy import cross_entropy_backward, cross_entropy_forward, nll_backward, nll_forward
from .dropout import dropout_backward, dropout_forward
from .embedding import embedding_backward, embedding_forward
from .gelu import gelu_backward, gelu_forward
from .glu import geglu_backward, geglu_forward, swiglu_backward, swiglu_forward
from .layernorm import layernorm_backward, layernorm_forward
from .linear import linear_backward, linear_forward
from .positions import (
    learned_positions_backward,
    learned_positions_forward,
    sinusoidal_backward,
    sinusoidal_forward,
    sinusoidal_table,
)
from .relu import relu_backward, relu_forward
from .rmsnorm import rmsnorm_backward, rmsnorm_forward
from .rope import rope_angles, rope_backward, rope_forward
from .silu import silu_backward, silu_forward
from .softmax import (
    log_softmax_backward,
    log_softmax_forward,
    softmax_backward,
    softmax_forward,
    softmax_jacobian,
)
from .softmax_variants import (
    clipped_softmax_backward,
    clipped_softmax_forward,
    sink_softmax_backward,
    sink_softmax_forward,
    softcap_backward,
    softcap_forward,
    softmax1_backward,
    softmax1_forward,
)

__all__ = [
    "attention_backward", "attention_forward", "attention_mask",
    "head_gate_backward", "head_gate_forward",
    "learned_positions_backward", "learned_positions_forward",
    "sinusoidal_backward", "sinusoidal_forward", "sinusoidal_table",
    "rope_angles", "rope_backward", "rope_forward",
    "clipped_softmax_backward", "clipped_softmax_forward", "softcap_backward",
    "softcap_forward", "softmax1_backward", "softmax1_forward",
    "sink_softmax_backward", "sink_softmax_forward",
    "cross_entropy_backward", "cross_entropy_forward", "nll_backward", "nll_forward",
    "dropout_backward", "dropout_forward",
    "embedding_backward", "embedding_forward",
    "gelu_backward", "gelu_forward",
    "geglu_backward", "geglu_forward", "swiglu_backward", "swiglu_forward",
    "layernorm_backward", "layernorm_forward",
    "linear_backward", "linear_forward",
    "relu_backward", "relu_forward",
    "rmsnorm_backward", "rmsnorm_forward",
    "silu_backward", "silu_forward",
    "log_softmax_backward", "log_softmax_forward", "softmax_backward", "softmax_forward",
    "softmax_jacobian",
]
