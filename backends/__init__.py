"""Backends: where an op's forms are computed. Installed as ``linrec_ref.backends``.

A backend maps (op name, form name) to a function with exactly the signature and semantics of
the NumPy reference's function of the same name. "numpy" is the reference itself. Faster
backends (Numba on the CPU, CuPy on NVIDIA GPUs) plug in here with ``register`` and are
validated against the reference before they are timed; callers never change.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional


class Backend:
    """A named resolver: ``resolve(op, form)`` returns the function computing that form."""

    def __init__(self, name: str, resolve: Callable[[str, str], Callable], description: str = ""):
        self.name = name
        self._resolve = resolve
        self.description = description

    def resolve(self, op: str, form: str) -> Callable:
        return self._resolve(op, form)

    def __repr__(self) -> str:
        return f"Backend({self.name!r})"


def _numpy_resolve(op: str, form: str) -> Callable:
    from linrec_ref import registry
    return registry.form(op, form)


_BACKENDS: Dict[str, Backend] = {
    "numpy": Backend("numpy", _numpy_resolve, "the readable NumPy reference (float64 ground truth)"),
}


def register(backend: Backend) -> None:
    """Add (or replace) a backend under ``backend.name``."""
    _BACKENDS[backend.name] = backend


DEFAULT = "numpy"


def get(name: Optional[str] = None) -> Backend:
    """The backend called ``name`` (None: the default, "numpy"); a clear error lists the available ones."""
    if name is None:
        name = DEFAULT
    if not isinstance(name, str) or name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}; available backends: {', '.join(sorted(_BACKENDS))}")
    return _BACKENDS[name]


def available() -> tuple:
    return tuple(sorted(_BACKENDS))
