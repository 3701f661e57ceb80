"""Declarative description of an op: its arguments, shapes, state, options and peers.

Every op module defines one ``SPEC = OpSpec(...)``. The same object drives input validation
(``_validation``), the generic form wrappers (``_forms``: varlen, initial/final state, gradient
bookkeeping), the registry (``linrec ops``) and the equivalence matrix of ``linrec check``. Op
modules therefore contain only the math, and in a closing section the generator of valid random
inputs that ``linrec_ref.testing.make_inputs`` calls: ``make_inputs(rng, regime, dims, dtype,
variant="default") -> dict`` (dims maps dimension names to sizes).

Shapes are written as strings of one-letter dimension names, e.g. ``"BTHK"`` for ``[B, T, H, K]``,
or, where a name has several letters, as space-separated names, e.g. ``"B T HV V"``. A name
denotes the same size everywhere it appears within one call. Reserved names: ``B`` batch, ``T``
time, ``N`` number of sequences in the state (``B``, or the number of segments with
``cu_seqlens``), and ``H`` / ``HV`` for grouped heads: q and k have H heads, values, gates and the
state HV heads, HV a multiple of H (value head j reads q/k head j // (HV / H)); the form
wrappers repeat q and k over the groups, so cores always see HV heads everywhere.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Tuple


def parse_dims(dims) -> Tuple[str, ...]:
    """"BTHK" -> ("B", "T", "H", "K"); "B T HV V" -> ("B", "T", "HV", "V"); tuples pass through."""
    if isinstance(dims, tuple):
        return dims
    return tuple(dims.split()) if " " in dims else tuple(dims)


@dataclass(frozen=True)
class Arg:
    """One array argument of an op.

    name:     argument name, as in the function signature.
    dims:     shape as dimension names, "BTHK" or "B T HV V" (stored as a tuple of names).
    kind:     "real" (float32/float64), "complex" (complex64/complex128, precision matching the
              real inputs) or "any_float" (real or complex).
    log_gate: the argument is a natural-log decay: must be <= 0; -inf is allowed (a hard reset).
    positive: every entry must be > 0 (e.g. a step size that is not passed through softplus).
    nonnegative: every entry must be >= 0 (e.g. the decay weights of a KV cache, 0 = absent).
    optional: may be None.
    """

    name: str
    dims: Tuple[str, ...]
    kind: str = "real"
    log_gate: bool = False
    positive: bool = False
    optional: bool = False
    nonnegative: bool = False

    def __post_init__(self):
        object.__setattr__(self, "dims", parse_dims(self.dims))

    @property
    def per_token(self) -> bool:
        """True when the argument has a time axis (it is split by cu_seqlens and by chunks)."""
        return "T" in self.dims


@dataclass(frozen=True)
class OpSpec:
    """Everything the library needs to know about one op besides its math.

    name:        registry name and the name of the top-level entry point (``linrec_ref.<name>``).
    family:      model family, e.g. "gated linear attention".
    transition:  the transition class of recurrences.md section 1, e.g. "diagonal decay".
    math:        the recurrence in one line, for catalogues.
    inputs:      array arguments in positional order (differentiable ones and optional ones).
    output:      dims of the output o, e.g. "BTHV".
    state:       the recurrent state as a tuple of Args (one Arg for a plain [N,H,K,V] state; a
                 tuple state such as mLSTM's (C, n, m) has several). Their dims start with "N".
    default_scale: maps the bound dimension sizes to the scale used when ``scale=None``; None if
                 the op takes no scale argument.
    options:     keyword options with their defaults (e.g. {"normalize": False}).
    peers:       functions of other libraries that compute the same math.
    regimes:     the input regimes of numerics.md that apply to this op.
    default_dims: sizes used by ``linrec check`` and the generic tests.
    has_attention_matrix: the parallel form exposes the T x T matrix mapping v to o.
    nondifferentiable: inputs for which no gradient is returned (documented in the op).
    variants:    named option sets that the equivalence matrix sweeps (e.g. with the normaliser).
    """

    name: str
    family: str
    transition: str
    math: str
    inputs: Tuple[Arg, ...]
    output: str
    state: Tuple[Arg, ...]
    default_scale: Optional[Callable[[dict], float]]
    peers: Tuple[str, ...]
    regimes: Tuple[str, ...]
    default_dims: dict
    options: dict = field(default_factory=dict)
    has_attention_matrix: bool = True
    nondifferentiable: Tuple[str, ...] = ()
    forms: Tuple[str, ...] = ("recurrent", "parallel", "chunkwise")
    # variant name -> options; the module's make_inputs(rng, regime, dims, dtype, variant) builds
    # inputs for it
    variants: dict = field(default_factory=lambda: {"default": {}})
    # options -> state Args, for ops whose state depends on an option (e.g. a normaliser that
    # adds a running key sum to the state); None means ``state`` always.
    state_fn: Optional[Callable[[dict], Tuple[Arg, ...]]] = None
    # A state dimension that grows by the number of tokens of a call (a KV cache length, "L"):
    # the final state has L + T entries along it; without an initial state L = 0. With
    # cu_seqlens, the final states of segments are front-padded with zeros to the longest, so an
    # op with a growing axis must treat all-zero entries as absent (see _forms).
    growing_axis: Optional[str] = None
    # The shape of the largest intermediate that grows with T^2 (of the parallel form, its vjp
    # and attention_matrix), as dims; an entry "T*NH" is a product of sizes. The form wrappers
    # refuse a call whose estimate exceeds the memory limit. None: [B, C, T, T], C the first of
    # HV, H, D that the call binds.
    quadratic: Optional[str] = None

    def arg(self, name: str) -> Arg:
        for a in self.inputs:
            if a.name == name:
                return a
        raise KeyError(f"{self.name} has no input named {name!r}")

    @property
    def input_names(self) -> Tuple[str, ...]:
        return tuple(a.name for a in self.inputs)

    @property
    def differentiable(self) -> Tuple[str, ...]:
        return tuple(a.name for a in self.inputs if a.name not in self.nondifferentiable)

    def state_args(self, options: Optional[dict] = None) -> Tuple[Arg, ...]:
        """The state's parts for these options (one part: a plain array state)."""
        if self.state_fn is None:
            return self.state
        return self.state_fn(bind_default_options(self, options or {}))

    def state_is_tuple(self, options: Optional[dict] = None) -> bool:
        return len(self.state_args(options)) > 1

    def describe_state(self, options: Optional[dict] = None) -> str:
        return ", ".join(f"{a.name}: [{', '.join(a.dims)}]" for a in self.state_args(options))


def bind_default_options(spec: OpSpec, options: dict) -> dict:
    """Return the op's options with defaults filled in; reject unknown names."""
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        known = ", ".join(sorted(spec.options)) or "none"
        raise TypeError(f"{spec.name}: unknown option(s) {unknown}; this op's options are: {known}")
    merged: dict[str, Any] = dict(spec.options)
    merged.update(options)
    return merged
