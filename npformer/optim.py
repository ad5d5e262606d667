"""Optimizers in NumPy: SGD (momentum, Nesterov) and AdamW, plus clipping and the lr schedule.

Every rule below is the one ``torch.optim`` implements (the single-tensor CPU path), written
in the same order of floating-point operations, so a run here and a run in PyTorch fed the
same gradients agree to rounding (float64: ~1e-16 relative per step). The optimizers update
``model.parameters()`` IN PLACE from ``model.gradients()`` (two dicts with the same keys):

    optimizer = AdamW(model.parameters(), lr=3e-4)
    model.zero_grad(); model.backward(dlogits)
    norm = clip_grad_norm(model.gradients(), 1.0)
    optimizer.step(model.gradients(), lr=lr_at(step, 3e-4, warmup, total))

Notation: θ a parameter, g_t = ∂L/∂θ at step t = 1, 2, ..., γ the learning rate, λ the
weight decay.

SGD (torch.optim.SGD)
---------------------
    g ← g + λ θ                          coupled weight decay = the gradient of (λ/2)‖θ‖²
    b_1 = g_1                            the momentum buffer starts AS the first gradient
    b_t = μ b_{t−1} + (1 − τ) g_t        μ momentum, τ dampening
    d = g_t + μ b_t   (Nesterov)   or   d = b_t
    θ ← θ − γ d

Two details decide agreement with other code. (1) The buffer starts at g_1, not at 0, so
dampening does not shrink the first step. (2) γ multiplies the buffer at the update, not
inside it (Sutskever et al. 2013 write v ← μ v − γ g; θ ← θ + v): the two forms agree for a
constant γ and differ while the schedule changes γ. Nesterov's look-ahead gradient ∇L(θ − γμb)
is approximated by the current gradient plus one more momentum step, g + μ b, which needs no
second gradient evaluation.

AdamW (torch.optim.AdamW; Loshchilov & Hutter, "Decoupled Weight Decay Regularization")
-------------------------------------------------------------------------------------------
    θ ← θ (1 − γ λ)                      decoupled decay, applied first, to the old θ
    m_t = β₁ m_{t−1} + (1 − β₁) g_t      first moment   (m_0 = 0)
    v_t = β₂ v_{t−1} + (1 − β₂) g_t²     second moment  (v_0 = 0), elementwise square
    m̂ = m_t / (1 − β₁ᵗ),  v̂ = v_t / (1 − β₂ᵗ)
    θ ← θ − γ m̂ / (√v̂ + ε)

Bias correction: unrolling, m_t = (1 − β₁) Σ_{k≤t} β₁^{t−k} g_k. If the g_k share a mean E[g],
E[m_t] = (1 − β₁) Σ_{j<t} β₁^j E[g] = (1 − β₁ᵗ) E[g]: a zero start biases the average toward 0
by exactly the factor 1 − β₁ᵗ, which m̂ divides out (same for v with β₂). At t = 1, m̂ = g and
v̂ = g², so the first step is γ g / (|g| + ε) ≈ γ sign(g) for every entry.

Why decoupled: adding λθ to g (L2, as SGD does) sends the decay through the Adam
normalisation, so an entry with a large gradient history (large √v̂) is decayed less; AdamW
shrinks every entry by the same factor 1 − γλ whatever its gradient. Note that torch (and
this file) multiplies λ by the CURRENT lr γ, so the decay follows the schedule; the paper
writes the decay with the schedule multiplier η_t alone.

Where ε sits: torch adds ε AFTER the square root of the bias-corrected second moment,
√v̂ + ε. Other conventions exist (ε inside the root; the "ε̂" of the Adam paper's footnote and
TensorFlow, added to √v_t before the correction) and give a different trajectory whenever √v̂
is comparable to ε. Evaluation order (as torch's kernels):

    m ← m + (1 − β₁)(g − m)                       lerp_, = β₁ m + (1 − β₁) g
    v ← v · β₂ + ((1 − β₂) · g) · g               mul_ then addcmul_
    denom = √v / √(1 − β₂ᵗ) + ε
    θ ← θ + (−γ / (1 − β₁ᵗ)) · m / denom          addcdiv_

Which parameters are decayed is a modelling choice, not part of Adam. The common rule (GPT-2,
nanoGPT, Llama recipes) decays the matrices of the linear layers and the (untied) LM head, and
not the norm gains and biases (1-D: decaying a gain pulls it toward 0 = a dead channel; a bias
has no scale to regularise) nor the embeddings. See :func:`default_no_decay`; torch expresses
the same split as two parameter groups, one with ``weight_decay = 0``.

Dtypes: float32 parameters stay float32, and their state (buffers, moments) is float32, as
torch keeps it in the parameter's dtype. Hyper-parameters are Python floats, so NumPy casts
them to the array's dtype (no float64 upcast), as torch casts a scalar to the tensor's type.

Gradient clipping (torch.nn.utils.clip_grad_norm_)
--------------------------------------------------
    n = ‖(g_1, g_2, ...)‖₂ = √(Σ_tensors Σ_entries g²)          one norm over all tensors
    c = max_norm / (n + 1e-6)
    if c < 1:  every g ← c · g

So after clipping the global norm is max_norm · n/(n + 1e-6), a hair below max_norm. torch
always multiplies by min(c, 1); multiplying by 1 changes nothing, so skipping it is the same.
The 1e-6 also means torch scales (by a factor within 1e-6/n of 1) when n is a hair BELOW
max_norm; this function does the same.

The learning-rate schedule (lr_at)
----------------------------------
Linear warm-up over W steps, then a half cosine from base_lr down to min_lr at total_steps
(step counts the steps taken before this one, starting at 0):

    step < W:                 lr = base_lr · (step + 1) / W           (base_lr/W, ..., base_lr)
    W ≤ step < total_steps:   p  = (step − W) / (total_steps − W)     (0 ≤ p < 1)
                              lr = min_lr + (base_lr − min_lr) · (1 + cos π p) / 2
    step ≥ total_steps:       lr = min_lr

The last warm-up step and the first decay step both use base_lr.

State and checkpoints
---------------------
``state_dict()`` returns ``{"step": int, kind: {parameter name: array}}`` (kinds
``momentum_buffer`` for SGD, ``exp_avg``/``exp_avg_sq`` for AdamW; copies), and
``load_state_dict`` restores it exactly, so a resumed run continues bit for bit. For files,
``flat_state()`` gives one flat ``{str: ndarray}`` dict (``"step"`` a 0-d int64 array,
``"exp_avg.layers.0.attn.q_proj.weight"``, ...) that safetensors or ``np.savez`` store without
pickle; :func:`from_flat_state` is its inverse and ``load_flat_state`` loads one. The
hyper-parameters (lr, betas, ...) are constructor arguments and are not part of the state.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, Mapping, Optional, Union

import numpy as np

from ._validate import check_float, check_int, check_positive, check_probability, check_shape
from .config import check_impl

NoDecay = Union[Callable[[str, np.ndarray], bool], Iterable[str], None]

# The norm's additive epsilon in the clipping factor max_norm / (norm + eps), as torch.
CLIP_EPS = 1e-6

# Parameter names of embedding tables (npformer.models.input_embedding).
EMBEDDING_NAMES = ("embed.tokens.weight", "embed.position_table")


# ---- validation helpers (private) ----------------------------------------------------------------


def _check_nonnegative(value, name: str) -> float:
    """A finite number ≥ 0 (lr, weight_decay, momentum ...)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (int, float, np.floating, np.integer)
    ):
        raise ValueError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def _check_params(params) -> Dict[str, np.ndarray]:
    """A non-empty ``{name: float array}`` dict whose arrays can be updated in place."""
    if not isinstance(params, Mapping):
        raise ValueError(
            f"params must be a dict {{name: array}} such as model.parameters(), "
            f"got {type(params).__name__}"
        )
    if not params:
        raise ValueError("params is empty: the optimizer needs at least one parameter")
    for name, p in params.items():
        if not isinstance(name, str):
            raise ValueError(f"params keys must be parameter names (str), got {name!r}")
        check_float(p, f"params[{name!r}]")
        if not p.flags.writeable:
            raise ValueError(f"params[{name!r}] is read-only; the optimizer updates it in place")
    return dict(params)


def _check_grads(grads, params: Dict[str, np.ndarray]) -> None:
    """Same names as ``params``; each gradient finite, of its parameter's shape and dtype.

    Everything is checked before anything is updated, so a refused step changes nothing.
    """
    if not isinstance(grads, Mapping):
        raise ValueError(
            f"grads must be a dict {{name: array}} such as model.gradients(), "
            f"got {type(grads).__name__}"
        )
    missing = [name for name in params if name not in grads]
    if missing:
        raise ValueError(
            f"grads has no gradient for parameter {missing[0]!r}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + "; pass model.gradients(), with the same names as the optimizer's params"
        )
    extra = [name for name in grads if name not in params]
    if extra:
        raise ValueError(
            f"grads has {extra[0]!r}, which is not a parameter of this optimizer"
            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
        )
    for name, p in params.items():  # parameter order: the error names the first bad one
        g = check_float(grads[name], f"grads[{name!r}]")  # NaN/inf refused here
        check_shape(g, p.shape, f"grads[{name!r}]", "(the shape of the parameter)")
        if g.dtype != p.dtype:
            raise ValueError(
                f"grads[{name!r}] has dtype {g.dtype} but the parameter has dtype {p.dtype}; "
                "pass the gradient in the parameter's dtype"
            )


# ---- one tensor at a time: the update rules ------------------------------------------------------


def _lerp_(start: np.ndarray, end: np.ndarray, weight: float) -> None:
    """``start ← start + weight (end − start)`` in place, evaluated as torch's ``lerp_``.

    torch picks the form by the weight so that both ends are exact: for |w| < 0.5
    ``start + w (end − start)``, else ``end − (end − start)(1 − w)`` with 1 − w in the
    array's precision.
    """
    w = start.dtype.type(weight)
    diff = end - start  # end − start
    if abs(w) < 0.5:
        diff *= w
        start += diff
    else:
        diff *= start.dtype.type(1) - w
        np.subtract(end, diff, out=start)


def sgd_update_(param: np.ndarray, grad: np.ndarray, buf: Optional[np.ndarray], *, lr: float,
                momentum: float, dampening: float, nesterov: bool,
                weight_decay: float) -> Optional[np.ndarray]:
    """One SGD step on one tensor, in place. Returns the momentum buffer (None without momentum).

    ``buf`` is None before the first step: the buffer then starts as a copy of the gradient.
    ``grad`` is never modified.
    """
    d = grad  # the direction, (same shape as param)
    if weight_decay != 0:
        d = grad + weight_decay * param  # g ← g + λ θ       (torch: grad.add(param, alpha=λ))
    if momentum != 0:
        if buf is None:
            buf = d.copy()  # b_1 = g_1
        else:
            buf *= momentum  # b_t = μ b_{t−1} + (1 − τ) g_t
            buf += (1 - dampening) * d
        d = d + momentum * buf if nesterov else buf  # d = g + μ b   or   d = b
    param += (-lr) * d  # θ ← θ − γ d           (torch: param.add_(d, alpha=−γ))
    return buf


def adamw_update_(param: np.ndarray, grad: np.ndarray, exp_avg: np.ndarray,
                  exp_avg_sq: np.ndarray, *, step: int, lr: float, beta1: float, beta2: float,
                  eps: float, weight_decay: float) -> None:
    """One AdamW step on one tensor, in place (``param``, ``exp_avg`` m, ``exp_avg_sq`` v).

    ``step`` is t ≥ 1, the count including this step (for the bias corrections).
    """
    if weight_decay != 0:
        param *= 1 - lr * weight_decay  # θ ← θ (1 − γ λ)
    _lerp_(exp_avg, grad, 1 - beta1)  # m = β₁ m + (1 − β₁) g
    exp_avg_sq *= beta2  # v = β₂ v + (1 − β₂) g²
    exp_avg_sq += ((1 - beta2) * grad) * grad
    bias_correction1 = 1 - beta1**step  # 1 − β₁ᵗ
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5  # √(1 − β₂ᵗ)
    step_size = lr / bias_correction1  # γ / (1 − β₁ᵗ): m̂ = m / (1 − β₁ᵗ) folded in
    denom = np.sqrt(exp_avg_sq)  # √v̂ + ε = √v / √(1 − β₂ᵗ) + ε
    denom /= bias_correction2_sqrt
    denom += eps
    update = (-step_size) * exp_avg  # θ ← θ − γ m̂ / (√v̂ + ε)
    update /= denom
    param += update


# ---- optimizers ----------------------------------------------------------------------------------


class _Optimizer:
    """Shared bookkeeping: the parameters, the step count, named state buffers, (de)serialising.

    Subclasses set ``BUFFER_KINDS`` and fill ``self.buffers[kind][name]``.
    """

    BUFFER_KINDS: tuple = ()

    def __init__(self, params: Dict[str, np.ndarray], lr: float) -> None:
        self.params = _check_params(params)
        self.lr = _check_nonnegative(lr, "lr")
        self.step_count = 0  # steps taken
        self.buffers: Dict[str, Dict[str, np.ndarray]] = {kind: {} for kind in self.BUFFER_KINDS}

    def _step_lr(self, lr) -> float:
        return self.lr if lr is None else _check_nonnegative(lr, "lr")

    def _expected_buffer_names(self, kind: str, step: int) -> set:
        """Which parameters must have a ``kind`` buffer after ``step`` steps (default: all)."""
        return set(self.params)

    # -- state ------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """``{"step": int, kind: {name: array copy}}``: everything the next step depends on."""
        state = {"step": int(self.step_count)}
        for kind in self.BUFFER_KINDS:
            state[kind] = {name: buf.copy() for name, buf in self.buffers[kind].items()}
        return state

    def load_state_dict(self, state: Mapping) -> None:
        """Restore a :meth:`state_dict` exactly (copies); every tensor is validated first."""
        if not isinstance(state, Mapping):
            raise ValueError(f"state must be a dict from state_dict(), got {type(state).__name__}")
        unknown = [key for key in state if key != "step" and key not in self.BUFFER_KINDS]
        if unknown:
            raise ValueError(
                f"state has unknown entry {unknown[0]!r}; a {type(self).__name__} state has "
                f"'step' and {list(self.BUFFER_KINDS)}"
            )
        if "step" not in state:
            raise ValueError("state has no 'step' (the number of steps taken)")
        step = state["step"]
        if (isinstance(step, np.ndarray) and step.ndim == 0
                and np.issubdtype(step.dtype, np.integer)):
            step = step[()]
        step = check_int(step, "state['step']", 0)
        loaded = {}
        for kind in self.BUFFER_KINDS:
            given = state.get(kind, {})
            if not isinstance(given, Mapping):
                raise ValueError(f"state[{kind!r}] must be a dict {{name: array}}, got "
                                 f"{type(given).__name__}")
            expected = self._expected_buffer_names(kind, step)
            for name in self.params:
                if name in expected and name not in given:
                    raise ValueError(f"state has no tensor {kind}.{name} (parameter {name!r})")
            for name in given:
                if name not in expected:
                    why = ("not a parameter of this optimizer" if name not in self.params
                           else f"not expected after {step} step(s)")
                    raise ValueError(f"state has tensor {kind}.{name}, which is {why}")
            loaded[kind] = {}
            for name in self.params:
                if name not in given:
                    continue
                p, arr = self.params[name], given[name]
                label = f"{kind}.{name}"
                if not isinstance(arr, np.ndarray):
                    raise ValueError(f"{label} must be a numpy.ndarray, got {type(arr).__name__}")
                check_shape(arr, p.shape, label, f"(the shape of parameter {name!r})")
                if arr.dtype != p.dtype:
                    raise ValueError(
                        f"{label} has dtype {arr.dtype} but parameter {name!r} has dtype "
                        f"{p.dtype}; state is kept in the parameter's dtype"
                    )
                check_float(arr, label)
                loaded[kind][name] = np.array(arr, dtype=p.dtype, copy=True, order="C")
        self.step_count = step
        self.buffers = loaded

    def flat_state(self) -> Dict[str, np.ndarray]:
        """The state as one ``{str: ndarray}`` dict for safetensors / ``np.savez`` (no pickle)."""
        return flatten_state(self.state_dict())

    def load_flat_state(self, flat: Mapping[str, np.ndarray]) -> None:
        """Load what :meth:`flat_state` returned (e.g. read back from a safetensors file)."""
        self.load_state_dict(from_flat_state(flat))


class SGD(_Optimizer):
    """Stochastic gradient descent with optional momentum, Nesterov and coupled weight decay.

    Exactly ``torch.optim.SGD(params, lr, momentum, dampening, weight_decay, nesterov)`` (see
    the module docstring for the update). Stricter than torch: momentum must lie in [0, 1)
    and dampening in [0, 1].
    """

    BUFFER_KINDS = ("momentum_buffer",)

    def __init__(self, params: Dict[str, np.ndarray], lr: float, momentum: float = 0.0,
                 dampening: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0) -> None:
        super().__init__(params, lr)
        self.momentum = check_probability(momentum, "momentum")
        self.dampening = check_probability(dampening, "dampening", allow_one=True)
        self.weight_decay = _check_nonnegative(weight_decay, "weight_decay")
        if not isinstance(nesterov, (bool, np.bool_)):
            raise ValueError(f"nesterov must be True or False, got {nesterov!r}")
        self.nesterov = bool(nesterov)
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError(
                f"nesterov=True requires momentum > 0 and dampening = 0, got momentum="
                f"{self.momentum} and dampening={self.dampening}"
            )

    def _expected_buffer_names(self, kind: str, step: int) -> set:
        # torch creates the buffer at the first step, and only with momentum
        return set(self.params) if (self.momentum != 0 and step > 0) else set()

    def step(self, grads: Dict[str, np.ndarray], lr: Optional[float] = None) -> None:
        """Update every parameter in place; ``lr`` overrides ``self.lr`` for this step only.

        Raises ValueError (and changes nothing) for missing/extra/mis-shaped/mis-typed or
        non-finite gradients, naming the first such parameter.
        """
        lr = self._step_lr(lr)
        _check_grads(grads, self.params)
        buffers = self.buffers["momentum_buffer"]
        for name, p in self.params.items():
            buf = sgd_update_(p, grads[name], buffers.get(name), lr=lr, momentum=self.momentum,
                              dampening=self.dampening, nesterov=self.nesterov,
                              weight_decay=self.weight_decay)
            if buf is not None:
                buffers[name] = buf
        self.step_count += 1


def default_no_decay(name: str, array: np.ndarray) -> bool:
    """True for the parameters AdamW should NOT decay (the GPT-2 / nanoGPT rule).

    - 1-D tensors: norm gains and biases (a decayed gain drifts toward a dead channel, a bias
      has no scale to regularise);
    - names ending in ``bias`` or containing ``norm`` (``layers.0.attn_norm.weight``,
      ``final_norm.weight``), the same set named explicitly;
    - the embedding tables ``embed.tokens.weight`` and ``embed.position_table`` (also with a
      prefix, e.g. ``model.embed.tokens.weight``). With tied embeddings the token table is the
      LM head too and is still not decayed; an untied ``lm_head.weight`` is decayed.

    Everything else (the 2-D weights of the linear layers) is decayed.
    """
    if array.ndim < 2 or name.endswith("bias") or "norm" in name:
        return True
    return any(name == e or name.endswith("." + e) for e in EMBEDDING_NAMES)


class AdamW(_Optimizer):
    """Adam with decoupled weight decay, exactly ``torch.optim.AdamW`` (amsgrad=False).

    ``no_decay`` chooses the parameters with weight decay 0 (torch: a second parameter group
    with ``weight_decay=0``): a function ``(name, array) -> bool``, a set of names, or None for
    :func:`default_no_decay`. ``self.no_decay_names`` is the resulting set.
    """

    BUFFER_KINDS = ("exp_avg", "exp_avg_sq")

    def __init__(self, params: Dict[str, np.ndarray], lr: float, betas=(0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, no_decay: NoDecay = None,
                 impl: str = "numpy") -> None:
        super().__init__(params, lr)
        self.impl = check_impl(impl)  # "numba": one kernel call, "numpy": adamw_update_
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        self.beta1 = check_probability(betas[0], "betas[0] (beta1)")
        self.beta2 = check_probability(betas[1], "betas[1] (beta2)")
        self.eps = check_positive(eps, "eps")
        self.weight_decay = _check_nonnegative(weight_decay, "weight_decay")
        self.no_decay_names = frozenset(self._no_decay_names(no_decay))
        for name, p in self.params.items():  # m_0 = v_0 = 0, in the parameter's dtype
            self.buffers["exp_avg"][name] = np.zeros_like(p)
            self.buffers["exp_avg_sq"][name] = np.zeros_like(p)

    def _no_decay_names(self, no_decay: NoDecay) -> set:
        if no_decay is None:
            no_decay = default_no_decay
        if callable(no_decay):
            return {name for name, p in self.params.items() if no_decay(name, p)}
        if isinstance(no_decay, (str, bytes)) or not isinstance(no_decay, Iterable):
            raise ValueError(
                "no_decay must be a function (name, array) -> bool, a set of parameter names "
                f"or None, got {type(no_decay).__name__} {no_decay!r}"
            )
        names = set(no_decay)
        unknown = sorted(str(n) for n in names if n not in self.params)
        if unknown:
            raise ValueError(f"no_decay names {unknown[0]!r}, which is not a parameter"
                             + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
        return names

    def weight_decay_of(self, name: str) -> float:
        """The weight decay applied to parameter ``name`` (0.0 when it is in no_decay_names)."""
        return 0.0 if name in self.no_decay_names else self.weight_decay

    def step(self, grads: Dict[str, np.ndarray], lr: Optional[float] = None) -> None:
        """Update every parameter in place; ``lr`` overrides ``self.lr`` for this step only.

        Raises ValueError (and changes nothing) for missing/extra/mis-shaped/mis-typed or
        non-finite gradients, naming the first such parameter.
        """
        lr = self._step_lr(lr)
        _check_grads(grads, self.params)
        step = self.step_count + 1  # t, counting this step
        if self.impl == "numba":
            from .kernels.optimizer import adamw_step_tensors  # the same rule, one pass each

            adamw_step_tensors(
                [(p, grads[name], self.buffers["exp_avg"][name], self.buffers["exp_avg_sq"][name],
                  self.weight_decay_of(name)) for name, p in self.params.items()],
                step=step, lr=lr, beta1=self.beta1, beta2=self.beta2, eps=self.eps)
        else:
            for name, p in self.params.items():
                adamw_update_(p, grads[name], self.buffers["exp_avg"][name],
                              self.buffers["exp_avg_sq"][name], step=step, lr=lr, beta1=self.beta1,
                              beta2=self.beta2, eps=self.eps, weight_decay=self.weight_decay_of(name))
        self.step_count = step


# ---- flat state (files) --------------------------------------------------------------------------


def flatten_state(state: Mapping) -> Dict[str, np.ndarray]:
    """``{"step": n, kind: {name: a}}`` → ``{"step": int64 0-d array, "kind.name": a}``."""
    flat = {"step": np.array(int(state["step"]), dtype=np.int64)}
    for kind, tensors in state.items():
        if kind == "step":
            continue
        for name, array in tensors.items():
            flat[f"{kind}.{name}"] = array
    return flat


def from_flat_state(flat: Mapping[str, np.ndarray]) -> dict:
    """The inverse of :func:`flatten_state` / ``optimizer.flat_state()``: a state dict.

    A key ``"exp_avg.layers.0.attn.q_proj.weight"`` splits at its first dot (kinds have none).
    The arrays are not copied here; ``load_state_dict`` copies and validates them.
    """
    if not isinstance(flat, Mapping):
        raise ValueError(f"flat state must be a dict {{str: array}}, got {type(flat).__name__}")
    if "step" not in flat:
        raise ValueError("flat state has no 'step' entry (a 0-d integer array)")
    step = flat["step"]
    if not (isinstance(step, np.ndarray) and step.ndim == 0
            and np.issubdtype(step.dtype, np.integer)):
        raise ValueError(f"flat state 'step' must be a 0-d integer array, got {step!r}")
    state: dict = {"step": int(step)}
    for key, array in flat.items():
        if key == "step":
            continue
        kind, dot, name = key.partition(".")
        if not dot or not name:
            raise ValueError(
                f"flat state key {key!r} is not 'step' or '<kind>.<parameter name>'"
            )
        state.setdefault(kind, {})[name] = array
    return state


# ---- gradient clipping and the schedule ----------------------------------------------------------


def _check_grad_dict(grads) -> None:
    if not isinstance(grads, Mapping):
        raise ValueError(f"grads must be a dict {{name: array}}, got {type(grads).__name__}")
    for name, g in grads.items():
        if not isinstance(g, np.ndarray) or g.dtype not in (np.float32, np.float64):
            raise ValueError(f"grads[{name!r}] must be a float32/float64 numpy.ndarray, got "
                             f"{getattr(g, 'dtype', type(g).__name__)}")


def grad_global_norm(grads: Dict[str, np.ndarray], impl: str = "numpy") -> float:
    """‖g‖₂ over every tensor at once, Σ g² accumulated in float64 (NaN/inf if any entry is).

    impl: "numpy" (a float64 dot per tensor) or "numba" (:mod:`npformer.kernels.optimizer`,
    one parallel pass per tensor, no float64 copy)."""
    _check_grad_dict(grads)
    if check_impl(impl) == "numba":
        from .kernels.optimizer import sum_of_squares_flat

        return math.sqrt(sum(sum_of_squares_flat(g.reshape(-1)) for g in grads.values()))
    total_sq = 0.0
    for g in grads.values():
        flat = g.reshape(-1).astype(np.float64, copy=False)  # (N,)
        total_sq += float(np.dot(flat, flat))  # Σ g²
    return math.sqrt(total_sq)  # ‖g‖₂ over all tensors at once


def clip_grad_norm(grads: Dict[str, np.ndarray], max_norm: float, impl: str = "numpy") -> float:
    """Scale every gradient in place by max_norm / (‖g‖ + 1e-6) when that factor is < 1.

    Returns the global 2-norm before clipping, as a float (accumulated in float64 whatever
    the gradients' dtype; torch accumulates in the gradients' dtype, so float32 norms agree
    to float32 rounding). Same rule as ``torch.nn.utils.clip_grad_norm_(ps, max_norm)``.

    A non-finite norm (a NaN or inf gradient) is RETURNED and the gradients are left
    untouched; the caller decides (skip the step, stop). torch would multiply by the NaN or 0
    factor, or raise with ``error_if_nonfinite=True``. Either way nothing non-finite is
    applied: ``SGD.step`` / ``AdamW.step`` refuse non-finite gradients with a ValueError.
    impl: as :func:`grad_global_norm`; the scaling is the same in-place multiply.
    """
    max_norm = check_positive(max_norm, "max_norm")
    total_norm = grad_global_norm(grads, impl)
    if not math.isfinite(total_norm):
        return total_norm
    clip_coef = max_norm / (total_norm + CLIP_EPS)
    if clip_coef < 1.0:
        for g in grads.values():
            g *= clip_coef  # a Python float: cast to g's dtype, no upcast
    return total_norm


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int,
          min_lr: float = 0.0) -> float:
    """The learning rate for step ``step`` (0-based): linear warm-up, then cosine to min_lr.

        step < warmup_steps:      base_lr · (step + 1) / warmup_steps
        step < total_steps:       min_lr + (base_lr − min_lr) · (1 + cos(π p)) / 2,
                                  p = (step − warmup_steps) / (total_steps − warmup_steps)
        otherwise:                min_lr

    warmup_steps = 0 means no warm-up. A warm-up longer than the run is allowed (short test
    runs): the run then ends during the warm-up. Requires 0 ≤ min_lr ≤ base_lr.
    """
    step = check_int(step, "step", 0)
    warmup_steps = check_int(warmup_steps, "warmup_steps", 0)
    total_steps = check_int(total_steps, "total_steps", 1)
    base_lr = _check_nonnegative(base_lr, "base_lr")
    min_lr = _check_nonnegative(min_lr, "min_lr")
    if min_lr > base_lr:
        raise ValueError(f"min_lr must be <= base_lr (the schedule decays), got min_lr={min_lr} "
                         f"and base_lr={base_lr}")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / (total_steps - warmup_steps)  # in [0, 1)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
