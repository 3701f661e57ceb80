"""Testing tools for users' own suites: tolerance tiers, one comparison function, input
generators for the regimes of numerics.md, one way to call every form and backward (``run``,
``vjp``, ``run_steps``, ``cotangents``), and a central finite-difference gradient checker.

    >>> from linrec_ref import testing
    >>> x = testing.make_inputs("gla", "fast_forgetting", T=64, dtype=np.float32)   # doctest: +SKIP
    >>> o_ref, _ = linrec_ref.gla(**testing.as_float64(x), form="recurrent")       # doctest: +SKIP
    >>> testing.assert_close(my_kernel(**x), o_ref, tier="float32")                # doctest: +SKIP

The pass rule of a tier is elementwise:  |actual - ref| <= rtol * |ref| + atol * max|ref|.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterable, NamedTuple, Optional

import numpy as np

from . import registry
from ._mlstm_condition import MlstmCondition, mlstm_keys, mlstm_queries
from ._regimes import DECAY_REGIMES, log_decay, normal  # noqa: F401  (re-exported)


@dataclass(frozen=True)
class Tolerance:
    """rtol is relative to each reference entry; atol is relative to max |reference|."""

    rtol: float
    atol: float
    what: str


# The one tolerance table of numerics.md, used by every test and by `linrec check`.
TOLERANCES: Dict[str, Tolerance] = {
    "float64": Tolerance(1e-10, 1e-12, "float64 forms against each other (T <= 512)"),
    "float32": Tolerance(1e-4, 1e-5, "float32 anything against the float64 reference"),
    "fd": Tolerance(1e-6, 1e-8, "float64 gradients vs central finite differences (4th-order stencil, step 1e-5)"),
}


def tier_for(dtype) -> str:
    """The tier for comparing a result computed in ``dtype`` with the float64 reference."""
    return "float64" if np.dtype(dtype) in (np.float64, np.complex128) else "float32"


class NonFinite(NamedTuple):
    """The non-finite entries (NaN, +inf, -inf) of one side of a comparison."""

    count: int = 0
    first: str = ""      # where the first one is, e.g. "dq[0, 3, 1]" ("" when count == 0)

    def __str__(self) -> str:
        return f"{self.count} (first at {self.first})" if self.count else "0"


@dataclass
class Comparison:
    """The measured error of one comparison, next to its tolerance.

    The statistics are taken over the entries where both arrays are finite:
    max_abs:   max |actual - ref|
    max_rel:   max |actual - ref| / max |ref|  (normwise relative error; what reports quote)
    max_elem_rel: max over entries of |actual - ref| / |ref| where |ref| > atol * max|ref|
    max_ref:   max |ref|
    rms_ratio: rms(actual - ref) / rms(ref)  (the "error ratio" other libraries report)
    actual_nonfinite, reference_nonfinite: how many NaN / +-inf entries each side holds, and the
               first one's place
    ok:        the tier's elementwise pass rule holds at every entry where both are finite, and
               every non-finite entry of either side is the same non-finite value (NaN, +inf or
               -inf) at the same place in the other; any other NaN or inf fails
    """

    name: str
    max_abs: float
    max_rel: float
    max_elem_rel: float
    max_ref: float
    rms_ratio: float
    tolerance: Tolerance
    ok: bool
    actual_nonfinite: NonFinite = NonFinite()
    reference_nonfinite: NonFinite = NonFinite()

    def __str__(self) -> str:
        status = "ok" if self.ok else "FAIL"
        nonfinite = ""
        if self.actual_nonfinite.count or self.reference_nonfinite.count:
            nonfinite = (f" non-finite: actual {self.actual_nonfinite}, reference "
                         f"{self.reference_nonfinite}; statistics over the finite entries")
        return (f"{self.name}: max_abs={self.max_abs:.3e} max_rel={self.max_rel:.3e} "
                f"elem_rel={self.max_elem_rel:.3e} max|ref|={self.max_ref:.3e} "
                f"rms_ratio={self.rms_ratio:.3e} (rtol={self.tolerance.rtol:g}, "
                f"atol={self.tolerance.atol:g}*max|ref|){nonfinite} {status}")


def leaves(x, prefix=""):
    """Flatten arrays / tuples / dicts of arrays into (name, array) pairs."""
    if isinstance(x, dict):
        for k, v in x.items():
            yield from leaves(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(x, (tuple, list)):
        for i, v in enumerate(x):
            yield from leaves(v, f"{prefix}[{i}]")
    elif x is not None:
        yield prefix, np.asarray(x)


def tolerance(tier) -> Tolerance:
    """The Tolerance of a tier name ("float64", "float32", "fd"); a Tolerance passes through."""
    if isinstance(tier, Tolerance):
        return tier
    if tier not in TOLERANCES:
        raise ValueError(f"testing: unknown tolerance tier {tier!r}; expected one of "
                         f"{', '.join(repr(t) for t in TOLERANCES)} or a testing.Tolerance")
    return TOLERANCES[tier]


def _place(name: str, leaf: str) -> str:
    """The name of one leaf of a compared value: "o[1]" for tuples, "grads.dq" for dicts."""
    return f"{name}{leaf}" if not leaf or leaf.startswith("[") else f"{name}.{leaf}"


def _nonfinite(x: np.ndarray, leaf: str) -> NonFinite:
    """Count and first place of the non-finite entries of one leaf."""
    bad = ~np.isfinite(x)
    if not bad.any():
        return NonFinite()
    first = np.unravel_index(int(np.argmax(bad)), x.shape)
    return NonFinite(int(bad.sum()), f"{leaf}[{', '.join(str(int(j)) for j in first)}]")


def _same_nonfinite(a: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Entrywise: a and r are the same value or both NaN (in each part of a complex number)."""
    parts = (np.real, np.imag) if np.iscomplexobj(a) else (lambda x: x,)
    same = np.ones(a.shape, bool)
    for part in parts:
        pa, pr = part(a), part(r)
        same &= (pa == pr) | (np.isnan(pa) & np.isnan(pr))
    return same


def compare(actual, reference, tier: str = "float64", name: str = "value",
            zero_scale: Optional[float] = None) -> Comparison:
    """Measure the error of ``actual`` against ``reference`` (arrays, tuples or dicts of arrays).

    Shapes must match exactly (no broadcasting). Several leaves are judged jointly: the
    reported numbers are the worst over leaves, and max|ref| is taken per leaf.

    Non-finite entries: the statistics are taken over the entries where both sides are finite,
    and the count and first place of the NaN / inf entries of each side are reported. A
    non-finite entry passes only where the other side holds the same non-finite value (NaN and
    NaN, +inf and +inf, -inf and -inf), e.g. a -inf gate passed through unchanged; NaN or inf
    against a finite value fails, and so does a reference with NaN where the result is finite.

    Numerically zero leaves: a leaf whose max|ref| is below the tier's absolute floor of the
    joint scale (atol * the largest max|ref| over all leaves, or ``zero_scale`` when that is
    larger, e.g. the largest gradient of the same call) is a quantity that vanishes in theory
    and holds only rounding noise; it is judged at that floor instead of relative to itself.
    """
    tol = tolerance(tier)
    pairs_a, pairs_r = list(leaves(actual)), list(leaves(reference))
    if [n for n, _ in pairs_a] != [n for n, _ in pairs_r]:
        raise ValueError(f"{name}: structures differ: {[n for n, _ in pairs_a]} vs {[n for n, _ in pairs_r]}")
    for (leaf, a), (_, r) in zip(pairs_a, pairs_r):
        if a.shape != r.shape:
            raise ValueError(f"{_place(name, leaf)}: shape {a.shape} differs from the reference's {r.shape}")
    worst = dict(max_abs=0.0, max_rel=0.0, max_elem_rel=0.0, max_ref=0.0, rms_ratio=0.0)
    ok = True
    nonfinite = {"actual": NonFinite(), "reference": NonFinite()}
    finite_mags = [np.abs(r[np.isfinite(r)]) for _, r in pairs_r]
    joint_max = max([float(m.max()) for m in finite_mags if m.size] + [0.0])
    if zero_scale is not None:
        joint_max = max(joint_max, float(zero_scale))
    for (leaf, a), (_, r) in zip(pairs_a, pairs_r):
        if a.size == 0:
            continue
        a64 = a.astype(np.complex128 if np.iscomplexobj(a) or np.iscomplexobj(r) else np.float64)
        r64 = r.astype(a64.dtype)
        for side, x in (("actual", a64), ("reference", r64)):
            found = _nonfinite(x, _place(name, leaf))
            nonfinite[side] = NonFinite(nonfinite[side].count + found.count, nonfinite[side].first or found.first)
        finite = np.isfinite(a64) & np.isfinite(r64)
        ok &= bool(_same_nonfinite(a64[~finite], r64[~finite]).all())
        if not finite.any():
            continue
        err = np.abs(a64[finite] - r64[finite])                      # [n_finite]
        mag = np.abs(r64[finite])                                    # [n_finite]
        max_ref = float(mag.max())
        if max_ref <= tol.atol * joint_max:  # numerically zero: judge on the joint scale
            max_ref = joint_max
        floor = tol.atol * max_ref
        ok &= bool(np.all(err <= tol.rtol * mag + floor))
        big = mag > max(floor, np.finfo(np.float64).tiny)
        rms_ref = float(np.sqrt(np.mean(mag ** 2)))
        worst["max_abs"] = max(worst["max_abs"], float(err.max()))
        worst["max_rel"] = max(worst["max_rel"], float(err.max()) / max_ref if max_ref > 0 else float(err.max()))
        worst["max_elem_rel"] = max(worst["max_elem_rel"], float((err[big] / mag[big]).max()) if big.any() else 0.0)
        worst["max_ref"] = max(worst["max_ref"], max_ref)
        worst["rms_ratio"] = max(worst["rms_ratio"],
                                 float(np.sqrt(np.mean(err ** 2))) / rms_ref if rms_ref > 0 else float(err.max()))
    return Comparison(name=name, tolerance=tol, ok=ok, actual_nonfinite=nonfinite["actual"],
                      reference_nonfinite=nonfinite["reference"], **worst)


def assert_close(actual, reference, tier: str = "float64", name: str = "value") -> Comparison:
    """Raise AssertionError with the full report unless ``compare(...).ok``; return the report."""
    c = compare(actual, reference, tier, name)
    if not c.ok:
        raise AssertionError(str(c))
    return c


# ------------------------------------------------------------------------- input generators
def _op_name(op) -> str:
    """An op given by name ("gla") or by its module (linrec_ref.ops.gla)."""
    return op if isinstance(op, str) else op.SPEC.name


def default_dims(op: str, **overrides) -> dict:
    """The op's default sizes (B, T, H, K, V, ...) with overrides, e.g. default_dims("gla", T=64).
    op: a name or an ops module, here and in every function below."""
    s = registry.spec(_op_name(op))
    dims = {"T": 16, **s.default_dims}
    dims.update(overrides)
    return dims


def random_state(op: str, dims: dict, dtype=np.float64, rng=None, scale: float = 1.0,
                 options: Optional[dict] = None):
    """A random state [N, ...] (tuple for tuple states) with N = dims["N"] or dims["B"]."""
    s = registry.spec(_op_name(op))
    state_args = s.state_args(options)
    rng = np.random.default_rng(0) if rng is None else rng
    sizes = dict(dims)
    sizes.setdefault("N", dims["B"])
    parts = []
    for arg in state_args:
        shape = tuple(sizes[d] for d in arg.dims)
        if arg.nonnegative or arg.positive:  # e.g. cache weights: away from 0 for FD steps
            parts.append(rng.uniform(0.05, 1.0, shape).astype(dtype))
            continue
        x = scale * rng.standard_normal(shape)
        if arg.kind == "complex":
            x = x + 1j * scale * rng.standard_normal(shape)
            dt = np.complex64 if np.dtype(dtype) == np.float32 else np.complex128
        else:
            dt = dtype
        parts.append(x.astype(dt))
    return tuple(parts) if len(state_args) > 1 else parts[0]


def make_inputs(op: str, regime: str = "typical", *, dtype=np.float64, seed: int = 0,
                variant: str = "default", initial_state: bool = False, **dims) -> dict:
    """Valid random inputs of op for a regime, as keyword arguments of its forms.

    dims override the op's default sizes (e.g. T=257). With initial_state=True a random
    ``initial_state`` is included. The variant's options are included too.
    """
    op = _op_name(op)
    s = registry.spec(op)
    if regime not in s.regimes:
        raise ValueError(f"{op}: regime {regime!r} does not apply; its regimes are {s.regimes}")
    if variant not in s.variants:
        raise ValueError(f"{op}: unknown variant {variant!r}; expected one of {list(s.variants)}")
    rng = np.random.default_rng(seed)
    d = default_dims(op, **dims)
    x = registry.module(op).make_inputs(rng, regime, d, np.dtype(dtype), variant)
    x.update(s.variants[variant])
    if initial_state:
        x["initial_state"] = random_state(op, d, dtype, rng, options=s.variants[variant])
    return x


# ------------------------------------------------------------------ calling forms and vjps
def _form(op, form: str, backend: str):
    """The function of one form on a backend ("numpy": the reference's own function)."""
    if backend == "numpy":
        return registry.form(_op_name(op), form)
    from . import backends
    return backends.get(backend).resolve(_op_name(op), form)


def run(op, form: str, inputs: dict, *, chunk_size: Optional[int] = None, backend: str = "numpy",
        **options):
    """(o, final_state) of a forward form of op (a name or an ops module) on ``inputs`` (a
    keyword dict such as make_inputs returns), with output_final_state=True.

    chunk_size goes to the chunkwise form only, so one call site can run every form; options
    (e.g. scale, an op option) are passed to the form as they are. backend: where the form runs
    (default the NumPy reference; "numba", ... to test a fast path against it).
    """
    fn = _form(op, form, backend)
    if form == "chunkwise" and chunk_size is not None:
        options["chunk_size"] = chunk_size
    return fn(**inputs, output_final_state=True, **options)


def vjp(op, form: str, inputs: dict, do, dht=None, *, chunk_size: Optional[int] = None,
        backend: str = "numpy", **options) -> dict:
    """The gradient dict {input name: cotangent} of form's backward (form "recurrent" runs
    recurrent_vjp) for output cotangent do and final-state cotangent dht; chunk_size, backend
    and options as in ``run``."""
    fn = _form(op, f"{form}_vjp", backend)
    if form == "chunkwise" and chunk_size is not None:
        options["chunk_size"] = chunk_size
    return fn(**inputs, do=do, dht=dht, **options)


def run_steps(op, inputs: dict, *, backend: str = "numpy"):
    """Decode token by token with the op's ``step`` (on ``backend``); returns (o, final_state)
    like ``run``."""
    name = _op_name(op)
    spec = registry.spec(name)
    arrays = {k: v for k, v in inputs.items() if k in set(spec.input_names)}
    rest = {k: v for k, v in inputs.items() if k not in arrays}
    per_token = [a.name for a in spec.inputs if a.per_token and arrays.get(a.name) is not None]
    options = {k: v for k, v in rest.items() if k in spec.options or k == "scale"}
    state = rest.get("initial_state")
    T = arrays[per_token[0]].shape[1]
    if T == 0:  # no token to decode: the forms' empty call (an empty output, the initial state
        return run(name, "recurrent", inputs, backend=backend)  # passed through, zeros if none)
    step = _form(name, "step", backend)
    outs = []
    for t in range(T):
        token = {k: (v[:, t] if k in per_token else v) for k, v in arrays.items()}
        o_t, state = step(**token, state=state, **options)
        outs.append(o_t)
    return np.stack(outs, axis=1), state


def cotangents(o, ht=None, *, seed: int = 1, rng: Optional[np.random.Generator] = None):
    """Random N(0, 1) cotangents (do, dht) shaped and typed like the output o and the final
    state ht (an array, a tuple of arrays, or None); complex leaves get complex cotangents.
    rng, when given, is drawn from instead of a generator seeded with ``seed``."""
    rng = np.random.default_rng(seed) if rng is None else rng

    def like(a):
        if a is None:
            return None
        if isinstance(a, tuple):
            return tuple(like(leaf) for leaf in a)
        c = rng.standard_normal(a.shape)
        if np.iscomplexobj(a):
            c = c + 1j * rng.standard_normal(a.shape)
        return c.astype(a.dtype)
    return like(o), like(ht)


def as_float64(inputs: dict) -> dict:
    """Promote every float32/complex64 array of an input dict (states included) to 64-bit."""
    def up(x):
        if isinstance(x, tuple):
            return tuple(up(v) for v in x)
        if isinstance(x, np.ndarray) and x.dtype == np.float32:
            return x.astype(np.float64)
        if isinstance(x, np.ndarray) and x.dtype == np.complex64:
            return x.astype(np.complex128)
        return x
    return {k: up(v) for k, v in inputs.items()}


def inner(a, b) -> float:
    """Re <a, b> summed over all leaves: the pairing of a cotangent with a value."""
    return float(sum(np.real(np.vdot(x, y)) for (_, x), (_, y) in zip(leaves(a), leaves(b))))


# ------------------------------------------------------------------------- finite differences
def fd_check(loss: Callable[[dict], float], inputs: dict, grads: dict, names: Iterable[str], *,
             rng=None, eps: float = 1e-5, n_directions: int = 2, n_entries: int = 4,
             tier: str = "fd") -> Dict[str, Comparison]:
    """Check analytic gradients against central finite differences of a scalar loss.

    The stencil is the fourth-order central difference
        f'(x) ~ [8 (f(x+h) - f(x-h)) - (f(x+2h) - f(x-2h))] / (12 h),   h = eps = 1e-5,
    whose truncation error (O(h^4)) and rounding noise (O(|L| * 1e-16 / h)) are both well below
    the "fd" tier for losses of a few hundred; the second-order stencil at h = 1e-6 is not.

    loss:   loss(inputs) -> float (e.g. <do, o> + <dht, final_state>).
    grads:  {name: analytic gradient}, same shapes as inputs[name] (tuples allowed for states).
    For every name, compares (a) directional derivatives along ``n_directions`` random N(0,1)
    directions, and (b) the partial derivatives of the ``n_entries`` largest-magnitude entries
    of the gradient plus as many random entries. Complex inputs are perturbed in their real and
    imaginary parts (gradient convention: dL/dRe + i dL/dIm). Entries equal to -inf (hard
    resets) are not perturbed. Returns {name: Comparison} (fd value as the reference).
    """
    rng = np.random.default_rng(1) if rng is None else rng
    out = {}
    for name in names:
        x0, g = inputs[name], grads[name]
        leaves_x = [l for _, l in leaves(x0)]
        leaves_g = [l for _, l in leaves(g)]
        fd_vals, an_vals = [], []

        def perturbed(deltas, sign):
            new = [xl + sign * eps * dl for xl, dl in zip(leaves_x, deltas)]
            value = tuple(new) if isinstance(x0, tuple) else new[0]
            return loss({**inputs, name: value})

        def directional(deltas):
            near = perturbed(deltas, +1) - perturbed(deltas, -1)
            far = perturbed(deltas, +2) - perturbed(deltas, -2)
            fd_vals.append((8 * near - far) / (12 * eps))
            an_vals.append(sum(float(np.real(np.vdot(gl, dl))) for gl, dl in zip(leaves_g, deltas)))

        finite = [np.isfinite(xl) for xl in leaves_x]
        for _ in range(n_directions):
            deltas = []
            for xl, fin in zip(leaves_x, finite):
                d = rng.standard_normal(xl.shape)
                if np.iscomplexobj(xl):
                    d = d + 1j * rng.standard_normal(xl.shape)
                deltas.append((d * fin).astype(xl.dtype))
            directional(deltas)
        for li, (xl, gl, fin) in enumerate(zip(leaves_x, leaves_g, finite)):
            if xl.size == 0:
                continue
            mag = np.where(fin, np.abs(gl), -1).ravel()
            picks = list(np.argsort(mag)[::-1][:n_entries]) + list(rng.integers(0, xl.size, n_entries))
            for flat in picks:
                if not fin.ravel()[flat]:
                    continue
                parts = [1.0] + ([1j] if np.iscomplexobj(xl) else [])
                for unit in parts:
                    deltas = [np.zeros_like(l) for l in leaves_x]
                    deltas[li].ravel()[flat] = unit
                    directional(deltas)
        out[name] = (np.array(an_vals), np.array(fd_vals))
    # a gradient that vanishes in theory has FD values that are rounding noise: judge every
    # input on the scale of the largest directional derivative of the call (see compare)
    joint = max([float(np.abs(fd).max()) for _, fd in out.values() if fd.size] + [0.0])
    return {name: compare(an, fd, tier, name=f"d{name} vs FD", zero_scale=joint)
            for name, (an, fd) in out.items()}


# ------------------------------------------------------------------------- mlstm conditioning
def mlstm_condition(q, k, v, i, f, *, scale: Optional[float] = None, initial_state=None,
                    block: int = 64) -> MlstmCondition:
    """How ill-conditioned mlstm's output is at every token, for these inputs.

    mlstm's output h_t = num_t / max(|n_t . q^_t|, 1) divides two sums over the past tokens s
    (see linrec_ref.ops.mlstm). Where their terms cancel, rounding is amplified: the relative
    error of any evaluation of h_t is about u * ``.output``, u the unit roundoff (6e-8 in
    float32, 1.1e-16 in float64), with the per-token relative condition numbers
        .normaliser = sum_s |w_ts q^_t . k_s| / max(|n_t . q^_t|, 1)
        .numerator  = max_j sum_s |w_ts (q^_t . k_s) v_sj| / max_j |(C_t^T q^_t)_j|
    (w_ts = exp(f_{s+1} + ... + f_t + i_s), q^ = scale q; the initial state counts as one more
    term) and .log_normaliser = log |n_t . q^_t| (0 is the floor's kink). A float32 kernel whose
    error at a token is far above 6e-8 * .output has a bug; one near it meets an ill-posed input.
    docs/testing.md gives measured numbers.

    Exact for T <= 2 * block; beyond, terms older than one to two blocks enter through a
    Cauchy-Schwarz bound, so the measure is an upper bound (a few times the exact value at most,
    in slow decays, where old terms matter). Float64; time and memory O(B H T block).

    q, k: [B, T, H, K]; v: [B, T, H, V]; i, f: [B, T, H]; initial_state: (C~_0, n~_0, m_0) or
    None; scale=None means K^-1/2. Returns an MlstmCondition of three [B, T, H] arrays.
    """
    from ._forms import _prepare            # the op's own validation: shapes, dtypes, values
    p = _prepare(registry.spec("mlstm"), dict(q=q, k=k, v=v, i=i, f=f, scale=scale,
                                               initial_state=initial_state))
    if isinstance(block, (bool, np.bool_)) or not isinstance(block, (int, np.integer)) or block < 1:
        raise TypeError(f"mlstm_condition: argument 'block' must be an integer >= 1, got {block!r}")
    q, k, v, i, f = (p.inputs[n].astype(np.float64) for n in ("q", "k", "v", "i", "f"))
    B, T, H, _ = q.shape
    if T == 0:
        return MlstmCondition(*(np.zeros((B, 0, H)) for _ in MlstmCondition._fields))
    state = initial_state if p.has_initial_state else None
    keys = mlstm_keys(k, v, i, f, state, min(int(block), T))
    return mlstm_queries(keys, p.scale * q)
