r"""Machinery shared by the diagonal-plus-low-rank ops (dplr, rwkv7): the recurrence, its adjoint,
and the chunkwise form with one triangular solve per chunk, derived here from the recurrence.

The recurrence (one batch element, one head; the low-rank term reads the UNDECAYED S_{t-1}):

    x_t = a_t^T S_{t-1}                                    ("low-rank read", [V])
    S_t = diag(alpha_t) S_{t-1} + b_t x_t + k_t v_t^T,     alpha_t = exp(w_t) in [0, 1]^K
        = (diag(alpha_t) + b_t a_t^T) S_{t-1} + k_t v_t^T
    o_t = scale S_t^T q_t                                  (inclusive read)

Cores take dense inputs q, k, a, b, w: [B, T, H, K], v: [B, T, H, V], state [B, H, K, V].

Derivation of the chunkwise form (from the recurrence, not from a paper)
------------------------------------------------------------------------
Take one chunk of tokens t = 1..C entering with the state S_0 (= S_in). Let G_t = w_1 + ... + w_t
(per key channel, <= 0), G_0 = 0. The update is a diagonal-decay (GLA-type) recurrence with TWO
writes per token, (k_t, v_t) and (b_t, x_t), so unrolling it gives

    S_t = diag(e^{G_t}) S_0 + sum_{s <= t} diag(e^{G_t - G_s}) (k_s v_s^T + b_s x_s).        (1)

(a) The low-rank read x_t = a_t^T S_{t-1} is (1) at t - 1, i.e. a read BEFORE the update
    ("strict": query decay G_{t-1}, mask s < t):

        x_t = (a_t * e^{G_{t-1}})^T S_0 + sum_{s < t} [Wak[t, s] v_s + Wab[t, s] x_s],
        Wak[t, s] = sum_d a_t[d] k_s[d] e^{G_{t-1}[d] - G_s[d]},   Wab likewise with b_s.

    With rows as tokens this is the unit lower triangular system

        (I - Wab) X = R,     R = (A * E^-) S_0 + Wak V,    E^-[t] = e^{G_{t-1}}             (2)

    solved once per chunk: A_inv = (I - Wab)^{-1} (forward substitution). Splitting X into its
    state-free and state parts (the WY form),

        X = u + W S_0,     u = A_inv (Wak V),    W = A_inv (A * E^-).                       (3)

(b) The output reads (1) at t ("inclusive": query decay G_t, mask s <= t):

        O = scale [ (Q * E) S_0 + Wqk V + Wqb X ],    E[t] = e^{G_t},                      (4)
        Wqk[t, s] = sum_d q_t[d] k_s[d] e^{G_t[d] - G_s[d]},   Wqb likewise with b_s.

(c) The chunk's end state is (1) at C, with K_end[s] = k_s * e^{G_C - G_s}, B_end likewise:

        S_end = diag(e^{G_C}) S_0 + K_end^T V + B_end^T X = P S_0 + U,                      (5)
        P = diag(e^{G_C}) + B_end^T W   (the chunk's transition, [K, K]),
        U = K_end^T V + B_end^T u       (the chunk's input, [K, V]).

All four score matrices Wqk, Wqb (inclusive) and Wak, Wab (strict) are per-channel decayed
products, computed by ``linrec_ref._decay`` (factored where the chunk's decay range allows, exact
segment sums elsewhere; only exp of non-positive segment sums, an exact 0 across w = -inf).
The forms: chunkwise = (2)-(5) with a loop over chunks only for (5); parallel = the same with a
single chunk of length T (with a state-dependent transition this IS the quadratic form: there is
no T x T decay mask independent of the data); attention_matrix (S_0 = 0) is
scale (Wqk + Wqb A_inv Wak).

Backward through the solve (chunkwise and parallel)
---------------------------------------------------
Given dO and the cotangent dS_end of each chunk's end state:
    dX   = scale Wqb^T dO + B_end dS_end,     dR = A_inv^T dX     (the transpose solve)
    dWab = dR X^T,  dWak = dR V^T  (strict lower),  dWqk = scale dO V^T,  dWqb = scale dO X^T
    dV   = scale Wqk^T dO + Wak^T dR + K_end dS_end
    dS_0 = scale (Q * E)^T dO + (A * E^-)^T dR + diag(e^{G_C}) dS_end
         = P^T dS_end + scale (Q * E)^T dO + W^T (scale Wqb^T dO)     (the backward carry)
and for a score W = sum_d x_t y_s e^{Gq_t - G_s}: dx = decayed_mix(dW, y), dy = decayed_mix_t(dW, x):
    dq = mix(dWqk, k) + mix(dWqb, b) + scale E * (dO S_0^T)
    dk = mix_t(dWqk, q) + mix_t(dWak, a) + e^{G_C - G} * (V dS_end^T)
    db = mix_t(dWqb, q) + mix_t(dWab, a) + e^{G_C - G} * (X dS_end^T)
    da = mix(dWab, b) + mix(dWak, k) + E^- * (dR S_0^T)
Gate identity (per channel): every decay is e^{+G} on a query side (q at G_t; a at G_{t-1}) or
e^{-G} on a key side (k, b at G_s), plus the end state. Hence

    dL/dG_u = q_u dq_u + a_{u+1} da_{u+1} - k_u dk_u - b_u db_u  (+ rowsum(dS_end * S_end) at u = C)

and dw is its reverse cumulative sum inside the chunk, restarting at hard resets (w = -inf: the
terms from the reset on sum to exactly 0, so they are not added; numerics.md hazard 2). The s = t
terms of the inclusive scores cancel exactly in the identity and are added to dq, dk, db only
after it (their rounding stays out of dw).

Recurrent adjoint (ground truth), per step with dS_t the cotangent of S_t:
    dS_t += scale q_t do_t^T,  dq_t = scale S_t do_t,  dx_t = dS_t^T b_t
    dk_t = dS_t v_t,  dv_t = dS_t^T k_t,  db_t = dS_t x_t,  da_t = S_{t-1} dx_t
    dw_t = alpha_t * rowsum(dS_t * S_{t-1}),   dS_{t-1} = diag(alpha_t) dS_t + a_t dx_t^T.

Stability: the transition diag(alpha) + b a^T has no norm bound of its own. With RWKV-7's
structure a = -kappa, b = (c * beta_t) * kappa (|kappa| = 1, c in (0, 1]^K fixed per head,
beta_t in [0, 1]) it is similar, through diag(c)^{1/2}, to the symmetric diag(alpha) - beta_t u u^T
(u = c^{1/2} * kappa, |u| <= 1) whose eigenvalues lie in [-1, 1]: products of transitions stay
bounded by sqrt(max c / min c). ``dplr.make_inputs`` draws inputs of that family.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ._decay import (ChunkDecay, chunk_decay, decayed_mix, decayed_mix_t, decayed_scores,
                     reverse_cumsum_in_chunks)
from ._delta import solve_unit_lower
from ._scan import from_chunks, reverse_chunk_carry, reverse_steps, split_diagonal, to_chunks


# ----------------------------------------------------------------------------- recurrent
def _advance(k, v, a, b, w):
    """One step S_{t-1} -> S_t as a function of (S, t), for loops and reverse walks."""
    alpha = np.exp(w)                                               # [B, T, H, K]

    def advance(S, t):
        x = (a[:, t, :, None, :] @ S)[:, :, 0, :]                   # [B, H, V]  a_t^T S_{t-1}
        return (alpha[:, t, :, :, None] * S                         # [B, H, K, V]
                + b[:, t, :, :, None] * x[:, :, None, :]
                + k[:, t, :, :, None] * v[:, t, :, None, :])

    return advance


def recurrent(q, k, v, a, b, w, *, scale, initial_state):
    """The loop over t (ground truth). q, k, a, b, w: [B, T, H, K]; v: [B, T, H, V]."""
    advance = _advance(k, v, a, b, w)
    S = initial_state                                               # [B, H, K, V]
    o = np.empty(v.shape, dtype=v.dtype)                            # [B, T, H, V]
    for t in range(q.shape[1]):
        S = advance(S, t)
        o[:, t] = scale * (q[:, t, :, None, :] @ S)[:, :, 0, :]     # [B, H, V]
    return o, S


def step(q, k, v, a, b, w, *, state, scale):
    """One token: q, k, a, b, w: [B, H, K]; v: [B, H, V]; state: [B, H, K, V]."""
    x = (a[:, :, None, :] @ state)[:, :, 0, :]                      # [B, H, V]  reads S_{t-1}
    S = (np.exp(w)[..., :, None] * state + b[..., :, None] * x[:, :, None, :]
         + k[..., :, None] * v[:, :, None, :])                      # [B, H, K, V]
    o = scale * (q[:, :, None, :] @ S)[:, :, 0, :]                  # [B, H, V]
    return o, S


def recurrent_vjp(q, k, v, a, b, w, *, do, dht, scale, initial_state):
    """Direct adjoint of the loop, walking t = T-1 .. 0 (ground-truth backward; equations in the
    module docstring). Memory: states are recomputed from checkpoints (``_scan.reverse_steps``),
    never all T kept."""
    alpha = np.exp(w)                                               # [B, T, H, K]
    dq, dk, dv, da, db, dw = (np.zeros_like(x) for x in (q, k, v, a, b, w))
    dS = dht.copy()                                                 # [B, H, K, V]
    for t, S_prev, S_t in reverse_steps(_advance(k, v, a, b, w), initial_state, q.shape[1]):
        dS = dS + scale * q[:, t, :, :, None] * do[:, t, :, None, :]   # read of S_t
        dq[:, t] = scale * (S_t @ do[:, t, :, :, None])[..., 0]        # [B, H, K]
        x = (a[:, t, :, None, :] @ S_prev)[:, :, 0, :]                 # [B, H, V]
        dx = (b[:, t, :, None, :] @ dS)[:, :, 0, :]                    # [B, H, V]
        dk[:, t] = (dS @ v[:, t, :, :, None])[..., 0]                  # [B, H, K]
        dv[:, t] = (k[:, t, :, None, :] @ dS)[:, :, 0, :]              # [B, H, V]
        db[:, t] = (dS @ x[..., None])[..., 0]                         # [B, H, K]
        da[:, t] = (S_prev @ dx[..., None])[..., 0]                    # [B, H, K]
        dw[:, t] = alpha[:, t] * np.sum(dS * S_prev, axis=-1)          # [B, H, K]
        dS = alpha[:, t, :, :, None] * dS + a[:, t, :, :, None] * dx[:, :, None, :]  # to S_{t-1}
    return {"q": dq, "k": dk, "v": dv, "a": da, "b": db, "w": dw, "initial_state": dS}


# ----------------------------------------------------------------------------- chunk parts
class ChunkParts(NamedTuple):
    """Steps 1-4 of the chunkwise form for every chunk; arrays [B, H, N, ...] (module docstring)."""

    qc: np.ndarray              # [B, H, N, C, K]  chunked inputs
    kc: np.ndarray              # [B, H, N, C, K]
    vc: np.ndarray              # [B, H, N, C, V]
    ac: np.ndarray              # [B, H, N, C, K]
    bc: np.ndarray              # [B, H, N, C, K]
    wc: np.ndarray              # [B, H, N, C, K]
    decay_incl: ChunkDecay      # inclusive: G_t - G_s, s <= t (the output read)
    decay_strict: ChunkDecay    # strict: G_{t-1} - G_s, s < t (the low-rank read)
    Wqk: np.ndarray             # [B, H, N, C, C]  inclusive decayed scores of q with k
    Wqb: np.ndarray             # [B, H, N, C, C]  ... of q with b
    Wak: np.ndarray             # [B, H, N, C, C]  strict decayed scores of a with k
    Wab: np.ndarray             # [B, H, N, C, C]  ... of a with b
    A_inv: np.ndarray           # [B, H, N, C, C]  (I - Wab)^{-1}
    a_read: np.ndarray          # [B, H, N, C, K]  a_t e^{G_{t-1}}
    W: np.ndarray               # [B, H, N, C, K]  A_inv a_read
    u: np.ndarray               # [B, H, N, C, V]  A_inv Wak V
    k_end: np.ndarray           # [B, H, N, C, K]  k_s e^{G_C - G_s}
    b_end: np.ndarray           # [B, H, N, C, K]  b_s e^{G_C - G_s}
    P: np.ndarray               # [B, H, N, K, K]  the chunk's transition
    U: np.ndarray               # [B, H, N, K, V]  the chunk's input
    S_in: np.ndarray            # [B, H, N, K, V]  the state entering each chunk
    final_state: np.ndarray     # [B, H, K, V]


def _chunk_parts(q, k, v, a, b, w, initial_state, C, fast_bound=None) -> ChunkParts:
    """Steps 1-4 of the chunkwise form (module docstring, (2)-(5)); everything per chunk."""
    qc, kc, vc = to_chunks(q, C), to_chunks(k, C), to_chunks(v, C)  # [B, H, N, C, K|V]
    ac, bc, wc = to_chunks(a, C), to_chunks(b, C), to_chunks(w, C)  # [B, H, N, C, K]
    decay_incl = chunk_decay(wc, strict=False, fast_bound=fast_bound)   # G_t - G_s, s <= t
    decay_strict = chunk_decay(wc, strict=True, fast_bound=fast_bound)   # G_{t-1} - G_s, s < t
    # 1. per-channel decayed scores: inclusive (the output read), strict (the low-rank read)
    Wqk = decayed_scores(qc, kc, decay_incl)                        # [B, H, N, C, C]
    Wqb = decayed_scores(qc, bc, decay_incl)                        # [B, H, N, C, C]
    Wak = decayed_scores(ac, kc, decay_strict)                      # [B, H, N, C, C] strictly lower
    Wab = decayed_scores(ac, bc, decay_strict)                      # [B, H, N, C, C] strictly lower
    # 2. the one triangular solve per chunk: A_inv = (I - Wab)^{-1}
    eye = np.eye(Wab.shape[-1], dtype=Wab.dtype)                    # [C, C]
    A_inv = solve_unit_lower(-Wab, eye)                             # [B, H, N, C, C]
    # 3. WY factors X = u + W S_in; chunk transition P and input U
    a_read = ac * decay_strict.exp_Gq                               # [B, H, N, C, K] a_t e^{G_{t-1}}
    W = A_inv @ a_read                                              # [B, H, N, C, K]
    u = A_inv @ (Wak @ vc)                                          # [B, H, N, C, V]
    k_end = kc * decay_incl.to_end                                  # [B, H, N, C, K] k_s e^{G_C-G_s}
    b_end = bc * decay_incl.to_end                                  # [B, H, N, C, K]
    P = b_end.swapaxes(-1, -2) @ W                                  # [B, H, N, K, K]
    idx = np.arange(P.shape[-1])
    P[..., idx, idx] += decay_incl.total                            # + diag(e^{G_C})
    U = k_end.swapaxes(-1, -2) @ vc + b_end.swapaxes(-1, -2) @ u    # [B, H, N, K, V]
    # 4. carry across chunks: S_end = P S_in + U
    S_in = np.empty(U.shape, dtype=U.dtype)                         # [B, H, N, K, V]
    S = initial_state                                               # [B, H, K, V]
    for n in range(U.shape[2]):
        S_in[:, :, n] = S
        S = P[:, :, n] @ S + U[:, :, n]
    return ChunkParts(qc=qc, kc=kc, vc=vc, ac=ac, bc=bc, wc=wc, decay_incl=decay_incl,
                      decay_strict=decay_strict, Wqk=Wqk, Wqb=Wqb, Wak=Wak, Wab=Wab, A_inv=A_inv,
                      a_read=a_read, W=W, u=u, k_end=k_end, b_end=b_end, P=P, U=U, S_in=S_in,
                      final_state=S)


def _chunk_len(chunk_size, T):
    return max(1, min(int(chunk_size), T))                          # one chunk covers T <= C


def chunk_intermediates(q, k, v, a, b, w, initial_state, chunk_size, fast_bound=None):
    """The per-chunk quantities a kernel writer needs (dense inputs, as the cores take them).

    q, k, a, b, w: [B, T, H, K]; v: [B, T, H, V]; initial_state: [B, H, K, V]. With N chunks of
    C = min(chunk_size, T) tokens (the last one zero-padded), returns a dict:
        S_in   [B, H, N, K, V]  the state entering each chunk (S_in[:, :, 0] = initial_state)
        Wqk, Wqb [B, H, N, C, C] inclusive decayed scores (s <= t) of q with k and with b
        Wak, Wab [B, H, N, C, C] strict decayed scores (s < t) of a with k and with b
        A_inv  [B, H, N, C, C]  (I - Wab)^{-1}, the solved matrix (unit lower triangular)
        W      [B, H, N, C, K]  A_inv (a * e^{G_{t-1}})      u  [B, H, N, C, V]  A_inv Wak V
        X      [B, H, N, C, V]  u + W S_in: the low-rank reads x_t = a_t^T S_{t-1}
        P      [B, H, N, K, K]  diag(e^{G_C}) + B_end^T W, the chunk's transition
        U      [B, H, N, K, V]  K_end^T V + B_end^T u, the chunk's input (S_end = P S_in + U)
        final_state [B, H, K, V]
    """
    C = _chunk_len(chunk_size, q.shape[1])
    p = _chunk_parts(q, k, v, a, b, w, initial_state, C, fast_bound)
    X = p.u + p.W @ p.S_in                                          # [B, H, N, C, V]
    keep = ("S_in", "Wqk", "Wqb", "Wak", "Wab", "A_inv", "W", "u", "P", "U", "final_state")
    return dict({n: getattr(p, n) for n in keep}, X=X)


# ----------------------------------------------------------------------------- forward
def chunked_forward(q, k, v, a, b, w, *, scale, initial_state, chunk_size, fast_bound=None):
    """Chunkwise forward, numbered steps as in the module docstring. Memory O(T/C K V) per head.

    1. decayed scores Wqk, Wqb (inclusive), Wak, Wab (strict)   2. A_inv = (I - Wab)^{-1}
    3. WY factors u, W; transition P, input U                    4. carry S_end = P S_in + U
    5. low-rank reads X = u + W S_in                             6. O = scale[(Q*E) S_in + Wqk V + Wqb X]
    fast_bound: see ``_decay.chunk_decay`` (None: the dtype's default; for tests).
    """
    T = q.shape[1]
    C = _chunk_len(chunk_size, T)
    p = _chunk_parts(q, k, v, a, b, w, initial_state, C, fast_bound)  # 1.-4.
    S_in = p.S_in
    X = p.u + p.W @ S_in                                            # 5. [B, H, N, C, V]
    o = (p.qc * p.decay_incl.exp_Gq) @ S_in + p.Wqk @ p.vc + p.Wqb @ X   # 6. [B, H, N, C, V]
    o *= scale
    return from_chunks(o, T), p.final_state


def attention_matrix(q, k, a, b, w, *, scale):
    """M = scale (Wqk + Wqb A_inv Wak) over the whole sequence: [B, H, T, T], o = M v if S_0 = 0."""
    T = q.shape[1]
    B, _, H, K = q.shape
    zeros_v = np.zeros((B, T, H, 1), dtype=q.dtype)                 # v does not enter M
    S0 = np.zeros((B, H, K, 1), dtype=q.dtype)
    p = _chunk_parts(q, k, zeros_v, a, b, w, S0, max(T, 1))
    M = p.Wqk + p.Wqb @ (p.A_inv @ p.Wak)                           # [B, H, 1, T, T]
    return scale * M[:, :, 0]                                       # [B, H, T, T]


# ----------------------------------------------------------------------------- backward
def chunked_vjp(q, k, v, a, b, w, *, do, dht, scale, initial_state, chunk_size, fast_bound=None):
    """Backward of ``chunked_forward`` through the solve (module docstring). Per-chunk states only.

    1. recompute steps 1-5 (S_in per chunk, X)
    2. carry dS backwards: dS_in = P^T dS_end + scale (Q*E)^T dO + W^T (scale Wqb^T dO)
    3. through the solve: dX, dR = A_inv^T dX, the score cotangents dWqk, dWqb, dWak, dWab
    4. gradients of q, k, v, a, b through ``_decay`` (mix / mix_t)
    5. dw from the gate identity, reverse-summed inside each chunk (restarting at resets)
    """
    T = q.shape[1]
    C = _chunk_len(chunk_size, T)
    p = _chunk_parts(q, k, v, a, b, w, initial_state, C, fast_bound)  # 1.
    qc, kc, vc, ac, bc = p.qc, p.kc, p.vc, p.ac, p.bc
    decay_incl, decay_strict = p.decay_incl, p.decay_strict
    S_in, S_T = p.S_in, p.final_state
    X = p.u + p.W @ S_in                                            # [B, H, N, C, V]
    doc = to_chunks(do, C)                                          # [B, H, N, C, V]
    # 2. state cotangents at every chunk end
    dX_local = scale * (p.Wqb.swapaxes(-1, -2) @ doc)               # [B, H, N, C, V]
    q_read = qc * decay_incl.exp_Gq                                 # [B, H, N, C, K]
    local = scale * (q_read.swapaxes(-1, -2) @ doc) + p.W.swapaxes(-1, -2) @ dX_local   # [.., K, V]
    dS_end, dh0 = reverse_chunk_carry(p.P, local, dht)              # [B, H, N, K, V], [B, H, K, V]
    # 3. through the solve
    dX = dX_local + p.b_end @ dS_end                                # [B, H, N, C, V]
    dR = p.A_inv.swapaxes(-1, -2) @ dX                              # [B, H, N, C, V]
    dWab = dR @ X.swapaxes(-1, -2)                                  # [B, H, N, C, C] (masked in mix)
    dWak = dR @ vc.swapaxes(-1, -2)                                 # [B, H, N, C, C]
    dWqk, dqk_diag = split_diagonal(scale * (doc @ vc.swapaxes(-1, -2)))  # [.., C, C], [.., C, 1]
    dWqb, dqb_diag = split_diagonal(scale * (doc @ X.swapaxes(-1, -2)))
    # 4. q, k, v, a, b (without the s = t terms of the inclusive scores)
    dq = (decayed_mix(dWqk, kc, decay_incl) + decayed_mix(dWqb, bc, decay_incl)
          + scale * decay_incl.exp_Gq * (doc @ S_in.swapaxes(-1, -2)))   # [B, H, N, C, K]
    dk = (decayed_mix_t(dWqk, qc, decay_incl) + decayed_mix_t(dWak, ac, decay_strict)
          + decay_incl.to_end * (vc @ dS_end.swapaxes(-1, -2)))     # [B, H, N, C, K]
    db = (decayed_mix_t(dWqb, qc, decay_incl) + decayed_mix_t(dWab, ac, decay_strict)
          + decay_incl.to_end * (X @ dS_end.swapaxes(-1, -2)))      # [B, H, N, C, K]
    da = (decayed_mix(dWab, bc, decay_strict) + decayed_mix(dWak, kc, decay_strict)
          + decay_strict.exp_Gq * (dR @ S_in.swapaxes(-1, -2)))     # [B, H, N, C, K]
    dv = (scale * (p.Wqk.swapaxes(-1, -2) @ doc) + p.Wak.swapaxes(-1, -2) @ dR
          + p.k_end @ dS_end)                                       # [B, H, N, C, V]
    # 5. gate identity per chunk; S_end[n] = S_in[n+1], the last one is the final state
    S_end = np.concatenate([S_in[:, :, 1:], S_T[:, :, None]], axis=2)  # [B, H, N, K, V]
    dG = qc * dq - kc * dk - bc * db                                # [B, H, N, C, K]
    dG[..., :-1, :] += (ac * da)[..., 1:, :]                        # a_t is read at G_{t-1}
    dG[..., -1, :] += np.sum(dS_end * S_end, axis=-1)
    dw = reverse_cumsum_in_chunks(dG, reset=np.isneginf(p.wc))      # [B, H, N, C, K]
    dq += dqk_diag * kc + dqb_diag * bc                             # the s = t terms
    dk += dqk_diag * qc
    db += dqb_diag * qc
    back = lambda x: from_chunks(x, T)                              # [B, H, N, C, .] -> [B, T, H, .]
    return {"q": back(dq), "k": back(dk), "v": back(dv), "a": back(da), "b": back(db),
            "w": back(dw), "initial_state": dh0}
