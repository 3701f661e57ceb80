r"""The UT/WY chunk machinery of the delta-rule ops (delta_rule, gated_delta_rule, kda, and
delta_product through gated_delta_rule): the chunkwise form with one triangular solve per chunk
for a scalar or a per-key-channel gate, its backward, and the attention matrix.

The chunk machinery is written for the per-channel rule (kda; decay first, then the delta step):

    S'_t    = diag(a_t) S_{t-1},           a_t = exp(g_t) in [0, 1]^K
    delta_t = beta_t (v_t - S'_t^T k_t)                                   ("new value", [V])
    S_t     = S'_t + k_t delta_t^T  =  (I - beta_t k_t k_t^T) diag(a_t) S_{t-1} + beta_t k_t v_t^T
    o_t     = scale S_t^T q_t

A scalar gate g_t (gated_delta_rule; [B, T, H]) is the per-channel gate constant over K: the
chunk functions give it a channel axis of size 1 that broadcasts over K, and return its
gradient summed over K. The plain delta rule is g = 0 (a = 1, exactly). The recurrences
themselves (the ground truth) live in the op modules: the scalar-gate loop in
``ops/gated_delta_rule.py`` (also delta_rule's, with g = 0) and kda's own loop in ``ops/kda.py``,
so that the identity "kda with a gate constant over K equals gated_delta_rule" compares two
independent loops. The functions here take mapped inputs: keys and queries already
l2-normalised if the op asks for it, beta already through its activation
(``gated_delta_rule.prepare`` / ``pull_back``).

Derivation of the chunkwise form (from the recurrence, not from a paper)
------------------------------------------------------------------------
Take one chunk of tokens t = 1..C entering with the state S_0 (= S_in). Per key channel, let
G_t = g_1 + ... + g_t (<= 0, in R^K), Gamma_t = exp(G_t) (a vector; Gamma * X scales the rows
of X channel by channel), and for any two token rows x_t, y_s the decayed score

        <x_t, y_s>_D = sum_k x_t[k] y_s[k] exp(G_t[k] - G_s[k])      (s <= t; 0 for s > t)

(GLA's scores: ``_decay.decayed_scores``, one matmul (x e^{G}) (y e^{-G})^T where the chunk's
decay range allows factoring, exact segment sums, never exp of a positive number, elsewhere;
an exact 0 across a hard reset g = -inf). For a scalar gate it is (x_t . y_s) exp(G_t - G_s).

(a) Since S_t = diag(a_t) S_{t-1} + k_t delta_t^T, unrolling gives the GLA shape

        S_t = diag(Gamma_t) S_0 + sum_{s <= t} diag(exp(G_t - G_s)) k_s delta_s^T.      (1)

(b) The new value reads S'_t = diag(a_t) S_{t-1} = diag(Gamma_t) S_0 + sum_{s < t} (same), so

        delta_t + beta_t sum_{s < t} <k_t, k_s>_D delta_s = beta_t (v_t - S_0^T (Gamma_t * k_t)).

    In matrix form (rows are tokens), with KKD[t, s] = <k_t, k_s>_D and the unit lower triangular

        A = I + L,   L = tril(diag(beta) KKD, -1)                                         (2)

    this is A Delta = diag(beta) (V - (Gamma * K) S_0), hence, with the UT matrix

        T_mat = A^{-1} diag(beta),   u = T_mat V,   w = T_mat (Gamma * K),               (3)

        Delta = u - w S_0.                                                               (4)

    (Gamma * K has rows Gamma_t * k_t: w carries the decay from the chunk start.)
(c) Reading (1) at every t and at the chunk end C, with QKD[t, s] = <q_t, k_s>_D:

        O     = scale [ (Gamma * Q) S_0 + QKD Delta ]                                     (5)
        S_end = diag(Gamma_C) S_0 + K_end^T Delta,   K_end[s] = exp(G_C - G_s) * k_s
              = P S_0 + K_end^T u,   P = diag(Gamma_C) - K_end^T w  (the chunk's transition) (6)

    P is the WY form of the product prod_t (I - beta_t k_t k_t^T) diag(a_t) over the chunk.
The forms: chunkwise = (2)-(6) with a loop over chunks only for (6); parallel = one chunk of
length T; the attention matrix (S_0 = 0) is scale QKD T_mat.

Backward through the solve (chunkwise and parallel)
---------------------------------------------------
With R = diag(beta) Y, Y = V - (Gamma * K) S_0, Delta = A^{-1} R: dR = A^{-T} dDelta and
dA = -dR Delta^T, of which only the strictly lower part (dL) matters. Then
    dbeta_t = sum_v dR[t] Y[t] + sum_s dL[t, s] KKD[t, s],   dY = beta * dR, dV = dY,
    d(Gamma * K) = -dY S_0^T,  dKKD = beta * dL (strictly lower),  dQKD = scale dO Delta^T,
and dq, dk through the scores with ``_decay.decayed_mix`` (row side) / ``decayed_mix_t``
(column side). The state cotangent is carried backwards by the transpose of (6):
    dS_in = P^T dS_end + scale (Gamma * Q)^T dO - w^T (scale QKD^T dO).
Gates, by the gate identity per channel: every decay is a product of a row factor e^{G_t} and a
column factor e^{-G_s}, so
    dL/dG_t = q_t * dq_t + k_t * dk_t[row side: KKD rows, Gamma * K]
              - k_t * dk_t[column side: QKD, KKD columns, K_end]  (+ rowsum(dS_end * S_end) at t = C)
(the s = t terms of QKD cancel exactly and are left out), and dg is its reverse cumulative sum
inside the chunk (never across chunks, numerics.md hazard 2), restarting at hard resets where
the terms from the reset on sum to exactly 0 (``_decay.reverse_cumsum_in_chunks``).

Numerics (numerics.md hazard 8): the eigenvalues of I - beta k k^T are 1 (K - 1 times) and
1 - beta |k|^2, so each step is a contraction when |k| = 1 and beta in [0, 2] (and diag(a_t) is
one too). With keys that are not unit norm, or beta outside (0, 2), the state and A^{-1} can grow
exponentially; use ``use_qk_l2norm_in_kernel=True`` for raw keys.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ._decay import (ChunkDecay, chunk_decay, decayed_mix, decayed_mix_t, decayed_scores,
                     reverse_cumsum_in_chunks)
from ._scan import from_chunks, reverse_chunk_carry, segsum, split_diagonal, to_chunks


# ----------------------------------------------------------------------------- UT transform
def solve_unit_lower(L, R):
    """X = (I + L)^{-1} R by forward substitution, vectorised over the leading axes.

    L: [..., C, C] strictly lower triangular (its diagonal and upper part are ignored);
    R: [..., C, M]. Row i: X[i] = R[i] - L[i, :i] X[:i]. One Python loop over the C rows.
    """
    C = L.shape[-1]
    X = np.empty(np.broadcast_shapes(L.shape[:-2], R.shape[:-2]) + R.shape[-2:],
                 dtype=np.result_type(L, R))                        # [..., C, M]
    for i in range(C):
        X[..., i, :] = R[..., i, :] - (L[..., i, None, :i] @ X[..., :i, :])[..., 0, :]
    return X


def _is_scalar_gate(g, k):
    """True for a scalar gate g: [B, T, H] next to keys k: [B, T, H, K]; False for [B, T, H, K]."""
    return g.ndim == k.ndim - 1


def _chunk_decays(g, k, C, fast_bound):
    """The per-channel decays of the chunks (``_decay.ChunkDecay``, arrays [B, H, N, C, K]).

    A scalar gate [B, T, H] is the per-channel gate constant over K: it gets a channel axis of
    size 1 ([B, H, N, C, 1]), which broadcasts over K in every product (and keeps the exact
    path's decay tensor [C, C, 1] instead of [C, C, K]).
    """
    if _is_scalar_gate(g, k):
        g = g[..., None]                                            # [B, T, H, 1]
    return chunk_decay(to_chunks(g, C), strict=False, fast_bound=fast_bound)


class UTParts(NamedTuple):
    """Steps 1-3 of the chunkwise form for every chunk (no state involved); [B, H, N, ...]."""

    kc: np.ndarray          # [B, H, N, C, K]  keys of each chunk
    vc: np.ndarray          # [B, H, N, C, V]  values
    bc: np.ndarray          # [B, H, N, C]     beta
    decay: ChunkDecay       # per-channel decays from the chunk start (K or 1 channels)
    KKD: np.ndarray         # [B, H, N, C, C]  tril(<k_t, k_s>_D, -1)
    A_inv: np.ndarray       # [B, H, N, C, C]  A^{-1}, A = I + diag(beta) KKD
    T_mat: np.ndarray       # [B, H, N, C, C]  A^{-1} diag(beta)
    gamma_k: np.ndarray     # [B, H, N, C, K]  Gamma_t * k_t
    u: np.ndarray           # [B, H, N, C, V]  T_mat V
    w: np.ndarray           # [B, H, N, C, K]  T_mat (Gamma * K)
    k_end: np.ndarray       # [B, H, N, C, K]  e^{G_C - G_s} k_s
    P: np.ndarray           # [B, H, N, K, K]  the chunk's transition diag(Gamma_C) - K_end^T w
    U: np.ndarray           # [B, H, N, K, V]  the chunk's input K_end^T u


def _ut_parts(k, v, beta, g, C, fast_bound=None) -> UTParts:
    """Steps 1-3 of the chunkwise form (no state involved): everything per chunk.

    k: [B, T, H, K]; v: [B, T, H, V]; beta: [B, T, H]; g: [B, T, H] or [B, T, H, K].
    """
    kc, vc = to_chunks(k, C), to_chunks(v, C)                       # [B, H, N, C, K|V]
    bc = to_chunks(beta, C)                                         # [B, H, N, C]
    # 1. decays relative to the chunk start, per key channel (module docstring, eq. (2'))
    decay = _chunk_decays(g, k, C, fast_bound)                      # [B, H, N, C, K]
    # 2. the UT matrix: A = I + tril(diag(beta) KKD, -1), KKD[t, s] = sum_k k_t k_s e^{G_t - G_s}
    KKD = np.tril(decayed_scores(kc, kc, decay), -1)                # [B, H, N, C, C]
    L = bc[..., :, None] * KKD                                      # [B, H, N, C, C]
    eye = np.eye(L.shape[-1], dtype=L.dtype)                        # [C, C]
    A_inv = solve_unit_lower(L, eye)                                # [B, H, N, C, C]  the one solve
    T_mat = A_inv * bc[..., None, :]                                # [B, H, N, C, C]
    # 3. WY factors: u = T_mat V, w = T_mat (Gamma * K); chunk transition P and input U
    gamma_k = decay.exp_Gq * kc                                     # [B, H, N, C, K]  Gamma_t * k_t
    u = T_mat @ vc                                                  # [B, H, N, C, V]
    w = T_mat @ gamma_k                                             # [B, H, N, C, K]
    k_end = kc * decay.to_end                                       # [B, H, N, C, K]  e^{G_C-G_s} k_s
    P = decay.total[..., :, None] * np.eye(kc.shape[-1], dtype=kc.dtype) \
        - k_end.swapaxes(-1, -2) @ w                                # [B, H, N, K, K]
    U = k_end.swapaxes(-1, -2) @ u                                  # [B, H, N, K, V]
    return UTParts(kc=kc, vc=vc, bc=bc, decay=decay, KKD=KKD, A_inv=A_inv, T_mat=T_mat,
                   gamma_k=gamma_k, u=u, w=w, k_end=k_end, P=P, U=U)


def _carry(parts: UTParts, initial_state):
    """Step 4: S_end = P S_in + U chunk after chunk; returns (S_in per chunk, final state)."""
    P, U = parts.P, parts.U
    S_in = np.empty(U.shape, dtype=U.dtype)                         # [B, H, N, K, V]
    S = initial_state                                               # [B, H, K, V]
    for n in range(U.shape[2]):
        S_in[:, :, n] = S
        S = P[:, :, n] @ S + U[:, :, n]
    return S_in, S


def chunk_intermediates(k, v, beta, g, initial_state, chunk_size, fast_bound=None):
    """The per-chunk quantities a kernel writer needs, for processed inputs (H == HV, dense).

    k: [B, T, H, K]; v: [B, T, H, V]; beta: [B, T, H]; g: [B, T, H] (scalar gate; 0 for the
    ungated rule) or [B, T, H, K] (per-key-channel gate, kda); initial_state: [B, H, K, V].
    With N = ceil(T / C) chunks of C = chunk_size tokens (the last one zero-padded), returns:
        S_in      [B, H, N, K, V]  the state entering each chunk (S_in[:, :, 0] = initial_state)
        T_mat     [B, H, N, C, C]  A^{-1} diag(beta), A = I + tril(diag(beta) KKD, -1)
        A_inv     [B, H, N, C, C]  A^{-1} (unit lower triangular)
        w         [B, H, N, C, K]  T_mat (Gamma * K)
        u         [B, H, N, C, V]  T_mat V
        v_new     [B, H, N, C, V]  Delta = u - w S_in, the new values written:
                                   S_t = diag(e^{g_t}) S_{t-1} + k_t v_new_t^T
        gamma     [B, H, N, C] (scalar g) or [B, H, N, C, K] (per-channel g): exp(G_t), the
                                   decay from the chunk start, G_t = g_first + ... + g_t
        D         [B, H, N, C, C]  (scalar g only) exp(G_t - G_s) for s <= t, else 0
        final_state [B, H, K, V]
    """
    parts = _ut_parts(k, v, beta, g, chunk_size, fast_bound)
    S_in, S_T = _carry(parts, initial_state)
    v_new = parts.u - parts.w @ S_in                                # [B, H, N, C, V]
    out = {"S_in": S_in, "T_mat": parts.T_mat, "A_inv": parts.A_inv, "w": parts.w,
           "u": parts.u, "v_new": v_new, "gamma": parts.decay.exp_Gq, "final_state": S_T}
    if _is_scalar_gate(g, k):
        out["gamma"] = out["gamma"][..., 0]                         # [B, H, N, C] (from [.., C, 1])
        out["D"] = np.exp(segsum(to_chunks(g, chunk_size)))         # [B, H, N, C, C]
    return out


def chunkwise(q, k, v, beta, g, scale, initial_state, chunk_size, fast_bound=None):
    """Chunkwise form, numbered steps as in the module docstring. Memory O(T/C K V) per head.

    q, k: [B, T, H, K]; v: [B, T, H, V]; beta: [B, T, H]; g: [B, T, H] or [B, T, H, K].
    fast_bound: see ``_decay.chunk_decay`` (None: the dtype's default; 0 forces the exact path).
    1. decays Gamma, e^{G_C - G_s} relative to the chunk start   2. UT matrix (one triangular solve)
    3. WY factors u, w and the chunk transition P                 4. carry S_end = P S_in + K_end^T u
    5. new values Delta = u - w S_in                              6. o = scale[(Gamma*Q) S_in + QKD Delta]
    """
    C = max(1, min(chunk_size, q.shape[1]))                         # one chunk covers T <= C
    parts = _ut_parts(k, v, beta, g, C, fast_bound)                 # 1.-3.
    S_in, S_T = _carry(parts, initial_state)                        # 4.
    delta = parts.u - parts.w @ S_in                                # 5. [B, H, N, C, V]
    qc = to_chunks(q, C)                                            # [B, H, N, C, K]
    decay = parts.decay
    QKD = decayed_scores(qc, parts.kc, decay)                       # [B, H, N, C, C]
    o = scale * ((decay.exp_Gq * qc) @ S_in + QKD @ delta)          # 6. [B, H, N, C, V]
    return from_chunks(o, q.shape[1]), S_T


def attention_matrix(q, k, beta, g, scale, fast_bound=None):
    """M = scale QKD T_mat over the whole sequence: [B, H, T, T], o = M v when S_0 = 0."""
    T = max(q.shape[1], 1)
    parts = _ut_parts(k, k[..., :1] * 0, beta, g, T, fast_bound)    # v unused by T_mat
    QKD = decayed_scores(to_chunks(q, T), parts.kc, parts.decay)    # [B, H, 1, T, T]
    return scale * (QKD @ parts.T_mat)[:, :, 0]                     # [B, H, T, T]


def chunkwise_vjp(q, k, v, beta, g, do, dht, scale, initial_state, chunk_size, fast_bound=None):
    """Backward of the chunkwise form, through the triangular solve (module docstring).

    1. recompute steps 1-5 (per-chunk states only)
    2. carry dS backwards: dS_in = P^T dS_end + scale (Gamma*Q)^T dO - w^T dDelta_local
    3. dDelta, then through the solve: dR = A^{-T} dDelta, dL = tril(-dR Delta^T, -1)
    4. gradients of q, k, v, beta (k enters on the query side of KKD and Gamma*K, and on the
       key side of QKD, KKD and K_end)
    5. dg from the gate identity, reverse-summed per chunk (restarting at hard resets); a scalar
       gate gets the sum over K
    """
    T = q.shape[1]
    C = max(1, min(chunk_size, T))
    p = _ut_parts(k, v, beta, g, C, fast_bound)                     # 1.
    S_in, S_T = _carry(p, initial_state)
    kc, vc, bc, decay = p.kc, p.vc, p.bc, p.decay
    delta = p.u - p.w @ S_in                                        # [B, H, N, C, V]
    qc, doc = to_chunks(q, C), to_chunks(do, C)                     # [B, H, N, C, K|V]
    QKD = decayed_scores(qc, kc, decay)                             # [B, H, N, C, C]
    gamma_q = decay.exp_Gq * qc                                     # [B, H, N, C, K]  Gamma_t * q_t
    # 2. state cotangents at every chunk end
    ddelta_local = scale * QKD.swapaxes(-1, -2) @ doc               # [B, H, N, C, V]
    local = scale * gamma_q.swapaxes(-1, -2) @ doc - p.w.swapaxes(-1, -2) @ ddelta_local  # [.., K, V]
    dS_end, dh0 = reverse_chunk_carry(p.P, local, dht)              # [B, H, N, K, V], [B, H, K, V]
    # 3. through the solve
    ddelta = ddelta_local + p.k_end @ dS_end                        # [B, H, N, C, V]
    dR = p.A_inv.swapaxes(-1, -2) @ ddelta                          # [B, H, N, C, V]
    dL = np.tril(-dR @ delta.swapaxes(-1, -2), -1)                  # [B, H, N, C, C]
    Y = vc - p.gamma_k @ S_in                                       # [B, H, N, C, V]
    dY = bc[..., None] * dR                                         # [B, H, N, C, V]
    dgamma_k = -dY @ S_in.swapaxes(-1, -2)                          # [B, H, N, C, K]  d(Gamma * K)
    dKKD = bc[..., :, None] * dL                                    # [B, H, N, C, C]  strictly lower
    dQKD, dQKD_diag = split_diagonal(scale * (doc @ delta.swapaxes(-1, -2)))  # [.., C, C], [.., C, 1]
    # 4. q, k, v, beta; each term of dk kept apart for the gate identity
    dq_read = scale * decay.exp_Gq * (doc @ S_in.swapaxes(-1, -2))  # [B, H, N, C, K]
    dq_scores = decayed_mix(dQKD, kc, decay)                        # [B, H, N, C, K]
    dk_rows = decayed_mix(dKKD, kc, decay) + decay.exp_Gq * dgamma_k   # query side: KKD rows, Gamma K
    dk_cols = (decayed_mix_t(dQKD, qc, decay) + decayed_mix_t(dKKD, kc, decay)
               + decay.to_end * (delta @ dS_end.swapaxes(-1, -2)))  # key side: QKD, KKD cols, K_end
    dq = dq_scores + dq_read + dQKD_diag * kc                       # [B, H, N, C, K]
    dk = dk_rows + dk_cols + dQKD_diag * qc                         # [B, H, N, C, K]
    dbeta = np.sum(dR * Y, axis=-1) + np.sum(dL * p.KKD, axis=-1)   # [B, H, N, C]
    # 5. gate identity: dL/dG_t = q_t dq_t + k_t dk_rows_t - k_t dk_cols_t (+ end-state term);
    #    the s = t terms of QKD cancel exactly in it and are left out
    S_end = np.concatenate([S_in[:, :, 1:], S_T[:, :, None]], axis=2)  # [B, H, N, K, V]
    dG = qc * (dq_scores + dq_read) + kc * (dk_rows - dk_cols)      # [B, H, N, C, K]
    dG[..., -1, :] += np.sum(dS_end * S_end, axis=-1)
    scalar = _is_scalar_gate(g, k)
    if scalar:                                                      # one gate for all channels
        dG = np.sum(dG, axis=-1, keepdims=True)                     # [B, H, N, C, 1]
    dg = reverse_cumsum_in_chunks(dG, reset=np.isneginf(decay.g))   # [B, H, N, C, K or 1]
    if scalar:
        dg = dg[..., 0]                                             # [B, H, N, C]
    return {"q": from_chunks(dq, T), "k": from_chunks(dk, T), "v": from_chunks(dY, T),
            "beta": from_chunks(dbeta, T), "g": from_chunks(dg, T), "initial_state": dh0}
