"""``npformer.functional`` with NumPy alone: no numba, no scipy, no kernels/nn/models.

The functional pairs are the readable reference a learner steps through; reading them must
not need numba (issue 17). Two checks:

- statically, every ``import`` under npformer/functional/ and in npformer/_validate.py
  (including imports inside functions) names neither numba, scipy, torch nor
  npformer.kernels / npformer.nn / npformer.models;
- dynamically, a subprocess whose ``sys.meta_path`` refuses numba and scipy imports
  ``npformer.functional`` and runs one forward/backward pair (or other public function) of
  its ``__all__`` on a tiny float64 input, one subprocess per name (a name added to
  ``__all__`` without a case here fails every run), then checks that neither numba nor
  scipy nor npformer.kernels / nn / models was loaded.
"""

from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys

import pytest

import npformer.functional as functional

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "npformer"
FORBIDDEN = ("numba", "scipy", "torch", "npformer.kernels", "npformer.nn", "npformer.models")


def _imported_modules(source: str, package: str):
    """Absolute names of every module a source file of ``package`` (e.g.
    "npformer.functional") imports, anywhere in the file, relative imports resolved."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            # "from .. import kernels" imports npformer.kernels: name the imported names too
            yield module
            yield from (f"{module}.{alias.name}" for alias in node.names)


@pytest.mark.parametrize(
    "path",
    sorted((PACKAGE / "functional").glob("*.py")) + [PACKAGE / "_validate.py"],
    ids=lambda p: str(p.relative_to(PACKAGE)),
)
def test_no_forbidden_import(path):
    package = ".".join(path.relative_to(ROOT).parts[:-1])
    bad = [m for m in _imported_modules(path.read_text(encoding="utf-8"), package)
           if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}; npformer.functional must need NumPy only"


def test_import_scan_sees_a_kernel_import():
    # the scan itself can fail: relative and lazy imports of the kernels are named
    source = ("from ..kernels.erf import erf\nfrom .. import kernels\n"
              "def f():\n    import numba\n")
    names = set(_imported_modules(source, "npformer.functional"))
    assert {"npformer.kernels.erf", "npformer.kernels", "numba"} <= names


# Run in the subprocess: block numba and scipy, import npformer.functional, run every pair.
_SCRIPT = r'''
import importlib.abc
import sys


class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("numba", "scipy"):
            raise ModuleNotFoundError(f"{name} is blocked: npformer.functional needs NumPy only")
        return None


sys.meta_path.insert(0, Refuse())

import numpy as np

import npformer.functional as F

rng = np.random.default_rng(0)


def r(*shape):
    return rng.standard_normal(shape)


B, H, K, T, D, C, V, F_ = 2, 4, 2, 3, 4, 6, 5, 8
ids = rng.integers(0, V, (B, T))
positions = np.arange(T)

# name -> (forward args, forward kwargs); the backward gets an upstream gradient like y
cases = {
    "attention": ((r(B, H, T, D), r(B, K, T, D), r(B, K, T, D)), dict(causal=True)),
    "head_gate": ((r(B, T, 8), r(B, H, T, D), r(H, 8 // H), r(H)), {}),
    "cross_entropy": ((r(B, T, V), ids), {}),
    "nll": ((F.log_softmax_forward(r(B, T, V))[0], ids), {}),
    "dropout": ((r(B, T, C), 0.25, np.random.default_rng(1)), {}),
    "embedding": ((ids, r(V, C)), {}),
    "gelu": ((r(B, T, C),), {}),
    "geglu": ((r(B, T, C), r(F_, C), r(F_, C), r(C, F_)), {}),
    "swiglu": ((r(B, T, C), r(F_, C), r(F_, C), r(C, F_)), {}),
    "layernorm": ((r(B, T, C), r(C), r(C)), {}),
    "linear": ((r(B, T, C), r(V, C), r(V)), {}),
    "learned_positions": ((r(B, T, C), r(T + 1, C)), {}),
    "sinusoidal": ((r(B, T, C),), {}),
    "relu": ((r(B, T, C),), {}),
    "rmsnorm": ((r(B, T, C), r(C)), {}),
    "rope": ((r(B, H, T, D), positions), {}),
    "silu": ((r(B, T, C),), {}),
    "softmax": ((r(B, T, V),), {}),
    "log_softmax": ((r(B, T, V),), {}),
    "softmax1": ((r(B, T, V),), {}),
    "clipped_softmax": ((r(B, T, V),), {}),
    "sink_softmax": ((r(B, T, V), r(B, T, 1)), {}),
    "softcap": ((r(B, T, V), 3.0), {}),
}

others = {  # the public functions that are not pairs
    "attention_mask": lambda: F.attention_mask(B, T, T, causal=True),
    "sinusoidal_table": lambda: F.sinusoidal_table(T, C),
    "rope_angles": lambda: F.rope_angles(positions, D),
    "softmax_jacobian": lambda: F.softmax_jacobian(F.softmax_forward(r(V))[0]),
}
pairs = sorted(n[: -len("_forward")] for n in F.__all__ if n.endswith("_forward"))
singles = sorted(n for n in F.__all__ if not n.endswith(("_forward", "_backward")))
missing = sorted((set(pairs) - set(cases)) | (set(singles) - set(others)))
assert not missing, f"public functions without a case in this test: {missing}"

for name in sys.argv[1:]:  # none: the import alone
    if name in others:
        others[name]()
        continue
    args, kwargs = cases[name]
    y, cache = getattr(F, name + "_forward")(*args, **kwargs)
    dy = np.ones_like(y) if np.ndim(y) == 0 else r(*np.shape(y))
    grads = getattr(F, name + "_backward")(dy, cache)
    grads = grads if isinstance(grads, tuple) else (grads,)
    for g in grads:
        assert g is None or np.isfinite(g).all(), name
    assert np.isfinite(y).all(), name

loaded = sorted(m for m in sys.modules
                if m.split(".")[0] in ("numba", "scipy")
                or m.startswith(("npformer.kernels", "npformer.nn", "npformer.models")))
assert not loaded, f"loaded: {loaded}"
print("ran", sys.argv[1:])
'''


def _run(script, *names):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", script, *names], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


_PUBLIC = sorted({name[: -len("_forward")] if name.endswith("_forward") else name
                  for name in functional.__all__ if not name.endswith("_backward")})


@pytest.mark.parametrize("name", [None] + _PUBLIC)
def test_functional_runs_with_numpy_alone(name):
    # one subprocess per public pair or function (None: the import alone), so that a
    # failure names the module that pulls in numba
    names = () if name is None else (name,)
    result = _run(_SCRIPT, *names)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"ran {list(names)}" in result.stdout


def test_the_blocker_blocks():
    # the subprocess's meta_path finder does refuse numba (so the test above can fail)
    script = _SCRIPT.split("import numpy as np")[0] + "import numba\n"
    result = _run(script)
    assert result.returncode != 0 and "numba is blocked" in result.stderr
