"""One training step: npformer's ``Trainer.train_step`` vs the same model in torch eager.

    python benchmarks/train_step.py [--quick] [--presets gpt2,llama3,transformer-2017]
        [--sizes default,384] [--repeats N] [--json PATH] [--layer-impl NAME | --compare-impls]
        [--no-memory] [--profile-steps N]

Configurations: each preset (gpt2, llama3, transformer-2017) at two sizes, float32:

- ``default``: the preset's own sizes (C = 128, 4 layers, 4 heads), B = 16, T = 128;
- ``384``:     C = 384, 6 layers, 6 heads, B = 8, T = 256 (llama3 keeps its 2 K/V heads;
               transformer-2017 has 6 encoder and 6 decoder layers).

Vocabulary: npformer's character tokenizer on the shipped Shakespeare (V = 65); both
contenders see the same shapes. Every contender runs with 2 threads (torch.set_num_threads,
numba.set_num_threads, BLAS through threadpoolctl); torch is imported before numba starts
its threads (see attention.py: a shared libgomp slowed torch ~30× otherwise), and
``OMP_WAIT_POLICY=PASSIVE`` is set for the process unless given (torch's idle OpenMP threads
spinning next to numba's kernels made the npformer step 2.8× slower in this process than in
``npformer train``, which never imports torch; torch's own step time did not change).

Contenders (one row each per configuration):

- ``npformer``: exactly what ``npformer train`` runs — a ``Trainer`` built from
  ``TrainOptions(preset, batch_size=B, seq_len=T, model_overrides=sizes)`` into a temporary
  run directory, timed on ``trainer.train_step()`` (batch sampling, forward, cross-entropy,
  backward, clip_grad_norm(1.0), AdamW(lr 3e-3, weight decay 0.1 on the 2-D weights except
  the embeddings)). With ``--layer-impl NAME`` the config field ``layer_impl`` is set (only
  if ModelConfig has that field); ``--compare-impls`` runs ``npformer[numba]`` and
  ``npformer[numpy]`` side by side in the same rounds.
- ``torch``: the same model in torch eager, random weights from config objects, no download:
  gpt2 → transformers ``GPT2LMHeadModel``, llama3 → ``LlamaForCausalLM`` (HF config from
  npformer's own mapping ``interop.hf_config.hf_config_from_config``; attention "sdpa"; for
  llama3 the document mask of the same packed batch is passed as a 4-D boolean mask, as
  npformer applies it), transformer-2017 → ``torch.nn.Transformer`` (post-LN, ReLU) with
  npformer's stack weights (``interop.torch_transformer``), a shared embedding × √C,
  sinusoidal positions and the tied head, as in ``interop.torch_reference``. One step:
  ``zero_grad``, forward, ``F.cross_entropy``, ``backward``, ``clip_grad_norm_(1.0)``,
  ``torch.optim.AdamW`` (lr 3e-3, weight decay 0.1 on the same kind of parameters: 2-D,
  not an embedding), ``loss.item()``. One fixed batch (from npformer's sampler) every step.
- ``floor``: the products-alone floor — the step's matrix products in NumPy, nothing else
  (no softmax, norms, activations, optimizer), on preallocated arrays (``out=``), BLAS 2
  threads. Count rule, N = B·T rows (the encoder's B·S too; S = T here):
    * every linear layer (each 2-D weight W (out, in) but the embedding tables): forward
      x @ Wᵀ (N, in)·(in, out), backward dy @ W (N, out)·(out, in) and dyᵀ @ x
      (out, N)·(N, in), all on 2-D arrays (3 products);
    * a tied output head (gpt2, transformer-2017): the same 3 products against the token
      table, x @ Eᵀ (N, C)·(C, V), dlogits @ E and dlogitsᵀ @ x (an untied ``lm_head`` is a
      linear layer above);
    * every attention (per layer; the decoder's self- and cross-attention, the encoder's
      self-attention): 7 batched products per query head — QKᵀ and PV forward, and 5
      backward (QKᵀ recomputed, dP = dO·Vᵀ, dV = Pᵀ·dO, dQ = dS·K, dK = dSᵀ·Q), each
      (T, D)·(D, T) or (T, T)·(T, D), over B·H heads for a dense mask (the encoder and the
      cross-attention) and over ⌈B·H/2⌉ heads for a causal mask (causal density: half of
      the (query, key) pairs). The document mask of llama3 is counted at causal density
      (it skips more pairs, data-dependent; the floor does not subtract them).
  Weights and activations of one shape are reused across layers (a floor: better cache
  reuse than the real step). This is the time this design — NumPy's BLAS for every
  product — cannot go below.

Columns: ``median ms`` / ``min ms`` of one step over the repeats; rounds are interleaved
(each round runs every contender once, in the same order, each after a pause that lets
the previous contender's threads go idle), after 2 warm-up steps each. ``tok/s`` = B·T /
median (for transformer-2017 the T target tokens per row, as ``npformer train`` counts).
``/ torch`` = median / torch's median (``min/t``: the same for the minima, less
sensitive to a busy shared machine); ``/ floor`` = median / the floor's median.
``GFLOP/s``: the floor's product flops (2·m·n·k each) / median. ``peak RSS`` (MiB): the
peak resident set (``VmHWM``) of a FRESH child process per contender and configuration
that imports only what that contender needs, builds it, and runs 1 warm-up + 3 steps —
process totals, interpreter and libraries included (the peak is reset through
/proc/self/clear_refs once the contender is built, after freeing the temporary npformer
Trainer the torch contender takes its config and batch from); ``RSS rise`` = that peak
minus the child's RSS after its imports, before building the model (the step's own
memory, weights and optimizer state included). The machine's load average (1 min) is
recorded before and after each configuration: on a shared 2-core machine other
processes' load inflates every 2-thread contender, the medians most.

Breakdown (npformer rows): cProfile over ``--profile-steps`` steps (default 3) after the
timing, every function's own time (``tottime``) given to a category by its file and name;
the time of C functions (BLAS matmul, ufuncs, numba kernels called through their
dispatcher) goes to their Python callers in proportion to the time spent under each (from
pstats' caller table), so ``np.matmul`` inside functional/linear.py counts as linear.
Categories by keyword in the file path / function: linear, norm (layernorm/rmsnorm),
activation (gelu/glu/silu/relu/erf), attention (attention, flash, softmax, rope, mask),
embedding (embedding, positions), dropout/residual, cross-entropy, optimizer (optim.py),
clip (clip_grad_norm), validation (_validate.py), model glue (models/, nn/module.py, the
blocks), trainer (train.py, dataset.py), other. Percentages of the profiled time
(profiling slows Python-heavy code more than BLAS-heavy code: read them as a guide).

No assertions: this prints figures; the tests check correctness
(tests/test_benchmark_train_step.py checks only that the JSON has its keys and finite
positive numbers).
"""

from __future__ import annotations

import argparse
import cProfile
import ctypes
import datetime
import gc
import json
import math
import os
import platform
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from npformer._machine import cpu_model  # noqa: E402  (after the path: the checkout's npformer)

THREADS = 2
PRESETS = ("gpt2", "llama3", "transformer-2017")
SIZES = {
    # name: (model overrides, B, T)
    "default": ({}, 16, 128),
    "384": (dict(d_model=384, n_layers=6, n_heads=6), 8, 256),
    "tiny": (dict(d_model=32, n_layers=1, n_heads=2), 2, 16),  # for the test; not a default
}
FULL_SIZES = ("default", "384")
LR, WEIGHT_DECAY, GRAD_CLIP = 3e-3, 0.1, 1.0
WARMUP_STEPS = 2
MEMORY_STEPS = 3
LAYER_IMPL_FIELD = "layer_impl"
COMPARED_IMPLS = ("numba", "numpy")


# ---- threads ----------------------------------------------------------------------------------


def limit_threads(torch=None):
    """2 threads for everything: torch's intra-op pool, numba's pool, every BLAS. Returns the
    threadpoolctl limiter (keep a reference: it holds the BLAS limit)."""
    from threadpoolctl import threadpool_limits

    if torch is not None:
        torch.set_num_threads(THREADS)
    import numba

    numba.set_num_threads(THREADS)
    return threadpool_limits(THREADS, user_api="blas")


# ---- npformer ---------------------------------------------------------------------------------


def layer_impl_supported() -> bool:
    from npformer.config import config_field_names

    return LAYER_IMPL_FIELD in config_field_names()


def make_trainer(preset: str, size: str, directory: str, layer_impl=None):
    """The Trainer ``npformer train --preset PRESET`` builds, at the size's overrides."""
    from npformer.train import TrainOptions, Trainer

    overrides, B, T = SIZES[size]
    overrides = dict(overrides)
    if layer_impl is not None:
        overrides[LAYER_IMPL_FIELD] = layer_impl
    options = TrainOptions(preset=preset, out=os.path.join(directory, "run"), steps=10**9,
                           batch_size=B, seq_len=T, lr=LR, weight_decay=WEIGHT_DECAY,
                           grad_clip=GRAD_CLIP, warmup_steps=0, model_overrides=overrides)
    return Trainer(options, progress=False, log=lambda *args, **kwargs: None)


class NpformerContender:
    def __init__(self, preset, size, layer_impl=None):
        self.directory = tempfile.TemporaryDirectory(prefix="npformer-bench-")
        self.trainer = make_trainer(preset, size, self.directory.name, layer_impl)
        self.layer_impl = getattr(self.trainer.config, LAYER_IMPL_FIELD, None)

    def step(self):
        return self.trainer.train_step()["loss"]

    def close(self):
        self.trainer._lock.release()
        self.directory.cleanup()


# ---- torch ------------------------------------------------------------------------------------


def torch_batch(trainer):
    """One batch from the Trainer's own sampler, cut as ``Trainer._forward_loss`` cuts it."""
    batch = trainer.train_sampler.next()
    x, y = batch[0], batch[1]
    if trainer.encoder_decoder:
        T = trainer.options.seq_len
        return dict(src=x[:, :T], tgt=x[:, T - 1:2 * T - 1], targets=y[:, T - 1:2 * T - 1])
    return dict(ids=x, targets=y, doc_ids=batch[2] if len(batch) > 2 else None)


def hf_model(torch, config):
    """GPT2LMHeadModel or LlamaForCausalLM of the npformer config, random weights."""
    import transformers

    from npformer.interop.hf_config import hf_config_from_config

    model_type, cls = {"rmsnorm": ("llama", "LlamaForCausalLM")}.get(
        config.norm, ("gpt2", "GPT2LMHeadModel"))
    hf = hf_config_from_config(config, model_type)
    hf.update(bos_token_id=None, eos_token_id=None)  # GPT-2's 50256 is outside V = 65
    hf_config = transformers.AutoConfig.for_model(**hf)
    torch.manual_seed(0)
    return getattr(transformers, cls)(hf_config).float()


def transformer_2017_module(torch, npformer_model):
    """torch.nn.Transformer with npformer's stack weights + shared embedding, positions and
    the tied head (interop.torch_reference.encoder_decoder_logits, built once)."""
    from npformer.functional.positions import sinusoidal_table
    from npformer.interop.torch_transformer import torch_transformer_state_dict

    config = npformer_model.config
    C = config.d_model

    class Transformer2017(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = torch.nn.Transformer(
                d_model=C, nhead=config.n_heads, num_encoder_layers=config.encoder_layers,
                num_decoder_layers=config.n_layers, dim_feedforward=config.ffn_width,
                dropout=0.0, activation="relu", layer_norm_eps=config.norm_eps,
                batch_first=True, norm_first=False)
            if not config.final_norm:
                self.transformer.encoder.norm = None
                self.transformer.decoder.norm = None
            self.transformer.load_state_dict({k: torch.from_numpy(v) for k, v in
                                              torch_transformer_state_dict(npformer_model).items()})
            table = npformer_model.parameters()["embed.tokens.weight"]
            self.embedding = torch.nn.Parameter(torch.from_numpy(table.copy()))
            self.register_buffer("positions", torch.from_numpy(
                sinusoidal_table(config.max_seq_len * 2, C).astype(np.float32)))

        def forward(self, src, tgt):
            S, T = src.shape[1], tgt.shape[1]
            src = self.embedding[src] * math.sqrt(C) + self.positions[:S]
            tgt = self.embedding[tgt] * math.sqrt(C) + self.positions[:T]
            causal = torch.nn.Transformer.generate_square_subsequent_mask(T)
            out = self.transformer(src, tgt, tgt_mask=causal, tgt_is_causal=True)
            return out @ self.embedding.T

    return Transformer2017()


def decays(name: str, parameter) -> bool:
    """npformer's default_no_decay, on torch names: 2-D weights decay, embeddings do not."""
    return parameter.ndim >= 2 and not any(e in name for e in ("wte", "wpe", "embed"))


class TorchContender:
    def __init__(self, torch, preset, size):
        self.torch = torch
        with tempfile.TemporaryDirectory(prefix="npformer-bench-") as directory:
            trainer = make_trainer(preset, size, directory)  # its config, batch and weights
            try:
                config = trainer.config
                batch = torch_batch(trainer)
                if trainer.encoder_decoder:
                    self.model = transformer_2017_module(torch, trainer.model)
                else:
                    self.model = hf_model(torch, config)
            finally:
                trainer._lock.release()
        self.model.train()
        self.V = config.vocab_size
        self.targets = torch.from_numpy(batch["targets"]).long()
        if "src" in batch:
            self.inputs = dict(src=torch.from_numpy(batch["src"]).long(),
                               tgt=torch.from_numpy(batch["tgt"]).long())
            self.kind = "torch.nn.Transformer"
        else:
            self.inputs = dict(input_ids=torch.from_numpy(batch["ids"]).long())
            if batch["doc_ids"] is not None:  # (B, 1, T, T): same document and causal
                d = torch.from_numpy(batch["doc_ids"])
                T = d.shape[1]
                self.inputs["attention_mask"] = (d[:, None, :, None] == d[:, None, None, :]) \
                    & torch.ones(T, T, dtype=torch.bool).tril()
            self.kind = type(self.model).__name__ + f" ({self.model.config._attn_implementation})"
        named = list(self.model.named_parameters())
        self.parameters = [p for _, p in named]
        self.optimizer = torch.optim.AdamW(
            [dict(params=[p for n, p in named if decays(n, p)], weight_decay=WEIGHT_DECAY),
             dict(params=[p for n, p in named if not decays(n, p)], weight_decay=0.0)], lr=LR)

    def step(self):
        torch = self.torch
        self.optimizer.zero_grad(set_to_none=True)
        out = self.model(**self.inputs)
        logits = out if isinstance(out, torch.Tensor) else out.logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, self.V), self.targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.parameters, GRAD_CLIP)
        self.optimizer.step()
        return loss.item()

    def close(self):
        pass


# ---- the products-alone floor -----------------------------------------------------------------


def floor_products(trainer):
    """[(kind, m, k, n, batch)]: every product of one step (see the module docstring)."""
    config, options = trainer.config, trainer.options
    B, T = options.batch_size, options.seq_len
    N = B * T
    products = []
    params = trainer.model.parameters()
    for name, W in params.items():
        if W.ndim != 2 or name in ("embed.tokens.weight", "embed.position_table"):
            continue
        out, inp = W.shape
        products += [("linear", N, inp, out, 1), ("linear", N, out, inp, 1),
                     ("linear", out, N, inp, 1)]
    if config.tie_embeddings:
        V, C = params["embed.tokens.weight"].shape
        products += [("head", N, C, V, 1), ("head", N, V, C, 1), ("head", V, N, C, 1)]
    H, D = config.n_heads, config.head_size
    dense, causal = B * H, -(-B * H // 2)
    heads = [causal] * config.n_layers  # the decoder's (causal) self-attention
    if trainer.encoder_decoder:
        heads += [dense] * config.encoder_layers + [dense] * config.n_layers  # encoder, cross
    for g in heads:
        products += [("attention", T, D, T, g)] * 3  # QKᵀ, its recomputation, dO·Vᵀ
        products += [("attention", T, T, D, g)] * 4  # PV, Pᵀ·dO, dS·K, dSᵀ·Q
    return products


class FloorContender:
    """The step's products in NumPy on preallocated arrays, BLAS with 2 threads."""

    def __init__(self, trainer):
        self.products = floor_products(trainer)
        self.flops = sum(2 * m * k * n * g for _, m, k, n, g in self.products)
        rng = np.random.default_rng(0)
        self.arrays = {}
        for _, m, k, n, g in self.products:
            if (m, k, n, g) not in self.arrays:
                shape = (g,) if g > 1 else ()
                a = rng.standard_normal(shape + (m, k)).astype(np.float32)
                b = rng.standard_normal(shape + (k, n)).astype(np.float32)
                self.arrays[(m, k, n, g)] = (a, b, np.empty(shape + (m, n), np.float32))
        self.calls = [self.arrays[(m, k, n, g)] for _, m, k, n, g in self.products]

    def step(self):
        for a, b, out in self.calls:
            np.matmul(a, b, out=out)
        return 0.0

    def close(self):
        pass


# ---- the profile breakdown --------------------------------------------------------------------

CATEGORY_RULES = [
    # (category, keywords in "path:function", lower case); first match wins
    ("clip", ("clip_grad_norm",)),
    ("cross-entropy", ("cross_entropy",)),
    ("optimizer", ("optim.py", "adamw")),
    ("validation", ("_validate.py",)),
    ("linear", ("linear",)),
    ("norm", ("layernorm", "rmsnorm", "nn/norm.py", "norm.py")),
    ("activation", ("gelu", "glu", "silu", "relu", "erf", "activation", "feedforward")),
    ("attention", ("attention", "flash", "softmax", "rope", "mask")),
    ("embedding", ("embedding", "positions")),
    ("dropout/residual", ("dropout", "residual")),
    ("model glue", ("npformer/models/", "npformer/nn/")),
    ("trainer", ("train.py", "dataset.py")),
]
CATEGORIES = [c for c, _ in CATEGORY_RULES] + ["other"]


def category_of(function) -> str:
    """The category of one of npformer's own functions (file path and name)."""
    filename, _, name = function
    where = f"{filename.replace(os.sep, '/').lower()}:{name.lower()}"
    for category, keywords in CATEGORY_RULES:
        if any(k in where for k in keywords):
            return category
    return "other"


def is_npformer(function) -> bool:
    return "/npformer/" in function[0].replace(os.sep, "/")


def profile_breakdown(contender, steps: int) -> dict:
    """{category: percent of the profiled time} over ``steps`` npformer steps.

    An npformer function's own time goes to its category; the own time of any other
    function (C calls: BLAS, ufuncs, numba dispatchers; NumPy's Python wrappers) goes to
    its nearest npformer callers, split in proportion to the cumulative time spent under
    each caller (pstats' caller table), recursively."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        contender.step()
    profiler.disable()
    stats = pstats.Stats(profiler).stats
    shares_of = {}

    def shares(function, visiting=frozenset()):
        """{category: fraction} that ``function``'s own time is charged to."""
        if is_npformer(function):
            return {category_of(function): 1.0}
        if function in shares_of:
            return shares_of[function]
        callers = stats[function][4] if function in stats else {}
        weights = {c: v[3] for c, v in callers.items() if c not in visiting}
        total = sum(weights.values())
        if not total:
            result = {"other": 1.0}
        else:
            result = {}
            for caller, weight in weights.items():
                for category, fraction in shares(caller, visiting | {function}).items():
                    result[category] = result.get(category, 0.0) + fraction * weight / total
        if not visiting:
            shares_of[function] = result
        return result

    seconds = dict.fromkeys(CATEGORIES, 0.0)
    for function, (_, _, tottime, _, _) in stats.items():
        for category, fraction in shares(function).items():
            seconds[category] += tottime * fraction
    total = sum(seconds.values()) or 1.0
    return {c: round(100 * s / total, 1) for c, s in seconds.items()}


# ---- memory (child processes) -----------------------------------------------------------------


def _status_mib(key: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process, in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _release_freed_memory() -> None:
    gc.collect()
    try:  # hand freed heap memory back to the system
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def memory_probe(preset, size, contender_name):
    """Child process: build one contender, 1 warm-up + MEMORY_STEPS steps; print JSON.

    The peak is reset (/proc/self/clear_refs) once the contender is built, so the temporary
    npformer Trainer that the torch contender takes its config, batch and (2017) weights
    from is not counted; the contender's own weights and optimizer state are (they are
    resident at the reset)."""
    torch = None
    if contender_name == "torch":
        import torch
        import transformers  # noqa: F401  (counted in the baseline, as the import cost)
    import npformer.train  # noqa: F401
    limiter = limit_threads(torch)
    baseline = _status_mib("VmRSS")
    contender = build_contender(contender_name, preset, size, torch)
    _release_freed_memory()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # VmHWM := VmRSS now
    for _ in range(1 + MEMORY_STEPS):
        contender.step()
    # VmHWM, not ru_maxrss: Linux carries the parent's peak across fork + exec into
    # ru_maxrss (measured here: every child reported the benchmark process's 882 MiB)
    peak = _status_mib("VmHWM")
    contender.close()
    del limiter
    print(json.dumps(dict(peak_rss_mib=peak, baseline_rss_mib=baseline)))


def measure_memory(preset, size, contender_name):
    command = [sys.executable, __file__, "--memory-probe", preset, size, contender_name]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"memory probe failed for {preset} {size} {contender_name}: "
              f"{done.stderr.strip()[-400:]}", file=sys.stderr)
        return None, None
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return report["peak_rss_mib"], report["peak_rss_mib"] - report["baseline_rss_mib"]


# ---- one configuration ------------------------------------------------------------------------


def build_contender(name, preset, size, torch):
    if name == "torch":
        return TorchContender(torch, preset, size)
    if name.startswith("npformer[") and name.endswith("]"):
        return NpformerContender(preset, size, layer_impl=name[len("npformer["):-1])
    if name == "npformer":
        return NpformerContender(preset, size)
    raise ValueError(f"unknown contender {name!r}")


def significant(value: float, digits: int = 4) -> float:
    """``value`` rounded to ``digits`` significant digits (a tiny size's GFLOP/s stay > 0)."""
    return float(f"{value:.{digits}g}")


def run_configuration(preset, size, names, repeats, torch, memory, profile_steps, pause):
    overrides, B, T = SIZES[size]
    load_before = os.getloadavg()[0]
    contenders = {name: build_contender(name, preset, size, torch) for name in names}
    first_npformer = next(c for c in contenders.values() if isinstance(c, NpformerContender))
    contenders["floor"] = FloorContender(first_npformer.trainer)
    config = first_npformer.trainer.config
    for contender in contenders.values():
        for _ in range(WARMUP_STEPS):
            contender.step()
    times = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, contender in contenders.items():
            time.sleep(pause)
            start = time.perf_counter()
            contender.step()
            times[name].append(time.perf_counter() - start)
    breakdowns = {}
    for name, contender in contenders.items():
        if isinstance(contender, NpformerContender) and profile_steps:
            time.sleep(pause)
            breakdowns[name] = profile_breakdown(contender, profile_steps)
    flops = contenders["floor"].flops
    n_products = len(contenders["floor"].products)
    for contender in contenders.values():
        contender.close()
    median = {name: statistics.median(t) for name, t in times.items()}
    rows = []
    for name in contenders:
        ms = 1000 * median[name]
        peak, rise = (None, None)
        if memory and name != "floor":
            peak, rise = measure_memory(preset, size, name)
        contender = contenders[name]
        rows.append(dict(
            preset=preset, size=size, d_model=config.d_model, n_layers=config.n_layers,
            n_heads=config.n_heads, batch_size=B, seq_len=T, vocab_size=config.vocab_size,
            contender=name,
            implementation=(getattr(contender, "kind", None) if name == "torch" else
                            "NumPy matmul" if name == "floor" else "Trainer.train_step"),
            layer_impl=getattr(contender, "layer_impl", None),
            median_ms=round(ms, 2), min_ms=round(1000 * min(times[name]), 2),
            times_ms=[round(1000 * t, 2) for t in times[name]],
            tokens_per_s=round(B * T / median[name], 1),
            ratio_to_torch=significant(median[name] / median["torch"]) if "torch" in median else None,
            min_ratio_to_torch=(significant(min(times[name]) / min(times["torch"]))
                                if "torch" in times else None),
            ratio_to_floor=significant(median[name] / median["floor"]),
            floor_gflops_per_s=significant(flops / median[name] / 1e9),
            peak_rss_mib=None if peak is None else round(peak, 1),
            rss_rise_mib=None if rise is None else round(rise, 1),
            breakdown_pct=breakdowns.get(name),
        ))
    return rows, dict(preset=preset, size=size, products=n_products, gflop=significant(flops / 1e9),
                      load_average_before=load_before, load_average_after=os.getloadavg()[0])


# ---- output -----------------------------------------------------------------------------------


def print_table(rows):
    header = (f"{'preset':<17}{'size':<8}{'contender':<17}{'median ms':>10}{'min ms':>9}"
              f"{'tok/s':>9}{'/ torch':>8}{'min/t':>7}{'/ floor':>8}{'GFLOP/s':>8}{'peak RSS':>9}"
              f"{'RSS rise':>9}")
    print(header)
    print("-" * len(header))

    def cell(value, width, fmt):
        return f"{'' if value is None else format(value, fmt):>{width}}"

    for r in rows:
        print(f"{r['preset']:<17}{r['size']:<8}{r['contender']:<17}{r['median_ms']:>10.1f}"
              f"{r['min_ms']:>9.1f}{r['tokens_per_s']:>9.0f}{cell(r['ratio_to_torch'], 8, '.2f')}"
              f"{cell(r['min_ratio_to_torch'], 7, '.2f')}"
              f"{r['ratio_to_floor']:>8.2f}{r['floor_gflops_per_s']:>8.1f}"
              f"{cell(r['peak_rss_mib'], 9, '.0f')}{cell(r['rss_rise_mib'], 9, '.0f')}")


def print_breakdowns(rows):
    profiled = [r for r in rows if r["breakdown_pct"]]
    if not profiled:
        return
    used = [c for c in CATEGORIES if any(r["breakdown_pct"][c] >= 0.05 for r in profiled)]
    short = {"cross-entropy": "xent", "dropout/residual": "drop/res", "model glue": "glue",
             "validation": "valid", "activation": "act", "attention": "attn",
             "embedding": "embed", "optimizer": "optim"}
    header = f"{'preset':<17}{'size':<8}{'contender':<17}" + "".join(
        f"{short.get(c, c):>9}" for c in used)
    print("\nnpformer step, % of profiled time (cProfile; C calls charged to their callers):")
    print(header)
    print("-" * len(header))
    for r in profiled:
        print(f"{r['preset']:<17}{r['size']:<8}{r['contender']:<17}" + "".join(
            f"{r['breakdown_pct'][c]:>9.1f}" for c in used))


def blas_info():
    from threadpoolctl import threadpool_info

    return [dict(library=os.path.basename(i["filepath"]), api=i["internal_api"],
                 architecture=i.get("architecture"), threads=i["num_threads"],
                 version=i.get("version")) for i in threadpool_info()]


def _names(text, valid, what):
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in valid]
    if bad or not names:
        raise SystemExit(f"--{what} {text!r}: unknown {bad or 'empty'}; valid: {', '.join(valid)}")
    return names


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="CI smoke: 3 repeats, default size only, short pauses, no memory probes")
    parser.add_argument("--presets", default=",".join(PRESETS), help="comma-separated presets")
    parser.add_argument("--sizes", default=None,
                        help="comma-separated sizes: default, 384 (and tiny, for tests)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per contender (7)")
    parser.add_argument("--json", default=None,
                        help="output JSON (default benchmarks/results/train_step.<date>.json)")
    parser.add_argument("--layer-impl", default=None,
                        help=f"set ModelConfig.{LAYER_IMPL_FIELD} (if this checkout has it)")
    parser.add_argument("--compare-impls", action="store_true",
                        help=f"npformer with {LAYER_IMPL_FIELD} = {' and '.join(COMPARED_IMPLS)}")
    parser.add_argument("--no-torch", action="store_true", help="skip torch")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-RSS child processes")
    parser.add_argument("--profile-steps", type=int, default=None,
                        help="steps under cProfile for the breakdown (3; 0: none)")
    parser.add_argument("--memory-probe", nargs=3, metavar=("PRESET", "SIZE", "CONTENDER"),
                        help=argparse.SUPPRESS)  # internal: one measurement in a child process
    args = parser.parse_args(argv)
    if args.memory_probe:
        return memory_probe(*args.memory_probe)
    presets = _names(args.presets, PRESETS, "presets")
    sizes = _names(args.sizes or ("default" if args.quick else ",".join(FULL_SIZES)),
                   list(SIZES), "sizes")
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 7)
    if repeats < 1:
        raise SystemExit(f"--repeats must be ≥ 1, got {repeats}")
    profile_steps = args.profile_steps if args.profile_steps is not None else (1 if args.quick else 3)
    pause = 0.2 if args.quick else 1.0
    memory = not (args.no_memory or args.quick)

    # Both OpenMP runtimes in this process (torch's libgomp and numba's) let idle threads
    # sleep, as npformer.kernels asks for its own: torch's pool, spinning after every torch
    # op, otherwise took the cores from numba's kernels in the npformer rounds (gpt2 default:
    # npformer[numba] 464 ms with torch spinning beside it, 166 ms without torch in the
    # process, 172 ms with this; torch itself 119–133 ms either way).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    torch = None
    if not args.no_torch:
        import torch  # before numba starts its OpenMP threads (see the docstring)
    import npformer.train  # noqa: F401

    if (args.layer_impl or args.compare_impls) and not layer_impl_supported():
        raise SystemExit(f"--layer-impl/--compare-impls: ModelConfig has no field "
                         f"{LAYER_IMPL_FIELD!r} on this checkout ({npformer.__file__})")
    if args.compare_impls:
        names = [f"npformer[{impl}]" for impl in COMPARED_IMPLS]
    elif args.layer_impl:
        names = [f"npformer[{args.layer_impl}]"]
    else:
        names = ["npformer"]
    names += [] if torch is None else ["torch"]
    limiter = limit_threads(torch)  # noqa: F841  (holds the BLAS limit)
    import numba

    cpu = cpu_model()
    info = blas_info()
    print(f"CPU {cpu}; python {platform.python_version()}, numpy {np.__version__}, numba "
          f"{numba.__version__}" + (f", torch {torch.__version__}" if torch else "")
          + f"; {THREADS} threads each; {LAYER_IMPL_FIELD} "
          + ("supported" if layer_impl_supported() else "not a ModelConfig field here"))
    for lib in info:
        print(f"  {lib['api']} {lib['library']} {lib['version'] or ''} "
              f"{lib['architecture'] or ''}: {lib['threads']} threads")
    path = Path(args.json or ROOT / "benchmarks" / "results" /
                f"train_step.{datetime.date.today().isoformat()}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    settings = dict(cpu=cpu, threads=THREADS, repeats=repeats, warmup_steps=WARMUP_STEPS,
                    quick=args.quick, presets=presets, sizes=sizes, contenders=names,
                    profile_steps=profile_steps, memory_steps=MEMORY_STEPS if memory else None,
                    lr=LR, weight_decay=WEIGHT_DECAY, grad_clip=GRAD_CLIP,
                    layer_impl_field=layer_impl_supported(), blas=info,
                    openblas_coretype=os.environ.get("OPENBLAS_CORETYPE"),
                    omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"), cpus=os.cpu_count(),
                    python=platform.python_version(), numpy=np.__version__,
                    numba=numba.__version__, torch=torch.__version__ if torch else None)
    rows, floors = [], []
    for preset in presets:
        for size in sizes:
            config_rows, floor = run_configuration(preset, size, names, repeats, torch, memory,
                                                   profile_steps, pause)
            print_table(config_rows)
            print(f"  floor: {floor['products']} products, {floor['gflop']} GFLOP; load average "
                  f"{floor['load_average_before']:.1f} → {floor['load_average_after']:.1f} "
                  f"on {os.cpu_count()} CPUs\n", flush=True)
            rows += config_rows
            floors.append(floor)
            # after every configuration, so an interrupted run keeps what it measured
            path.write_text(json.dumps(dict(settings=settings, floors=floors, rows=rows), indent=2))
    print("all configurations:")
    print_table(rows)
    print_breakdowns(rows)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
