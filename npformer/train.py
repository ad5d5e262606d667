"""The training loop: any preset, the shipped Shakespeare corpus, hand-written AdamW.

One step, every piece hand-derived and gradient-checked elsewhere:

    x, y      = sampler.next()                      (B, T) ids and next-token targets
    logits    = model.forward(x [, doc_ids])        (B, T, V)
    L, cache  = cross_entropy_forward(logits, y)    mean over B·T tokens
    model.zero_grad(); model.backward(cross_entropy_backward(1, cache))
    ‖g‖       = clip_grad_norm(grads, grad_clip)    global norm, scaled down if above the clip
    lr        = warm-up then cosine decay
    AdamW step (decoupled weight decay, none on norms, biases, embeddings)

The model's ``layer_impl`` decides how the step runs. ``"numba"`` (the default): the layers'
fused kernels, the loss and ``p − onehot(y)`` in one kernel pass written over the logits,
clipping and AdamW as one pass per tensor; NaN/inf are looked for once per step (the token
ids at the door, the loss, the gradient norm, the overflow checks inside the kernels; see
``npformer._validate.finite_values_checked_once``). ``"numpy"``: the functional pairs, each
checking its own inputs. Both give the same losses (tests/test_layer_impl.py: 1e-10 over 20
float64 steps).

Everything that decides the next step — weights, optimizer moments, the batch sampler's and
the dropout generator's states — goes into each checkpoint, so ``--resume`` continues
exactly: N steps in one run equal N/2 steps plus a resumed N/2 (same losses, bit for bit).
One process at a time trains into a run directory (``checkpoint.RunLock``): the lock is
taken when the Trainer is built and dropped when ``run()`` returns.

The 2017 encoder-decoder learns the same text as a sequence-to-sequence task: the encoder
reads T characters and the decoder writes the next T (its input starts with the encoder's
last character).
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import shutil
import tempfile
import time
import weakref
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import numpy as np

from . import checkpoint as ckpt
from ._memory import keep_freed_memory_for_reuse
from ._plotting import pyplot, save_png
from ._validate import NonFiniteError, finite_values_checked_once
from .config import ModelConfig
from .dataset import (BatchSampler, ByteTokenizer, CharTokenizer, PackedBatchSampler, load_text,
                      split_documents, split_train_val, tokenizer_from_dict)
from .functional.cross_entropy import cross_entropy_backward, cross_entropy_forward
from .kernels.cross_entropy import softmax_cross_entropy
from .models import build_model
from .optim import AdamW, clip_grad_norm, grad_global_norm, lr_at
from .presets import get_preset, preset_config


class TrainingDiverged(ValueError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainOptions:
    preset: str = "gpt2"
    out: Optional[str] = None  # default: runs/<preset>
    data: Optional[str] = None  # default: the shipped tinyshakespeare.txt
    tokenizer: str = "char"  # "char" or "byte"
    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    min_lr: Optional[float] = None  # default lr / 10
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    eval_interval: int = 100
    eval_batches: int = 8
    checkpoint_interval: int = 100
    dtype: str = "float32"
    model_overrides: Dict[str, object] = field(default_factory=dict)  # d_model, n_layers, ...
    stop_after: Optional[int] = None  # stop (with a checkpoint) after this step, for testing resume
    # Train on packed documents (the document mask's data) also when the model has no document
    # mask: the mask's comparison run (npformer tour) sees the same batches without the mask.
    # A model with document_mask=True always trains on packed documents.
    packed_documents: bool = False

    def run_dir(self) -> str:
        return self.out or os.path.join("runs", self.preset)


def _check_options(options: TrainOptions) -> None:
    """Every option on its own, and the run directory, before any file is read or written."""
    get_preset(options.preset)
    for name in ("steps", "batch_size", "seq_len", "eval_interval", "eval_batches",
                 "checkpoint_interval"):
        value = getattr(options, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer ≥ 1, got {value!r}")
    for name in ("warmup_steps", "seed"):  # np.random.default_rng refuses a negative seed
        value = getattr(options, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an integer ≥ 0, got {value!r}")
    if options.stop_after is not None and (isinstance(options.stop_after, bool) or not isinstance(
            options.stop_after, int) or options.stop_after < 1):
        raise ValueError(f"stop_after must be None or an integer ≥ 1, got {options.stop_after!r}")
    for name in ("lr", "min_lr", "weight_decay", "grad_clip"):
        value = getattr(options, name)
        if name == "min_lr" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number ≥ 0, got {value!r}")
    if options.min_lr is not None and options.min_lr > options.lr:
        raise ValueError(f"min_lr (--min-lr) must be ≤ lr (--lr), the peak the schedule decays "
                         f"from; got min_lr={options.min_lr} and lr={options.lr}")
    if not isinstance(options.packed_documents, bool):
        raise ValueError(f"packed_documents must be True or False, got {options.packed_documents!r}")
    if options.tokenizer not in ("char", "byte"):
        raise ValueError(f"tokenizer must be 'char' or 'byte', got {options.tokenizer!r}")
    # The run directory: a directory, or a path where one can be created. (`out or ...`
    # would silently turn an empty --out into runs/PRESET.)
    if options.out is not None and not os.fspath(options.out):
        raise ValueError("out (--out) is empty; give a run directory or omit it for runs/PRESET")
    run_dir = options.run_dir()
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise ValueError(f"run directory (--out) {run_dir!r} is a file, not a directory; "
                         "choose another --out")
    existing = os.path.abspath(run_dir)
    while not os.path.exists(existing):  # the nearest part of the path that exists
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"run directory (--out) {run_dir!r} cannot be created: {existing!r} is "
                         "a file, not a directory")
    try:  # os.access says yes to root everywhere; creating a directory is the real test
        os.rmdir(tempfile.mkdtemp(prefix=".npformer-write-test-", dir=existing))
    except OSError as error:
        raise ValueError(f"run directory (--out) {run_dir!r} cannot be written: creating a "
                         f"directory in {existing!r} fails ({error.strerror or error})") from None


def model_config_for(options: TrainOptions, vocab_size: int) -> ModelConfig:
    """The preset at the run's sizes: vocabulary from the tokenizer, positions for 2·T
    (the encoder-decoder reads T and writes T) or T, dropout off unless overridden."""
    overrides = dict(options.model_overrides)
    overrides.setdefault("dropout", 0.0)
    overrides.setdefault("dtype", options.dtype)
    config = preset_config(options.preset, vocab_size=vocab_size, max_seq_len=options.seq_len,
                           **overrides)
    return config


class Trainer:
    """Holds the run: model, optimizer, samplers; ``run()`` trains to ``options.steps``."""

    def __init__(self, options: TrainOptions, *, resume: bool = False, overwrite: bool = False,
                 progress: bool = True, log=print) -> None:
        _check_options(options)
        keep_freed_memory_for_reuse()  # each step's arrays reuse the last step's memory
        self.options, self.progress, self.log = options, progress, log
        self.run_dir = options.run_dir()
        self._lock = ckpt.RunLock(self.run_dir, log=log)
        weakref.finalize(self, self._lock.release)  # a Trainer dropped before run() unlocks
        text = load_text(options.data)
        try:
            if resume:
                self._resume(text)
            else:
                self._start(text, overwrite)
        except BaseException:
            self._lock.release()
            raise

    # ---- setup ---------------------------------------------------------------------------

    def _start(self, text: str, overwrite: bool) -> None:
        options = self.options
        # Everything that can fail on bad input runs before an existing run is replaced.
        self.tokenizer = CharTokenizer(text) if options.tokenizer == "char" else ByteTokenizer()
        self.config = model_config_for(options, self.tokenizer.vocab_size)
        self._build(text)
        replacing = os.path.exists(self.run_dir) and (
            not os.path.isdir(self.run_dir) or set(os.listdir(self.run_dir)) - {ckpt.RunLock.NAME})
        if replacing:
            if not overwrite:
                raise ValueError(f"{self.run_dir} already exists and is not empty; pass --resume to "
                                 "continue that run, --overwrite to replace it, or another --out")
            if not os.path.isfile(os.path.join(self.run_dir, "train.json")):
                raise ValueError(f"{self.run_dir} is not a training run directory (no train.json); "
                                 "refusing to delete it — choose another --out")
        os.makedirs(self.run_dir, exist_ok=True)
        self._lock.acquire()  # before anything is deleted: a running process keeps its run
        if replacing:
            for entry in os.listdir(self.run_dir):
                if entry != ckpt.RunLock.NAME:
                    path = os.path.join(self.run_dir, entry)
                    shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) \
                        else os.unlink(path)
        self.step = 0
        self.history: List[dict] = []
        ckpt.write_json(os.path.join(self.run_dir, "config.json"), self.config.to_dict())
        ckpt.write_json(os.path.join(self.run_dir, "tokenizer.json"), self.tokenizer.to_dict())
        ckpt.write_json(os.path.join(self.run_dir, "train.json"), self._options_dict())

    def _resume(self, text: str) -> None:
        if not os.path.isdir(self.run_dir):
            raise ValueError(f"--resume: {self.run_dir} does not exist (nothing to resume)")
        if not os.path.isfile(os.path.join(self.run_dir, "train.json")):
            raise ValueError(f"--resume: {self.run_dir} is not a training run directory "
                             "(no train.json)")
        self._lock.acquire()
        train_path = os.path.join(self.run_dir, "train.json")
        compared = ("preset", "batch_size", "seq_len", "tokenizer", "dtype", "seed")
        saved = ckpt.require_keys(ckpt.read_json(train_path), dict.fromkeys(compared, object),
                                  train_path)
        saved.setdefault("packed_documents", False)  # runs from before the option existed
        compared += ("packed_documents",)
        for name in compared:
            if saved[name] != getattr(self.options, name):
                raise ValueError(f"--resume: the run in {self.run_dir} used {name}={saved[name]!r}, "
                                 f"not {getattr(self.options, name)!r}; resume with the same value")
        directory, loaded = ckpt.load_latest(self.run_dir, log=self.log, state_keys=dict(
            sampler=dict, dropout_rng=dict, history=list))
        config, tokenizer, model_tensors, optimizer_tensors, state = loaded
        state_path = os.path.join(directory, "state.json")
        rows = state["history"]
        if not all(isinstance(r, dict) and isinstance(r.get("step"), int) for r in rows) or \
                not rows or rows[-1]["step"] != state["step"]:
            raise ValueError(f"{state_path}: 'history' must be the rows of steps 1..{state['step']} "
                             f"(each a dict with its 'step'), ending at step {state['step']}")
        self.tokenizer = tokenizer_from_dict(tokenizer)
        asked = model_config_for(self.options, self.tokenizer.vocab_size)
        for name in self.options.model_overrides:  # sizes given again must be the run's sizes
            if getattr(asked, name) != getattr(config, name):
                raise ValueError(f"--resume: the run in {self.run_dir} has {name}="
                                 f"{getattr(config, name)!r}, not {getattr(asked, name)!r}; its "
                                 "checkpoint belongs to that config (omit the flag to keep it)")
        self.config = config
        self._build(text)
        for what, path, restore in (
                ("weights", "model.safetensors",
                 lambda: ckpt.assign_parameters(self.model, model_tensors)),
                ("optimizer state", "optimizer.safetensors",
                 lambda: self.optimizer.load_flat_state(optimizer_tensors)),
                ("'sampler'", "state.json",
                 lambda: self.train_sampler.load_state_dict(state["sampler"])),
                ("'dropout_rng'", "state.json",
                 lambda: setattr(self.model.dropout_rng.bit_generator, "state", state["dropout_rng"]))):
            try:
                restore()
            except (KeyError, TypeError, ValueError) as error:
                raise ValueError(f"--resume: {os.path.join(directory, path)}: its {what} does not "
                                 f"fit this run ({error})") from None
        self.step = state["step"]
        self.history = [row for row in rows if row["step"] <= self.step]
        ckpt.write_json(os.path.join(self.run_dir, "train.json"), self._options_dict())

    def _build(self, text: str) -> None:
        """Samplers, model and optimizer for the run; first every check that the data holds
        the windows of --seq-len and that the run fits in memory, before any array of the
        run's size is allocated (and, in a new run, before an old one is replaced)."""
        options, config = self.options, self.config
        self.encoder_decoder = config.architecture == "encoder-decoder"
        window = 2 * options.seq_len if self.encoder_decoder else options.seq_len
        corpus = "the shipped corpus" if options.data is None else f"--data {options.data!r}"
        needs = (f"--seq-len {options.seq_len} needs at least {window + 1} tokens in it ("
                 + ("the encoder reads T, the decoder writes T, plus one target)"
                    if self.encoder_decoder else "T inputs and one more target)")
                 + f"; lower --seq-len or use a longer {corpus}")

        def check_split(split: str, n_tokens: int, detail: str) -> None:
            if n_tokens < window + 1:
                raise ValueError(f"the {split} of {corpus} has {n_tokens} tokens ({detail}), but {needs}")

        self.packed = config.document_mask or options.packed_documents
        if self.packed:
            # packed documents: split the text at blank lines, keep the order, 90/10 split
            documents = [self.tokenizer.encode(d) for d in split_documents(text)]
            cut = int(len(documents) * 0.9)
            for split, part, which in (("training split", documents[:cut], "the first 90%"),
                                       ("validation split", documents[cut:], "the last 10%")):
                if not part:
                    raise ValueError(f"the {split} of {corpus} has no document ({which} of its "
                                     f"{len(documents)} blank-line separated document(s)); the "
                                     "document mask needs at least 2 documents")
                check_split(split, sum(len(d) for d in part),
                            f"{which} of its {len(documents)} documents")
        else:
            ids = self.tokenizer.encode(text)
            if len(ids) < 2:
                raise ValueError(f"{corpus} has {len(ids)} token(s); a training and a validation "
                                 f"split need more, and {needs}")
            train_ids, val_ids = split_train_val(ids)
            check_split("training split", len(train_ids), f"the first 90% of {len(ids)}")
            check_split("validation split", len(val_ids), f"the last 10% of {len(ids)}")

        # Memory, a lower bound: weights, gradients and AdamW's two moments (4·P); the logits,
        # their softmax and gradient (3·B·T·V); per layer at least the block's input, its
        # normed input, q, k/v and output (≥ 4·C) and the FFN's hidden layer before and after
        # the activation (2·F) for each of the B·T' tokens (T' = 2T for the encoder-decoder);
        # the readable attention also keeps its (B, H, T, T) probabilities.
        from ._validate import check_memory
        from .models.stats import parameter_count

        B, T, V, s = options.batch_size, options.seq_len, config.vocab_size, config.np_dtype.itemsize
        layers = config.n_layers + (config.encoder_layers if self.encoder_decoder else 0)
        n_params = parameter_count(config)
        per_token = layers * (4 * config.d_model + 2 * config.ffn_width)
        if config.attention_impl == "numpy":
            per_token += layers * config.n_heads * window
        estimate = s * (4 * n_params + 3 * B * T * V + B * window * per_token)
        check_memory(estimate, f"training {n_params:,} parameters (vocabulary V = {V}, "
                     f"{config.dtype}) on batches of --batch-size {B} × --seq-len {T}",
                     "lower --batch-size or --seq-len, or the model's size")

        if self.packed:
            self.train_sampler = PackedBatchSampler(documents[:cut], options.batch_size, window, options.seed)
            self._val_sampler = lambda: PackedBatchSampler(documents[cut:], options.batch_size,
                                                           window, options.seed + 1)
        else:
            self.train_sampler = BatchSampler(train_ids, options.batch_size, window, options.seed)
            self._val_sampler = lambda: BatchSampler(val_ids, options.batch_size, window, options.seed + 1)
        self.model = build_model(config, seed=options.seed)
        self.optimizer = AdamW(self.model.parameters(), lr=options.lr, weight_decay=options.weight_decay,
                               impl=config.layer_impl)

    @property
    def fused(self) -> bool:
        """The step runs the fused kernels (``layer_impl="numba"``)."""
        return self.config.layer_impl == "numba"

    def _options_dict(self) -> dict:
        return asdict(self.options)

    # ---- one step ------------------------------------------------------------------------

    def _forward_loss(self, batch, *, backward: bool = False, validating: bool = False):
        """The loss of one batch, and ∂L/∂logits when ``backward`` (the model keeps its own
        cache).

        Fused path (``layer_impl="numba"``): one kernel pass gives the loss and writes
        p − onehot(y) over the logits in place, so the step holds no (N, V) array besides
        the logits; the loss is checked here, once per step (NaN or inf logits make it NaN).
        Reference path: the functional pair, whose forward refuses NaN/inf logits itself."""
        x, y = batch[0], batch[1]
        if self.encoder_decoder:
            T = self.options.seq_len
            src, tgt_in, targets = x[:, :T], x[:, T - 1:2 * T - 1], y[:, T - 1:2 * T - 1]
            logits = self.model.forward(src, tgt_in)
        else:
            # packed batches carry doc_ids; only a model with the document mask uses them
            doc_ids = batch[2] if len(batch) > 2 and self.config.document_mask else None
            logits, targets = self.model.forward(x, doc_ids=doc_ids), y
        if self.fused:
            loss, dlogits = softmax_cross_entropy(logits, targets, dlogits_out=logits)
            loss = float(loss)
            if not math.isfinite(loss):
                raise self._diverged(f"NaN or infinite ({loss}: NaN or infinite logits, or a "
                                     f"loss beyond {logits.dtype})", validating=validating)
            return loss, dlogits
        if not np.isfinite(logits).all():  # the loss would be NaN; say so as a divergence
            raise self._diverged("NaN or infinite logits", validating=validating)
        loss, cache = cross_entropy_forward(logits, targets)
        loss = float(loss)
        if not math.isfinite(loss):
            raise self._diverged(str(loss), validating=validating)
        return loss, (cross_entropy_backward(1.0, cache) if backward else None)

    def _diverged(self, what: str, *, validating: bool = False) -> TrainingDiverged:
        """The error for a loss gone NaN/inf: in step self.step + 1, or, when ``validating``,
        in the validation of the weights of step self.step."""
        last = ckpt.latest_checkpoint(self.run_dir)
        where = f"in the validation after step {self.step}" if validating else f"at step {self.step + 1}"
        return TrainingDiverged(
            f"the loss became {what} {where}; stopped without saving. The last "
            f"good checkpoint is {last or '(none yet)'}; lower --lr or raise --warmup-steps")

    def train_step(self) -> dict:
        min_lr = self.options.lr / 10 if self.options.min_lr is None else self.options.min_lr
        lr = lr_at(self.step, self.options.lr, self.options.warmup_steps, self.options.steps, min_lr)
        self.model.train()
        try:
            loss, dlogits = self._forward_loss(self.train_sampler.next(), backward=True)
            self.model.zero_grad()
            self.model.backward(dlogits)
        except NonFiniteError as error:
            # The batch is ours and valid, so a layer refusing NaN/inf activations or
            # gradients, or an overflow, means the weights have blown up: a divergence.
            raise self._diverged(f"NaN or infinite inside the model ({error})") from error
        grads = self.model.gradients()
        impl = self.config.layer_impl
        grad_norm = (clip_grad_norm(grads, self.options.grad_clip, impl=impl) if self.options.grad_clip
                     else grad_global_norm(grads, impl=impl))
        if not math.isfinite(grad_norm):  # stepping would write NaN into every weight
            raise self._diverged(f"finite ({loss:.4g}) but its gradient norm {grad_norm}")
        # a finite global norm means every gradient is finite: the optimizer need not scan again
        with finite_values_checked_once() if self.fused else contextlib.nullcontext():
            self.optimizer.step(grads, lr=lr)
        self.step += 1
        return dict(step=self.step, loss=loss, lr=lr, grad_norm=float(grad_norm))

    def evaluate(self) -> float:
        """Mean loss over ``eval_batches`` fixed validation batches (dropout off)."""
        self.model.eval()
        sampler = self._val_sampler()
        try:
            losses = [self._forward_loss(sampler.next(), validating=True)[0]
                      for _ in range(self.options.eval_batches)]
        except NonFiniteError as error:  # a layer refusing the activations of blown-up weights
            raise self._diverged(f"NaN or infinite inside the model ({error})",
                                 validating=True) from error
        self.model._last_cache = None  # nothing to backpropagate from evaluation
        return float(np.mean(losses))

    # ---- the loop ------------------------------------------------------------------------

    def run(self) -> dict:
        options = self.options
        tokens_per_step = options.batch_size * options.seq_len
        start_step, started = self.step, time.perf_counter()
        if not self._lock.held:  # run() called again after a previous run() returned
            self._lock.acquire()
        if self.step >= options.steps:
            self._lock.release()
            self.log(f"{self.run_dir} already reached step {self.step} (--steps {options.steps}): "
                     "nothing to train; pass a larger --steps to continue it")
            last_row = self.history[-1] if self.history else {}
            return dict(step=self.step, steps_trained=0, loss=last_row.get("loss"),
                        val_loss=self.last_val_loss(), seconds=0.0, tokens_per_s=0.0,
                        run_dir=self.run_dir)
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=options.steps, initial=self.step, unit="step", dynamic_ncols=True)
        last = None
        try:
            while self.step < options.steps:
                row = self.train_step()
                elapsed = time.perf_counter() - started
                row["tokens_per_s"] = (self.step - start_step) * tokens_per_step / max(elapsed, 1e-9)
                if self.step % options.eval_interval == 0 or self.step == options.steps:
                    row["val_loss"] = self.evaluate()
                self.history.append(row)
                last = row
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}",
                                    tok_s=f"{row['tokens_per_s']:.0f}",
                                    val=f"{self.last_val_loss():.3f}" if self.last_val_loss() else "-")
                stopping = options.stop_after is not None and self.step >= options.stop_after
                if self.step % options.checkpoint_interval == 0 or self.step == options.steps or stopping:
                    self.save()
                if stopping:
                    break
        finally:
            if bar is not None:
                bar.close()
            self._lock.release()
        elapsed = time.perf_counter() - started
        return dict(step=self.step, steps_trained=self.step - start_step,
                    loss=None if last is None else last["loss"],
                    val_loss=self.last_val_loss(), seconds=elapsed,
                    tokens_per_s=(self.step - start_step) * tokens_per_step / max(elapsed, 1e-9),
                    run_dir=self.run_dir)

    def last_val_loss(self) -> Optional[float]:
        for row in reversed(self.history):
            if "val_loss" in row:
                return row["val_loss"]
        return None

    # ---- saving --------------------------------------------------------------------------

    def save(self) -> None:
        state = dict(sampler=self.train_sampler.state_dict(),
                     dropout_rng=self.model.dropout_rng.bit_generator.state,
                     history=self.history)
        ckpt.save_checkpoint(self.run_dir, self.step, self.model.parameters(),
                             self.optimizer.flat_state(), state, config=self.config.to_dict(),
                             tokenizer=self.tokenizer.to_dict())
        self._write_logs()

    def _write_logs(self) -> None:
        columns = ["step", "loss", "val_loss", "lr", "grad_norm", "tokens_per_s"]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in self.history:
            writer.writerow({k: row.get(k, "") for k in columns})
        ckpt.write_atomically(os.path.join(self.run_dir, "log.csv"), [buffer.getvalue().encode()])
        ckpt.write_json(os.path.join(self.run_dir, "log.json"), self.history)
        plot_losses(self.history, os.path.join(self.run_dir, "loss.png"), self.options.preset)


def plot_losses(history: List[dict], path: str, title: str) -> None:
    """Training and validation loss against step, as a PNG (matplotlib, written atomically)."""
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(6, 4), dpi=100)
    axes.plot([r["step"] for r in history], [r["loss"] for r in history], label="train", lw=1)
    val = [r for r in history if "val_loss" in r]
    if val:
        axes.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    axes.set_xlabel("step")
    axes.set_ylabel("cross-entropy (nats / token)")
    axes.set_title(f"npformer {title}")
    axes.grid(alpha=0.3)
    axes.legend()
    save_png(figure, path)


def load_trained(run_dir: str):
    """(model in eval mode, tokenizer) from the latest checkpoint of a run directory."""
    config, tokenizer, model_tensors, _, _ = ckpt.load_checkpoint(run_dir)
    model = build_model(config)
    ckpt.assign_parameters(model, model_tensors)
    return model.eval(), tokenizer_from_dict(tokenizer)
