"""Backends: where an op's forms are computed. Installed as ``linrec_ref.backends``.

A backend maps (op name, form name) to a function with exactly the signature and semantics of
the NumPy reference's function of the same name. Three are built in:

    "numpy"  the readable reference itself (float64 ground truth);
    "numba"  compiled CPU kernels (``pip install 'linrec_ref[numba]'``), see
             ``linrec_ref.backends.numba``; forms it does not compile run the NumPy form;
    "auto"   the default of the top-level entry points: "numba" when Numba can be imported,
             else "numpy". Deciding never imports Numba, so ``import linrec_ref`` stays NumPy-only.

``set_backend(name)`` (also ``linrec_ref.set_backend``) changes what ``backend=None`` means.
Other backends (CuPy on NVIDIA GPUs) plug in with ``register`` and are validated against the
reference (``linrec check --backend NAME``) before they are timed; callers never change.
"""
from __future__ import annotations

import importlib.util
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


def _numba_resolve(op: str, form: str) -> Callable:
    from . import numba as numba_backend   # imports Numba only now, with a clear error if missing
    return numba_backend.resolve(op, form)


def numba_installed() -> bool:
    """Whether Numba can be imported (checked without importing it)."""
    try:
        return importlib.util.find_spec("numba") is not None
    except (ImportError, ValueError):   # a broken or blocked installation counts as missing
        return False


def _auto_resolve(op: str, form: str) -> Callable:
    if numba_installed():
        from . import numba as numba_backend
        return numba_backend.resolve(op, form, fallback=True)
    return _numpy_resolve(op, form)


_BACKENDS: Dict[str, Backend] = {
    "numpy": Backend("numpy", _numpy_resolve, "the readable NumPy reference (float64 ground truth)"),
    "numba": Backend("numba", _numba_resolve,
                     "compiled CPU kernels (Numba); forms without a kernel run the NumPy form"),
    "auto": Backend("auto", _auto_resolve, "numba when Numba is installed, else numpy"),
}


def register(backend: Backend) -> None:
    """Add (or replace) a backend under ``backend.name``."""
    _BACKENDS[backend.name] = backend


DEFAULT = "auto"
_default = DEFAULT


def set_backend(name: Optional[str]) -> str:
    """Make ``name`` what ``backend=None`` means (None restores "auto"); returns the previous one."""
    global _default
    previous = _default
    if name is not None:
        get(name)               # validates the name
    _default = DEFAULT if name is None else name
    return previous


def get_backend() -> str:
    """The name that ``backend=None`` currently means."""
    return _default


def get(name: Optional[str] = None) -> Backend:
    """The backend called ``name`` (None: the default, see ``set_backend``); a clear error lists
    the available ones."""
    if name is None:
        name = _default
    if not isinstance(name, str) or name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}; available backends: {', '.join(sorted(_BACKENDS))}")
    return _BACKENDS[name]


def resolved_name(name: Optional[str] = None) -> str:
    """The concrete backend a name stands for: "auto" (or None meaning it) -> "numba" or "numpy"."""
    name = _default if name is None else name
    get(name)
    if name == "auto":
        return "numba" if numba_installed() else "numpy"
    return name


def available() -> tuple:
    """The names of the registered backends, sorted ("auto" and "numpy" always; "numba" once
    registered)."""
    return tuple(sorted(_BACKENDS))
