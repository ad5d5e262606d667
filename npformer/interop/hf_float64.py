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
4. Llama / GPT-NeoX / Cohere rotary embeddings compute ``inv_freq``, the attention scaling
   and the cos/sin tables in float32: recomputed in float64 by :func:`float64_rotary_forward`,
   which runs transformers' OWN init function of the class's ``rope_type``
   (``ROPE_INIT_FUNCTIONS[rope_type]``, or the class's ``compute_default_rope_parameters``)
   under :func:`in_model_dtype` — every scaled RoPE (linear, dynamic, yarn, llama3) with
   transformers' own formula — then the float64 angles (half-split tables for Llama/NeoX,
   interleaved for Cohere). It is a factory for any family's ``*RotaryEmbedding.forward``.
5. ``LlamaRMSNorm`` upcasts to float32 and back: computed in the input's dtype.
6. ``CohereLayerNorm`` upcasts to float32 and back: computed in the input's dtype.
7. Cohere's ``apply_rotary_pos_emb`` rotates q and k in float32 (``q.float()``): rotated in
   their own dtype.
8. Mistral, Qwen2, Qwen3 and Phi-3 have their own copies of Llama's rotary embedding (float32
   ``inv_freq``, scaling and tables; Phi-3's for its first int(D · partial_rotary_factor)
   channels) and of ``LlamaRMSNorm`` (float32 upcast; Qwen3's q/k norms are the same class):
   patches 4 (half-split) and 5 on each family's classes (:func:`_mistral_qwen_phi_patches`).
9. ``GemmaRMSNorm`` / ``Gemma2RMSNorm`` compute x / √(mean(x²) + eps) · (1 + w) in float32
   (``x.float()``, ``weight.float()``) and cast back: computed in the input's dtype.
10. Gemma / Gemma 2 rotary embeddings: as 4 (half-split tables).
11. Gemma / Gemma 2 ``*TextScaledWordEmbedding`` multiply by the ``embed_scale`` buffer, made
    by ``torch.tensor(√C)`` in the default dtype: a model built in float32 and moved to float64
    keeps √C rounded to float32 (6e-8 off). Multiplied by √C in the weights' dtype instead
    (``from_pretrained(dtype=float64)`` already builds it so).
12. Gemma 2's ``eager_attention_forward`` (the only attention it supports with soft-capping;
    ``from_pretrained`` picks it) takes its softmax in float32: as 1, 2.

:func:`float64_patches` lists the patches that touch one ``model_type``'s modeling code
(``npformer compare --hf DIR`` prints them).

Use ``with exact_float64(): hf = AutoModelForCausalLM.from_pretrained(...); hf(ids)`` —
building and running inside. The eager softmax of some families also runs in float32; use
the ``sdpa`` attention implementation (the default of ``from_pretrained``) for those (Gemma 2
has no sdpa: its eager attention is patched, 12).
"""

from __future__ import annotations

import contextlib
import types


class _TorchInModelDtype:
    """Stands in for the ``torch`` module inside a patched function: ``torch.float32`` and
    its alias ``torch.float`` read as float64, everything else is torch itself."""

    def __init__(self, torch) -> None:
        self._torch = torch

    def __getattr__(self, name):
        return self._torch.float64 if name in ("float32", "float") else getattr(self._torch, name)


def in_model_dtype(function, torch):
    """The same code as ``function`` with ``torch.float32`` / ``torch.float`` read as float64
    (patches 1, 2 and the rope init functions of 4). Functions nested in ``function`` (yarn's
    ``linear_ramp_factor``) share its globals, so they read float64 too. Tensor methods
    (``x.float()``) and implicit promotion to the default dtype are NOT covered: a function
    run this way must not rely on them (the rope init functions of default, linear, dynamic,
    yarn and llama3 do not, given a Python-int seq_len)."""
    namespace = {**function.__globals__, "torch": _TorchInModelDtype(torch)}
    return types.FunctionType(function.__code__, namespace, function.__name__,
                              function.__defaults__, function.__closure__)


def _dynamic_seq_len(rotary, position_ids) -> int:
    """transformers' ``dynamic_rope_update`` state machine, as a Python int: the length whose
    frequencies this call uses. It grows ``max_seq_len_cached`` to the call's
    max(position_ids) + 1, and resets to the original length when a call is shorter than it
    after a longer one; else it keeps the cached length (so a call between L₀ and the
    longest seen reuses the longest's frequencies, exactly as stock transformers)."""
    seq_len = int(position_ids.max()) + 1
    if seq_len > rotary.max_seq_len_cached:  # growth
        rotary.max_seq_len_cached = seq_len
    elif seq_len < rotary.original_max_seq_len < rotary.max_seq_len_cached:  # reset
        rotary.max_seq_len_cached = rotary.original_max_seq_len
    return rotary.max_seq_len_cached


def float64_rotary_forward(interleaved: bool = False):
    """A float64 ``forward(self, x, position_ids)`` for ANY family's ``*RotaryEmbedding``
    class (patch 4): ``interleaved`` False for the half-split ``cat((freqs, freqs))`` tables
    (Llama, GPT-NeoX, Mistral, Qwen2/3, Gemma, Gemma 2, Phi-3), True for Cohere's
    ``repeat_interleave(freqs, 2)``.

    It recomputes ``inv_freq`` and ``attention_scaling`` with transformers' own init function
    for the instance's ``rope_type`` (``ROPE_INIT_FUNCTIONS``, or the class's
    ``compute_default_rope_parameters`` for "default") run under :func:`in_model_dtype`, so
    the formula is transformers' and only the dtype changes; dynamic gets the Python-int
    seq_len of transformers' ``dynamic_rope_update`` (:func:`_dynamic_seq_len`), stateful as
    there. Then cos/sin of position · inv_freq in float64, times the attention scaling,
    cast to x's dtype. Types whose init function needs float32 tensor methods (longrope) are
    refused."""
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    def forward(self, x, position_ids):
        rope_type = self.rope_type
        if rope_type not in ("default", "linear", "dynamic", "yarn", "llama3"):
            raise ValueError(f"float64_rotary_forward: rope_type={rope_type!r} is not covered "
                             "(its init function computes in float32 through tensor methods)")
        init = (type(self).compute_default_rope_parameters if rope_type == "default"
                else ROPE_INIT_FUNCTIONS[rope_type])
        seq_len = _dynamic_seq_len(self, position_ids) if rope_type == "dynamic" else None
        inv_freq, scaling = in_model_dtype(init, torch)(self.config, device=x.device,
                                                         seq_len=seq_len)
        self.attention_scaling = scaling
        if inv_freq.dtype != torch.float64:  # a float32 island the namespace did not reach
            raise AssertionError(f"{type(self).__name__}: {rope_type} inv_freq came out "
                                 f"{inv_freq.dtype}, not float64")
        angles = position_ids[..., None].to(torch.float64) * inv_freq  # (B, T, dim/2)
        if interleaved:  # Cohere: each angle twice in a row, for pairs (0,1), (2,3), ...
            emb = torch.repeat_interleave(angles, 2, dim=-1)
        else:  # [angles | angles] for the half-split rotation
            emb = torch.cat((angles, angles), dim=-1)
        return (emb.cos() * scaling).to(x.dtype), (emb.sin() * scaling).to(x.dtype)

    return forward


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

    def gemma_rmsnorm(self, x):  # 9: x / √(mean(x²) + eps) · (1 + w)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)

    def gemma_scaled_embedding(self, input_ids):  # 11: lookup · √C in the weights' dtype
        scale = torch.tensor(self.scalar_embed_scale, dtype=self.weight.dtype)
        return torch.nn.Embedding.forward(self, input_ids) * scale

    gemma = [  # issue 16
        (modeling_gemma.GemmaRMSNorm, "forward", gemma_rmsnorm),
        (modeling_gemma2.Gemma2RMSNorm, "forward", gemma_rmsnorm),
        (modeling_gemma.GemmaRotaryEmbedding, "forward", float64_rotary_forward()),
        (modeling_gemma2.Gemma2RotaryEmbedding, "forward", float64_rotary_forward()),
        (modeling_gemma.GemmaTextScaledWordEmbedding, "forward", gemma_scaled_embedding),
        (modeling_gemma2.Gemma2TextScaledWordEmbedding, "forward", gemma_scaled_embedding),
        (modeling_gemma2, "eager_attention_forward",
         in_model_dtype(modeling_gemma2.eager_attention_forward, torch)),
    ]
    return _mistral_qwen_phi_patches(float64_rotary_forward(), rmsnorm) + gemma + [
        (modeling_cohere, "apply_rotary_pos_emb", cohere_rotary),
        (modeling_gpt_neo.GPTNeoSelfAttention, "_attn",
         in_model_dtype(modeling_gpt_neo.GPTNeoSelfAttention._attn, torch)),
        (modeling_gptj, "eager_attention_forward",
         in_model_dtype(modeling_gptj.eager_attention_forward, torch)),
        (modeling_gptj, "create_sinusoidal_positions", sinusoidal_positions),
        (modeling_llama.LlamaRotaryEmbedding, "forward", float64_rotary_forward()),
        (modeling_gpt_neox.GPTNeoXRotaryEmbedding, "forward", float64_rotary_forward()),
        (modeling_cohere.CohereRotaryEmbedding, "forward", float64_rotary_forward(interleaved=True)),
        (modeling_llama.LlamaRMSNorm, "forward", rmsnorm),
        (modeling_cohere.CohereLayerNorm, "forward", cohere_layernorm),
    ]


def _mistral_qwen_phi_patches(rotary_forward, rmsnorm_forward):
    """Patch 8: Llama's rotary-table and RMSNorm patches on the families' own classes."""
    from transformers.models.mistral import modeling_mistral
    from transformers.models.phi3 import modeling_phi3
    from transformers.models.qwen2 import modeling_qwen2
    from transformers.models.qwen3 import modeling_qwen3

    patches = []
    for module, prefix in ((modeling_mistral, "Mistral"), (modeling_qwen2, "Qwen2"),
                           (modeling_qwen3, "Qwen3"), (modeling_phi3, "Phi3")):
        patches.append((getattr(module, f"{prefix}RotaryEmbedding"), "forward", rotary_forward))
        patches.append((getattr(module, f"{prefix}RMSNorm"), "forward", rmsnorm_forward))
    return patches


def float64_patches(model_type: str) -> list:
    """The patched pieces of ``model_type``'s transformers modeling code, as
    ``module.Owner.attribute`` strings (empty for an unknown model_type)."""
    import transformers

    from .hf_checkpoint import ARCHITECTURES

    if model_type not in ARCHITECTURES:
        return []
    modeling = getattr(transformers, ARCHITECTURES[model_type]).__module__
    names = []
    for owner, attribute, _ in _patches():
        module = owner.__name__ if isinstance(owner, types.ModuleType) else owner.__module__
        if module == modeling:
            where = "" if isinstance(owner, types.ModuleType) else f"{owner.__name__}."
            names.append(f"{module.rsplit('.', 1)[-1]}.{where}{attribute}")
    return names


def float64_patches_line(path: str) -> str:
    """One line for ``npformer compare --hf path``: which float32 pieces of transformers were
    recomputed in float64 for the checkpoint's model_type."""
    import os

    from .hf_checkpoint import _read_json

    model_type = _read_json(os.path.join(path, "config.json")).get("model_type")
    names = float64_patches(model_type)
    if not names:
        return f"float64 reference: transformers' {model_type} code ran unpatched"
    return (f"float64 reference: transformers' {model_type} code with its float32 pieces "
            f"recomputed in float64 (same formulas): {', '.join(names)}")


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
