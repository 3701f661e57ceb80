r"""delta_rule: linear attention that overwrites instead of adding (DeltaNet).

Recurrence (one batch element, one value head; inclusive read, the state after step t):

    S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T  =  S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T
    o_t = scale * S_t^T q_t

Each step moves the value stored under key k_t a fraction beta_t of the way to v_t (one step of
online gradient descent on ||S^T k_t - v_t||^2 / 2 with learning rate beta_t).

Glossary
    symbol   argument   shape            paper (Schlag et al.; Yang et al.)   fla (chunk_delta_rule)
    q_t      q          [B, T, H, K]     q_t                                  q
    k_t      k          [B, T, H, K]     k_t (unit norm)                      k
    v_t      v          [B, T, HV, V]    v_t                                  v
    beta_t   beta       [B, T, HV]       beta_t (writing strength)            beta
    S_t      state      [N, HV, K, V]    S_t / W_t (stored transposed)        initial_state / final_state
    scale    scale      float            1/sqrt(d_k)                          scale (default K^-1/2)
Grouped heads: value head j reads q/k head j // (HV / H) (the form wrappers repeat q and k).

Options (as in fla)
    use_qk_l2norm_in_kernel=False: q and k are replaced by x / sqrt(sum(x^2) + 1e-6) inside the
        op (its gradient included).
    beta_activation="none": beta is the write strength itself and must lie in [0, 2] (an
        InputError otherwise); "sigmoid": beta holds raw logits and sigmoid(beta) is used (its
        gradient included).

Stability (numerics.md hazard 8): the eigenvalues of I - beta k k^T are 1 and 1 - beta |k|^2, so
a step never expands the state when |k| = 1 and beta in [0, 2]. Keys should be unit norm (or use
``use_qk_l2norm_in_kernel=True``) and beta in (0, 2); with raw keys the state, and the UT matrix
of the chunkwise form, can grow exponentially.

Forms (this op is gated_delta_rule with g = 0: its loop ``gated_delta_rule.recurrence`` and the
UT/WY machinery of ``linrec_ref._delta``, both called with a zero log gate, so exp(0) = 1 exactly)
    recurrent  the loop above (ground truth); O(K V) memory per head.
    parallel   the quadratic form through the UT transform over the whole sequence:
               A = I + tril(diag(beta) K K^T, -1),  Delta = A^{-1} diag(beta) (V - K S_0),
               o = scale [Q S_0 + tril(Q K^T) Delta].
    chunkwise  the same inside chunks of C tokens (one triangular solve per chunk), the state
               carried as S_end = P S_in + K^T u with P = I - K^T w the WY form of
               prod (I - beta_t k_t k_t^T). ``chunk_intermediates`` exposes S_in, T_mat, w, u.
    step       one token of the recurrence (decoding).
    attention_matrix  M = scale tril(Q K^T) A^{-1} diag(beta), o = M v when S_0 = 0.

Gradients (hand-written): recurrent_vjp is the direct adjoint (per step: dr = -beta (k^T dS_t),
dk_t = dS_t delta_t + S_{t-1} dr, dS_{t-1} = dS_t + k_t dr^T); parallel_vjp and chunkwise_vjp go
through the triangular solve (dR = A^{-T} dDelta, dA = -dR Delta^T). See ``linrec_ref._delta``.

Peers: fla ``chunk_delta_rule`` / ``fused_recurrent_delta_rule`` (same argument names and
options; pass fla's post-sigmoid beta with beta_activation="none").

References: Schlag, Irie, Schmidhuber, "Linear Transformers Are Secretly Fast Weight
Programmers", 2021; Yang et al., "Parallelizing Linear Transformers with the Delta Rule over
Sequence Length", 2024 (UT/WY chunkwise form).
"""
from __future__ import annotations

import numpy as np

from .. import _delta
from .._forms import forward_form, matrix_form, step_form, vjp_form
from .._spec import Arg, OpSpec
from .gated_delta_rule import (BETA_REGIMES, family_inputs, prepare, pull_back, recurrence,
                               recurrence_step, recurrence_vjp)

_OPTIONS = {"use_qk_l2norm_in_kernel": False, "beta_activation": "none"}

SPEC = OpSpec(
    name="delta_rule",
    family="delta rule (DeltaNet)",
    transition="rank-1 Householder",
    math="S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T;  o_t = scale S_t^T q_t",
    inputs=(Arg("q", "B T H K"), Arg("k", "B T H K"), Arg("v", "B T HV V"), Arg("beta", "B T HV")),
    output="B T HV V",
    state=(Arg("state", "N HV K V"),),
    default_scale=lambda dims: dims["K"] ** -0.5,
    peers=("fla.ops.delta_rule.chunk_delta_rule", "fla.ops.delta_rule.fused_recurrent_delta_rule"),
    regimes=("typical",) + tuple(BETA_REGIMES),
    default_dims={"B": 2, "H": 1, "HV": 2, "K": 8, "V": 6},
    options=dict(_OPTIONS),
    variants={"default": {},
              "l2norm_sigmoid": {"use_qk_l2norm_in_kernel": True, "beta_activation": "sigmoid"}},
)


def _no_decay(beta):
    """The zero log gate g = 0 of every step: exp(g) = 1 exactly. [B, T, H] (or [B, H])."""
    return np.zeros_like(beta)


def _without_gate(grads):
    """The gradients of gated_delta_rule's machinery without dg (g = 0 is not an input here)."""
    grads.pop("g")
    return grads


# ----------------------------------------------------------------------------- recurrent
@forward_form(SPEC)
def recurrent(q, k, v, beta, *, scale, initial_state, **opts):
    """The definition: a loop over t. q, k: [B, T, H, K]; v: [B, T, H, V]; beta: [B, T, H]."""
    q, k, beta = prepare(SPEC.name, q, k, beta, opts)
    return recurrence(q, k, v, _no_decay(beta), beta, scale, initial_state)


@step_form(SPEC)
def step(q, k, v, beta, *, state, scale, **opts):
    """One token: q, k: [B, H, K]; v: [B, H, V]; beta: [B, H]; state: [B, H, K, V]."""
    q, k, beta = prepare(SPEC.name, q, k, beta, opts)
    return recurrence_step(q, k, v, _no_decay(beta), beta, state, scale)


@vjp_form(SPEC)
def recurrent_vjp(q, k, v, beta, do, dht, *, scale, initial_state, **opts):
    """Direct adjoint of the loop (ground truth); checkpointed reverse walk, never all T states."""
    qm, km, bm = prepare(SPEC.name, q, k, beta, opts)
    grads = recurrence_vjp(qm, km, v, _no_decay(beta), bm, do, dht, scale, initial_state)
    return pull_back(q, k, beta, _without_gate(grads), opts)


# ----------------------------------------------------------------------------- UT/WY forms
@forward_form(SPEC)
def parallel(q, k, v, beta, *, scale, initial_state, **opts):
    """The UT-transform quadratic form over the whole sequence (one chunk of length T)."""
    q, k, beta = prepare(SPEC.name, q, k, beta, opts)
    return _delta.chunkwise(q, k, v, beta, _no_decay(beta), scale, initial_state,
                            max(q.shape[1], 1))


@forward_form(SPEC, chunked=True)
def chunkwise(q, k, v, beta, *, scale, initial_state, chunk_size, **opts):
    """Chunks of C = chunk_size tokens, one triangular solve each (steps in ``_delta.chunkwise``)."""
    q, k, beta = prepare(SPEC.name, q, k, beta, opts)
    return _delta.chunkwise(q, k, v, beta, _no_decay(beta), scale, initial_state, chunk_size)


@matrix_form(SPEC, names=("q", "k", "beta"))
def attention_matrix(q, k, beta, *, scale, **opts):
    """M = scale tril(Q K^T) A^{-1} diag(beta): [B, HV, T, T]; o = M v when the initial state is 0."""
    q, k, beta = prepare(SPEC.name, q, k, beta, opts)
    return _delta.attention_matrix(q, k, beta, _no_decay(beta), scale)


@vjp_form(SPEC)
def parallel_vjp(q, k, v, beta, do, dht, *, scale, initial_state, **opts):
    """Backward of the parallel form, through the triangular solve over the whole sequence."""
    qm, km, bm = prepare(SPEC.name, q, k, beta, opts)
    grads = _delta.chunkwise_vjp(qm, km, v, bm, _no_decay(beta), do, dht, scale, initial_state,
                                 max(q.shape[1], 1))
    return pull_back(q, k, beta, _without_gate(grads), opts)


@vjp_form(SPEC, chunked=True)
def chunkwise_vjp(q, k, v, beta, do, dht, *, scale, initial_state, chunk_size, **opts):
    """Backward of the chunkwise form (per-chunk states only, O(T/C K V) per head)."""
    qm, km, bm = prepare(SPEC.name, q, k, beta, opts)
    grads = _delta.chunkwise_vjp(qm, km, v, bm, _no_decay(beta), do, dht, scale, initial_state,
                                 chunk_size)
    return pull_back(q, k, beta, _without_gate(grads), opts)


def chunk_intermediates(q, k, v, beta, *, initial_state=None, chunk_size=64,
                        use_qk_l2norm_in_kernel=False, beta_activation="none"):
    """Per-chunk intermediates of the chunkwise form, for kernel writers (no grouped heads, no
    varlen: q, k: [B, T, H, K]; v: [B, T, H, V]; beta: [B, T, H]; H == HV).

    The op's options are applied first (l2 norm of k, sigmoid of beta). Returns the dict of
    ``linrec_ref._delta.chunk_intermediates``: S_in [B, H, N, K, V] (state entering each chunk),
    T_mat [B, H, N, C, C] (A^{-1} diag(beta)), A_inv, w [B, H, N, C, K] (T_mat K), u [B, H, N, C, V]
    (T_mat V), v_new (u - w S_in), gamma (ones), D (the causal mask of ones), final_state.
    """
    opts = {"use_qk_l2norm_in_kernel": use_qk_l2norm_in_kernel, "beta_activation": beta_activation}
    _, k, beta = prepare(SPEC.name, q, k, beta, opts)
    if initial_state is None:
        initial_state = np.zeros((v.shape[0], v.shape[2], k.shape[3], v.shape[3]), v.dtype)
    return _delta.chunk_intermediates(k, v, beta, _no_decay(beta), initial_state, chunk_size)


# ----------------------------------------------------------------------------- random inputs
def make_inputs(rng, regime, dims, dtype, variant="default"):
    """Valid random inputs: q, v ~ N(0, 1); unit-norm keys and beta in [0, 2] for "default"
    (U(0.01, 0.99); "beta_extremes": from {1e-3, 0.5, 1, 1.9}), raw keys and beta logits for
    "l2norm_sigmoid"."""
    return family_inputs(rng, regime, dims, dtype, variant, gated=False)
