r"""kda: Kimi Delta Attention, the gated delta rule with a per-key-channel decay.

Recurrence (one batch element, one value head; decay first, then the delta step):

    S'_t = diag(exp(g_t)) S_{t-1}                                   (g_t in R^K, g_t <= 0)
    S_t  = S'_t + beta_t k_t (v_t - S'_t^T k_t)^T  =  (I - beta_t k_t k_t^T) diag(exp(g_t)) S_{t-1}
                                                      + beta_t k_t v_t^T
    o_t  = scale * S_t^T q_t                                        (inclusive read)

Glossary
    symbol   argument   shape            paper (Kimi Linear, KDA)              fla (chunk_kda / fused_recurrent_kda)
    q_t      q          [B, T, H, K]     q_t                                   q
    k_t      k          [B, T, H, K]     k_t (unit norm)                       k
    v_t      v          [B, T, HV, V]    v_t                                   v
    g_t      g          [B, T, HV, K]    log alpha_t (per-channel forget gate) g (log space, after its activation)
    beta_t   beta       [B, T, HV]       beta_t                                beta
    S_t      state      [N, HV, K, V]    S_t (stored K x V)                    initial_state / final_state
    scale    scale      float            1/sqrt(d_k)                           scale (default K^-1/2)
    G_t      -          per chunk        cumulative log decay in the chunk     g after chunk_local_cumsum
Grouped heads: value head j reads q/k head j // (HV / H) (the form wrappers repeat q and k).
A gate constant over K is gated_delta_rule's scalar gate (recurrences.md section 4).

Options (as gated_delta_rule and fla)
    use_qk_l2norm_in_kernel=False: q and k are replaced by x / sqrt(sum(x^2) + 1e-6) inside the
        op (its gradient included).
    beta_activation="none": beta is the write strength itself and must lie in [0, 2] (an
        InputError otherwise); "sigmoid": beta holds raw logits and sigmoid(beta) is used.

Stability (numerics.md hazard 8): both factors of a step, I - beta k k^T and diag(exp(g)), have
operator norm <= 1 when |k| = 1 and beta in [0, 2], so the state stays bounded. Keys should be
unit norm (or use ``use_qk_l2norm_in_kernel=True``).

Forms (derived in ``linrec_ref._delta`` from the recurrence; the decays through ``_decay``)
    recurrent  the loop above (ground truth); O(K V) memory per head.
    parallel   the quadratic form through the UT transform over the whole sequence (one chunk):
               KKD[t, s] = sum_k k_t[k] k_s[k] exp(G_t[k] - G_s[k]),  A = I + tril(diag(beta) KKD, -1)
               Delta = A^{-1} diag(beta) (V - (Gamma * K) S_0),  Gamma_t = exp(G_t) per channel,
               o = scale [(Gamma * Q) S_0 + QKD Delta],  QKD[t, s] = sum_k q_t k_s exp(G_t - G_s), s <= t.
    chunkwise  the same inside chunks of C tokens (one triangular solve per chunk), the state
               carried as S_end = P S_in + K_end^T u with P = diag(Gamma_C) - K_end^T w,
               K_end[s] = exp(G_C - G_s) * k_s. The decayed scores QKD and KKD are GLA's scores:
               one matmul (x e^{G}) (y e^{-G})^T per chunk whose decay range allows factoring,
               exact segment sums elsewhere (fast forgetting, g = -inf), see ``linrec_ref._decay``.
    step       one token of the recurrence (decoding).
    attention_matrix  M = scale QKD A^{-1} diag(beta): o = M v when S_0 = 0.
    chunk_intermediates  S_in, T_mat, A_inv, w, u, v_new, gamma per chunk, for kernel writers.

Gradients (hand-written): recurrent_vjp is the direct adjoint, per step
    dS_t += scale q_t do_t^T;  dq_t = scale S_t do_t;  ddelta = dS_t^T k_t;  dr = -beta_t ddelta
    dk_t = dS_t delta_t + S'_t dr;  dbeta_t = ddelta . (v_t - S'^T k_t);  dv_t = beta_t ddelta
    dS' = dS_t + k_t dr^T;  dg_t = rowsum(dS' * S'_t) (one entry per key channel);
    dS_{t-1} = diag(exp(g_t)) dS'.
parallel_vjp and chunkwise_vjp go through the triangular solve (dR = A^{-T} dDelta,
dA = -dR Delta^T) and get dg from the per-channel gate identity
    dL/dG_t = q_t * dq_t + k_t * dk_t(query side: KKD rows, Gamma*K) - k_t * dk_t(key side: QKD,
              KKD columns, K_end)  (+ rowsum(dS_end * S_end) at the chunk's last token),
reverse-summed inside each chunk, restarting at hard resets (see ``linrec_ref._delta``).

Peers: fla ``chunk_kda`` / ``fused_recurrent_kda`` (g in log space, as here; fla's model layer
computes g and beta with its own activations: pass its post-activation g and
beta_activation="none" with its post-sigmoid beta).

References: Kimi Team, "Kimi Linear: An Expressive, Efficient Attention Architecture", 2025
(KDA); Yang, Kautz, Hatamizadeh, "Gated Delta Networks", 2024; Yang et al., "Parallelizing
Linear Transformers with the Delta Rule over Sequence Length", 2024 (UT/WY chunkwise form).
"""
from __future__ import annotations

import numpy as np

from .. import _delta, _regimes
from .._forms import forward_form, matrix_form, step_form, vjp_form
from .._scan import reverse_steps
from .._spec import Arg, OpSpec
from .gated_delta_rule import BETA_REGIMES, family_inputs, prepare, pull_back

_OPTIONS = {"use_qk_l2norm_in_kernel": False, "beta_activation": "none"}

SPEC = OpSpec(
    name="kda",
    family="delta rule (Kimi Delta Attention)",
    transition="rank-1 Householder",
    math="S_t = (I - beta_t k_t k_t^T) diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T;  o_t = scale S_t^T q_t",
    inputs=(Arg("q", "B T H K"), Arg("k", "B T H K"), Arg("v", "B T HV V"),
            Arg("g", "B T HV K", log_gate=True), Arg("beta", "B T HV")),
    output="B T HV V",
    state=(Arg("state", "N HV K V"),),
    default_scale=lambda dims: dims["K"] ** -0.5,
    peers=("fla.ops.kda.chunk_kda", "fla.ops.kda.fused_recurrent_kda"),
    regimes=tuple(_regimes.DECAY_REGIMES) + tuple(BETA_REGIMES),
    default_dims={"B": 2, "H": 1, "HV": 2, "K": 8, "V": 6},
    options=dict(_OPTIONS),
    variants={"default": {},
              "l2norm_sigmoid": {"use_qk_l2norm_in_kernel": True, "beta_activation": "sigmoid"}},
)


# ----------------------------------------------------------------------------- recurrent
# kda's own loop, independent of gated_delta_rule.recurrence: the identity test
# "kda with a gate constant over K equals gated_delta_rule" compares the two.
def _advance(k, v, beta, g):
    """One step S_{t-1} -> S_t as a function of (S, t). k, g: [B, T, H, K]; v: [B, T, H, V]."""
    a = np.exp(g)                                                   # [B, T, H, K]

    def advance(S, t):
        S_dec = a[:, t, :, :, None] * S                             # [B, H, K, V]  S' = diag(a) S
        read = (k[:, t, :, None, :] @ S_dec)[:, :, 0, :]            # [B, H, V]     S'^T k
        delta = beta[:, t, :, None] * (v[:, t] - read)              # [B, H, V]
        return S_dec + k[:, t, :, :, None] * delta[:, :, None, :]   # [B, H, K, V]

    return advance


def _recurrence(q, k, v, beta, g, scale, initial_state):
    """The loop over t on mapped inputs (q, k normalised, beta activated)."""
    advance = _advance(k, v, beta, g)
    S = initial_state                                               # [B, H, K, V]
    o = np.empty(v.shape, dtype=v.dtype)                            # [B, T, H, V]
    for t in range(q.shape[1]):
        S = advance(S, t)
        o[:, t] = scale * (q[:, t, :, None, :] @ S)[:, :, 0, :]     # [B, H, V]
    return o, S


@forward_form(SPEC)
def recurrent(q, k, v, g, beta, *, scale, initial_state, **opts):
    """The definition: a loop over t. q, k, g: [B, T, H, K]; v: [B, T, H, V]; beta: [B, T, H]."""
    q, k, beta = prepare(SPEC.name, q, k, beta, opts)
    return _recurrence(q, k, v, beta, g, scale, initial_state)


@step_form(SPEC)
def step(q, k, v, g, beta, *, state, scale, **opts):
    """One token: q, k, g: [B, H, K]; v: [B, H, V]; beta: [B, H]; state: [B, H, K, V]."""
    q, k, beta = prepare(SPEC.name, q, k, beta, opts)
    S_dec = np.exp(g)[:, :, :, None] * state                        # [B, H, K, V]
    read = (k[:, :, None, :] @ S_dec)[:, :, 0, :]                   # [B, H, V]
    delta = beta[:, :, None] * (v - read)                           # [B, H, V]
    S = S_dec + k[:, :, :, None] * delta[:, :, None, :]             # [B, H, K, V]
    o = scale * (q[:, :, None, :] @ S)[:, :, 0, :]                  # [B, H, V]
    return o, S


def _recurrence_vjp(q, k, v, beta, g, do, dht, scale, initial_state):
    """Direct adjoint of the loop on mapped inputs, walking t = T-1 .. 0 (module docstring).

    Memory: states are recomputed from checkpoints (``_scan.reverse_steps``), never all T kept.
    """
    a = np.exp(g)                                                   # [B, T, H, K]
    dq, dk, dv, dbeta, dg = (np.zeros_like(x) for x in (q, k, v, beta, g))
    dS = dht.copy()                                                 # [B, H, K, V]
    for t, S_prev, S_t in reverse_steps(_advance(k, v, beta, g), initial_state, q.shape[1]):
        kt, bt = k[:, t], beta[:, t, :, None]                       # [B, H, K], [B, H, 1]
        dS = dS + scale * q[:, t, :, :, None] * do[:, t, :, None, :]   # read of S_t
        dq[:, t] = scale * (S_t @ do[:, t, :, :, None])[..., 0]        # [B, H, K]
        S_dec = a[:, t, :, :, None] * S_prev                           # [B, H, K, V]
        resid = v[:, t] - (kt[:, :, None, :] @ S_dec)[:, :, 0, :]      # [B, H, V]  v - S'^T k
        delta = bt * resid                                             # [B, H, V]
        ddelta = (kt[:, :, None, :] @ dS)[:, :, 0, :]                  # [B, H, V]
        dr = -bt * ddelta                                              # [B, H, V]
        dbeta[:, t] = np.sum(ddelta * resid, axis=-1)                  # [B, H]
        dv[:, t] = bt * ddelta
        dk[:, t] = (dS @ delta[..., None])[..., 0] + (S_dec @ dr[..., None])[..., 0]
        dS_dec = dS + kt[..., None] * dr[:, :, None, :]                # [B, H, K, V]
        dg[:, t] = np.sum(dS_dec * S_dec, axis=-1)                     # [B, H, K]
        dS = a[:, t, :, :, None] * dS_dec                              # to S_{t-1}
    return {"q": dq, "k": dk, "v": dv, "beta": dbeta, "g": dg, "initial_state": dS}


@vjp_form(SPEC)
def recurrent_vjp(q, k, v, g, beta, do, dht, *, scale, initial_state, **opts):
    """Direct adjoint of the loop (ground truth); checkpointed reverse walk, never all T states."""
    qm, km, bm = prepare(SPEC.name, q, k, beta, opts)
    grads = _recurrence_vjp(qm, km, v, bm, g, do, dht, scale, initial_state)
    return pull_back(q, k, beta, grads, opts)


# ----------------------------------------------------------------------------- UT/WY forms
@forward_form(SPEC)
def parallel(q, k, v, g, beta, *, scale, initial_state, **opts):
    """The UT-transform quadratic form over the whole sequence (one chunk of length T)."""
    q, k, beta = prepare(SPEC.name, q, k, beta, opts)
    return _delta.chunkwise(q, k, v, beta, g, scale, initial_state, max(q.shape[1], 1))


@forward_form(SPEC, chunked=True)
def chunkwise(q, k, v, g, beta, *, scale, initial_state, chunk_size, **opts):
    """Chunks of C = chunk_size tokens, one triangular solve each (steps in ``_delta.chunkwise``)."""
    q, k, beta = prepare(SPEC.name, q, k, beta, opts)
    return _delta.chunkwise(q, k, v, beta, g, scale, initial_state, chunk_size)


@matrix_form(SPEC, names=("q", "k", "g", "beta"))
def attention_matrix(q, k, g, beta, *, scale, **opts):
    """M = scale QKD A^{-1} diag(beta): [B, HV, T, T]; o = M v when the initial state is 0."""
    q, k, beta = prepare(SPEC.name, q, k, beta, opts)
    return _delta.attention_matrix(q, k, beta, g, scale)


@vjp_form(SPEC)
def parallel_vjp(q, k, v, g, beta, do, dht, *, scale, initial_state, **opts):
    """Backward of the parallel form, through the triangular solve over the whole sequence."""
    qm, km, bm = prepare(SPEC.name, q, k, beta, opts)
    grads = _delta.chunkwise_vjp(qm, km, v, bm, g, do, dht, scale, initial_state,
                                 max(q.shape[1], 1))
    return pull_back(q, k, beta, grads, opts)


@vjp_form(SPEC, chunked=True)
def chunkwise_vjp(q, k, v, g, beta, do, dht, *, scale, initial_state, chunk_size, **opts):
    """Backward of the chunkwise form (per-chunk states only, O(T/C K V) per head)."""
    qm, km, bm = prepare(SPEC.name, q, k, beta, opts)
    grads = _delta.chunkwise_vjp(qm, km, v, bm, g, do, dht, scale, initial_state, chunk_size)
    return pull_back(q, k, beta, grads, opts)


def chunk_intermediates(q, k, v, g, beta, *, initial_state=None, chunk_size=64,
                        use_qk_l2norm_in_kernel=False, beta_activation="none"):
    """Per-chunk intermediates of the chunkwise form, for kernel writers (no grouped heads, no
    varlen: q, k, g: [B, T, H, K]; v: [B, T, H, V]; beta: [B, T, H]; H == HV).

    The op's options are applied first (l2 norm of k, sigmoid of beta). Returns the dict of
    ``linrec_ref._delta.chunk_intermediates``: S_in [B, H, N, K, V] (state entering each chunk),
    T_mat [B, H, N, C, C] (A^{-1} diag(beta)), A_inv, w [B, H, N, C, K] (T_mat (Gamma * K)),
    u [B, H, N, C, V] (T_mat V), v_new (u - w S_in), gamma [B, H, N, C, K] (exp(G_t) per
    channel from the chunk start), final_state.
    """
    opts = {"use_qk_l2norm_in_kernel": use_qk_l2norm_in_kernel, "beta_activation": beta_activation}
    _, k, beta = prepare(SPEC.name, q, k, beta, opts)
    if initial_state is None:
        initial_state = np.zeros((v.shape[0], v.shape[2], k.shape[3], v.shape[3]), v.dtype)
    return _delta.chunk_intermediates(k, v, beta, g, initial_state, chunk_size)


# ----------------------------------------------------------------------------- random inputs
def make_inputs(rng, regime, dims, dtype, variant="default"):
    """Valid random inputs: q, v ~ N(0, 1); unit-norm keys and beta in [0, 2] for "default",
    raw keys and beta logits for "l2norm_sigmoid"; g [B, T, HV, K] from the decay regime, in
    "hard_reset" with -inf at whole steps and at single (t, channel) entries ("beta_extremes":
    typical decays, beta from {1e-3, 0.5, 1, 1.9})."""
    return family_inputs(rng, regime, dims, dtype, variant, gated=True, per_channel=True)
