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
    parallel   "GLA read one step earlier" (below), plus the bonus diagonal.
    chunkwise  the same on gla's chunkwise form.
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
The parallel and chunkwise forms are built this way on gla's cores. Gradients flow back through
the shift (dk_t = dk'_{t+1}, dv_t = dv'_{t+1}, dw_t = dw'_{t+1} for t < T; the gradient of the
constant g'_1 = 0 is dropped), through the last step (dk_T, dv_T, dw_T from the final-state
cotangent) and through the bonus term.

Gradients (hand-written; dS_t is the cotangent of S_t, starting from the final-state cotangent):
    dS_{t-1} = diag(a_t) dS_t + scale r_t do_t^T,      a_t = exp(w_t)
    dr_t = scale (S_{t-1} do_t + beta_t (u * k_t)),    beta_t = do_t . v_t
    dk_t = dS_t v_t + scale beta_t (u * r_t)
    dv_t = dS_t^T k_t + scale (r_t . (u * k_t)) do_t
    dw_t = a_t * rowsum(dS_t * S_{t-1})                (per key channel)
    du   = scale * sum_{b, t} beta_t (r_t * k_t)        (u is shared by all tokens and sequences)
    dS_0 = the adjoint after the sweep.

Peers: fla ``fused_recurrent_rwkv6`` and ``chunk_rwkv6`` (w in log space, u [H, K]).

References: Peng et al., "Eagle and Finch: RWKV with Matrix-Valued States and Dynamic
Recurrence", 2024; Yang et al., "Gated Linear Attention Transformers with Hardware-Efficient
Training", 2024 (the GLA forms reused here).
"""
from __future__ import annotations

import numpy as np

from .. import _regimes
from .._forms import forward_form, matrix_form, step_form, vjp_form
from .._scan import reverse_sweep
from .._spec import Arg, OpSpec


def make_inputs(rng, regime, dims, dtype, variant="default"):
    """Valid random inputs: r, k, v, u ~ N(0, 1); w (log decay per key channel) from the regime."""
    B, T, H, K, V = (dims[d] for d in "BTHKV")
    return {
        "r": _regimes.normal(rng, (B, T, H, K), dtype),
        "k": _regimes.normal(rng, (B, T, H, K), dtype),
        "v": _regimes.normal(rng, (B, T, H, V), dtype),
        "w": _regimes.log_decay(rng, (B, T, H, K), regime, dtype),
        "u": _regimes.normal(rng, (H, K), dtype),
    }


SPEC = OpSpec(
    name="rwkv6",
    family="RWKV-6 (Finch) time mixing",
    transition="diagonal decay",
    math="o_t = scale [S_{t-1}^T r_t + (r_t . (u * k_t)) v_t];  S_t = diag(exp(w_t)) S_{t-1} + k_t v_t^T",
    inputs=(Arg("r", "BTHK"), Arg("k", "BTHK"), Arg("v", "BTHV"), Arg("w", "BTHK", log_gate=True),
            Arg("u", "HK")),
    output="BTHV",
    state=(Arg("state", "NHKV"),),
    default_scale=lambda d: d["K"] ** -0.5,
    peers=("fla.ops.rwkv6.fused_recurrent_rwkv6", "fla.ops.rwkv6.chunk_rwkv6"),
    make_inputs=make_inputs,
    regimes=tuple(_regimes.DECAY_REGIMES),
    default_dims={"B": 2, "H": 2, "K": 8, "V": 6},
)


# ----------------------------------------------------------------------------- bonus term
def _bonus(r, k, u):
    """The bonus weight of the current token: r_t . (u * k_t). [B, T, H, K] -> [B, T, H]."""
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
    bonus = np.sum(r * u * k, axis=-1)                              # [B, H]
    o = scale * (read + bonus[..., None] * v)                       # [B, H, V]
    S = np.exp(w)[..., None] * state + k[..., :, None] * v[..., None, :]  # [B, H, K, V]
    return o, S


@vjp_form(SPEC)
def recurrent_vjp(r, k, v, w, u, do, dht, *, scale, initial_state):
    """Backward of the loop, walking t = T-1 .. 0 with the adjoint state dS (ground truth).

    Memory: states are recomputed from checkpoints (``_scan.reverse_sweep``), never all T kept.
    """
    a = np.exp(w)                                                   # [B, T, H, K]
    dr, dk, dv, du = _bonus_vjp(r, k, v, u, do, scale)              # the bonus term
    dw = np.zeros_like(w)
    dS = dht.copy()                                                 # [B, H, K, V]: cotangent of S_t

    def visit(t, S_prev, S_t):
        nonlocal dS
        # update S_t = diag(a_t) S_{t-1} + k_t v_t^T
        dk[:, t] += (dS @ v[:, t, :, :, None])[..., 0]                 # [B, H, K]
        dv[:, t] += (k[:, t, :, None, :] @ dS)[:, :, 0, :]             # [B, H, V]
        dw[:, t] = a[:, t] * np.sum(dS * S_prev, axis=-1)              # [B, H, K]
        # read of S_{t-1} at step t
        dr[:, t] += scale * (S_prev @ do[:, t, :, :, None])[..., 0]    # [B, H, K]
        dS = a[:, t, :, :, None] * dS + scale * r[:, t, :, :, None] * do[:, t, :, None, :]

    reverse_sweep(_advance(k, v, w), initial_state, r.shape[1], visit)
    return {"r": dr, "k": dk, "v": dv, "w": dw, "u": du.astype(u.dtype), "initial_state": dS}
