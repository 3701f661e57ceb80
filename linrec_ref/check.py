"""The equivalence matrix: every form, step and backward of an op against the recurrent loop.

Used by ``linrec check`` and by the generic test suite (tests/test_equivalence.py). Each check
returns ``CheckRow``s carrying the measured error next to its tolerance (linrec_ref.testing).

What is compared (the reference is always the float64 recurrent form on the same inputs):
    forward    parallel, chunkwise (several chunk sizes), step loop, and for float32 inputs the
               float32 recurrent form: output o and final state.
    backward   each form's vjp against the float64 recurrent_vjp, per gradient; and the
               recurrent_vjp against central finite differences (float64).
    carry      running [0, t) then [t, T) with the carried state equals one call.
    varlen     packed sequences (with a zero-length segment) equal separate calls.

With ``backend="numba"`` (or another registered backend) the forms, steps and vjps that backend
computes itself run there while the reference stays the NumPy float64 loop, and their float64
results are also held to BACKEND_AGREEMENT against the NumPy form they replace. Forms a backend
hands to NumPy are the reference's own and are checked by the "numpy" matrix; so are the
finite-difference rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Sequence

import numpy as np

from . import registry, testing
from ._forms import concat_segment_states, segment_cotangent, tree_map

QUICK_LENGTHS = (1, 7, 64)
FULL_LENGTHS = (1, 2, 7, 64, 257)
QUICK_CHUNKS = (1, 3, 16, 10**6)          # 10**6 stands for "chunk size >= T"
FULL_CHUNKS = (1, 3, 16, 64, 10**6)
# A backend's float64 result against the NumPy form it replaces: the same arithmetic in another
# order, so a few ulps; 1e-12 leaves room for reassociated sums over K and V.
BACKEND_AGREEMENT = testing.Tolerance(1e-12, 1e-12, "a backend's float64 form vs the NumPy form")


@dataclass
class CheckRow:
    op: str
    variant: str
    check: str           # e.g. "o,ht: chunkwise vs recurrent", "dq: parallel_vjp vs recurrent_vjp"
    regime: str
    dtype: str
    T: int
    chunk: Optional[int]
    result: testing.Comparison
    backend: str = "numpy"

    @property
    def ok(self) -> bool:
        return self.result.ok


def _per_token_names(spec, x: dict) -> List[str]:
    return [a.name for a in spec.inputs if a.per_token and x.get(a.name) is not None]


def _chunk_label(C, T):
    return f">=T({C})" if C >= T else str(C)


def _on(form: str, backend: str) -> str:
    """A form's name in a row: "chunkwise", or "chunkwise[numba]" on another backend."""
    return form if backend == "numpy" else f"{form}[{backend}]"


def compiled(op: str, form: str, backend: str) -> bool:
    """Whether ``backend`` runs its own code for op's form (not the NumPy form it falls back to)."""
    if backend == "numpy":
        return False
    if backend in ("numba", "auto"):
        from . import backends
        if backends.resolved_name(backend) != "numba":
            return False
        from .backends import numba as numba_backend
        return form in numba_backend.accelerated(op)
    return True


# ------------------------------------------------------------------------------ checks
def check_forward(op, variant="default", regime="typical", dtype=np.float64, T=16,
                  chunk_sizes=QUICK_CHUNKS, seed=0, initial_state=True, backend="numpy") -> List[CheckRow]:
    """Rows of the forward matrix for one op, variant, regime and dtype: every form, the step loop,
    split-and-carry and varlen against the recurrent loop."""
    dt = np.dtype(dtype)
    x = testing.make_inputs(op, regime, dtype=dt, seed=seed, variant=variant,
                            initial_state=initial_state, T=T)
    ref = testing.run(op, "recurrent", testing.as_float64(x))
    tier = testing.tier_for(dt)
    row = lambda name, res, C=None: CheckRow(op, variant, name, regime, dt.name, T, C, res, backend)
    rows = []
    ref_name = "recurrent" if dt == np.float64 else "recurrent(f64)"
    on = lambda form: _on(form, backend)

    def agreement(form, got, C=None):
        """A compiled float64 form against the NumPy form it replaces."""
        if dt == np.float64 and compiled(op, form, backend):
            mine = testing.run_steps(op, x) if form == "step" else testing.run(op, form, x, chunk_size=C)
            rows.append(row(f"o,ht: {on(form)} vs {form}", testing.compare(got, mine, BACKEND_AGREEMENT),
                            None if C is None else _chunk_label(C, T)))

    want = lambda form: backend == "numpy" or compiled(op, form, backend)
    if (dt != np.float64 or backend != "numpy") and want("recurrent"):
        got = testing.run(op, "recurrent", x, backend=backend)
        rows.append(row(f"o,ht: {on('recurrent')} vs recurrent(f64)", testing.compare(got, ref, tier)))
        agreement("recurrent", got)
    if want("parallel"):
        rows.append(row(f"o,ht: {on('parallel')} vs {ref_name}",
                        testing.compare(testing.run(op, "parallel", x, backend=backend), ref, tier)))
    for C in chunk_sizes if want("chunkwise") else ():
        C = min(C, max(T, 1)) if C >= 10**6 else C
        got = testing.run(op, "chunkwise", x, chunk_size=C, backend=backend)
        rows.append(row(f"o,ht: {on('chunkwise')} vs {ref_name}", testing.compare(got, ref, tier),
                        _chunk_label(C, T)))
        agreement("chunkwise", got, C)
    if T >= 1 and want("step"):
        got = testing.run_steps(op, x, backend=backend)
        rows.append(row(f"o,ht: {on('step')} loop vs {ref_name}", testing.compare(got, ref, tier)))
        agreement("step", got)
    return rows


def check_backward(op, variant="default", regime="typical", dtype=np.float64, T=16,
                   chunk_sizes=(3, 10**6), seed=0, fd=True, initial_state=True,
                   backend="numpy") -> List[CheckRow]:
    """Rows of the backward matrix: every form's vjp against the recurrent vjp, and against finite
    differences (fd=True)."""
    spec = registry.spec(op)
    dt = np.dtype(dtype)
    rng = np.random.default_rng(seed + 1000)
    x = testing.make_inputs(op, regime, dtype=dt, seed=seed, variant=variant,
                            initial_state=initial_state, T=T)
    x64 = testing.as_float64(x)
    o, ht = testing.run(op, "recurrent", x64)
    do64, dht64 = testing.cotangents(o, ht, rng=rng)
    ref = testing.vjp(op, "recurrent", x64, do64, dht64)
    tier = testing.tier_for(dt)
    cast = lambda a: a.astype(dt if not np.iscomplexobj(a) else np.result_type(dt, np.complex64))
    do, dht = cast(do64), tree_map(cast, dht64)
    rows = []
    names = [n for n in list(spec.differentiable) + ["initial_state"] if ref.get(n) is not None]
    # a gradient that is exactly zero in theory (e.g. T = 1 without a state) is judged on the
    # scale of the call's other gradients: forms may return rounding noise there
    zero_scale = max(max(float(np.abs(l).max()) for _, l in testing.leaves(ref[n]) if l.size) for n in names)
    runs = [("recurrent_vjp", None)] if dt != np.float64 or backend != "numpy" else []
    runs += [("parallel_vjp", None)] + [("chunkwise_vjp", C) for C in chunk_sizes]
    runs = [(f, C) for f, C in runs if backend == "numpy" or compiled(op, f, backend)]
    ref_name = "recurrent_vjp" if dt == np.float64 and backend == "numpy" else "recurrent_vjp(f64)"
    for form_vjp, C in runs:
        C = min(C, max(T, 1)) if C is not None and C >= 10**6 else C
        label = _chunk_label(C, T) if C else None
        got = testing.vjp(op, form_vjp[:-4], x, do, dht, chunk_size=C, backend=backend)
        for n in names:
            res = testing.compare(got[n], ref[n], tier, name=f"d{n}", zero_scale=zero_scale)
            rows.append(CheckRow(op, variant, f"d{n}: {_on(form_vjp, backend)} vs {ref_name}", regime,
                                 dt.name, T, label, res, backend))
        if dt == np.float64 and compiled(op, form_vjp, backend):
            mine = testing.vjp(op, form_vjp[:-4], x, do, dht, chunk_size=C)
            res = testing.compare({n: got[n] for n in names}, {n: mine[n] for n in names},
                                  BACKEND_AGREEMENT, name="grads")
            rows.append(CheckRow(op, variant, f"grads: {_on(form_vjp, backend)} vs {form_vjp}", regime,
                                 dt.name, T, label, res, backend))
    if fd and dt == np.float64 and backend == "numpy":
        def loss(inputs):
            o_, ht_ = testing.run(op, "recurrent", inputs)
            return testing.inner(do64, o_) + testing.inner(dht64, ht_)
        for n, res in testing.fd_check(loss, x64, ref, names, rng=rng).items():
            rows.append(CheckRow(op, variant, f"d{n}: recurrent_vjp vs finite differences", regime,
                                 dt.name, T, None, res))
    return rows


def check_split_carry(op, variant="default", regime="typical", dtype=np.float64, T=23, split=None,
                      form="chunkwise", chunk_size=4, seed=0, backend="numpy") -> CheckRow:
    """Running [0, t) then [t, T) with the carried state equals one call (also the gradients'
    initial-state link is covered by the varlen check)."""
    spec = registry.spec(op)
    dt = np.dtype(dtype)
    x = testing.make_inputs(op, regime, dtype=dt, seed=seed, variant=variant, initial_state=True, T=T)
    t = T // 3 + 2 if split is None else split  # 9 for T=23: not a multiple of the chunk size
    per_token = _per_token_names(spec, x)
    first = {k: (v[:, :t] if k in per_token else v) for k, v in x.items()}
    second = {k: (v[:, t:] if k in per_token else v) for k, v in x.items()}
    o1, h1 = testing.run(op, form, first, chunk_size=chunk_size, backend=backend)
    second["initial_state"] = h1
    o2, h2 = testing.run(op, form, second, chunk_size=chunk_size, backend=backend)
    ref = testing.run(op, form, x, chunk_size=chunk_size, backend=backend)
    res = testing.compare((np.concatenate([o1, o2], axis=1), h2), ref, testing.tier_for(dt))
    return CheckRow(op, variant, f"o,ht: split at t={t} and carry ({_on(form, backend)}) vs one call",
                    regime, dt.name, T, chunk_size if form == "chunkwise" else None, res, backend)


def check_varlen(op, variant="default", regime="typical", dtype=np.float64, lengths=(5, 0, 9, 1),
                 form="chunkwise", chunk_size=4, seed=0, backward=True, backend="numpy") -> List[CheckRow]:
    """Packed sequences (B=1, cu_seqlens) equal separate calls, forward and backward."""
    spec = registry.spec(op)
    dt = np.dtype(dtype)
    T = int(sum(lengths))
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    x = testing.make_inputs(op, regime, dtype=dt, seed=seed, variant=variant, initial_state=False, T=T, B=1)
    per_token = _per_token_names(spec, x)
    h0 = testing.random_state(op, dict(testing.default_dims(op, T=T, B=1), N=len(lengths)), dt,
                              np.random.default_rng(seed + 7), options=spec.variants[variant])
    packed_o, packed_h = testing.run(op, form, dict(x, initial_state=h0, cu_seqlens=cu), chunk_size=chunk_size, backend=backend)
    outs, finals = [], []
    for n in range(len(lengths)):
        h0_n = tree_map(lambda s: s[n:n + 1], h0)
        lo, hi = cu[n], cu[n + 1]
        if hi == lo:
            finals.append(h0_n)
            continue
        seg = {k: (v[:, lo:hi] if k in per_token else v) for k, v in x.items()}
        o_n, h_n = testing.run(op, form, dict(seg, initial_state=h0_n), chunk_size=chunk_size, backend=backend)
        outs.append(o_n)
        finals.append(h_n)
    sep_h = concat_segment_states(spec, spec.state_args(spec.variants[variant]), finals)
    tier = testing.tier_for(dt)
    label = f"lengths {list(lengths)}"
    rows = [CheckRow(op, variant, f"o,ht: varlen {label} vs separate calls ({_on(form, backend)})", regime,
                     dt.name, T, chunk_size,
                     testing.compare((packed_o, packed_h), (np.concatenate(outs, axis=1), sep_h), tier), backend)]
    if backward:
        rng = np.random.default_rng(seed + 11)
        do, dht = testing.cotangents(packed_o, packed_h, rng=rng)
        g_packed = testing.vjp(op, form, dict(x, initial_state=h0, cu_seqlens=cu), do, dht, chunk_size=chunk_size, backend=backend)
        # separate calls, gradients assembled in the packed layout
        g_sep = {n: np.zeros_like(x[n]) for n in spec.differentiable if x.get(n) is not None}
        dh0 = []
        state_args = spec.state_args(spec.variants[variant])
        L0 = testing.default_dims(op).get(spec.growing_axis, 0) if spec.growing_axis else 0
        for n in range(len(lengths)):
            lo, hi = cu[n], cu[n + 1]
            dht_n = segment_cotangent(spec, state_args, tree_map(lambda s: s[n:n + 1], dht), L0 + hi - lo)
            if hi == lo:
                dh0.append(dht_n)
                continue
            seg = {k: (v[:, lo:hi] if k in per_token else v) for k, v in x.items()}
            g = testing.vjp(op, form, dict(seg, initial_state=tree_map(lambda s: s[n:n + 1], h0)),
                            do[:, lo:hi], dht_n, chunk_size=chunk_size, backend=backend)
            for name in g_sep:
                if name in per_token:
                    g_sep[name][:, lo:hi] = g[name]
                else:
                    g_sep[name] = g_sep[name] + g[name]
            dh0.append(g["initial_state"])
        g_sep["initial_state"] = tree_map(lambda *parts: np.concatenate(parts, axis=0), *dh0)
        got = {k: g_packed[k] for k in g_sep}
        rows.append(CheckRow(op, variant, f"grads: varlen {label} vs separate calls ({_on(form, backend)})",
                             regime, dt.name, T, chunk_size, testing.compare(got, g_sep, tier), backend))
    return rows


# ------------------------------------------------------------------------------ the matrix
def matrix(op: str, dtype=np.float64, full: bool = False, seed: int = 0, backend: str = "numpy"):
    """Yield the (description, thunk) pairs of the equivalence matrix of one op (on a backend)."""
    spec = registry.spec(op)
    lengths = FULL_LENGTHS if full else QUICK_LENGTHS
    chunks = FULL_CHUNKS if full else QUICK_CHUNKS
    # the carried-state checks run the form the backend compiles, chunkwise otherwise
    carry_form = ("recurrent" if compiled(op, "recurrent", backend)
                  and not compiled(op, "chunkwise", backend) else "chunkwise")
    bk = dict(backend=backend)
    if backend != "numpy" and not any(compiled(op, f, backend) for f in ("recurrent", "chunkwise", "step")):
        return                     # every form of op runs the NumPy reference on this backend
    for variant in spec.variants:
        for regime in spec.regimes:
            for T in lengths:
                yield (f"{op}/{variant}/{regime}/T={T} forward",
                       lambda v=variant, r=regime, T=T: check_forward(op, v, r, dtype, T, chunks, seed, **bk)
                       + check_forward(op, v, r, dtype, T, chunks[1:2], seed + 1, initial_state=False, **bk))
            for T in ((7, 33) if full else (7,)):
                yield (f"{op}/{variant}/{regime}/T={T} backward",
                       lambda v=variant, r=regime, T=T: check_backward(op, v, r, dtype, T, seed=seed, **bk)
                       + check_backward(op, v, r, dtype, T, seed=seed + 1, initial_state=False, **bk))
            yield (f"{op}/{variant}/{regime} split-and-carry",
                   lambda v=variant, r=regime: [check_split_carry(op, v, r, dtype, seed=seed,
                                                                  form=carry_form, **bk)])
            yield (f"{op}/{variant}/{regime} varlen",
                   lambda v=variant, r=regime: check_varlen(op, v, r, dtype, seed=seed, form=carry_form, **bk))


def run(ops: Optional[Sequence[str]] = None, dtypes: Iterable = (np.float64,), full: bool = False,
        progress: Optional[Callable[[int, int, str], None]] = None, backend: str = "numpy") -> List[CheckRow]:
    """Run the matrix for the given ops (default: all) and dtypes on a backend; returns every row."""
    ops = list(ops) if ops else list(registry.available())
    jobs = [job for op in ops for dt in dtypes for job in matrix(op, dt, full, backend=backend)]
    rows: List[CheckRow] = []
    for i, (label, thunk) in enumerate(jobs):
        if progress:
            progress(i, len(jobs), label)
        rows.extend(thunk())
    if progress:
        progress(len(jobs), len(jobs), "done")
    return rows


def comparison_kind(row: CheckRow) -> str:
    """forms vs recurrent | vjp vs recurrent_vjp | vjp vs finite differences | varlen/split."""
    if "finite differences" in row.check:
        return "vjp vs finite differences"
    if "_vjp" in row.check:
        return "vjp vs recurrent_vjp"
    if "varlen" in row.check or "split" in row.check:
        return "varlen / split-and-carry"
    return "forms vs recurrent"


def summarize_compact(rows: Sequence[CheckRow]) -> List[dict]:
    """Worst error per (op, dtype, kind of comparison)."""
    groups = {}
    for r in rows:
        key = (r.op, r.dtype, comparison_kind(r))
        g = groups.setdefault(key, {"op": r.op, "dtype": r.dtype, "check": key[2], "n": 0, "failed": 0,
                                    "max_rel": 0.0, "rtol": r.result.tolerance.rtol,
                                    "atol": r.result.tolerance.atol})
        g["n"] += 1
        g["failed"] += 0 if r.ok else 1
        g["max_rel"] = max(g["max_rel"], r.result.max_rel)
    return list(groups.values())


def summarize(rows: Sequence[CheckRow]) -> List[dict]:
    """Worst error per (op, dtype, check kind), ready to print as a table."""
    groups = {}
    for r in rows:
        key = (r.op, r.dtype, r.check.split(": ", 1)[1] if ": " in r.check else r.check,
               r.check.split(": ", 1)[0])
        g = groups.setdefault(key, {"op": r.op, "dtype": r.dtype, "check": key[2], "what": key[3],
                                    "n": 0, "failed": 0, "max_rel": 0.0, "max_elem_rel": 0.0,
                                    "rtol": r.result.tolerance.rtol, "atol": r.result.tolerance.atol,
                                    "worst": ""})
        g["n"] += 1
        g["failed"] += 0 if r.ok else 1
        if r.result.max_rel >= g["max_rel"]:
            g["max_rel"] = r.result.max_rel
            g["worst"] = f"{r.regime}, T={r.T}" + (f", C={r.chunk}" if r.chunk else "")
        g["max_elem_rel"] = max(g["max_elem_rel"], r.result.max_elem_rel)
    return list(groups.values())
