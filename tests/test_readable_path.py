"""The readable path: with ``attention_impl="numpy"`` and ``layer_impl="numpy"`` a model's
forward and backward (and an AdamW step) run the functional pairs of npformer/functional/ —
the code a learner steps through in a debugger — and never a function defined under
npformer/kernels/.

Two detectors, so that neither way of reaching a kernel goes unseen:
- ``sys.setprofile`` records every Python frame whose code lives in npformer/kernels/ (any
  Python function there, however it was referenced: a module attribute, a tuple in a dict,
  a local import);
- every function or numba dispatcher defined in npformer.kernels, wherever a module of
  npformer holds it as a global (``from ..kernels.x import f``) and on the kernel modules
  themselves, is replaced by one that raises (a compiled dispatcher runs no Python frame).
The positive control runs the same detectors on the default fused path and requires them to
fire, so the test can fail.

Also: the six functional modules of the attention/softmax/loss/RoPE pages, called (scaled
RoPE included, which validates through ModelConfig), need NumPy alone.
"""

import importlib
import inspect
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import forward_backward, random_weight_model, tiny_train_options
from npformer.optim import AdamW
from npformer.presets import preset_names
from npformer.train import Trainer

KERNELS_DIR = str(Path(__file__).resolve().parents[1] / "npformer" / "kernels") + os.sep


def _is_kernel_callable(value) -> bool:
    module = getattr(value, "__module__", None) or ""
    if not module.startswith("npformer.kernels"):
        return False
    return inspect.isfunction(value) or hasattr(value, "py_func")  # numba dispatcher


def _import_every_module():
    """Every module of npformer, imported before the detectors are installed: module and
    class bodies run now (they are not calls), and every global can be patched."""
    import npformer

    for info in pkgutil.walk_packages(npformer.__path__, "npformer."):
        if info.name != "npformer.__main__":
            importlib.import_module(info.name)


@pytest.fixture
def kernel_calls(monkeypatch):
    """A list that collects the name of every kernel function reached while the fixture is
    active (Python frames under npformer/kernels/, and calls to the patched globals)."""
    _import_every_module()
    calls = []

    def raiser(name):
        def called(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"the readable path called the kernel {name}")
        return called

    for module_name, module in list(sys.modules.items()):
        if not module_name.startswith("npformer") or module is None:
            continue
        for attr, value in list(vars(module).items()):
            if _is_kernel_callable(value):
                monkeypatch.setattr(module, attr, raiser(f"{value.__module__}.{attr}"))

    def profile(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(KERNELS_DIR):
            calls.append(f"{frame.f_code.co_filename}:{frame.f_code.co_name}")

    sys.setprofile(profile)
    try:
        yield calls
    finally:
        sys.setprofile(None)


def _readable_model(name, **fields):
    model = random_weight_model(name, layer_impl="numpy", attention_impl="numpy", **fields)
    assert model.config.layer_impl == "numpy" and model.config.attention_impl == "numpy"
    return model


@pytest.mark.parametrize("name", preset_names())
def test_the_readable_path_calls_no_kernel(name, kernel_calls):
    """Every preset (encoder-decoder, parallel blocks, RoPE both layouts, GQA, documents,
    local windows), dropout on: forward, backward and one AdamW step reach no kernel."""
    model = _readable_model(name, dropout=0.1)
    logits, grads = forward_backward(model)
    AdamW(model.parameters(), lr=1e-3, impl=model.config.layer_impl).step(model.gradients(), lr=1e-3)
    assert not kernel_calls, sorted(set(kernel_calls))
    assert np.isfinite(logits).all() and all(np.isfinite(g).all() for g in grads.values())


@pytest.mark.parametrize("preset", ["gpt2", "llama3"])
def test_a_readable_training_step_calls_no_kernel(tmp_path, preset, kernel_calls):
    """Trainer.train_step with both switches "numpy": the loss is the functional
    cross-entropy, the gradient norm and AdamW the NumPy ones."""
    options = tiny_train_options(tmp_path, preset=preset, dtype="float64")
    options.model_overrides = dict(options.model_overrides, layer_impl="numpy",
                                   attention_impl="numpy", dropout=0.1)
    trainer = Trainer(options, progress=False)
    assert not trainer.fused
    row = trainer.train_step()
    assert not kernel_calls, sorted(set(kernel_calls))
    assert np.isfinite(row["loss"]) and np.isfinite(row["grad_norm"])


@pytest.mark.parametrize("fields", [dict(softmax="clipped"), dict(softmax="softmax1"),
                                    dict(attention_softcap=30.0, final_logit_softcap=20.0)])
def test_the_softmax_variants_on_the_readable_path_call_no_kernel(fields, kernel_calls):
    model = _readable_model("llama3", **fields)
    forward_backward(model)
    assert not kernel_calls, sorted(set(kernel_calls))


def test_the_readable_attention_is_functional_attention():
    """The core a debugger steps into is npformer/functional/attention.py itself."""
    from npformer.functional import attention as functional_attention
    from npformer.functional import rope as functional_rope
    from npformer.nn.attention import MultiHeadAttention

    model = _readable_model("llama3")
    cores = [m for m in _modules(model) if isinstance(m, MultiHeadAttention)]
    assert cores
    for attention in cores:
        assert attention.core == (functional_attention.attention_forward,
                                  functional_attention.attention_backward)
        assert attention.rope_pair == (functional_rope.rope_forward, functional_rope.rope_backward)


def _modules(model):
    found, stack = [], [model]
    while stack:
        module = stack.pop()
        found.append(module)
        stack.extend(child for _, child in module.named_children())
    return found


@pytest.mark.parametrize("name", ["llama3", "transformer-2017"])
def test_the_detectors_see_the_fused_path(name, kernel_calls):
    """Positive control: the default switches (numba) are caught by the same detectors."""
    model = random_weight_model(name)  # layer_impl="numba", attention_impl="numba"
    with pytest.raises(AssertionError, match="called the kernel"):
        forward_backward(model)
    assert kernel_calls


NUMPY_ONLY = r"""
import importlib, sys, types

class Block:
    # numba, scipy and torch are absent; so are the kernels, the modules and the models'
    # layers (npformer.models.stats, which ModelConfig reads, may load)
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top in ("numba", "scipy", "torch") or name.startswith(
                ("npformer.kernels", "npformer.nn")) or (
                name.startswith("npformer.models.") and name != "npformer.models.stats"):
            raise ImportError("not installed here: " + name)

sys.meta_path.insert(0, Block())
import numpy as np
import npformer

# the six modules themselves, whatever functional/__init__ imports beside them
package = types.ModuleType("npformer.functional")
package.__path__ = [npformer.__path__[0] + "/functional"]
sys.modules["npformer.functional"] = package
F = {m: importlib.import_module("npformer.functional." + m) for m in
     ("softmax", "softmax_variants", "cross_entropy", "attention", "attention_mask", "rope")}

rng = np.random.default_rng(0)
q = rng.standard_normal((1, 4, 5, 6))  # (B, H, T, D)
k, v = rng.standard_normal((2, 1, 2, 5, 6))  # (B, K, S, D) each: grouped-query
scaling = F["rope"].RopeScaling("yarn", 4.0, 4)
qr, cache = F["rope"].rope_forward(q, theta=500000.0, scaling=scaling)
F["rope"].rope_backward(qr, cache)
o, cache = F["attention"].attention_forward(qr, k, v, causal=True, softcap=5.0)
F["attention"].attention_backward(o, cache)
loss, cache = F["cross_entropy"].cross_entropy_forward(o.reshape(-1, 6), np.arange(20) % 6,
                                                       label_smoothing=0.1)
F["cross_entropy"].cross_entropy_backward(1.0, cache)
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("numba", "scipy", "torch")
             or m.startswith(("npformer.kernels", "npformer.nn")))
assert not bad, bad
print("numpy only: ok")
"""


def test_the_attention_and_loss_modules_run_with_numpy_alone():
    """softmax, softmax_variants, cross_entropy, attention, attention_mask and rope — scaled
    RoPE included, whose schedule is validated by ModelConfig — import and run with numba,
    scipy, torch, the kernels and the layers unavailable."""
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-c", NUMPY_ONLY], capture_output=True, text=True,
                         env=env, cwd=str(repo), timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "numpy only: ok" in run.stdout
