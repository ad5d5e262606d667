"""npformer: a transformer laboratory in NumPy with hand-derived, gradient-checked backward passes."""

__version__ = "0.1.0"
