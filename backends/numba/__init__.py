"""The Numba CPU backend: compiled loops behind the NumPy reference's API.

    import linrec_ref
    o, S = linrec_ref.gla(q, k, v, g, form="recurrent", backend="numba", output_final_state=True)
    grads = linrec_ref.gla.vjp(q, k, v, g, do=do, form="recurrent", backend="numba")
    o, S = linrec_ref.gla(q, k, v, g, form="recurrent", backend="numba", num_threads=1)

Every public function here is the NumPy form's own validation layer (``linrec_ref._forms``:
argument checks, scale default, zero initial state, cu_seqlens segments, T = 0, grouped heads,
output_final_state) wrapped around a compiled core, so errors, shapes and options are exactly
the reference's. The cores apply the op's input maps with the reference's own functions (l2 norm,
beta activation) and run the time loop in Numba; ``accelerated(op)`` lists the forms that have a
kernel, and every other form (``parallel``, for instance, and the chunkwise forms not yet
compiled) runs the NumPy form unchanged; ``linrec ops`` shows the same table.

Kernels: time sequential; parallel over batch x heads, and over blocks of the value axis when
batch x heads is below the thread count (``prange``); the state in a local K x V array; the
backward by the reference's reverse loop, recomputing states from checkpoints every ~sqrt(T)
steps (O(sqrt(T) K V) memory per head). Accumulation is in the inputs' dtype, as the reference.

Threads: Numba's pool (``NUMBA_NUM_THREADS``, default the core count) and, per call,
``num_threads=n``. The kernels call no BLAS inside their parallel regions, so Numba and BLAS
threads never multiply.

Compilation: on the first call of each kernel and dtype (``cache=True``); the cache goes to
``NUMBA_CACHE_DIR`` when set, else to ``~/.cache/linrec_ref/numba`` (``$XDG_CACHE_HOME`` is
honoured), never into the source tree.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

INSTALL_HINT = "pip install 'linrec_ref[numba]'"


def cache_dir() -> Path:
    """Where compiled kernels are cached: NUMBA_CACHE_DIR, else the user cache folder."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return Path(os.environ["NUMBA_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "linrec_ref" / "numba"


def import_numba(what: str = "the numba backend"):
    """Import Numba, pointing its cache away from the source tree; a clear error when missing."""
    os.environ.setdefault("NUMBA_CACHE_DIR", str(cache_dir()))
    try:
        import numba
    except ImportError as e:
        raise ImportError(f"{what} needs Numba, which is not installed: {INSTALL_HINT} "
                          "(or pass backend='numpy')") from e
    if not numba.config.CACHE_DIR:   # Numba was imported before us: set the folder it reads
        numba.config.CACHE_DIR = str(cache_dir())
    return numba


def _kernel_modules():
    """{op: {form: dense core}} from the kernel modules (imported, and Numba with them, now)."""
    import_numba()
    from . import _delta, _dplr, _gla, _hgrn, _lru, _mamba, _mlstm, _rwkv6
    cores: Dict[str, Dict[str, Callable]] = {}
    for module in (_gla, _delta, _mamba, _hgrn, _rwkv6, _dplr, _lru, _mlstm):
        cores.update(module.CORES)
    return cores


_CORES: Optional[Dict[str, Dict[str, Callable]]] = None


def cores() -> Dict[str, Dict[str, Callable]]:
    """{op: {form: compiled core}} of every kernel module (imported once, on first use)."""
    global _CORES
    if _CORES is None:
        _CORES = _kernel_modules()
    return _CORES


# Which forms have a kernel, without importing Numba (kept equal to the kernel modules' CORES
# by tests/test_numba_backend.py).
_LOOP = ("recurrent", "recurrent_vjp", "step")
ACCELERATED: Dict[str, Tuple[str, ...]] = {
    **{op: _LOOP for op in ("linear_attention", "retnet", "simple_gla", "gla",
                            "delta_rule", "gated_delta_rule", "kda", "delta_product", "mamba",
                            "rwkv6", "dplr", "rwkv7", "lru", "mlstm")},
    "hgrn": ("recurrent", "recurrent_vjp"),      # its step is one NumPy expression already
}


def accelerated(op: str) -> Tuple[str, ...]:
    """The forms of op that run a Numba kernel (the rest run the NumPy form)."""
    return ACCELERATED.get(op, ())


@contextlib.contextmanager
def threads(num_threads: Optional[int]):
    """Run with Numba's thread count set to num_threads (None: leave it as it is)."""
    if num_threads is None:
        yield
        return
    numba = import_numba()
    limit = numba.config.NUMBA_NUM_THREADS
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or not 1 <= num_threads <= limit:
        raise ValueError(f"numba backend: num_threads must be an integer in [1, {limit}] "
                         f"(NUMBA_NUM_THREADS={limit}), got {num_threads!r}")
    before = numba.get_num_threads()
    numba.set_num_threads(num_threads)
    try:
        yield
    finally:
        numba.set_num_threads(before)


def _decorator(spec, form: str):
    from linrec_ref._forms import forward_form, step_form, vjp_form
    if form == "step":
        return step_form(spec)
    base = form[:-4] if form.endswith("_vjp") else form
    wrap = vjp_form if form.endswith("_vjp") else forward_form
    return wrap(spec, chunked=(base == "chunkwise"))


_PUBLIC: Dict[Tuple[str, str], Callable] = {}
_FELL_BACK: Dict[Tuple[str, str], bool] = {}


def _compile_error_types():
    from numba.core.errors import NumbaError
    return (NumbaError,)


def _public(op: str, form: str, fallback: bool) -> Callable:
    """The validated public function of one compiled form (built once)."""
    key = (op, form)
    if key not in _PUBLIC:
        from linrec_ref import registry
        core = cores()[op][form]

        def named_core(*args, **kwargs):
            return core(*args, **kwargs)
        named_core.__name__ = form          # the validation layer keys on the form's name
        named_core.__qualname__ = f"{op}.{form}"
        named_core.__doc__ = (f"{op}.{form}, Numba backend (compiled kernel); the math and the "
                              f"arguments are those of linrec_ref.ops.{op}.{form}.\n")
        _PUBLIC[key] = _decorator(registry.spec(op), form)(named_core)
    validated = _PUBLIC[key]
    errors = _compile_error_types()

    def call(*args, num_threads: Optional[int] = None, **kwargs):
        if _FELL_BACK.get(key):
            from linrec_ref import registry
            return registry.form(op, form)(*args, **kwargs)
        try:
            with threads(num_threads):
                return validated(*args, **kwargs)
        except errors as e:
            if not fallback:
                raise RuntimeError(f"numba backend: compiling {op}.{form} failed ({type(e).__name__}: "
                                   f"{str(e).splitlines()[0] if str(e) else ''}); pass backend='numpy' "
                                   "to use the reference") from e
            _FELL_BACK[key] = True
            warnings.warn(f"backend 'auto': the Numba kernel of {op}.{form} failed to compile "
                          f"({type(e).__name__}); using the NumPy form from now on", RuntimeWarning)
            from linrec_ref import registry
            return registry.form(op, form)(*args, **kwargs)

    call.__name__ = form
    call.__qualname__ = f"{op}.{form}"
    call.__doc__ = validated.__doc__
    call.__signature__ = getattr(validated, "__signature__", None)
    call.core = validated.core
    return call


def _numpy_form(op: str, form: str) -> Callable:
    """A form without a kernel: the NumPy form, taking (and checking) num_threads like the rest."""
    from linrec_ref import registry
    fn = registry.form(op, form)

    def call(*args, num_threads: Optional[int] = None, **kwargs):
        with threads(num_threads):
            return fn(*args, **kwargs)

    call.__name__, call.__qualname__, call.__doc__ = fn.__name__, f"{op}.{form}", fn.__doc__
    call.__signature__ = getattr(fn, "__signature__", None)
    call.core = getattr(fn, "core", None)
    return call


def resolve(op: str, form: str, fallback: bool = False) -> Callable:
    """The function computing op's form: a compiled kernel when ``accelerated(op)`` lists it,
    else the NumPy form. fallback=True (backend "auto"): if Numba cannot be imported, warn once
    and use NumPy; explicitly asking for numba (fallback=False) raises instead."""
    from linrec_ref import registry
    registry.spec(op)                       # unknown op: the registry's error
    if form not in accelerated(op):
        return _numpy_form(op, form)
    try:
        cores()
    except ImportError:
        if not fallback:
            raise
        if not _FELL_BACK.get(("*", "import")):
            _FELL_BACK[("*", "import")] = True
            warnings.warn(f"backend 'auto': Numba could not be imported; using the NumPy "
                          f"reference ({INSTALL_HINT} to get the compiled kernels)", RuntimeWarning)
        return registry.form(op, form)
    return _public(op, form, fallback)
