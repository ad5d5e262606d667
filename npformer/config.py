"""``ModelConfig``: one dataclass whose fields are the switches of the lineage.

Every architecture from the 2017 Transformer to Llama 3 is a value of this class (the presets
in :mod:`npformer.presets` are each their parent plus the fields that changed). A field that
names a convention says which model uses which value, so the config doubles as a map of
where the models differ.

``validate()`` (run by the constructor and by ``replace``) raises a ``ValueError`` naming
the field, its value and what would be valid for every impossible combination: heads not
divisible by kv heads, an odd rotary dim, a window on an encoder, biased GLU, ...
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

FFN_TYPES = ("relu", "gelu", "gelu_tanh", "swiglu", "geglu", "geglu_tanh")
GLU_TYPES = ("swiglu", "geglu", "geglu_tanh")
NORM_TYPES = ("layernorm", "rmsnorm")
NORM_PLACEMENTS = ("post", "pre")
BLOCK_LAYOUTS = ("sequential", "parallel")
POSITION_TYPES = ("sinusoidal", "learned", "rope", "none")
ROPE_LAYOUTS = ("half", "interleaved")
# RoPE frequency schedules (transformers' rope_parameters["rope_type"]; maths in
# npformer.functional.rope.rope_frequencies). "default" is the unscaled RoPE of RoFormer / Llama.
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
# The rope_* scaling fields each type reads; any other one set away from its default is refused.
ROPE_SCALING_DEFAULTS = dict(rope_factor=1.0, rope_original_max_seq_len=None,
                             rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                             rope_beta_fast=32.0, rope_beta_slow=1.0, rope_truncate=True,
                             rope_attention_factor=None)
ROPE_TYPE_FIELDS = {
    "default": (),
    "linear": ("rope_factor",),
    "dynamic": ("rope_factor", "rope_original_max_seq_len"),
    "yarn": ("rope_factor", "rope_original_max_seq_len", "rope_beta_fast", "rope_beta_slow",
             "rope_truncate", "rope_attention_factor"),
    "llama3": ("rope_factor", "rope_original_max_seq_len", "rope_low_freq_factor",
               "rope_high_freq_factor"),
}
ATTENTION_KINDS = ("dense", "local")
SOFTMAX_TYPES = ("softmax", "softmax1", "clipped", "sink")
ARCHITECTURES = ("decoder", "encoder-decoder")
DTYPES = ("float64", "float32")
ATTENTION_IMPLS = ("numba", "numpy")
LAYER_IMPLS = ("numba", "numpy")


def check_impl(impl) -> str:
    """A module's or optimizer's ``impl``: "numba" (the fused kernels) or "numpy" (the
    functional pairs), as ``ModelConfig.layer_impl``."""
    if impl not in LAYER_IMPLS:
        raise ValueError(f"impl must be one of {list(LAYER_IMPLS)} (ModelConfig.layer_impl), "
                         f"got {impl!r}")
    return impl

# The largest model a config may describe: a trillion parameters (4 TB in float32). Far above
# what a NumPy model trains, it exists to refuse absurd sizes (vocab_size=10**13, a typo'd
# n_layers) with the size they would need, before any array is allocated; whether a smaller
# model fits this machine is checked where it is built for training (npformer.train).
MAX_PARAMETERS = 10**12


def _divisors(n: int, shown: int = 16):
    """The divisors of n, for an error message: all of them, or the first ``shown`` (at most
    10⁶ trial divisions, so an absurd n answers at once)."""
    small, large, d = [], [], 1
    while d * d <= n and len(small) < shown and d <= 10**6:
        if n % d == 0:
            small.append(d)
            if d * d != n:
                large.append(n // d)
        d += 1
    if len(small) >= shown or d * d <= n:
        return f"{small} ... (divisors of {n})"
    return small + large[::-1]


def _fail(field_name: str, value, valid: str) -> None:
    raise ValueError(f"config field {field_name}={value!r} is invalid: {valid}")


@dataclass(frozen=True)
class ModelConfig:
    """The switches. Shapes: V vocab_size, C d_model, H n_heads, K n_kv_heads, D head_dim,
    F d_ff, L n_layers."""

    # --- what kind of model -------------------------------------------------------------
    architecture: str = "decoder"  # "decoder" (GPT-1 onward) or "encoder-decoder" (2017)
    vocab_size: int = 65  # V (65 = the characters of the shipped Shakespeare corpus)
    d_model: int = 128  # C, the residual stream width
    n_layers: int = 4  # L (decoder layers; for the encoder-decoder, the decoder's)
    n_encoder_layers: Optional[int] = None  # encoder-decoder only; None = n_layers
    max_seq_len: int = 256  # longest sequence (size of a learned position table)

    # --- attention ----------------------------------------------------------------------
    n_heads: int = 4  # H
    n_kv_heads: Optional[int] = None  # K: None = H (MHA); 1 = multi-query (PaLM); 1<K<H GQA (Llama 2)
    head_dim: Optional[int] = None  # D: None = C // H
    attention_pattern: Tuple[str, ...] = ("dense",)  # cycled over layers: GPT-3 ("dense", "local")
    window: Optional[int] = None  # keys per query in a "local" layer: i − w < j ≤ i
    attention_scale: Optional[float] = None  # None = 1/√D; GPT-Neo uses 1.0 (no scaling)
    # "softmax", "softmax1" (off by one), "clipped" (Bondarenko et al.), "sink" (a learned
    # logit per head, parameter attn.sinks (H,) initialised to 0 = softmax₁; gpt-oss)
    softmax: str = "softmax"
    clip_gamma: float = -0.03  # clipped softmax: stretch p to (ζ − γ) p + γ, then clip to [0, 1]
    clip_zeta: float = 1.0
    # clipped softmax, length-aware: γ_i = −clip_alpha / n_i, n_i the keys query i may see
    # (causal: i + 1), instead of clip_gamma; None = the fixed clip_gamma
    clip_alpha: Optional[float] = None
    attention_softcap: Optional[float] = None  # cap · tanh(scores / cap) (Gemma 2), None = off
    document_mask: bool = False  # Llama 3: train on packed documents, no attention across them
    # Gated attention (Bondarenko et al. 2023): each head's output times σ(x_h · w_h + b_h), x_h
    # the head's C/H slice of the attention's input (parameters attn.gate_weight (H, C/H),
    # attn.gate_bias (H,)); needs d_model % n_heads == 0; decoder only.
    attention_gate: bool = False
    attention_gate_init: float = 0.25  # the initial gate value σ(b), in (0, 1) (the paper's OPT)
    # "numba": the fused, tiled kernels of npformer.kernels.flash_attention (no T×S matrix;
    # the clipped softmax falls back to the reference); "numpy": the readable reference,
    # npformer.functional.attention. Same results to rounding; a choice of speed, not of model.
    attention_impl: str = "numba"
    # Every other layer of a training step, the same choice: "numba" runs the fused kernels of
    # npformer.kernels (norms, activations, RoPE, the softmax–cross-entropy head, AdamW over
    # flat buffers) with the products on 2-D views and the finite-value checks done once per
    # step; "numpy" runs the functional pairs, each checking its own inputs. Same results to
    # rounding (tested); layer_impl="numpy" with attention_impl="numpy" is the fully readable
    # path to step through in a debugger.
    layer_impl: str = "numba"

    # --- positions ----------------------------------------------------------------------
    positions: str = "learned"  # "sinusoidal" (2017), "learned" (GPT-1..GPT-Neo), "rope", "none"
    rope_theta: float = 10000.0  # Llama 3: 500000
    rotary_dim: Optional[int] = None  # dims of each head rotated; None = all (GPT-J: 64 of 256)
    rope_layout: str = "half"  # "interleaved" pairs (0,1),(2,3).. (GPT-J); "half" (NeoX, Llama)
    # RoPE scaling (transformers' rope_parameters; the schedules are derived in
    # npformer.functional.rope). Each type reads only its own fields (ROPE_TYPE_FIELDS).
    rope_type: str = "default"  # "default", "linear", "dynamic" (NTK), "yarn", "llama3" (Llama 3.1)
    rope_factor: float = 1.0  # linear: angles of position m/factor; dynamic: NTK factor; yarn, llama3
    # yarn / llama3: original_max_position_embeddings (the pre-training length); dynamic: the
    # length up to which nothing is scaled (transformers' max_position_embeddings for that type)
    rope_original_max_seq_len: Optional[int] = None
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths above L0/low are divided by factor
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths below L0/high are kept
    rope_beta_fast: float = 32.0  # yarn: rotations at L0 above which a pair is kept (extrapolated)
    rope_beta_slow: float = 1.0  # yarn: rotations at L0 below which a pair is interpolated
    rope_truncate: bool = True  # yarn: floor/ceil the correction range to whole pairs
    rope_attention_factor: Optional[float] = None  # yarn: multiplies cos and sin; None = 0.1 ln(factor) + 1

    # --- feed-forward -------------------------------------------------------------------
    ffn: str = "gelu"  # "relu" (2017), "gelu" exact (NeoX), "gelu_tanh" (GPT-1/2), "swiglu", "geglu"
    # (exact GeLU gate), "geglu_tanh" (tanh-GeLU gate: Gemma's gelu_pytorch_tanh)
    d_ff: Optional[int] = None  # F: None = ffn_multiplier · C rounded up to ffn_multiple_of
    ffn_multiplier: Optional[float] = None  # None: 4 (plain FFN), 8/3 (GLU, Llama); PaLM: 4
    ffn_multiple_of: int = 1  # GLU width rounding (Llama rounds up to a multiple of 256)

    # --- normalisation and block layout --------------------------------------------------
    norm: str = "layernorm"  # "layernorm" or "rmsnorm" (Llama)
    norm_eps: float = 1e-5  # inside the square root; Llama 1: 1e-6, Llama 2/3: 1e-5
    norm_bias: bool = True  # LayerNorm's additive bias (PaLM: none); RMSNorm never has one
    norm_placement: str = "pre"  # "post" (2017, GPT-1: norm after the residual add) or "pre"
    block: str = "sequential"  # "sequential" or "parallel": x + attn(n(x)) + ffn(n(x)) (GPT-J)
    parallel_norms: int = 1  # parallel block: 1 shared norm (GPT-J, PaLM) or 2 (GPT-NeoX)
    final_norm: bool = True  # a norm before the head (GPT-2 onward; not 2017 or GPT-1)
    # Gemma: every RMSNorm of the model (the q/k norms included) scales by (1 + w), w
    # initialised to 0, instead of by w initialised to 1. Needs norm="rmsnorm".
    norm_unit_offset: bool = False
    # Gemma 2: each branch output is normalised before its residual add,
    # x + n_post(branch(n_pre(x))) (parameters attn_post_norm, ffn_post_norm). Needs
    # norm_placement="pre", block="sequential", architecture="decoder".
    sandwich_norm: bool = False
    # Qwen3, Gemma 3: an RMSNorm (eps = norm_eps) over each head's D channels of q and of k,
    # one weight (D,) each shared by all heads (q_norm, k_norm), after the projections and
    # before RoPE. Decoder only.
    qk_norm: bool = False

    # --- biases, embeddings, head -------------------------------------------------------
    qkv_bias: bool = True  # GPT-2, NeoX: yes; GPT-Neo, GPT-J, PaLM, Llama: no
    out_bias: bool = True  # attention output projection (GPT-Neo: yes; GPT-J: no)
    ffn_bias: bool = True  # FFN linears (GPT-J: yes; PaLM, Llama: no; GLU: never here)
    lm_head_bias: bool = False  # GPT-J's head has a bias
    tie_embeddings: bool = True  # head weight = token embedding (GPT-1/2, PaLM; not GPT-J/NeoX/Llama)
    scale_embeddings: bool = False  # multiply token embeddings by √C (2017)
    logit_scale: float = 1.0  # logits multiplied by this (Cohere's logit_scale)
    # Gemma 2: logits = cap · tanh(z / cap), z the head's output after logit_scale; None = off
    final_logit_softcap: Optional[float] = None
    padding_idx: Optional[int] = None  # a token whose embedding row gets no gradient

    # --- training-time ------------------------------------------------------------------
    dropout: float = 0.0  # on embeddings and on each branch output before its residual add
    init_std: float = 0.02  # N(0, std²) for every weight matrix
    scaled_residual_init: bool = False  # GPT-2: residual output projections std / √(2L)
    dtype: str = "float64"  # "float64" (gradient checks) or "float32"

    def __post_init__(self) -> None:
        # tuples from lists (JSON) so the frozen config stays hashable
        object.__setattr__(self, "attention_pattern", tuple(self.attention_pattern))
        self.validate()

    # ---- derived sizes ------------------------------------------------------------------

    @property
    def kv_heads(self) -> int:
        """K, with None resolved to H."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_size(self) -> int:
        """D, with None resolved to C // H."""
        return self.d_model // self.n_heads if self.head_dim is None else self.head_dim

    @property
    def ffn_width(self) -> int:
        """F. Default 4C; for a GLU (8/3)·C, so its three matrices cost what two 4C ones do
        (Llama), rounded up to a multiple of ``ffn_multiple_of`` (Llama's ``multiple_of``)."""
        if self.d_ff is not None:
            return self.d_ff
        if self.ffn_multiplier is not None:
            width = int(self.ffn_multiplier * self.d_model)
        elif self.ffn in GLU_TYPES:
            width = int(2 * (4 * self.d_model) / 3)  # Llama: int(2 · 4C / 3)
        else:
            width = 4 * self.d_model
        m = self.ffn_multiple_of
        return max(m * ((width + m - 1) // m), 1)

    @property
    def encoder_layers(self) -> int:
        return self.n_layers if self.n_encoder_layers is None else self.n_encoder_layers

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    def layer_window(self, layer: int) -> Optional[int]:
        """The window of decoder layer ``layer``: None for a dense layer."""
        kind = self.attention_pattern[layer % len(self.attention_pattern)]
        return self.window if kind == "local" else None

    def replace(self, **changes) -> "ModelConfig":
        """A copy with some fields changed (validated); unknown field names are refused."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"unknown config field(s) {unknown}; valid fields: "
                             f"{[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["attention_pattern"] = list(self.attention_pattern)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown config field(s) {unknown}")
        return cls(**d)

    # ---- validation ---------------------------------------------------------------------

    def validate(self) -> None:
        self._check_choices()
        self._check_finite_floats()
        self._check_sizes()
        self._check_attention()
        self._check_attention_gate()
        self._check_positions()
        self._check_combinations()
        self._check_parameter_count()

    def _check_finite_floats(self) -> None:
        """Every float field, used by this config or not, is a finite number (or None where
        optional): a NaN theta or an infinite soft-cap would only show up as NaN logits."""
        for f in dataclasses.fields(self):
            if f.type not in ("float", "Optional[float]"):
                continue
            value = getattr(self, f.name)
            if value is None and f.type == "Optional[float]":
                continue
            if isinstance(value, (bool, np.bool_)) or not isinstance(
                    value, (int, float, np.integer, np.floating)) or not np.isfinite(float(value)):
                _fail(f.name, value, "must be a finite number"
                      + (" or None" if f.type == "Optional[float]" else ""))

    def _check_parameter_count(self) -> None:
        from .models.stats import parameter_count

        n = parameter_count(self)
        if n > MAX_PARAMETERS:
            from ._validate import format_bytes

            raise ValueError(
                f"config describes {n:.3g} parameters (vocab_size={self.vocab_size}, "
                f"d_model={self.d_model}, n_layers={self.n_layers}, max_seq_len="
                f"{self.max_seq_len}, d_ff={self.ffn_width}), which would need "
                f"{format_bytes(n * self.np_dtype.itemsize)} of memory in {self.dtype}; "
                f"the limit is {MAX_PARAMETERS:.0e} parameters")

    def _check_choices(self) -> None:
        for name, valid in (("architecture", ARCHITECTURES), ("ffn", FFN_TYPES),
                            ("norm", NORM_TYPES), ("norm_placement", NORM_PLACEMENTS),
                            ("block", BLOCK_LAYOUTS), ("positions", POSITION_TYPES),
                            ("rope_layout", ROPE_LAYOUTS), ("rope_type", ROPE_TYPES),
                            ("softmax", SOFTMAX_TYPES),
                            ("dtype", DTYPES), ("attention_impl", ATTENTION_IMPLS),
                            ("layer_impl", LAYER_IMPLS)):
            value = getattr(self, name)
            if value not in valid:
                _fail(name, value, f"choose one of {list(valid)}")
        for name in ("qkv_bias", "out_bias", "ffn_bias", "lm_head_bias", "norm_bias",
                     "tie_embeddings", "scale_embeddings", "final_norm", "document_mask",
                     "scaled_residual_init", "norm_unit_offset", "sandwich_norm", "qk_norm",
                     "rope_truncate", "attention_gate"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                _fail(name, getattr(self, name), "must be True or False")

    def _check_sizes(self) -> None:
        def positive_int(name, value, minimum=1):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
                _fail(name, value, f"must be an integer ≥ {minimum}")

        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "ffn_multiple_of"):
            positive_int(name, getattr(self, name))
        for name in ("n_kv_heads", "head_dim", "d_ff", "n_encoder_layers"):
            if getattr(self, name) is not None:
                positive_int(name, getattr(self, name))
        if self.head_dim is None and self.d_model % self.n_heads:
            _fail("n_heads", self.n_heads,
                  f"d_model={self.d_model} is not divisible by it; set head_dim explicitly or "
                  f"choose n_heads among {_divisors(self.d_model)}")
        if self.n_heads % self.kv_heads:
            _fail("n_kv_heads", self.n_kv_heads,
                  f"n_heads={self.n_heads} must be divisible by it; valid: "
                  f"{_divisors(self.n_heads)}")
        if self.ffn_multiplier is not None and not (
                isinstance(self.ffn_multiplier, (int, float)) and self.ffn_multiplier > 0):
            _fail("ffn_multiplier", self.ffn_multiplier, "must be None or a number > 0")
        for name in ("norm_eps", "init_std", "logit_scale"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not np.isfinite(value) or value <= 0:
                _fail(name, value, "must be a finite number > 0")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            _fail("dropout", self.dropout, "must be a probability in [0, 1)")
        if self.padding_idx is not None and not (
                isinstance(self.padding_idx, (int, np.integer)) and 0 <= self.padding_idx < self.vocab_size):
            _fail("padding_idx", self.padding_idx, f"must be None or an id in [0, {self.vocab_size})")

    def _check_attention(self) -> None:
        if not self.attention_pattern:
            _fail("attention_pattern", self.attention_pattern, "give at least one of 'dense', 'local'")
        for kind in self.attention_pattern:
            if kind not in ATTENTION_KINDS:
                _fail("attention_pattern", self.attention_pattern,
                      f"entries must be among {list(ATTENTION_KINDS)}, got {kind!r}")
        has_local = "local" in self.attention_pattern
        if has_local and (self.window is None or isinstance(self.window, bool)
                          or not isinstance(self.window, (int, np.integer)) or self.window < 1):
            _fail("window", self.window, "a 'local' layer in attention_pattern needs an integer window ≥ 1")
        if not has_local and self.window is not None:
            _fail("window", self.window, "no layer is 'local' in attention_pattern; set window=None "
                  "or add 'local' to attention_pattern")
        if self.attention_scale is not None and not (
                isinstance(self.attention_scale, (int, float)) and np.isfinite(self.attention_scale)
                and self.attention_scale > 0):
            _fail("attention_scale", self.attention_scale, "must be None (1/√D) or a number > 0")
        for name in ("attention_softcap", "final_logit_softcap"):
            cap = getattr(self, name)
            if cap is not None and not (isinstance(cap, (int, float)) and not isinstance(cap, bool)
                                        and cap > 0):
                _fail(name, cap, "must be None (no cap) or a number > 0")
        if self.softmax == "clipped":
            from .functional.softmax_variants import check_clip_range

            check_clip_range(self.clip_gamma, self.clip_zeta, "clip_gamma", "clip_zeta")
        if self.clip_alpha is not None:
            if self.softmax != "clipped":
                _fail("clip_alpha", self.clip_alpha, "the length-aware γ = −clip_alpha / n is "
                      f"only used with softmax='clipped' (softmax={self.softmax!r}); set "
                      "clip_alpha=None")
            if isinstance(self.clip_alpha, bool) or not isinstance(
                    self.clip_alpha, (int, float, np.integer, np.floating)) \
                    or not np.isfinite(self.clip_alpha) or self.clip_alpha <= 0:
                _fail("clip_alpha", self.clip_alpha, "must be None or a finite number > 0")

    def _check_attention_gate(self) -> None:
        init = self.attention_gate_init
        if not 0.0 < init < 1.0:
            _fail("attention_gate_init", init, "the initial gate value σ(gate_bias) must lie "
                  "strictly inside (0, 1) (Bondarenko et al.: 0.25)")
        if not self.attention_gate:
            if init != 0.25:
                _fail("attention_gate_init", init, "only read with attention_gate=True; leave "
                      "it at its default 0.25")
            return
        if self.d_model % self.n_heads:
            _fail("attention_gate", self.attention_gate,
                  f"the gate reads each head's d_model/n_heads slice of x, but d_model="
                  f"{self.d_model} is not divisible by n_heads={self.n_heads}; choose n_heads "
                  f"among {_divisors(self.d_model)}")
        if self.architecture != "decoder":
            _fail("attention_gate", self.attention_gate, "decoder only (not wired through the "
                  f"encoder-decoder); architecture={self.architecture!r}")

    def _check_positions(self) -> None:
        if self.positions == "sinusoidal" and self.d_model % 2:
            _fail("d_model", self.d_model, "sinusoidal positions need an even d_model")
        if self.positions != "rope":
            if self.rotary_dim is not None:
                _fail("rotary_dim", self.rotary_dim, f"only used with positions='rope' "
                      f"(positions={self.positions!r}); set rotary_dim=None")
            if self.rope_type != "default":
                _fail("rope_type", self.rope_type, f"only used with positions='rope' "
                      f"(positions={self.positions!r}); set rope_type='default'")
            self._check_rope_scaling_fields_unused(())
            return
        if not isinstance(self.rope_theta, (int, float)) or self.rope_theta <= 0:
            _fail("rope_theta", self.rope_theta, "must be a number > 0")
        rotary = self.head_size if self.rotary_dim is None else self.rotary_dim
        if isinstance(rotary, bool) or not isinstance(rotary, (int, np.integer)) or rotary < 2 \
                or rotary % 2 or rotary > self.head_size:
            _fail("rotary_dim", self.rotary_dim,
                  f"RoPE rotates pairs: need an even number in [2, head_dim={self.head_size}]"
                  + (" (head_dim is odd: set an even rotary_dim < head_dim)" if self.rotary_dim is None else ""))
        self._check_rope_scaling()

    def _check_rope_scaling_fields_unused(self, read) -> None:
        """Every rope_* scaling field that this config's rope_type does not read (``read``)
        stays at its default: a factor set for the default RoPE would otherwise be ignored."""
        for name, default in ROPE_SCALING_DEFAULTS.items():
            value = getattr(self, name)
            changed = value is not None if default is None else value != default
            if name not in read and changed:
                users = [t for t, fields in ROPE_TYPE_FIELDS.items() if name in fields]
                where = (f"positions={self.positions!r}" if self.positions != "rope"
                         else f"rope_type={self.rope_type!r}")
                _fail(name, value, f"not read with {where} (only with positions='rope' and "
                      f"rope_type in {users}); leave it at its default {default!r}")

    def _check_rope_scaling(self) -> None:
        """The fields of the RoPE frequency schedule ``rope_type`` (transformers' required
        keys and ranges, as errors where transformers only warns)."""
        read = ROPE_TYPE_FIELDS[self.rope_type]
        self._check_rope_scaling_fields_unused(read)
        if "rope_factor" in read and not self.rope_factor >= 1.0:
            _fail("rope_factor", self.rope_factor, f"rope_type={self.rope_type!r} needs a "
                  "scaling factor ≥ 1 (1 = no scaling)")
        if "rope_original_max_seq_len" in read:
            original = self.rope_original_max_seq_len
            if isinstance(original, bool) or not isinstance(original, (int, np.integer)) \
                    or original < 1:
                _fail("rope_original_max_seq_len", original, f"rope_type={self.rope_type!r} "
                      "needs the original (pre-training) length: an integer ≥ 1")
        if self.rope_type == "dynamic" and (self.rotary_dim or self.head_size) == 2:
            _fail("rotary_dim", self.rotary_dim, "rope_type='dynamic' needs a rotary dim ≥ 4: its "
                  "base exponent d/(d−2) divides by zero at d = 2 (transformers raises "
                  "ZeroDivisionError)")
        if self.rope_type == "llama3":
            if not self.rope_low_freq_factor > 0:
                _fail("rope_low_freq_factor", self.rope_low_freq_factor, "must be > 0 (Llama 3.1: 1)")
            if not self.rope_high_freq_factor > self.rope_low_freq_factor:
                _fail("rope_high_freq_factor", self.rope_high_freq_factor,
                      f"must be > rope_low_freq_factor={self.rope_low_freq_factor} (Llama 3.1: 4); "
                      "the smooth interpolation divides by their difference")
        if self.rope_type == "yarn":
            if not self.rope_beta_slow > 0:
                _fail("rope_beta_slow", self.rope_beta_slow, "must be > 0 (YaRN: 1)")
            if not self.rope_beta_fast >= self.rope_beta_slow:
                _fail("rope_beta_fast", self.rope_beta_fast,
                      f"must be ≥ rope_beta_slow={self.rope_beta_slow} (YaRN: 32)")
            if self.rope_attention_factor is not None and not self.rope_attention_factor > 0:
                _fail("rope_attention_factor", self.rope_attention_factor,
                      "must be None (0.1·ln(factor) + 1) or a number > 0")

    def _check_combinations(self) -> None:
        if self.ffn in GLU_TYPES and self.ffn_bias:
            _fail("ffn_bias", self.ffn_bias, f"the {self.ffn} FFN here has no biases (PaLM, Llama); "
                  "set ffn_bias=False")
        if self.norm == "rmsnorm" and self.norm_bias:
            _fail("norm_bias", self.norm_bias, "RMSNorm has no bias; set norm_bias=False")
        if self.norm_unit_offset and self.norm != "rmsnorm":
            _fail("norm_unit_offset", self.norm_unit_offset,
                  f"the (1 + w) scale is Gemma's RMSNorm; it needs norm='rmsnorm' "
                  f"(norm={self.norm!r})")
        if self.sandwich_norm:
            for name, needed in (("norm_placement", "pre"), ("block", "sequential"),
                                 ("architecture", "decoder")):
                if getattr(self, name) != needed:
                    _fail("sandwich_norm", self.sandwich_norm,
                          f"the sandwich block (Gemma 2) needs {name}={needed!r}, "
                          f"got {name}={getattr(self, name)!r}")
        if self.qk_norm and self.architecture != "decoder":
            _fail("qk_norm", self.qk_norm, "decoder only (Qwen3, Gemma 3); architecture="
                  f"{self.architecture!r}")
        if self.block == "parallel":
            if self.norm_placement != "pre":
                _fail("block", self.block, "the parallel block (GPT-J, NeoX, PaLM) is pre-norm; "
                      "set norm_placement='pre'")
            if self.parallel_norms not in (1, 2):
                _fail("parallel_norms", self.parallel_norms, "1 (GPT-J, PaLM) or 2 (GPT-NeoX)")
            if self.architecture == "encoder-decoder":
                _fail("block", self.block, "the encoder-decoder has sequential blocks only")
        if self.architecture == "encoder-decoder":
            if "local" in self.attention_pattern:
                _fail("attention_pattern", self.attention_pattern,
                      "the encoder-decoder supports dense attention only")
            if self.positions == "rope":
                _fail("positions", self.positions, "the encoder-decoder takes 'sinusoidal', "
                      "'learned' or 'none' (RoPE is not wired through cross-attention)")
            if self.document_mask:
                _fail("document_mask", self.document_mask, "decoder-only (Llama 3)")
        elif self.n_encoder_layers is not None:
            _fail("n_encoder_layers", self.n_encoder_layers, "only for architecture='encoder-decoder'")


def config_field_names() -> Tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(ModelConfig))


__all__ = ["ModelConfig", "config_field_names"]
