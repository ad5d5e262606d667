"""Modules: objects that own parameters and their gradients, and call functional pairs.

A module's ``forward`` returns ``(y, cache)`` and its ``backward(dy, cache)`` returns the
input gradient while *adding* every parameter gradient into ``module.grads``. The cache is a
value handed back to the caller, never kept on the module: a module used twice in one step
(tied embeddings, a block applied to two inputs) gets two caches, and both backward calls
accumulate, exactly as the chain rule sums the contributions of every use of a parameter.

    y1, c1 = layer.forward(x1)
    y2, c2 = layer.forward(x2)
    layer.zero_grad()
    dx2 = layer.backward(dy2, c2)      # grads = ∂L/∂θ through the second use
    dx1 = layer.backward(dy1, c1)      # grads += ∂L/∂θ through the first use

Parameters are named ``params["weight"]`` locally and ``"child.weight"`` from a parent
(``named_parameters``), the names the checkpoints and the gradient checker use.
"""

from __future__ import annotations

from typing import Dict, Iterator, Tuple

import numpy as np


class Module:
    """Base class: ``params`` and ``grads`` (same keys and shapes) plus child modules."""

    def __init__(self) -> None:
        object.__setattr__(self, "params", {})
        object.__setattr__(self, "grads", {})
        object.__setattr__(self, "_children", {})

    def __setattr__(self, name, value) -> None:
        if isinstance(value, Module):
            self._children[name] = value
        elif name in self._children:
            del self._children[name]
        object.__setattr__(self, name, value)

    def add_parameter(self, name: str, value: np.ndarray) -> np.ndarray:
        """Register a parameter (a contiguous float array) and its zero gradient."""
        if "." in name:
            raise ValueError(f"parameter name {name!r} must not contain '.'")
        value = np.ascontiguousarray(value)
        self.params[name] = value
        self.grads[name] = np.zeros_like(value)
        return value

    def named_children(self) -> Iterator[Tuple[str, "Module"]]:
        return iter(self._children.items())

    def named_parameters(self, prefix: str = "") -> Iterator[Tuple[str, np.ndarray]]:
        for name, value in self.params.items():
            yield prefix + name, value
        for child_name, child in self._children.items():
            yield from child.named_parameters(prefix + child_name + ".")

    def named_gradients(self, prefix: str = "") -> Iterator[Tuple[str, np.ndarray]]:
        for name, value in self.grads.items():
            yield prefix + name, value
        for child_name, child in self._children.items():
            yield from child.named_gradients(prefix + child_name + ".")

    def parameters(self) -> Dict[str, np.ndarray]:
        """Every parameter by dotted name (the arrays themselves, not copies)."""
        return dict(self.named_parameters())

    def gradients(self) -> Dict[str, np.ndarray]:
        """Every accumulated gradient by dotted name (the arrays themselves)."""
        return dict(self.named_gradients())

    def zero_grad(self) -> None:
        for grad in self.grads.values():
            grad[...] = 0
        for child in self._children.values():
            child.zero_grad()

    def num_parameters(self) -> int:
        return int(sum(p.size for _, p in self.named_parameters()))

    def accumulate(self, name: str, grad) -> None:
        """``grads[name] += grad`` (skipped for None: an absent optional parameter)."""
        if grad is not None:
            self.grads[name] += grad


class ModuleList(Module):
    """An ordered list of modules, named ``"0"``, ``"1"``, ... (``layers.3.attn.q_proj.weight``)."""

    def __init__(self, modules=()) -> None:
        super().__init__()
        object.__setattr__(self, "_items", [])
        for module in modules:
            self.append(module)

    def append(self, module: Module) -> None:
        if not isinstance(module, Module):
            raise ValueError(f"ModuleList holds modules, got {type(module).__name__}")
        self._children[str(len(self._items))] = module
        self._items.append(module)

    def __getitem__(self, index: int) -> Module:
        return self._items[index]

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self):
        return iter(self._items)
