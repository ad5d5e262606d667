"""An honest float64 Hugging Face reference: remove the float32 islands of ``transformers``.

``transformers`` 5 computes a few pieces in float32 even when the model is float64, which
caps float64 parity at ~1e-7 whatever the other side does. Each patch below recomputes one
such piece in the model's dtype with the *same formula* (a test checks that patched and stock
outputs agree to float32 precision, so no patch changes the maths):

1. GPT-Neo ``GPTNeoSelfAttention._attn`` casts q and k to float32 before the scores: run the
   same code with ``torch.float32`` read as float64.
2. GPT-J ``eager_attention_forward`` does the same cast: same treatment.
3. GPT-J ``create_sinusoidal_positions`` builds its sin/cos table in float32: rebuilt in
   float64 (it is called when the model is built, so build it inside the context).
4. Llama / GPT-NeoX / Cohere rotary embeddings compute ``inv_freq`` and the cos/sin tables
   in float32: recomputed in float64 (half-split tables for Llama/NeoX, interleaved for Cohere).
5. ``LlamaRMSNorm`` upcasts to float32 and back: computed in the input's dtype.
6. ``CohereLayerNorm`` upcasts to float32 and back: computed in the input's dtype.
7. Cohere's ``apply_rotary_pos_emb`` rotates q and k in float32 (``q.float()``): rotated in
   their own dtype.
8. ``GemmaRMSNorm`` / ``Gemma2RMSNorm`` compute x / √(mean(x²) + eps) · (1 + w) in float32
   (``x.float()``, ``weight.float()``) and cast back: computed in the input's dtype.
9. Gemma / Gemma 2 rotary embeddings: as 4 (half-split tables).
10. Gemma / Gemma 2 ``*TextScaledWordEmbedding`` multiply by the ``embed_scale`` buffer, made
    by ``torch.tensor(√C)`` in the default dtype: a model built in float32 and moved to float64
    keeps √C rounded to float32 (6e-8 off). Multiplied by √C in the weights' dtype instead
    (``from_pretrained(dtype=float64)`` already builds it so).
11. Gemma 2's ``eager_attention_forward`` (the only attention it supports with soft-capping;
    ``from_pretrained`` picks it) takes its softmax in float32: as 1, 2.

Use ``with exact_float64(): hf = AutoModelForCausalLM.from_pretrained(...); hf(ids)`` —
building and running inside. The eager softmax of some families also runs in float32; use
the ``sdpa`` attention implementation (the default of ``from_pretrained``) for those (Gemma 2
has no sdpa: its eager attention is patched, 11).
"""

from __future__ import annotations

import contextlib
import types


class _TorchInModelDtype:
    """Stands in for the ``torch`` module inside a patched function: ``torch.float32`` reads
    as float64, everything else is torch itself."""

    def __init__(self, torch) -> None:
        self._torch = torch

    def __getattr__(self, name):
        return self._torch.float64 if name == "float32" else getattr(self._torch, name)


def in_model_dtype(function, torch):
    """The same code as ``function`` with ``torch.float32`` read as float64 (patches 1, 2)."""
    namespace = {**function.__globals__, "torch": _TorchInModelDtype(torch)}
    return types.FunctionType(function.__code__, namespace, function.__name__,
                              function.__defaults__, function.__closure__)


def _patches():
    """(owner, attribute, replacement) for every patch of the module docstring."""
    import torch
    from transformers.models.cohere import modeling_cohere
    from transformers.models.gemma import modeling_gemma
    from transformers.models.gemma2 import modeling_gemma2
    from transformers.models.gpt_neo import modeling_gpt_neo
    from transformers.models.gpt_neox import modeling_gpt_neox
    from transformers.models.gptj import modeling_gptj
    from transformers.models.llama import modeling_llama

    def sinusoidal_positions(num_pos, dim):  # 3: [sin | cos] of pos · 10000^(−2i/dim)
        inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        angles = torch.arange(num_pos, dtype=torch.float64)[:, None] * inv_freq  # (P, dim/2)
        return torch.cat((torch.sin(angles), torch.cos(angles)), dim=1)  # (P, dim)

    def rotary_tables(interleaved):  # 4: cos/sin of position · θ^(−2i/dim)
        def forward(self, x, position_ids):
            dim = 2 * self.inv_freq.shape[-1]
            theta = self.config.rope_parameters["rope_theta"]
            inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
            angles = position_ids[..., None].to(torch.float64) * inv_freq  # (B, T, dim/2)
            if interleaved:  # Cohere: each angle twice in a row, for pairs (0,1), (2,3), ...
                emb = torch.repeat_interleave(angles, 2, dim=-1)
            else:  # Llama, NeoX: [angles | angles] for the half-split rotation
                emb = torch.cat((angles, angles), dim=-1)
            scaling = getattr(self, "attention_scaling", 1.0)
            return (emb.cos() * scaling).to(x.dtype), (emb.sin() * scaling).to(x.dtype)
        return forward

    def rmsnorm(self, hidden_states):  # 5: w · x / √(mean(x²) + eps)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))

    def cohere_layernorm(self, hidden_states):  # 6: w · (x − μ) / √(var + eps), no bias
        mean = hidden_states.mean(-1, keepdim=True)
        variance = (hidden_states - mean).pow(2).mean(-1, keepdim=True)
        return self.weight * ((hidden_states - mean) * torch.rsqrt(variance + self.variance_epsilon))

    def cohere_rotary(q, k, cos, sin, unsqueeze_dim=1):  # 7: x cos + rotate(x) sin
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        rotate = modeling_cohere.rotate_half
        return q * cos + rotate(q) * sin, k * cos + rotate(k) * sin

    def gemma_rmsnorm(self, x):  # 8: x / √(mean(x²) + eps) · (1 + w)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)

    def gemma_scaled_embedding(self, input_ids):  # 10: lookup · √C in the weights' dtype
        scale = torch.tensor(self.scalar_embed_scale, dtype=self.weight.dtype)
        return torch.nn.Embedding.forward(self, input_ids) * scale

    gemma = [  # issue 16
        (modeling_gemma.GemmaRMSNorm, "forward", gemma_rmsnorm),
        (modeling_gemma2.Gemma2RMSNorm, "forward", gemma_rmsnorm),
        (modeling_gemma.GemmaRotaryEmbedding, "forward", rotary_tables(False)),
        (modeling_gemma2.Gemma2RotaryEmbedding, "forward", rotary_tables(False)),
        (modeling_gemma.GemmaTextScaledWordEmbedding, "forward", gemma_scaled_embedding),
        (modeling_gemma2.Gemma2TextScaledWordEmbedding, "forward", gemma_scaled_embedding),
        (modeling_gemma2, "eager_attention_forward",
         in_model_dtype(modeling_gemma2.eager_attention_forward, torch)),
    ]
    return gemma + [
        (modeling_cohere, "apply_rotary_pos_emb", cohere_rotary),
        (modeling_gpt_neo.GPTNeoSelfAttention, "_attn",
         in_model_dtype(modeling_gpt_neo.GPTNeoSelfAttention._attn, torch)),
        (modeling_gptj, "eager_attention_forward",
         in_model_dtype(modeling_gptj.eager_attention_forward, torch)),
        (modeling_gptj, "create_sinusoidal_positions", sinusoidal_positions),
        (modeling_llama.LlamaRotaryEmbedding, "forward", rotary_tables(False)),
        (modeling_gpt_neox.GPTNeoXRotaryEmbedding, "forward", rotary_tables(False)),
        (modeling_cohere.CohereRotaryEmbedding, "forward", rotary_tables(True)),
        (modeling_llama.LlamaRMSNorm, "forward", rmsnorm),
        (modeling_cohere.CohereLayerNorm, "forward", cohere_layernorm),
    ]


@contextlib.contextmanager
def exact_float64(enabled: bool = True):
    """Apply the patches for the duration of the block, then restore the stock functions."""
    if not enabled:
        yield
        return
    patches = _patches()
    originals = [(owner, name, owner.__dict__[name]) for owner, name, _ in patches]
    try:
        for owner, name, replacement in patches:
            setattr(owner, name, replacement)
        yield
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


def hf_parameter_name(hf_model, name: str) -> str:
    """The checkpoint name of a parameter: transformers 5 calls GPT-NeoX's head ``lm_head``
    inside the model but stores it as ``embed_out.weight``."""
    if type(hf_model).__name__ == "GPTNeoXForCausalLM" and name == "lm_head.weight":
        return "embed_out.weight"
    return name
