"""Input checks shared by every public function.

Each check raises a ``ValueError`` (or ``TypeError`` for a wrong Python type) whose message names
the op, the argument, what was expected and what was given. Nothing is broadcast or cast: an input
of the wrong shape or dtype is an error, never a silent conversion.
"""
from __future__ import annotations

import numbers
from typing import Dict, Iterable, Optional, Tuple

import numpy as np

from ._spec import Arg

REAL_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
COMPLEX_OF = {np.dtype(np.float32): np.dtype(np.complex64), np.dtype(np.float64): np.dtype(np.complex128)}
REAL_OF = {v: k for k, v in COMPLEX_OF.items()}


class InputError(ValueError):
    """A bad argument: wrong shape, dtype, range, or a NaN/Inf where none is allowed."""


def _fmt_dims(dims, sizes: Dict[str, int]) -> str:
    letters = "[" + ", ".join(dims) + "]"
    if all(d in sizes for d in dims):
        return f"{letters} = [{', '.join(str(sizes[d]) for d in dims)}]"
    return letters


def _first_index(mask: np.ndarray) -> Tuple[int, ...]:
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(mask)), mask.shape))


class Binder:
    """Binds dimension letters to sizes across the arguments of one call.

    >>> b = Binder("gla"); b.bind("q", q, "BTHK"); b.bind("v", v, "BTHV")  # doctest: +SKIP
    A letter seen twice must have the same size; the error names both arguments.
    """

    def __init__(self, op: str, sizes: Optional[Dict[str, int]] = None, sources=None):
        self.op = op
        self.sizes: Dict[str, int] = dict(sizes or {})
        self.source: Dict[str, str] = dict(sources or {d: "the call" for d in self.sizes})

    def bind(self, name: str, x: np.ndarray, dims) -> None:
        if x.ndim != len(dims):
            raise InputError(
                f"{self.op}: argument '{name}' must have shape {_fmt_dims(dims, self.sizes)} "
                f"(rank {len(dims)}), got shape {tuple(x.shape)} (rank {x.ndim})"
            )
        for axis, (letter, size) in enumerate(zip(dims, x.shape)):
            if letter in self.sizes and self.sizes[letter] != size:
                raise InputError(
                    f"{self.op}: argument '{name}' has {letter}={size} at axis {axis}, but "
                    f"{letter}={self.sizes[letter]} from {self.source[letter]}; expected shape "
                    f"{_fmt_dims(dims, self.sizes)}, got {tuple(x.shape)}"
                )
            if letter not in self.sizes:
                self.sizes[letter] = int(size)
                self.source[letter] = f"argument '{name}'"


def require_ndarray(op: str, name: str, x) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise TypeError(
            f"{op}: argument '{name}' must be a numpy.ndarray, got {type(x).__name__} "
            "(convert explicitly, e.g. np.asarray(x, dtype=np.float64); nothing is converted silently)"
        )
    return x


def check_dtype(op: str, arg: Arg, x: np.ndarray, real_dtype: Optional[np.dtype]) -> np.dtype:
    """Check x's dtype against the argument kind; return the real working dtype of the call."""
    dt = x.dtype
    if arg.kind == "real" or (arg.kind == "any_float" and dt.kind == "f"):
        if dt not in REAL_DTYPES:
            raise InputError(f"{op}: argument '{arg.name}' has dtype {dt}; expected float32 or float64")
        implied = dt
    elif arg.kind in ("complex", "any_float"):
        if dt not in REAL_OF:
            raise InputError(
                f"{op}: argument '{arg.name}' has dtype {dt}; expected complex64 or complex128"
            )
        implied = REAL_OF[dt]
    else:  # pragma: no cover - spec error
        raise AssertionError(f"unknown kind {arg.kind}")
    if real_dtype is not None and implied != real_dtype:
        want = real_dtype if dt.kind == "f" else COMPLEX_OF[real_dtype]
        raise InputError(
            f"{op}: argument '{arg.name}' has dtype {dt}, but the other inputs are {real_dtype}; "
            f"expected {want} (inputs are never cast implicitly)"
        )
    return implied


def check_values(op: str, arg: Arg, x: np.ndarray) -> None:
    """NaN is never allowed; Inf only as -inf in a log gate; gates <= 0; positive args > 0."""
    if x.size == 0:
        return
    nan = np.isnan(x)
    if nan.any():
        raise InputError(f"{op}: argument '{arg.name}' contains NaN (first at index {_first_index(nan)})")
    if arg.log_gate:
        if np.iscomplexobj(x):  # complex log decay: the real part is the log magnitude
            bad = ~np.isfinite(x)
            if bad.any():
                raise InputError(f"{op}: argument '{arg.name}' contains Inf at index {_first_index(bad)}")
            pos = x.real > 0
            if pos.any():
                i = _first_index(pos)
                raise InputError(
                    f"{op}: argument '{arg.name}' is a complex log decay and needs real part <= 0 "
                    f"(|lambda| <= 1); got real part {x.real[i]!r} at index {i}"
                )
            return
        pos = x > 0
        if pos.any():
            i = _first_index(pos)
            raise InputError(
                f"{op}: argument '{arg.name}' is a log decay and must be <= 0 (decay = exp({arg.name}) "
                f"in [0, 1]; -inf is a hard reset); got {x[i]!r} at index {i}. "
                "Pass log(a), not the probability a."
            )
        return
    bad = ~np.isfinite(x)
    if bad.any():
        raise InputError(f"{op}: argument '{arg.name}' contains Inf at index {_first_index(bad)}")
    if arg.nonnegative:
        neg = x < 0
        if neg.any():
            i = _first_index(neg)
            raise InputError(f"{op}: argument '{arg.name}' must be >= 0; got {x[i]!r} at index {i}")
    if arg.positive:
        nonpos = x <= 0
        if nonpos.any():
            i = _first_index(nonpos)
            raise InputError(f"{op}: argument '{arg.name}' must be > 0; got {x[i]!r} at index {i}")


def check_arrays(op: str, specs: Iterable[Arg], values: Dict[str, object], binder: Binder,
                 real_dtype: Optional[np.dtype] = None, drop: str = "") -> Optional[np.dtype]:
    """Validate the arrays named in ``specs`` (shape, dtype, values); return the working dtype.

    drop: dimension letters to remove from every spec (``"T"`` for the single-token ``step``).
    """
    for arg in specs:
        x = values.get(arg.name)
        if x is None:
            if arg.optional:
                continue
            raise TypeError(f"{op}: argument '{arg.name}' is required")
        x = require_ndarray(op, arg.name, x)
        dims = tuple(d for d in arg.dims if d not in drop)
        binder.bind(arg.name, x, dims)
        real_dtype = check_dtype(op, arg, x, real_dtype)
        check_values(op, arg, x)
    return real_dtype


def check_scale(op: str, scale) -> Optional[float]:
    if scale is None:
        return None
    if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{op}: argument 'scale' must be a real number or None, got {type(scale).__name__}")
    if not np.isfinite(scale):
        raise InputError(f"{op}: argument 'scale' must be finite, got {scale}")
    return float(scale)


def check_chunk_size(op: str, chunk_size) -> int:
    if isinstance(chunk_size, (bool, np.bool_)) or not isinstance(chunk_size, numbers.Integral):
        raise TypeError(
            f"{op}: argument 'chunk_size' must be a positive integer, got {type(chunk_size).__name__}"
        )
    if chunk_size <= 0:
        raise InputError(f"{op}: argument 'chunk_size' must be a positive integer, got {chunk_size}")
    return int(chunk_size)


def check_cu_seqlens(op: str, cu_seqlens, batch: int, length: int) -> np.ndarray:
    """Varlen offsets: a 1-D integer array [0, ..., T], non-decreasing, with B == 1."""
    cu = require_ndarray(op, "cu_seqlens", cu_seqlens)
    if cu.ndim != 1 or cu.shape[0] < 2:
        raise InputError(
            f"{op}: argument 'cu_seqlens' must be a 1-D array of N+1 >= 2 offsets, got shape {tuple(cu.shape)}"
        )
    if cu.dtype.kind not in "iu":
        raise InputError(f"{op}: argument 'cu_seqlens' must have an integer dtype, got {cu.dtype}")
    if batch != 1:
        raise InputError(
            f"{op}: with cu_seqlens the sequences are packed along T and the batch size must be 1, got B={batch}"
        )
    if cu[0] != 0:
        raise InputError(f"{op}: argument 'cu_seqlens' must start at 0, got {int(cu[0])}")
    if cu[-1] != length:
        raise InputError(
            f"{op}: argument 'cu_seqlens' must end at T={length} (the packed length), got {int(cu[-1])}"
        )
    steps = np.diff(cu.astype(np.int64))
    if (steps < 0).any():
        i = int(np.argmax(steps < 0))
        raise InputError(
            f"{op}: argument 'cu_seqlens' must be non-decreasing; cu_seqlens[{i + 1}]={int(cu[i + 1])} "
            f"< cu_seqlens[{i}]={int(cu[i])}"
        )
    return cu.astype(np.int64)
