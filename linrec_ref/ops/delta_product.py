r"""delta_product: Gated DeltaProduct, n_h Householder sub-steps per token after one decay.

Recurrence (one batch element, one value head; per token t, decay first, then n_h delta steps,
then one read):

    S <- exp(g_t) S
    for j = 1 .. n_h:
        S <- S + beta_{t,j} k_{t,j} (v_{t,j} - S^T k_{t,j})^T
           = (I - beta_{t,j} k_{t,j} k_{t,j}^T) S + beta_{t,j} k_{t,j} v_{t,j}^T
    S_t = S;    o_t = scale * S_t^T q_t                             (inclusive read, once per token)

So the token's transition is exp(g_t) prod_{j = n_h .. 1} (I - beta_{t,j} k_{t,j} k_{t,j}^T), a
product of n_h generalised Householder matrices (rank-n_h correction of a scaled identity).
n_h = 1 is gated_delta_rule; g = None means no decay (the ungated DeltaProduct; same as g = 0).

Layout: the sub-steps are an explicit axis (so that varlen, split-and-carry and step slice the
time axis by tokens):

Glossary
    symbol       argument   shape               paper (Siems et al., DeltaProduct)   fla (chunk_gated_delta_product)
    q_t          q          [B, T, H, K]        q_i                                   q  [B, T, H, K]
    k_{t,j}      k          [B, T, NH, H, K]    k_{i,j} (unit norm)                   k  [B, T*n_h, H, K], position t*n_h + j
    v_{t,j}      v          [B, T, NH, HV, V]   v_{i,j}                               v  [B, T*n_h, H, V], position t*n_h + j
    beta_{t,j}   beta       [B, T, NH, HV]      beta_{i,j}                            beta [B, T*n_h, H], position t*n_h + j
    g_t          g          [B, T, HV] or None  log alpha_i (gate of Gated DeltaProduct)  g [B, T, H] or None
    n_h          NH (size)  int                 n_h                                   num_householder
    S_t          state      [N, HV, K, V]       H_i (stored transposed)               initial_state / final_state
    scale        scale      float               1/sqrt(d_k)                           scale (default K^-1/2)
fla's interleaved layout [B, T*n_h, ...] holds sub-step j (0-based) of token t at position
t*n_h + j; ``from_interleaved(x, n_h)`` gives [B, T, n_h, ...] and ``to_interleaved`` inverts it
(a reshape, no copy when x is contiguous). ``from_fla_layout(q, k, v, g, beta, n_h)`` converts a
whole fla call and checks the lengths. Grouped heads: value head j reads q/k head j // (HV / H)
(the form wrappers repeat q and k). Positional order: (q, k, v, beta, g) with g last because it
is optional; fla's order is (q, k, v, g, beta): pass g and beta by keyword.

Options (as in fla / gated_delta_rule)
    use_qk_l2norm_in_kernel=False: q and every k_{t,j} are replaced by x / sqrt(sum(x^2) + 1e-6)
        inside the op (gradient included).
    beta_activation="none": beta is the write strength, must lie in [0, 2] (InputError
        otherwise); "sigmoid": beta holds logits and sigmoid(beta) is used (gradient included).

Stability (numerics.md hazard 8): each sub-step I - beta k k^T has eigenvalues 1 and
1 - beta |k|^2, a contraction for unit keys and beta in [0, 2]; so the token's product is too,
and the state stays bounded. Use ``use_qk_l2norm_in_kernel=True`` for raw keys.

Forms
    recurrent  the loop above over tokens and sub-steps (ground truth); O(K V) memory per head.
    step       one token: the decay, the n_h sub-steps and the read (decoding).
    parallel / chunkwise  the expanded sequence of T*n_h sub-steps is a gated delta rule with
               k, v, beta the sub-steps in order, the decay g_t on the first sub-step of token t
               and 0 on the others, and q_t at the last sub-step of token t (0 elsewhere);
               o_t is the read of sub-step t*n_h + n_h - 1. These forms run gated_delta_rule's
               parallel / chunkwise cores (UT/WY transform, see linrec_ref._delta) on it.
               A chunk of C = chunk_size TOKENS is C*n_h sub-steps: the core's chunk size is
               min(C, T) * n_h, so chunk boundaries fall between tokens and the carried state is
               the token state S_t.
    attention_matrix  M [B, HV, T, T*n_h]: o[b, :, h] = M[b, h] @ to_interleaved(v)[b, :, h]
               when the initial state is 0; rows are tokens, columns sub-steps
               (column t*n_h + j is sub-step j of token t); causal: M[t, s*n_h + j] = 0 for s > t.
               It is gated_delta_rule's matrix of the expanded sequence, rows t*n_h + n_h - 1.

Gradients (hand-written)
    recurrent_vjp: direct adjoint, per token walking the sub-steps backwards, with
        S^(0) = a_t S_{t-1}, S^(j) = S^(j-1) + k_j delta_j^T, r_j = S^(j-1)T k_j,
        delta_j = beta_j (v_j - r_j), S_t = S^(n_h):
        dS = dS_t + scale q_t do_t^T;  dq_t = scale S_t do_t;  then for j = n_h .. 1:
            ddelta = dS^T k_j,  dv_j = beta_j ddelta,  dbeta_j = ddelta . (v_j - r_j),
            dr = -beta_j ddelta,  dk_j = dS delta_j + S^(j-1) dr,  dS <- dS + k_j dr^T;
        dg_t = <dS, S^(0)>,  dS_{t-1} = a_t dS.
        Checkpointed (``_scan.reverse_steps`` over tokens): never all T states; the n_h + 1
        sub-step states of one token are recomputed from its entering state.
    parallel_vjp / chunkwise_vjp: gated_delta_rule's vjp cores on the expanded sequence with
        do placed at the read sub-steps (0 elsewhere); dq is taken from the read sub-steps,
        dg from the first sub-steps, dk, dv, dbeta are the sub-steps' gradients reshaped.

Peers: fla ``chunk_gated_delta_product`` (num_householder = n_h, k/v/beta interleaved, see
``from_fla_layout``; fla applies beta after a sigmoid in its layer: pass beta_activation="none"
with that post-sigmoid beta, or "sigmoid" with the logits).

References: Siems, Carstensen, Zela, Hutter, Pontil, Grazzi, "DeltaProduct: Improving
State-Tracking in Linear RNNs via Householder Products", 2025; Yang, Kautz, Hatamizadeh, "Gated
Delta Networks", 2024; Yang et al., "Parallelizing Linear Transformers with the Delta Rule over
Sequence Length", 2024 (UT/WY chunkwise form).
"""
from __future__ import annotations

import numbers

import numpy as np

from .. import _regimes
from .._forms import forward_form, matrix_form, step_form, vjp_form
from .._scan import reverse_steps
from .._spec import Arg, OpSpec
from .._validation import InputError, require_ndarray
from . import gated_delta_rule
from .gated_delta_rule import BETA_REGIMES, prepare, pull_back

_OPTIONS = {"use_qk_l2norm_in_kernel": False, "beta_activation": "none"}
# gated_delta_rule's cores get mapped inputs: no l2 norm, beta already the write strength
_RAW = {"use_qk_l2norm_in_kernel": False, "beta_activation": "none"}
_OP = "delta_product"

SPEC = OpSpec(
    name=_OP,
    family="delta rule (Gated DeltaProduct)",
    transition="rank-1 Householder",
    math=("per token: S <- exp(g_t) S; for j = 1..n_h: S <- S + beta_tj k_tj (v_tj - S^T k_tj)^T; "
          "o_t = scale S^T q_t"),
    inputs=(Arg("q", "B T H K"), Arg("k", "B T NH H K"), Arg("v", "B T NH HV V"),
            Arg("beta", "B T NH HV"), Arg("g", "B T HV", log_gate=True, optional=True)),
    output="B T HV V",
    quadratic="B HV T*NH T*NH",  # sub-step x sub-step matrices
    state=(Arg("state", "N HV K V"),),
    default_scale=lambda dims: dims["K"] ** -0.5,
    peers=("fla.ops.gated_delta_product.chunk_gated_delta_product "
           "(k, v, beta interleaved [B, T*n_h, ...]: see from_fla_layout)",),
    regimes=tuple(_regimes.DECAY_REGIMES) + tuple(BETA_REGIMES),
    default_dims={"B": 2, "NH": 2, "H": 1, "HV": 2, "K": 8, "V": 6},
    options=dict(_OPTIONS),
    variants={"default": {},
              "l2norm_sigmoid": {"use_qk_l2norm_in_kernel": True, "beta_activation": "sigmoid"},
              "no_gate": {}},
)


# ----------------------------------------------------------------------------- recurrent
def _token_update(S, a, k, v, beta):
    """One token S_{t-1} -> S_t. S: [B, H, K, V]; a: [B, H] or None (no decay);
    k: [B, NH, H, K]; v: [B, NH, H, V]; beta: [B, NH, H]."""
    if a is not None:
        S = a[:, :, None, None] * S                                 # [B, H, K, V]  S^(0)
    for j in range(k.shape[1]):
        kj = k[:, j]                                                # [B, H, K]
        read = (kj[:, :, None, :] @ S)[:, :, 0, :]                  # [B, H, V]  S^T k
        delta = beta[:, j, :, None] * (v[:, j] - read)              # [B, H, V]
        S = S + kj[:, :, :, None] * delta[:, :, None, :]            # [B, H, K, V]
    return S


def _advance(k, v, beta, g):
    """One token of the recurrence as a function of (S_{t-1}, t), for loops and reverse walks."""
    a = None if g is None else np.exp(g)                            # [B, T, H]
    return lambda S, t: _token_update(S, None if a is None else a[:, t], k[:, t], v[:, t], beta[:, t])


@forward_form(SPEC)
def recurrent(q, k, v, beta, g=None, *, scale, initial_state, **opts):
    """The definition: a loop over tokens and their sub-steps. q: [B, T, H, K];
    k: [B, T, NH, H, K]; v: [B, T, NH, H, V]; beta: [B, T, NH, H]; g: [B, T, H] or None."""
    qm, km, bm = prepare(_OP, q, k, beta, opts)
    advance = _advance(km, v, bm, g)
    S = initial_state                                               # [B, H, K, V]
    o = np.empty((v.shape[0], v.shape[1]) + v.shape[3:], dtype=v.dtype)   # [B, T, H, V]
    for t in range(q.shape[1]):
        S = advance(S, t)
        o[:, t] = scale * (qm[:, t, :, None, :] @ S)[:, :, 0, :]    # [B, H, V]
    return o, S


@step_form(SPEC)
def step(q, k, v, beta, g=None, *, state, scale, **opts):
    """One token: q: [B, H, K]; k: [B, NH, H, K]; v: [B, NH, H, V]; beta: [B, NH, H];
    g: [B, H] or None; state: [B, H, K, V]."""
    qm, km, bm = prepare(_OP, q, k, beta, opts)
    S = _token_update(state, None if g is None else np.exp(g), km, v, bm)    # [B, H, K, V]
    o = scale * (qm[:, :, None, :] @ S)[:, :, 0, :]                 # [B, H, V]
    return o, S


@vjp_form(SPEC)
def recurrent_vjp(q, k, v, beta, g=None, *, do, dht, scale, initial_state, **opts):
    """Direct adjoint of the loop (ground truth), tokens t = T-1 .. 0 and inside each token the
    sub-steps j = n_h .. 1 (equations in the module docstring). Checkpointed reverse walk over
    tokens (``_scan.reverse_steps``): never all T states, only n_h + 1 sub-step states of the
    token being visited."""
    qm, km, bm = prepare(_OP, q, k, beta, opts)
    NH = k.shape[2]
    a = None if g is None else np.exp(g)                            # [B, T, H]
    dq, dk, dv, dbeta = (np.zeros_like(x) for x in (q, k, v, beta))
    dg = None if g is None else np.zeros_like(g)
    dS = dht.copy()                                                 # [B, H, K, V]
    for t, S_prev, S_t in reverse_steps(_advance(km, v, bm, g), initial_state, q.shape[1]):
        dS = dS + scale * qm[:, t, :, :, None] * do[:, t, :, None, :]  # read of S_t
        dq[:, t] = scale * (S_t @ do[:, t, :, :, None])[..., 0]        # [B, H, K]
        # recompute the sub-step states S^(0) .. S^(NH-1) of token t
        subs = [S_prev if a is None else a[:, t, :, None, None] * S_prev]   # [B, H, K, V]
        for j in range(NH - 1):
            one = slice(j, j + 1)                                        # sub-step j, axis kept
            subs.append(_token_update(subs[-1], None, km[:, t, one], v[:, t, one], bm[:, t, one]))
        for j in reversed(range(NH)):
            kj, bj, S_in = km[:, t, j], bm[:, t, j, :, None], subs[j]    # [B, H, K], [B, H, 1]
            resid = v[:, t, j] - (kj[:, :, None, :] @ S_in)[:, :, 0, :]  # [B, H, V]  v - r
            delta = bj * resid                                           # [B, H, V]
            ddelta = (kj[:, :, None, :] @ dS)[:, :, 0, :]                # [B, H, V]
            dr = -bj * ddelta                                            # [B, H, V]
            dbeta[:, t, j] = np.sum(ddelta * resid, axis=-1)             # [B, H]
            dv[:, t, j] = bj * ddelta
            dk[:, t, j] = (dS @ delta[..., None])[..., 0] + (S_in @ dr[..., None])[..., 0]
            dS = dS + kj[..., None] * dr[:, :, None, :]                  # to S^(j-1)
        if a is not None:
            dg[:, t] = np.sum(dS * subs[0], axis=(-2, -1))               # <dS^(0), a S_{t-1}>
            dS = a[:, t, :, None, None] * dS                             # to S_{t-1}
    grads = {"q": dq, "k": dk, "v": dv, "beta": dbeta, "g": dg, "initial_state": dS}
    return pull_back(q, k, beta, grads, opts)


# ----------------------------------------------------------------------------- UT/WY forms
# The expanded sequence of T*n_h sub-steps is a gated delta rule (module docstring).
def _expand(q, k, v, beta, g):
    """The sequence of T*n_h sub-steps as a gated delta rule (see the module docstring).

    q: [B, T, H, K]; k: [B, T, NH, H, K]; v: [B, T, NH, H, V]; beta: [B, T, NH, H]; g: [B, T, H]
    or None. Returns {q, k, v, g, beta} of the expanded sequence (T*NH on axis 1), the keyword
    arguments of gated_delta_rule's cores.
    """
    B, T, NH, H, K = k.shape
    q_sub = np.zeros((B, T, NH, H, K), dtype=q.dtype)               # [B, T, NH, H, K]
    q_sub[:, :, -1] = q                                             # read after the last sub-step
    g_sub = np.zeros((B, T, NH, H), dtype=v.dtype)                  # [B, T, NH, H]
    if g is not None:
        g_sub[:, :, 0] = g                                          # decay before the first one
    sub = lambda x: x.reshape((B, T * NH) + x.shape[3:])            # [B, T*NH, ...]
    return {"q": sub(q_sub), "k": sub(k), "v": sub(v), "g": sub(g_sub), "beta": sub(beta)}


def _expand_do(do, NH):
    """do: [B, T, H, V] -> [B, T*NH, H, V], the cotangent at the read sub-steps, 0 elsewhere."""
    B, T = do.shape[:2]
    do_sub = np.zeros((B, T, NH) + do.shape[2:], dtype=do.dtype)    # [B, T, NH, H, V]
    do_sub[:, :, -1] = do
    return do_sub.reshape((B, T * NH) + do.shape[2:])               # [B, T*NH, H, V]


def _collapse_grads(grads, k, g):
    """Gradients of the expanded sequence -> gradients of (q, k, v, beta, g)."""
    B, T, NH = k.shape[:3]
    tok = lambda x: x.reshape((B, T, NH) + x.shape[2:])             # [B, T, NH, ...]
    out = {"q": tok(grads["q"])[:, :, -1],                          # [B, T, H, K]  read sub-steps
           "k": tok(grads["k"]), "v": tok(grads["v"]), "beta": tok(grads["beta"]),
           "initial_state": grads["initial_state"]}
    if g is not None:
        out["g"] = tok(grads["g"])[:, :, 0]                         # [B, T, H]  first sub-steps
    return out


@forward_form(SPEC)
def parallel(q, k, v, beta, g=None, *, scale, initial_state, **opts):
    """gated_delta_rule's parallel form (UT transform over all T*n_h sub-steps), read at the
    last sub-step of every token."""
    qm, km, bm = prepare(_OP, q, k, beta, opts)
    NH = k.shape[2]
    o_sub, S = gated_delta_rule.parallel.core(**_expand(qm, km, v, bm, g), scale=scale,
                                              initial_state=initial_state, **_RAW)
    return o_sub[:, NH - 1::NH], S                                  # [B, T, H, V]


@forward_form(SPEC, chunked=True)
def chunkwise(q, k, v, beta, g=None, *, scale, initial_state, chunk_size, **opts):
    """Chunks of C = chunk_size TOKENS, i.e. C*n_h sub-steps: gated_delta_rule's chunkwise form
    on the expanded sequence with chunk size min(C, T)*n_h (one triangular solve per chunk)."""
    qm, km, bm = prepare(_OP, q, k, beta, opts)
    NH = k.shape[2]
    C_sub = min(chunk_size, q.shape[1]) * NH
    o_sub, S = gated_delta_rule.chunkwise.core(**_expand(qm, km, v, bm, g), scale=scale,
                                               initial_state=initial_state, chunk_size=C_sub, **_RAW)
    return o_sub[:, NH - 1::NH], S                                  # [B, T, H, V]


@matrix_form(SPEC, names=("q", "k", "beta", "g"))
def attention_matrix(q, k, beta, g=None, *, scale, **opts):
    """M: [B, HV, T, T*n_h], tokens x sub-steps: o[b, :, h] = M[b, h] @ to_interleaved(v)[b, :, h]
    when the initial state is 0 (NOT the T x T shape of the other ops: the values are per
    sub-step). Column t*n_h + j is sub-step j of token t; M[t, s*n_h + j] = 0 for s > t."""
    qm, km, bm = prepare(_OP, q, k, beta, opts)
    NH = k.shape[2]
    sub = _expand(qm, km, km[..., :1], bm, g)                        # v is not used by M
    M_sub = gated_delta_rule.attention_matrix.core(q=sub["q"], k=sub["k"], g=sub["g"], beta=sub["beta"],
                                                   scale=scale, **_RAW)   # [B, H, T*NH, T*NH]
    return M_sub[:, :, NH - 1::NH]                                  # [B, H, T, T*NH]


@vjp_form(SPEC)
def parallel_vjp(q, k, v, beta, g=None, *, do, dht, scale, initial_state, **opts):
    """Backward of the parallel form: gated_delta_rule's parallel vjp on the expanded sequence."""
    qm, km, bm = prepare(_OP, q, k, beta, opts)
    grads = gated_delta_rule.parallel_vjp.core(
        **_expand(qm, km, v, bm, g), do=_expand_do(do, k.shape[2]), dht=dht, scale=scale,
        initial_state=initial_state, **_RAW)
    return pull_back(q, k, beta, _collapse_grads(grads, k, g), opts)


@vjp_form(SPEC, chunked=True)
def chunkwise_vjp(q, k, v, beta, g=None, *, do, dht, scale, initial_state, chunk_size, **opts):
    """Backward of the chunkwise form (chunks of C tokens = C*n_h sub-steps; per-chunk states only)."""
    qm, km, bm = prepare(_OP, q, k, beta, opts)
    NH = k.shape[2]
    grads = gated_delta_rule.chunkwise_vjp.core(
        **_expand(qm, km, v, bm, g), do=_expand_do(do, NH), dht=dht, scale=scale,
        initial_state=initial_state, chunk_size=min(chunk_size, q.shape[1]) * NH, **_RAW)
    return pull_back(q, k, beta, _collapse_grads(grads, k, g), opts)


# ----------------------------------------------------------------------------- fla's layout
def _check_num_householder(num_householder) -> int:
    if isinstance(num_householder, (bool, np.bool_)) or not isinstance(num_householder, numbers.Integral):
        raise TypeError(f"{_OP}: 'num_householder' must be a positive integer, "
                        f"got {type(num_householder).__name__}")
    if num_householder < 1:
        raise InputError(f"{_OP}: 'num_householder' (n_h, sub-steps per token) must be >= 1, "
                         f"got {num_householder}")
    return int(num_householder)


def from_interleaved(x, num_householder, name="x"):
    """fla's interleaved layout [B, T*n_h, ...] -> [B, T, n_h, ...] (sub-step j of token t sits
    at position t*n_h + j). For k, v and beta of ``chunk_gated_delta_product``."""
    n = _check_num_householder(num_householder)
    x = require_ndarray(_OP, name, x)
    if x.ndim < 2:
        raise InputError(f"{_OP}: argument '{name}' must have shape [B, T*n_h, ...], got {tuple(x.shape)}")
    L = x.shape[1]
    if L % n:
        raise InputError(
            f"{_OP}: argument '{name}' has {L} sub-steps along axis 1, which is not a multiple of "
            f"num_householder={n}; the interleaved layout is [B, T*n_h, ...] (sub-step j of token t "
            f"at position t*n_h + j)")
    return x.reshape((x.shape[0], L // n, n) + x.shape[2:])        # [B, T, n_h, ...]


def to_interleaved(x, name="x"):
    """[B, T, n_h, ...] -> fla's interleaved layout [B, T*n_h, ...] (inverse of from_interleaved)."""
    x = require_ndarray(_OP, name, x)
    if x.ndim < 3:
        raise InputError(f"{_OP}: argument '{name}' must have shape [B, T, NH, ...], got {tuple(x.shape)}")
    return x.reshape((x.shape[0], x.shape[1] * x.shape[2]) + x.shape[3:])   # [B, T*n_h, ...]


def from_fla_layout(q, k, v, g, beta, num_householder) -> dict:
    """Convert the arguments of fla's ``chunk_gated_delta_product(q, k, v, g, beta,
    num_householder)`` to this op's keyword arguments {q, k, v, beta, g}.

    q: [B, T, H, K]; k: [B, T*n_h, H, K]; v: [B, T*n_h, HV, V]; beta: [B, T*n_h, HV];
    g: [B, T, HV] or None. Checks that k, v and beta hold T*n_h sub-steps (T from q).
    """
    n = _check_num_householder(num_householder)
    q = require_ndarray(_OP, "q", q)
    if q.ndim != 4:
        raise InputError(f"{_OP}: argument 'q' must have shape [B, T, H, K], got {tuple(q.shape)}")
    T = q.shape[1]
    out = {"q": q, "g": g}
    for name, x in (("k", k), ("v", v), ("beta", beta)):
        x = require_ndarray(_OP, name, x)
        if x.ndim < 2 or x.shape[1] != T * n:
            got = x.shape[1] if x.ndim >= 2 else None
            raise InputError(
                f"{_OP}: argument '{name}' must hold T*n_h = {T}*{n} = {T * n} sub-steps along axis 1 "
                f"(T={T} from argument 'q', num_householder={n}), got {got} (shape {tuple(x.shape)})")
        out[name] = from_interleaved(x, n, name)
    return out


# ----------------------------------------------------------------------------- random inputs
def make_inputs(rng, regime, dims, dtype, variant="default"):
    """Valid random inputs. q, v ~ N(0, 1). "default": unit-norm keys, beta in [0, 2]
    (U(0.01, 0.99), or from {1e-3, 0.5, 1, 1.9} in "beta_extremes"), g from the decay regime
    ("beta_extremes": typical decays). "l2norm_sigmoid": raw N(0, 1) keys and beta logits
    (N(0, 2^2), or from {-20, 0, 20, N(0, 1)} in "beta_extremes"). "no_gate": as "default"
    without g (g = None). dims: B, T, NH, H, K, V and optionally HV (a multiple of H)."""
    B, T, NH, H, K, V = (dims[name] for name in ("B", "T", "NH", "H", "K", "V"))
    HV = dims.get("HV", H)
    if HV % H:
        raise ValueError(f"make_inputs: HV={HV} value heads is not a multiple of H={H}")
    raw = variant == "l2norm_sigmoid"
    q = _regimes.normal(rng, (B, T, H, K), np.float64)
    k = _regimes.normal(rng, (B, T, NH, H, K), np.float64)
    if not raw:
        k = k / np.linalg.norm(k, axis=-1, keepdims=True)          # unit-norm keys
    shape_b = (B, T, NH, HV)
    if regime in BETA_REGIMES:
        beta = rng.choice(np.array((-20.0, 0.0, 20.0) if raw else (1e-3, 0.5, 1.0, 1.9)), size=shape_b)
        if raw:
            beta = np.where(rng.uniform(size=shape_b) < 0.25, rng.standard_normal(shape_b), beta)
    else:
        beta = 2.0 * rng.standard_normal(shape_b) if raw else rng.uniform(0.01, 0.99, shape_b)
    x = {"q": q.astype(dtype), "k": k.astype(dtype),
         "v": _regimes.normal(rng, (B, T, NH, HV, V), dtype), "beta": beta.astype(dtype)}
    decay_regime = "typical" if regime in BETA_REGIMES else regime
    x["g"] = None if variant == "no_gate" else _regimes.log_decay(rng, (B, T, HV), decay_regime, dtype)
    return x
