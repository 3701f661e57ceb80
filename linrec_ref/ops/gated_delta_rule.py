r"""gated_delta_rule: the delta rule with a scalar decay per head and step (Gated DeltaNet).

Recurrence (one batch element, one value head; decay first, then the delta step):

    S'_t = exp(g_t) S_{t-1}
    S_t  = S'_t + beta_t k_t (v_t - S'_t^T k_t)^T  =  exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t  = scale * S_t^T q_t                                       (inclusive read)

Glossary
    symbol   argument   shape            paper (Yang et al., Gated DeltaNet)   fla (chunk_gated_delta_rule)
    q_t      q          [B, T, H, K]     q_t                                   q
    k_t      k          [B, T, H, K]     k_t (unit norm)                       k
    v_t      v          [B, T, HV, V]    v_t                                   v
    g_t      g          [B, T, HV]       log alpha_t                           g
    beta_t   beta       [B, T, HV]       beta_t                                beta
    S_t      state      [N, HV, K, V]    S_t (stored transposed)               initial_state / final_state
    scale    scale      float            1/sqrt(d_k)                           scale (default K^-1/2)
Grouped heads: value head j reads q/k head j // (HV / H) (the form wrappers repeat q and k).

Options (as in fla)
    use_qk_l2norm_in_kernel=False: q and k are replaced by x / sqrt(sum(x^2) + 1e-6) inside the
        op (its gradient included).
    beta_activation="none": beta is the write strength itself and must lie in [0, 2] (an
        InputError otherwise); "sigmoid": beta holds raw logits and sigmoid(beta) is used (its
        gradient included), fla's usual pre-processing.

Stability (numerics.md hazard 8): the eigenvalues of I - beta k k^T are 1 and 1 - beta |k|^2, so
a step never expands the state when |k| = 1 and beta in [0, 2]. Keys should be unit norm (or use
``use_qk_l2norm_in_kernel=True``) and beta in (0, 2); with raw keys the state, and the UT matrix
of the chunkwise form, can grow exponentially.

Forms (all derived in ``linrec_ref._delta`` from the recurrence)
    recurrent  the loop above (ground truth); O(K V) memory per head.
    parallel   the quadratic form through the UT transform over the whole sequence:
               A = I + tril(diag(beta) (K K^T * D), -1), D[t, s] = exp(g_{s+1} + .. + g_t),
               Delta = A^{-1} diag(beta) (V - (Gamma * K) S_0),  Gamma_t = exp(g_1 + .. + g_t),
               o = scale [(Gamma * Q) S_0 + (Q K^T * D) Delta].
    chunkwise  the same inside chunks of C tokens (one triangular solve per chunk), the state
               carried as S_end = P S_in + K_end^T u, P = Gamma_C I - K_end^T w the WY form of the
               chunk's product of transitions. ``chunk_intermediates`` exposes S_in, T_mat, w, u.
    step       one token of the recurrence (decoding).
    attention_matrix  M = scale (Q K^T * D) A^{-1} diag(beta), o = M v when S_0 = 0.

Gradients (hand-written): recurrent_vjp is the direct adjoint (per step: dS' = dS_t + k dr^T with
dr = -beta (k^T dS_t), dg_t = <dS', S'>, dS_{t-1} = exp(g_t) dS'); parallel_vjp and chunkwise_vjp
go through the triangular solve (dR = A^{-T} dDelta, dA = -dR Delta^T) and get dg from the
gradients of the segment sums, reverse-summed inside each chunk. See ``linrec_ref._delta``.

Peers: fla ``chunk_gated_delta_rule`` / ``fused_recurrent_gated_delta_rule`` (same argument names
and options; fla applies beta after its own sigmoid in the model layer, i.e. pass
beta_activation="none" with fla's post-sigmoid beta).

References: Yang, Kautz, Hatamizadeh, "Gated Delta Networks: Improving Mamba2 with Delta Rule",
2024; Yang et al., "Parallelizing Linear Transformers with the Delta Rule over Sequence Length",
2024 (UT/WY chunkwise form); Schlag et al., "Linear Transformers Are Secretly Fast Weight
Programmers", 2021.
"""
from __future__ import annotations

import numpy as np

from .. import _delta, _regimes
from .._forms import forward_form, matrix_form, step_form, vjp_form
from .._spec import Arg, OpSpec

_OPTIONS = {"use_qk_l2norm_in_kernel": False, "beta_activation": "none"}


def make_inputs(rng, regime, dims, dtype, variant="default"):
    """Valid random inputs: q, v ~ N(0, 1); unit-norm keys and beta in [0, 2] for "default",
    raw keys and beta logits for "l2norm_sigmoid"; g from the decay regime ("beta_extremes":
    typical decays, beta from {1e-3, 0.5, 1, 1.9})."""
    return _delta.make_inputs(rng, regime, dims, dtype, variant, gated=True)


SPEC = OpSpec(
    name="gated_delta_rule",
    family="delta rule (Gated DeltaNet)",
    transition="rank-1 Householder",
    math="S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T;  o_t = scale S_t^T q_t",
    inputs=(Arg("q", "B T H K"), Arg("k", "B T H K"), Arg("v", "B T HV V"),
            Arg("g", "B T HV", log_gate=True), Arg("beta", "B T HV")),
    output="B T HV V",
    state=(Arg("state", "N HV K V"),),
    default_scale=lambda d: d["K"] ** -0.5,
    peers=("fla.ops.gated_delta_rule.chunk_gated_delta_rule",
           "fla.ops.gated_delta_rule.fused_recurrent_gated_delta_rule"),
    regimes=tuple(_regimes.DECAY_REGIMES) + tuple(_delta.BETA_REGIMES),
    default_dims={"B": 2, "H": 1, "HV": 2, "K": 8, "V": 6},
    options=dict(_OPTIONS),
    variants={"default": {},
              "l2norm_sigmoid": {"use_qk_l2norm_in_kernel": True, "beta_activation": "sigmoid"}},
)


def _prep(q, k, beta, opts):
    return _delta.prepare(SPEC.name, q, k, beta, opts["use_qk_l2norm_in_kernel"], opts["beta_activation"])


def _pull_back(q, k, beta, grads, opts):
    return _delta.prepare_vjp(q, k, beta, grads, opts["use_qk_l2norm_in_kernel"], opts["beta_activation"])


# ----------------------------------------------------------------------------- forms
@forward_form(SPEC)
def recurrent(q, k, v, g, beta, *, scale, initial_state, **opts):
    """The definition: a loop over t. q, k: [B, T, H, K]; v: [B, T, H, V]; g, beta: [B, T, H]."""
    qn, kn, b = _prep(q, k, beta, opts)
    return _delta.recurrent(qn, kn, v, b, g, scale, initial_state)


@step_form(SPEC)
def step(q, k, v, g, beta, *, state, scale, **opts):
    """One token: q, k: [B, H, K]; v: [B, H, V]; g, beta: [B, H]; state: [B, H, K, V]."""
    qn, kn, b = _prep(q, k, beta, opts)
    return _delta.step(qn, kn, v, b, g, state, scale)


@forward_form(SPEC)
def parallel(q, k, v, g, beta, *, scale, initial_state, **opts):
    """The UT-transform quadratic form over the whole sequence (one chunk of length T)."""
    qn, kn, b = _prep(q, k, beta, opts)
    return _delta.chunkwise(qn, kn, v, b, g, scale, initial_state, max(q.shape[1], 1))


@forward_form(SPEC, chunked=True)
def chunkwise(q, k, v, g, beta, *, scale, initial_state, chunk_size, **opts):
    """Chunks of C = chunk_size tokens, one triangular solve each (steps in ``_delta.chunkwise``)."""
    qn, kn, b = _prep(q, k, beta, opts)
    return _delta.chunkwise(qn, kn, v, b, g, scale, initial_state, chunk_size)


@matrix_form(SPEC, names=("q", "k", "g", "beta"))
def attention_matrix(q, k, g, beta, *, scale, **opts):
    """M = scale (Q K^T * D) A^{-1} diag(beta): [B, HV, T, T]; o = M v when the initial state is 0."""
    qn, kn, b = _prep(q, k, beta, opts)
    return _delta.attention_matrix(qn, kn, b, g, scale)


@vjp_form(SPEC)
def recurrent_vjp(q, k, v, g, beta, do, dht, *, scale, initial_state, **opts):
    """Direct adjoint of the loop (ground truth); checkpointed reverse sweep, never all T states."""
    qn, kn, b = _prep(q, k, beta, opts)
    grads = _delta.recurrent_vjp(qn, kn, v, b, g, do, dht, scale, initial_state)
    return _pull_back(q, k, beta, grads, opts)


@vjp_form(SPEC)
def parallel_vjp(q, k, v, g, beta, do, dht, *, scale, initial_state, **opts):
    """Backward of the parallel form, through the triangular solve over the whole sequence."""
    qn, kn, b = _prep(q, k, beta, opts)
    grads = _delta.chunkwise_vjp(qn, kn, v, b, g, do, dht, scale, initial_state, max(q.shape[1], 1))
    return _pull_back(q, k, beta, grads, opts)


@vjp_form(SPEC, chunked=True)
def chunkwise_vjp(q, k, v, g, beta, do, dht, *, scale, initial_state, chunk_size, **opts):
    """Backward of the chunkwise form (per-chunk states only, O(T/C K V) per head)."""
    qn, kn, b = _prep(q, k, beta, opts)
    grads = _delta.chunkwise_vjp(qn, kn, v, b, g, do, dht, scale, initial_state, chunk_size)
    return _pull_back(q, k, beta, grads, opts)


def chunk_intermediates(q, k, v, g, beta, *, initial_state=None, chunk_size=64,
                        use_qk_l2norm_in_kernel=False, beta_activation="none"):
    """Per-chunk intermediates of the chunkwise form, for kernel writers (no grouped heads, no
    varlen: q, k: [B, T, H, K]; v: [B, T, H, V]; g, beta: [B, T, H]; H == HV).

    The op's options are applied first (l2 norm of k, sigmoid of beta). Returns the dict of
    ``linrec_ref._delta.chunk_intermediates``: S_in [B, H, N, K, V] (state entering each chunk),
    T_mat [B, H, N, C, C] (A^{-1} diag(beta)), A_inv, w [B, H, N, C, K] (T_mat (Gamma * K)),
    u [B, H, N, C, V] (T_mat V), v_new (u - w S_in), gamma, D, final_state.
    """
    opts = {"use_qk_l2norm_in_kernel": use_qk_l2norm_in_kernel, "beta_activation": beta_activation}
    _, kn, b = _prep(q, k, beta, opts)
    if initial_state is None:
        initial_state = np.zeros((v.shape[0], v.shape[2], k.shape[3], v.shape[3]), v.dtype)
    return _delta.chunk_intermediates(kn, v, b, g, initial_state, chunk_size)
