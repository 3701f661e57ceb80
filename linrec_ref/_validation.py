"""Input checks shared by every public function.

Each check raises a ``ValueError`` (or ``TypeError`` for a wrong Python type) whose message names
the op, the argument, what was expected and what was given. Nothing is broadcast or cast: an input
of the wrong shape or dtype is an error, never a silent conversion.

The memory limit of the forms whose memory grows with T^2 lives here too (``memory_limit``,
``set_memory_limit``, the environment variable LINREC_MEMORY_LIMIT); the estimate that is checked
against it is ``_forms.check_quadratic_memory``.
"""
from __future__ import annotations

import numbers
import os
import re
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


# ndarray subclasses whose meaning an op would silently drop: a masked array's mask, a matrix's
# 2-D-only algebra. Other subclasses (np.memmap) are plain memory and are accepted as views.
_REJECTED_SUBCLASSES = (
    (np.ma.MaskedArray, "a numpy.ma.MaskedArray (its mask would be ignored); "
                        "pass {name}.filled(value) or np.asarray({name}.data) explicitly"),
    (np.matrix, "a numpy.matrix (matrix semantics are not supported); pass np.asarray({name})"),
)


def require_ndarray(op: str, name: str, x) -> np.ndarray:
    """x as a plain ndarray (a view of the same memory for np.memmap and other plain subclasses);
    anything else, masked arrays and matrices included, is a TypeError naming the argument."""
    for cls, why in _REJECTED_SUBCLASSES:
        if isinstance(x, cls):
            raise TypeError(f"{op}: argument '{name}' is {why.format(name=name)}; nothing is "
                            "converted silently")
    if not isinstance(x, np.ndarray):
        raise TypeError(
            f"{op}: argument '{name}' must be a numpy.ndarray, got {type(x).__name__} "
            "(convert explicitly, e.g. np.asarray(x, dtype=np.float64); nothing is converted silently)"
        )
    return x if type(x) is np.ndarray else x.view(np.ndarray)


def check_dtype(op: str, arg: Arg, x: np.ndarray) -> np.dtype:
    """Check x's dtype against the argument kind; return the real working dtype it implies
    (float64 for float64 and complex128)."""
    dt = x.dtype
    if arg.kind == "real" or (arg.kind == "any_float" and dt.kind == "f"):
        if dt not in REAL_DTYPES:
            raise InputError(f"{op}: argument '{arg.name}' has dtype {dt}; expected float32 or float64")
        return dt
    if arg.kind in ("complex", "any_float"):
        if dt not in REAL_OF:
            raise InputError(
                f"{op}: argument '{arg.name}' has dtype {dt}; expected complex64 or complex128"
            )
        return REAL_OF[dt]
    raise AssertionError(f"unknown kind {arg.kind}")  # pragma: no cover - spec error


def common_dtype(op: str, arrays: Dict[str, np.ndarray], implied: Dict[str, np.dtype],
                 real_dtype: Optional[np.dtype] = None) -> Optional[np.dtype]:
    """The one working precision of a call (float32 or float64).

    ``implied`` maps each argument to the real dtype its dtype implies. The working dtype is
    ``real_dtype`` when given (e.g. the inputs' dtype, when checking a cotangent), else the
    majority of the arguments (a tie goes to the first argument, q for most ops). The error
    names the first argument that differs and lists every argument's dtype.
    """
    if not implied:
        return real_dtype
    if real_dtype is None:
        counts: Dict[np.dtype, int] = {}
        for dt in implied.values():
            counts[dt] = counts.get(dt, 0) + 1
        real_dtype = max(counts, key=counts.get)  # max keeps the first of equal counts
    for name, dt in implied.items():
        if dt != real_dtype:
            x_dt = arrays[name].dtype
            want = real_dtype if x_dt.kind == "f" else COMPLEX_OF[real_dtype]
            seen = ", ".join(f"{n}: {a.dtype}" for n, a in arrays.items())
            raise InputError(
                f"{op}: argument '{name}' has dtype {x_dt}, but the other inputs are {real_dtype}; "
                f"expected {want} (inputs are never cast implicitly; dtypes seen: {seen})"
            )
    return real_dtype


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
    """Validate the arrays named in ``specs`` (type, shape, dtype, values); return the working dtype.

    drop: dimension letters to remove from every spec (``"T"`` for the single-token ``step``).
    An accepted ndarray subclass (np.memmap) is replaced in ``values`` by a plain ndarray view.
    """
    arrays: Dict[str, np.ndarray] = {}
    implied: Dict[str, np.dtype] = {}
    for arg in specs:
        x = values.get(arg.name)
        if x is None:
            if arg.optional:
                continue
            raise TypeError(f"{op}: argument '{arg.name}' is required")
        x = values[arg.name] = require_ndarray(op, arg.name, x)
        binder.bind(arg.name, x, tuple(d for d in arg.dims if d not in drop))
        arrays[arg.name], implied[arg.name] = x, check_dtype(op, arg, x)
    real_dtype = common_dtype(op, arrays, implied, real_dtype)
    for arg in specs:
        if arg.name in arrays:
            check_values(op, arg, arrays[arg.name])
    return real_dtype


def check_flag(op: str, name: str, value, kind: str = "argument") -> bool:
    """A boolean flag: bool or np.bool_ only (a string such as 'no' is not a truth value).
    kind names it in the message: "argument" (output_final_state) or "option" (an op option)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{op}: {kind} '{name}' must be True or False, got {value!r} "
                        f"({type(value).__name__})")
    return bool(value)


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


# ---------------------------------------------------------------------------- memory limit
class MemoryLimitError(InputError, MemoryError):
    """A form whose memory grows with T^2 would exceed the memory limit at these sizes.

    Raised before anything is allocated. Both an ``InputError`` (the sizes are the problem) and a
    ``MemoryError`` (what the call would have run into).
    """


MEMORY_LIMIT_ENV = "LINREC_MEMORY_LIMIT"
_FALLBACK_LIMIT = 8 * 2**30      # when the physical memory cannot be read
_memory_limit: Optional[int] = None   # set_memory_limit(); None: the environment or the default
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def _physical_memory() -> Optional[int]:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):  # not a POSIX system
        return None


def default_memory_limit() -> int:
    """Half the physical memory where it can be read (POSIX), else 8 GiB."""
    physical = _physical_memory()
    return physical // 2 if physical else _FALLBACK_LIMIT


def parse_bytes(text: str, what: str) -> int:
    """'68719476736', '64GiB', '64 GB', '1.5T' -> bytes (K/M/G/T alone are binary units)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS or float(m.group(1)) * _UNITS[unit] < 1:
        raise InputError(f"{what} must be a positive number of bytes, optionally with a unit "
                         f"(e.g. 68719476736, 64GiB, 64GB), got {text!r}")
    return int(float(m.group(1)) * _UNITS[unit])


def memory_limit() -> int:
    """The limit, in bytes, on the estimated memory of a form that grows with T^2: the value of
    ``set_memory_limit``, else the environment variable LINREC_MEMORY_LIMIT, else
    ``default_memory_limit()`` (half the physical memory, or 8 GiB where it cannot be read)."""
    if _memory_limit is not None:
        return _memory_limit
    env = os.environ.get(MEMORY_LIMIT_ENV)
    if env:
        return parse_bytes(env, f"the environment variable {MEMORY_LIMIT_ENV}")
    return default_memory_limit()


def set_memory_limit(n_bytes) -> None:
    """Set the memory limit of quadratic forms (parallel, its vjp, attention_matrix) to n_bytes
    (an int > 0, or a string such as "64GiB"); None restores the environment variable
    LINREC_MEMORY_LIMIT or the default (half the physical memory)."""
    global _memory_limit
    if n_bytes is None:
        _memory_limit = None
        return
    if isinstance(n_bytes, str):
        _memory_limit = parse_bytes(n_bytes, "set_memory_limit: argument 'n_bytes'")
        return
    if isinstance(n_bytes, (bool, np.bool_)) or not isinstance(n_bytes, numbers.Integral):
        raise TypeError(f"set_memory_limit: argument 'n_bytes' must be an int, a string such as "
                        f"'64GiB', or None (the default), got {type(n_bytes).__name__}")
    if n_bytes < 1:
        raise InputError(f"set_memory_limit: argument 'n_bytes' must be >= 1, got {n_bytes}")
    _memory_limit = int(n_bytes)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover
