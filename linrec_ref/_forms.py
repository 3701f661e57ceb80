"""The public face of every form: validation, varlen, initial/final state, gradient bookkeeping.

An op module writes only dense math ("cores"), e.g.

    @forward_form(SPEC)
    def recurrent(q, k, v, g, *, scale, initial_state):       # dense [B, T, ...], h0 always given
        ...
        return o, final_state

and the decorator turns it into the public function

    recurrent(q, k, v, g, *, scale=None, initial_state=None, output_final_state=False,
              cu_seqlens=None) -> (o, final_state or None)

The decorators below do, for every op alike:
  1. check every array against the op's SPEC (shape letters, dtype, NaN/Inf, log gates <= 0),
     the scale, the chunk size and cu_seqlens, with errors that name the argument;
  2. resolve ``scale=None`` to the op's default (K^-1/2 for most ops);
  3. materialise a zero initial state (and a zero final-state cotangent ``dht``) when none is
     given, so cores never branch on None;
  4. run packed sequences (``cu_seqlens``) one segment at a time: a segment is a B=1 call with its
     own initial state, which is exactly "the state resets at each boundary";
  5. never call a core on zero tokens: a call (or segment) with T = 0 returns an empty output and
     passes its initial state through, and its vjp passes dht through as the initial state's
     gradient (zero gradients elsewhere);
  6. hand chunkwise cores a chunk size of at most the call's (segment's) T, so that no core pads
     T up to a chunk_size far larger than the sequence;
  7. refuse, before allocating, a quadratic form (parallel, its vjp, attention_matrix) whose
     estimated memory exceeds the memory limit (see ``check_quadratic_memory``);
  8. drop the final state unless ``output_final_state=True``.
Cores receive and return plain arrays; states are an array or, for ops with several state parts
(mLSTM), a tuple of arrays.
"""
from __future__ import annotations

import functools
import inspect
import math
from types import SimpleNamespace
from typing import Callable, Dict, NamedTuple, Optional, Sequence

import numpy as np

from . import _validation as V
from ._spec import Arg, OpSpec, bind_default_options, parse_dims

DEFAULT_CHUNK_SIZE = 64


# ---------------------------------------------------------------------------- state trees
def tree_map(fn: Callable, *trees):
    """Apply fn leafwise to states that are an array or a tuple of arrays."""
    if isinstance(trees[0], tuple):
        return tuple(fn(*leaves) for leaves in zip(*trees))
    return fn(*trees)


def tree_concat(trees: Sequence, axis: int = 0):
    if isinstance(trees[0], tuple):
        return tuple(np.concatenate([t[i] for t in trees], axis=axis) for i in range(len(trees[0])))
    return np.concatenate(trees, axis=axis)


def _state_tree(state_args: Sequence[Arg], parts):
    return tuple(parts) if len(state_args) > 1 else parts[0]


def _leaf_dtype(arg: Arg, real_dtype: np.dtype) -> np.dtype:
    return V.COMPLEX_OF[real_dtype] if arg.kind == "complex" else real_dtype


def _zeros_for(arg: Arg, sizes: Dict[str, int], real_dtype: np.dtype, override: Optional[dict] = None):
    sz = dict(sizes, **(override or {}))
    return np.zeros(tuple(sz[d] for d in arg.dims), dtype=_leaf_dtype(arg, real_dtype))


# ---------------------------------------------------------------------------- validation
def _check_state(spec: OpSpec, state_args, name: str, value, binder: V.Binder, real_dtype, drop=""):
    """Validate an initial state / final-state cotangent (array, or tuple for tuple states)."""
    if value is None:
        return None
    is_tuple = len(state_args) > 1
    parts = value if is_tuple else (value,)
    if is_tuple and (not isinstance(value, (tuple, list)) or len(value) != len(state_args)):
        described = ", ".join(f"{a.name}: [{', '.join(a.dims)}]" for a in state_args)
        got = (f"a {type(value).__name__} of {len(value)}" if isinstance(value, (tuple, list))
               else f"a {type(value).__name__}")
        raise TypeError(
            f"{spec.name}: argument '{name}' must be a tuple of {len(state_args)} arrays "
            f"({described}), got {got}"
        )
    for arg, x in zip(state_args, parts):
        label = name if not is_tuple else f"{name}.{arg.name}"
        x = V.require_ndarray(spec.name, label, x)
        dims = tuple(d for d in arg.dims if d not in drop)
        binder.bind(label, x, dims)
        want = _leaf_dtype(arg, real_dtype)
        if x.dtype != want:
            raise V.InputError(
                f"{spec.name}: argument '{label}' has dtype {x.dtype}; expected {want} "
                "(the state dtype follows the inputs; nothing is cast implicitly)"
            )
        # a cotangent (dht) has no range constraint, only finiteness
        V.check_values(spec.name, Arg(label, arg.dims, kind=arg.kind,
                                      nonnegative=arg.nonnegative and name != "dht"), x)
    return _state_tree(state_args, parts)


def _prepare(spec: OpSpec, values: dict, *, chunked: bool = False, vjp: bool = False,
             step: bool = False, names: Optional[Sequence[str]] = None) -> SimpleNamespace:
    """Validate one call's arguments; return what a core needs (inputs, scale, state, ...)."""
    op = spec.name
    binder = V.Binder(op)
    drop = "T" if step else ""
    args = [a for a in spec.inputs if names is None or a.name in names]
    dtype = V.check_arrays(op, args, values, binder, drop=drop)
    _check_head_groups(op, binder)
    p = SimpleNamespace(inputs={a.name: values.get(a.name) for a in args}, dtype=dtype, step=step)
    p.scale = V.check_scale(op, values.get("scale")) if spec.default_scale is not None else None
    if spec.default_scale is not None and p.scale is None:
        p.scale = float(spec.default_scale(binder.sizes))
    p.options = bind_default_options(spec, values.get("options", {}))
    for name, default in spec.options.items():
        if isinstance(default, bool):
            V.check_flag(op, name, p.options[name], kind="option")
    if "output_final_state" in values:
        V.check_flag(op, "output_final_state", values["output_final_state"])
    if names is not None:  # attention_matrix: no state, no varlen
        p.sizes = binder.sizes
        return p
    if chunked:
        p.chunk_size = V.check_chunk_size(op, values.get("chunk_size"))
    p.cu_seqlens = None
    if not step and values.get("cu_seqlens") is not None:
        p.cu_seqlens = V.check_cu_seqlens(op, values["cu_seqlens"], binder.sizes["B"], binder.sizes["T"])
        binder.sizes["N"], binder.source["N"] = len(p.cu_seqlens) - 1, "cu_seqlens (number of segments)"
    else:
        binder.sizes["N"], binder.source["N"] = binder.sizes["B"], "the batch size B"
    state_name = "state" if step else "initial_state"
    p.state_args = sargs = spec.state_args(p.options)
    h0 = _check_state(spec, sargs, state_name, values.get(state_name), binder, dtype, drop)
    p.has_initial_state = h0 is not None
    if h0 is None:
        if spec.growing_axis:  # an empty cache
            binder.sizes.setdefault(spec.growing_axis, 0)
        h0 = _state_tree(sargs, [_zeros_for(a, binder.sizes, dtype) for a in sargs])
    p.initial_state = h0
    if vjp:
        do_arg = Arg("do", spec.output)
        V.check_arrays(op, [do_arg], values, binder, real_dtype=dtype)
        p.do = values["do"]
        out_binder = _final_state_binder(spec, binder, p.cu_seqlens)
        dht = _check_state(spec, sargs, "dht", values.get("dht"), out_binder, dtype)
        if dht is None:
            dht = _state_tree(sargs, [_zeros_for(a, out_binder.sizes, dtype) for a in sargs])
        p.dht = dht
    p.sizes = binder.sizes
    return p


# ---------------------------------------------------------------------------- growing states
def _final_state_binder(spec: OpSpec, binder: V.Binder, cu_seqlens) -> V.Binder:
    """The sizes of the final state: those of the initial state, except a growing axis, which
    gains the call's T tokens (with cu_seqlens: the longest segment's, see _pad_segment_states)."""
    if not spec.growing_axis:
        return binder
    L = spec.growing_axis
    grown = binder.sizes["T"] if cu_seqlens is None else int(np.diff(cu_seqlens).max())
    sizes = dict(binder.sizes, **{L: binder.sizes[L] + grown})
    return V.Binder(binder.op, sizes, dict(binder.source, **{L: f"the final state ({L} + the tokens of the call)"}))


def _growing_axis_of(spec: OpSpec, arg: Arg):
    return arg.dims.index(spec.growing_axis) if spec.growing_axis in arg.dims else None


def concat_segment_states(spec: OpSpec, state_args, finals: Sequence):
    """Stack the final states of varlen segments along N. A growing axis differs in length
    between segments: shorter states are front-padded with zeros (absent entries)."""
    if not spec.growing_axis:
        return tree_concat(finals, axis=0)
    parts = []
    for i, arg in enumerate(state_args):
        leaves = [f[i] if len(state_args) > 1 else f for f in finals]
        ax = _growing_axis_of(spec, arg)
        if ax is not None:
            longest = max(x.shape[ax] for x in leaves)
            pads = [[(0, 0)] * x.ndim for x in leaves]
            for pad, x in zip(pads, leaves):
                pad[ax] = (longest - x.shape[ax], 0)
            leaves = [np.pad(x, pad) for x, pad in zip(leaves, pads)]
        parts.append(np.concatenate(leaves, axis=0))
    return _state_tree(state_args, parts)


def segment_cotangent(spec: OpSpec, state_args, dht_n, length: int):
    """The part of a (front-padded) final-state cotangent that belongs to a segment whose final
    state has ``length`` entries along the growing axis."""
    if not spec.growing_axis:
        return dht_n
    parts = dht_n if len(state_args) > 1 else (dht_n,)
    out = []
    for arg, x in zip(state_args, parts):
        ax = _growing_axis_of(spec, arg)
        if ax is not None:
            index = [slice(None)] * x.ndim
            index[ax] = slice(x.shape[ax] - length, None)
            x = x[tuple(index)]
        out.append(x)
    return _state_tree(state_args, out)


# ---------------------------------------------------------------------------- grouped heads
def _check_head_groups(op: str, binder: V.Binder) -> None:
    """q/k heads H and value heads HV: HV must be a multiple of H."""
    H, HV = binder.sizes.get("H"), binder.sizes.get("HV")
    if H is not None and HV is not None and (H == 0 or HV % H):
        raise V.InputError(
            f"{op}: grouped heads need HV (value heads, {HV} from {binder.source['HV']}) to be a "
            f"multiple of H (query/key heads, {H} from {binder.source['H']})"
        )


def _group_size(p) -> int:
    H, HV = p.sizes.get("H"), p.sizes.get("HV")
    return 1 if H is None or HV is None else HV // H


def _expand_groups(spec: OpSpec, p) -> dict:
    """Repeat every input with an H axis over the HV / H value heads it serves (value head j
    reads q/k head j // G), so that cores see HV heads everywhere."""
    G = _group_size(p)
    if G == 1:
        return p.inputs
    out = dict(p.inputs)
    for name, x in p.inputs.items():
        dims = spec.arg(name).dims
        if x is not None and "H" in dims:
            axis = dims.index("H") - (1 if p.step and "T" in dims else 0)
            out[name] = np.repeat(x, G, axis=axis)
    return out


def _reduce_groups(spec: OpSpec, p, grads: dict) -> dict:
    """Adjoint of ``_expand_groups``: sum the gradient of a repeated input over its group."""
    G = _group_size(p)
    if G == 1:
        return grads
    out = dict(grads)
    for name, x in p.inputs.items():
        dims = spec.arg(name).dims
        if x is not None and "H" in dims and grads.get(name) is not None:
            axis = dims.index("H")
            g = grads[name]
            out[name] = g.reshape(g.shape[:axis] + (g.shape[axis] // G, G) + g.shape[axis + 1:]).sum(axis + 1)
    return out


# ---------------------------------------------------------------------------- signatures
_P = inspect.Parameter


def _signature(spec: OpSpec, *, chunked=False, vjp=False, step=False, names=None) -> inspect.Signature:
    params = []
    for a in spec.inputs:
        if names is not None and a.name not in names:
            continue
        default = None if a.optional else _P.empty
        params.append(_P(a.name, _P.POSITIONAL_OR_KEYWORD, default=default))
    if step:
        params.append(_P("state", _P.POSITIONAL_OR_KEYWORD, default=None))
    kw = []
    if vjp:
        kw.append(("dht", None))
    if spec.default_scale is not None:
        kw.append(("scale", None))
    if names is None and not step:
        kw.append(("initial_state", None))
        if not vjp:
            kw.append(("output_final_state", False))
        kw.append(("cu_seqlens", None))
    if chunked:
        kw.append(("chunk_size", DEFAULT_CHUNK_SIZE))
    kw.extend(spec.options.items())
    if vjp:  # keyword-only, so that optional inputs may precede it: f(q, k, v, do=do)
        params.append(_P("do", _P.KEYWORD_ONLY))
    params += [_P(n, _P.KEYWORD_ONLY, default=d) for n, d in kw]
    return inspect.Signature(params)


def _bind(spec: OpSpec, sig: inspect.Signature, args, kwargs) -> dict:
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as e:
        raise TypeError(f"{spec.name}: {e}; signature is {sig}") from None
    bound.apply_defaults()
    values = dict(bound.arguments)
    values["options"] = {k: values.pop(k) for k in list(spec.options)}
    return values


def _publish(form, core, sig, doc_extra: str):
    functools.update_wrapper(form, core)
    form.__signature__ = sig
    form.__doc__ = (core.__doc__ or "") + doc_extra
    form.core = core  # the dense math without checks, for backends and tests
    return form


_FORWARD_DOC = """
    Common arguments (checked, see linrec_ref._forms):
        scale: float or None (None -> the op's default, K^-1/2 unless the op says otherwise).
        initial_state: state [N, ...] or None (zeros); N = B, or the number of segments.
        output_final_state: return the final state (else None is returned in its place).
        cu_seqlens: int array [N+1] of offsets packing N sequences along T (B must be 1).
    Returns (o, final_state or None).
"""

_VJP_DOC = """
    Vector-Jacobian product. Arguments as the forward form, plus (keyword-only)
        do:  cotangent of the output o.
        dht: cotangent of the final state (None -> zero).
    Returns a dict {input name: gradient, ..., "initial_state": gradient or None}; gradients have
    the shapes and dtypes of their inputs.
"""


# ---------------------------------------------------------------------------- quadratic memory
QUADRATIC_FORMS = ("parallel", "parallel_vjp", "attention_matrix")
# A quadratic form holds a few arrays of its largest size at once (decay masks, scores and their
# cotangents): the estimate counts this many. Measured peaks over the 16 ops at T = 128 and 256,
# in units of the largest array: 1.1-7.4 parallel, 3.0-13.0 parallel_vjp, 1.3-8.7 attention_matrix
# (tests/test_memory_guard.py keeps every op within twice its estimate).
ARRAYS_AT_ONCE = {"parallel": 4, "parallel_vjp": 8, "attention_matrix": 6}


def shape_of(dims: Sequence[str], sizes: Dict[str, int]) -> tuple:
    """The sizes of dims such as ("B", "HV", "T", "T*NH"); an entry "T*NH" is a product."""
    return tuple(math.prod(sizes[f] for f in d.split("*")) for d in dims)


def _channel_axis(sizes: Dict[str, int]) -> tuple:
    """The axis an op's T x T matrices are stacked over: the first of HV, H, D that is bound."""
    return next(((c,) for c in ("HV", "H", "D") if c in sizes), ())


def quadratic_dims(spec: OpSpec, sizes: Dict[str, int]) -> tuple:
    """The dims of the largest T^2 intermediate (OpSpec.quadratic; default [B, C, T, T])."""
    return parse_dims(spec.quadratic) if spec.quadratic else ("B",) + _channel_axis(sizes) + ("T", "T")


class QuadraticEstimate(NamedTuple):
    """The memory estimate of a quadratic form: ``copies`` arrays of the largest intermediate."""

    dims: tuple          # e.g. ("B", "D", "S", "T", "T")
    shape: tuple         # their sizes
    dtype: np.dtype
    largest: int         # bytes of one such array
    copies: int          # ARRAYS_AT_ONCE[form]
    total: int           # copies * largest


def estimate_quadratic_memory(spec: OpSpec, sizes: Dict[str, int], dtype, form_name: str
                              ) -> QuadraticEstimate:
    """The estimate for one core call at ``sizes``: ARRAYS_AT_ONCE[form_name] arrays of the
    op's largest T^2 intermediate (OpSpec.quadratic) in the working dtype."""
    dims = quadratic_dims(spec, sizes)
    shape = shape_of(dims, sizes)
    dtype = np.dtype(dtype)  # the working (real) dtype: quadratic intermediates are real in every op
    largest = math.prod(shape) * dtype.itemsize
    copies = ARRAYS_AT_ONCE[form_name]
    return QuadraticEstimate(dims, shape, dtype, largest, copies, copies * largest)


def check_quadratic_memory(spec: OpSpec, p, form_name: str) -> None:
    """Refuse, before anything is allocated, a quadratic form whose estimated memory (at the
    sizes one core call sees; with cu_seqlens: B = 1 and the longest segment's T) exceeds
    ``linrec_ref.memory_limit()``. Raises ``MemoryLimitError`` naming the estimate, the limit,
    how to raise it and the cheaper form."""
    sizes = dict(p.sizes)
    if getattr(p, "cu_seqlens", None) is not None:
        sizes.update(B=1, T=int(np.diff(p.cu_seqlens).max()))
    e = estimate_quadratic_memory(spec, sizes, p.dtype, form_name)
    limit = V.memory_limit()
    if e.total <= limit:
        return
    cheaper = ("It is a T x T matrix: compute it for a shorter T"
               if form_name == "attention_matrix" else
               "Use form='chunkwise' or 'recurrent' (memory linear in T)")
    raise V.MemoryLimitError(
        f"{spec.name}.{form_name} needs an estimated {V.format_bytes(e.total)} "
        f"({e.copies} arrays the size of its largest intermediate, [{', '.join(e.dims)}] = "
        f"[{', '.join(map(str, e.shape))}] {e.dtype}, {V.format_bytes(e.largest)} each), above "
        f"the memory limit of {V.format_bytes(limit)}. {cheaper}, or raise the limit with "
        f"linrec_ref.set_memory_limit(n_bytes) or the environment variable {V.MEMORY_LIMIT_ENV} "
        f"(e.g. {V.MEMORY_LIMIT_ENV}=64GiB)."
    )


# ---------------------------------------------------------------------------- decorators
def forward_form(spec: OpSpec, *, chunked: bool = False):
    """Wrap a dense forward core ``core(*inputs, scale, initial_state, [chunk_size], **options)``."""

    def decorate(core):
        sig = _signature(spec, chunked=chunked)
        quadratic = core.__name__ in QUADRATIC_FORMS

        def form(*args, **kwargs):
            values = _bind(spec, sig, args, kwargs)
            p = _prepare(spec, values, chunked=chunked)
            if quadratic:
                check_quadratic_memory(spec, p, core.__name__)
            kw = _core_kwargs(spec, p, chunked)
            p.inputs = _expand_groups(spec, p)
            if p.cu_seqlens is None:
                o, ht = _call_forward(spec, core, p, p.inputs, p.initial_state, kw,
                                      p.sizes["B"], p.sizes["T"])
            else:
                o, ht = _forward_varlen(spec, core, p, kw)
            return o, (ht if values["output_final_state"] else None)

        return _publish(form, core, sig, _FORWARD_DOC)

    return decorate


def vjp_form(spec: OpSpec, *, chunked: bool = False):
    """Wrap a dense VJP core ``core(*inputs, do, dht, scale, initial_state, ...) -> dict``."""

    def decorate(core):
        sig = _signature(spec, chunked=chunked, vjp=True)
        quadratic = core.__name__ in QUADRATIC_FORMS

        def form(*args, **kwargs):
            values = _bind(spec, sig, args, kwargs)
            p = _prepare(spec, values, chunked=chunked, vjp=True)
            if quadratic:
                check_quadratic_memory(spec, p, core.__name__)
            kw = _core_kwargs(spec, p, chunked)
            given = p.inputs
            p.inputs = _expand_groups(spec, p)
            if p.cu_seqlens is None:
                grads = _call_vjp(spec, core, p, p.inputs, p.do, p.dht, p.initial_state, kw,
                                  p.sizes["T"])
            else:
                grads = _vjp_varlen(spec, core, p, kw)
            grads = _zeros_for_unreached(spec, p.inputs, grads)
            p.inputs = given
            grads = _reduce_groups(spec, p, grads)
            out = {n: (grads.get(n) if p.inputs.get(n) is not None else None) for n in spec.differentiable}
            out["initial_state"] = grads["initial_state"] if p.has_initial_state else None
            return out

        return _publish(form, core, sig, _VJP_DOC)

    return decorate


def _core_kwargs(spec: OpSpec, p, chunked: bool) -> dict:
    kw = dict(p.options)
    if spec.default_scale is not None:
        kw["scale"] = p.scale
    if chunked:
        kw["chunk_size"] = p.chunk_size
    return kw


def _within(kw: dict, T: int) -> dict:
    """The core's keyword arguments for a call on T >= 1 tokens: a chunk of at most T tokens
    (one chunk covers the call; a core never pads T up to a larger chunk_size)."""
    if kw.get("chunk_size", 0) > T:
        return dict(kw, chunk_size=T)
    return kw


def _call_forward(spec: OpSpec, core, p, inputs: dict, h0, kw: dict, batch: int, T: int):
    """One core call on T tokens (the whole batch, or one varlen segment) -> (o, final state).
    With T = 0 the core is not called: the output is empty and the state passes through."""
    if T == 0:
        shape = (batch, 0) + tuple(p.sizes[d] for d in parse_dims(spec.output)[2:])
        return np.zeros(shape, dtype=p.dtype), h0
    return core(**inputs, initial_state=h0, **_within(kw, T))


def _call_vjp(spec: OpSpec, core, p, inputs: dict, do, dht, h0, kw: dict, T: int) -> dict:
    """The vjp of one ``_call_forward``. With T = 0 the call is the identity map on the state:
    dht is the initial state's gradient, per-token gradients are empty, and inputs without a
    time axis get none (``_zeros_for_unreached`` fills them)."""
    if T == 0:
        grads = {n: np.zeros_like(x) for n, x in inputs.items()
                 if x is not None and spec.arg(n).per_token}
        grads["initial_state"] = dht
        return grads
    return core(**inputs, do=do, dht=dht, initial_state=h0, **_within(kw, T))


def _zeros_for_unreached(spec: OpSpec, inputs: dict, grads: dict) -> dict:
    """A zero gradient for every given input that no core call reached (T = 0, empty segments)."""
    missing = [n for n, x in inputs.items() if x is not None and grads.get(n) is None]
    return dict(grads, **{n: np.zeros_like(inputs[n]) for n in missing}) if missing else grads


def _segments(p):
    cu = p.cu_seqlens
    for n in range(len(cu) - 1):
        yield n, int(cu[n]), int(cu[n + 1])


def _segment_inputs(spec: OpSpec, inputs: dict, lo: int, hi: int) -> dict:
    return {
        name: (x[:, lo:hi] if x is not None and spec.arg(name).per_token else x)
        for name, x in inputs.items()
    }


def _forward_varlen(spec: OpSpec, core, p, kw):
    outs, finals = [], []
    for n, lo, hi in _segments(p):
        h0 = tree_map(lambda s: s[n:n + 1], p.initial_state)
        segment = _segment_inputs(spec, p.inputs, lo, hi)
        o, ht = _call_forward(spec, core, p, segment, h0, kw, 1, hi - lo)
        outs.append(o)
        finals.append(ht)
    return np.concatenate(outs, axis=1), concat_segment_states(spec, p.state_args, finals)


def _vjp_varlen(spec: OpSpec, core, p, kw) -> dict:
    """Per-token gradients are concatenated over the segments, the others summed."""
    per_token = {n: [] for n, x in p.inputs.items() if x is not None and spec.arg(n).per_token}
    shared = {n: None for n, x in p.inputs.items() if x is not None and not spec.arg(n).per_token}
    dh0 = []
    L0 = p.sizes.get(spec.growing_axis, 0) if spec.growing_axis else 0
    for n, lo, hi in _segments(p):
        h0 = tree_map(lambda s: s[n:n + 1], p.initial_state)
        dht = segment_cotangent(spec, p.state_args, tree_map(lambda s: s[n:n + 1], p.dht), L0 + hi - lo)
        segment = _segment_inputs(spec, p.inputs, lo, hi)
        g = _call_vjp(spec, core, p, segment, p.do[:, lo:hi], dht, h0, kw, hi - lo)
        for name in per_token:
            per_token[name].append(g[name])
        for name in shared:
            if name in g:
                shared[name] = g[name] if shared[name] is None else tree_map(np.add, shared[name], g[name])
        dh0.append(g["initial_state"])
    grads = {name: np.concatenate(parts, axis=1) for name, parts in per_token.items()}
    grads.update({name: val for name, val in shared.items() if val is not None})
    grads["initial_state"] = tree_concat(dh0, axis=0)
    return grads


def step_form(spec: OpSpec):
    """Wrap a single-token core ``core(*inputs_without_T, state, scale, **options) -> (o, state)``."""

    def decorate(core):
        sig = _signature(spec, step=True)

        def form(*args, **kwargs):
            values = _bind(spec, sig, args, kwargs)
            p = _prepare(spec, values, step=True)
            kw = _core_kwargs(spec, p, False)
            return core(**_expand_groups(spec, p), state=p.initial_state, **kw)

        return _publish(form, core, sig, """
    One decoding step: the inputs of a single token (the forward form's shapes without T) and
    the state [B, ...] (None -> zeros). Returns (o_t, new_state). Memory O(state) per call.
""")

    return decorate


def matrix_form(spec: OpSpec, names: Sequence[str]):
    """Wrap ``core(*names, scale, **options) -> [B, H, T, T]`` (the implicit attention matrix)."""

    def decorate(core):
        sig = _signature(spec, names=tuple(names))

        def form(*args, **kwargs):
            values = _bind(spec, sig, args, kwargs)
            p = _prepare(spec, values, names=tuple(names))
            check_quadratic_memory(spec, p, "attention_matrix")
            if p.sizes["T"] == 0:  # no tokens: [B, C, 0, 0] (also delta_product's [B, HV, T, T*NH])
                dims = ("B",) + _channel_axis(p.sizes) + ("T", "T")
                return np.zeros(shape_of(dims, p.sizes), dtype=p.dtype)
            kw = _core_kwargs(spec, p, False)
            return core(**_expand_groups(spec, p), **kw)

        return _publish(form, core, sig, """
    Returns the op's implicit attention matrix M (causal: lower triangular in time), the linear
    map from the op's values to its output with a zero initial state, e.g. [B, H, T, T] with
    o[b, :, h] = M[b, h] @ v[b, :, h] for the q/k/v ops; the op's docstring above gives its exact
    shape and what it multiplies. For inspection and plots; O(T^2) memory (a call whose estimate
    exceeds ``linrec_ref.memory_limit()`` is refused with a MemoryLimitError).
""")

    return decorate
