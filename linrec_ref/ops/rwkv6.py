r"""rwkv6: RWKV-6 "Finch" time mixing: a per-channel decay, read BEFORE the update, plus a bonus.

Recurrence (one batch element, one head; the read sees S_{t-1}, the state BEFORE step t):

    o_t = scale * [ S_{t-1}^T r_t + (r_t . (u * k_t)) v_t ]
    S_t = diag(exp(w_t)) S_{t-1} + k_t v_t^T,        exp(w_t) in [0, 1]^K

The current token reaches the output only through the bonus u (one vector per head, shared by
all tokens); it enters the state for the next token. So o_1 depends on the initial state and the
bonus only.

Glossary
    symbol   argument   shape          paper (Eagle and Finch, RWKV-6)   fla (fused_recurrent_rwkv6)
    r_t      r          [B, T, H, K]   r_t (receptance)                  r
    k_t      k          [B, T, H, K]   k_t                               k
    v_t      v          [B, T, H, V]   v_t                               v
    w_t      w          [B, T, H, K]   log of w_t = exp(-exp(d_t)),      w (log space)
                                       i.e. w = -exp(d_t) <= 0
    u        u          [H, K]         u ("time_first", the bonus)       u
    S_t      state      [B, H, K, V]   wkv_t                             final_state
    scale    scale      float          1 in the paper                    scale (default K^-1/2)

    Users pass the LOG decay (as fla does): w = -exp(w_raw) for RWKV-6's parameterisation, never
    the decay exp(-exp(w_raw)) itself. ``scale=None`` means K^-1/2, as in fla's
    ``fused_recurrent_rwkv6``; the paper's model uses scale 1 (pass scale=1.0).

Forms
    recurrent  the loop above (ground truth): read S_{t-1}, add the bonus, then update.
    parallel   "GLA read one step earlier" (the shift identity below) on gla's parallel form,
               plus the bonus diagonal; O(T^2 K).
    chunkwise  gla's chunkwise core with strict=True (mask s < t: the read before the update,
               built on ``linrec_ref._decay``), plus the bonus; per-chunk states only. See
               ``chunkwise`` for why this and not the shift.
    step       one token (decoding): read the given state, add the bonus, return the new state.
    attention_matrix  M [B, H, T, T]: M[t, s] = scale * sum_k r_t[k] k_s[k] exp(w_{s+1} + .. +
               w_{t-1})[k] for s < t (strictly lower) and the bonus diagonal
               M[t, t] = scale * (r_t . (u * k_t)).

The shift identity. S_{t-1} is the state AFTER step t of a GLA recurrence fed with the inputs
shifted by one token,

    k'_t = k_{t-1},  v'_t = v_{t-1},  g'_t = w_{t-1}     (k'_1 = v'_1 = 0, g'_1 = 0),
    S'_t = diag(exp(g'_t)) S'_{t-1} + k'_t v'_t^T,  S'_0 = S_0   =>   S'_t = S_{t-1},

so o_t = [gla output with q = r on the shifted inputs]_t + scale (r_t . (u * k_t)) v_t, and the
final state is one more step, S_T = diag(exp(w_T)) S'_T + k_T v_T^T.
The parallel form and the attention matrix are built this way on gla's cores. Gradients flow
back through the shift (dk_t = dk'_{t+1}, dv_t = dv'_{t+1}, dw_t = dw'_{t+1} for t < T; the
gradient of the constant g'_1 = 0 is dropped), through the last step (dk_T, dv_T, dw_T from the
final-state cotangent) and through the bonus term.

Gradients (hand-written; dS_t is the cotangent of S_t, starting from the final-state cotangent):
    dS_{t-1} = diag(a_t) dS_t + scale r_t do_t^T,      a_t = exp(w_t)
    dr_t = scale (S_{t-1} do_t + beta_t (u * k_t)),    beta_t = do_t . v_t
    dk_t = dS_t v_t + scale beta_t (u * r_t)
    dv_t = dS_t^T k_t + scale (r_t . (u * k_t)) do_t
    dw_t = a_t * rowsum(dS_t * S_{t-1})                (per key channel)
    du   = scale * sum_{b, t} beta_t (r_t * k_t)        (u is shared by all tokens and sequences)
    dS_0 = the adjoint after the sweep.
The parallel and chunkwise backwards take the read/write terms from gla's vjps (dw from the gate
identity, reverse-summed inside a chunk; exactly 0 at hard resets w = -inf) and add the bonus
terms above.

Peers: fla ``fused_recurrent_rwkv6`` and ``chunk_rwkv6`` (w in log space, u [H, K]).

References: Peng et al., "Eagle and Finch: RWKV with Matrix-Valued States and Dynamic
Recurrence", 2024; Yang et al., "Gated Linear Attention Transformers with Hardware-Efficient
Training", 2024 (the GLA forms reused here).
"""
from __future__ import annotations

import numpy as np

from .. import _regimes
from .._forms import forward_form, matrix_form, step_form, vjp_form
from .._scan import reverse_steps
from .._spec import Arg, OpSpec
from . import gla


SPEC = OpSpec(
    name="rwkv6",
    family="RWKV-6 (Finch) time mixing",
    transition="diagonal decay",
    math="o_t = scale [S_{t-1}^T r_t + (r_t . (u * k_t)) v_t];  S_t = diag(exp(w_t)) S_{t-1} + k_t v_t^T",
    inputs=(Arg("r", "BTHK"), Arg("k", "BTHK"), Arg("v", "BTHV"), Arg("w", "BTHK", log_gate=True),
            Arg("u", "HK")),
    output="BTHV",
    quadratic="B H K T T",  # the per-channel decay masks of the parallel form
    state=(Arg("state", "NHKV"),),
    default_scale=lambda dims: dims["K"] ** -0.5,
    peers=("fla.ops.rwkv6.fused_recurrent_rwkv6", "fla.ops.rwkv6.chunk_rwkv6"),
    regimes=tuple(_regimes.DECAY_REGIMES),
    default_dims={"B": 2, "H": 2, "K": 8, "V": 6},
)


# ----------------------------------------------------------------------------- recurrent
def _advance(k, v, w):
    """One update S_t = diag(exp(w_t)) S_{t-1} + k_t v_t^T as a function of (S_{t-1}, t)."""
    a = np.exp(w)                                                   # [B, T, H, K]

    def advance(S, t):
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]              # [B, H, K, V]
        return a[:, t, :, :, None] * S + kv

    return advance


@forward_form(SPEC)
def recurrent(r, k, v, w, u, *, scale, initial_state):
    """The definition, a loop over t: read S_{t-1} plus the bonus, then update.

    r, k, w: [B, T, H, K]; v: [B, T, H, V]; u: [H, K]; initial_state: [B, H, K, V].
    """
    advance = _advance(k, v, w)
    bonus = _bonus(r, k, u)                                         # [B, T, H]
    S = initial_state                                               # [B, H, K, V]
    o = np.empty(v.shape, dtype=v.dtype)                            # [B, T, H, V]
    for t in range(r.shape[1]):
        read = (r[:, t, :, None, :] @ S)[:, :, 0, :]                # [B, H, V]: S_{t-1}^T r_t
        o[:, t] = scale * (read + bonus[:, t, :, None] * v[:, t])
        S = advance(S, t)
    return o, S


@step_form(SPEC)
def step(r, k, v, w, u, *, state, scale):
    """One token: r, k, w: [B, H, K]; v: [B, H, V]; u: [H, K]; state: [B, H, K, V] (S_{t-1})."""
    read = (r[:, :, None, :] @ state)[:, :, 0, :]                   # [B, H, V]
    bonus = _bonus(r, k, u)                                         # [B, H]
    o = scale * (read + bonus[..., None] * v)                       # [B, H, V]
    S = np.exp(w)[..., None] * state + k[..., :, None] * v[..., None, :]  # [B, H, K, V]
    return o, S


@vjp_form(SPEC)
def recurrent_vjp(r, k, v, w, u, do, dht, *, scale, initial_state):
    """Backward of the loop, walking t = T-1 .. 0 with the adjoint state dS (ground truth).

    Memory: states are recomputed from checkpoints (``_scan.reverse_steps``), never all T kept.
    """
    a = np.exp(w)                                                   # [B, T, H, K]
    dr, dk, dv, du = _bonus_vjp(r, k, v, u, do, scale)              # the bonus term
    dw = np.zeros_like(w)
    dS = dht.copy()                                                 # [B, H, K, V]: cotangent of S_t
    for t, S_prev, _ in reverse_steps(_advance(k, v, w), initial_state, r.shape[1]):
        # update S_t = diag(a_t) S_{t-1} + k_t v_t^T
        dk[:, t] += (dS @ v[:, t, :, :, None])[..., 0]                 # [B, H, K]
        dv[:, t] += (k[:, t, :, None, :] @ dS)[:, :, 0, :]             # [B, H, V]
        dw[:, t] = a[:, t] * np.sum(dS * S_prev, axis=-1)              # [B, H, K]
        # read of S_{t-1} at step t
        dr[:, t] += scale * (S_prev @ do[:, t, :, :, None])[..., 0]    # [B, H, K]
        dS = a[:, t, :, :, None] * dS + scale * r[:, t, :, :, None] * do[:, t, :, None, :]
    return {"r": dr, "k": dk, "v": dv, "w": dw, "u": du, "initial_state": dS}


# ----------------------------------------------------------------------------- bonus term
def _bonus(r, k, u):
    """The bonus weight of the current token: r_t . (u * k_t). [B, (T,) H, K] -> [B, (T,) H]."""
    return np.sum(r * u * k, axis=-1)


def _bonus_vjp(r, k, v, u, do, scale):
    """Gradients of the bonus term scale * (r_t . (u * k_t)) v_t (every form adds it).

    Returns dr, dk, dv (shapes of r, k, v) and du [H, K] (summed over batch and time).
    """
    beta = scale * np.sum(do * v, axis=-1, keepdims=True)           # [B, T, H, 1]
    dr = beta * u * k                                               # [B, T, H, K]
    dk = beta * u * r                                               # [B, T, H, K]
    dv = scale * _bonus(r, k, u)[..., None] * do                    # [B, T, H, V]
    du = np.sum(beta * r * k, axis=(0, 1))                          # [H, K]
    return dr, dk, dv, du


# ----------------------------------------------------------------------------- parallel
def _shift(x):
    """x'_t = x_{t-1}, x'_1 = 0: [B, T, H, D] -> [B, T, H, D] (the inputs of the shifted GLA)."""
    return np.concatenate([np.zeros_like(x[:, :1]), x[:, :-1]], axis=1)


def _unshift(dx_shifted, dx_last):
    """Gradient back through ``_shift`` plus the last token's own term.

    dx_shifted: [B, T, H, D] gradient w.r.t. x'; dx_last: [B, H, D] gradient w.r.t. x_T through
    the final step. dx_t = dx'_{t+1} for t < T (dx'_1 belongs to the constant 0 and is dropped).
    """
    return np.concatenate([dx_shifted[:, 1:], dx_last[:, None]], axis=1)   # [B, T, H, D]


def _shifted_gla_parallel(r, k, v, w, scale, initial_state):
    """gla's parallel form on the shifted inputs: o'_t = scale S_{t-1}^T r_t, and S'_T = S_{T-1}."""
    return gla.parallel.core(r, _shift(k), _shift(v), _shift(w), None, scale=scale,
                             initial_state=initial_state)


@matrix_form(SPEC, names=("r", "k", "w", "u"))
def attention_matrix(r, k, w, u, *, scale):
    """M: [B, H, T, T], the parallel form without initial state is o = M v.

    Strictly lower part (s < t): scale sum_k r_t[k] k_s[k] exp(w_{s+1} + .. + w_{t-1})[k], i.e.
    gla's matrix on the shifted keys and gates, M'[t, s + 1], moved one column left.
    Diagonal: the bonus scale (r_t . (u * k_t)). Above the diagonal: 0.
    """
    M_shifted = gla.attention_matrix.core(r, _shift(k), _shift(w), scale=scale)  # [B, H, T, T]
    M = np.zeros_like(M_shifted)
    M[..., :, :-1] = M_shifted[..., :, 1:]                          # M[t, s] = M'[t, s + 1]
    T = r.shape[1]
    M[..., np.arange(T), np.arange(T)] = scale * np.moveaxis(_bonus(r, k, u), 1, 2)  # [B, H, T]
    return M


@forward_form(SPEC)
def parallel(r, k, v, w, u, *, scale, initial_state):
    """GLA read one step earlier, plus the bonus. Shapes as ``recurrent``. O(T^2 K) memory.

    1. o'_t = scale S_{t-1}^T r_t: gla's parallel form on (k, v, w) shifted by one token
    2. o_t = o'_t + scale (r_t . (u * k_t)) v_t
    3. the final state is one more step: S_T = diag(exp(w_T)) S_{T-1} + k_T v_T^T
    """
    o_read, S_before_last = _shifted_gla_parallel(r, k, v, w, scale, initial_state)
    o = o_read + scale * _bonus(r, k, u)[..., None] * v             # [B, T, H, V]
    S_T = _advance(k, v, w)(S_before_last, r.shape[1] - 1)          # [B, H, K, V]
    return o, S_T


@vjp_form(SPEC)
def parallel_vjp(r, k, v, w, u, do, dht, *, scale, initial_state):
    """Backward of ``parallel``: gla's parallel vjp on the shifted inputs, chained back.

    1. recompute S_{T-1} (gla's parallel forward) for the last step's gate gradient
    2. last step S_T = diag(a_T) S_{T-1} + k_T v_T^T: dk_T, dv_T, dw_T, and dS_{T-1} = diag(a_T) dht
    3. gla's parallel vjp with dS_{T-1} as its final-state cotangent; back through the shift
    4. add the bonus term's gradients
    """
    _, S_before_last = _shifted_gla_parallel(r, k, v, w, scale, initial_state)   # 1.
    a_T = np.exp(w[:, -1])                                          # [B, H, K]
    dk_T = (dht @ v[:, -1, :, :, None])[..., 0]                     # 2. [B, H, K]
    dv_T = (k[:, -1, :, None, :] @ dht)[:, :, 0, :]                 # [B, H, V]
    dw_T = a_T * np.sum(dht * S_before_last, axis=-1)               # [B, H, K]
    shifted = gla.parallel_vjp.core(r, _shift(k), _shift(v), _shift(w), None, do=do,   # 3.
                                    dht=a_T[..., None] * dht, scale=scale,
                                    initial_state=initial_state)
    dr, dk, dv, du = _bonus_vjp(r, k, v, u, do, scale)              # 4.
    return {"r": dr + shifted["q"], "k": dk + _unshift(shifted["k"], dk_T),
            "v": dv + _unshift(shifted["v"], dv_T), "w": _unshift(shifted["g"], dw_T), "u": du,
            "initial_state": shifted["initial_state"]}


# ----------------------------------------------------------------------------- chunkwise
@forward_form(SPEC, chunked=True)
def chunkwise(r, k, v, w, u, *, scale, initial_state, chunk_size):
    """Chunks of C = chunk_size tokens (T need not divide). Memory: O(T/C * K V) per head.

    gla's chunkwise core with ``strict=True`` (the read sees the state before the update: the
    intra-chunk mask is s < t and the query-side decay of token t stops at t-1), plus the bonus.
    Inside ``gla.chunked_forward``:
    1. intra-chunk scores A[t, s] = scale sum_k r_t[k] k_s[k] exp(w_{s+1} + .. + w_{t-1})[k], s < t
    2. chunk states U_n = sum_s (k_s exp(w_{s+1} + .. + w_end)) v_s^T
    3. carry S_n = diag(exp(w_first + .. + w_end)) S_{n-1} + U_n, one loop over chunks
    4. output A v + scale (r_t exp(w_first + .. + w_{t-1}))^T S_{n-1}
    and here: 5. o_t += scale (r_t . (u * k_t)) v_t.

    Why the strict core and not the shift used by ``parallel``: it reads S_{t-1} directly, so the
    final state and every gradient come out as they are (no shifted copies, no extra last step,
    no gradient to unshift), and the chunk boundaries are rwkv6's own. The two derivations are
    independent, and the equivalence tests check them against each other.
    """
    o_read, S_T = gla.chunked_forward(r, k, v, w, None, scale=scale, initial_state=initial_state,
                                      chunk_size=chunk_size, strict=True)
    return o_read + scale * _bonus(r, k, u)[..., None] * v, S_T     # 5. [B, T, H, V]


@vjp_form(SPEC, chunked=True)
def chunkwise_vjp(r, k, v, w, u, do, dht, *, scale, initial_state, chunk_size):
    """Backward of ``chunkwise``: gla's strict chunkwise vjp (per-chunk states only; the gate
    gradient from the gate identity, reverse-summed inside each chunk) plus the bonus terms."""
    read = gla.chunked_vjp(r, k, v, w, None, do=do, dht=dht, scale=scale,
                           initial_state=initial_state, chunk_size=chunk_size, strict=True)
    dr, dk, dv, du = _bonus_vjp(r, k, v, u, do, scale)
    return {"r": dr + read["q"], "k": dk + read["k"], "v": dv + read["v"], "w": read["g"],
            "u": du, "initial_state": read["initial_state"]}


# ----------------------------------------------------------------------------- random inputs
def make_inputs(rng, regime, dims, dtype, variant="default"):
    """Valid random inputs: r, k, v, u ~ N(0, 1); w (log decay per key channel) from the regime.

    In "hard_reset", besides the whole-step resets of the regime, single key channels reset
    (w = -inf) at ~5% of the (t, channel) entries after t = 0.
    """
    B, T, H, K, V = (dims[name] for name in "BTHKV")
    w = _regimes.log_decay_per_channel(rng, (B, T, H, K), regime, dtype)
    return {
        "r": _regimes.normal(rng, (B, T, H, K), dtype),
        "k": _regimes.normal(rng, (B, T, H, K), dtype),
        "v": _regimes.normal(rng, (B, T, H, V), dtype),
        "w": w,
        "u": _regimes.normal(rng, (H, K), dtype),
    }
