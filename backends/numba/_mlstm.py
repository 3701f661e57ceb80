"""Numba kernels of the stabilised mLSTM loop, and its recurrent cores.

Per batch b and head h, with the stabilised state (C~ [K, V], n~ [K], m) of the reference
(``linrec_ref.ops.mlstm``, its docstring has the derivation):

    m_t = max(f_t + m_{t-1}, i_t),  decay = exp(f_t + m_{t-1} - m_t),  write = exp(i_t - m_t)
    C~_t = decay C~_{t-1} + write k_t v_t^T,   n~_t = decay n~_{t-1} + write k_t
    o_t = C~_t^T q^ / max(|n~_t . q^|, exp(-m_t)),   q^ = scale q_t

The adjoint walks t = T-1 .. 0 with (G, g) = dL/d(C~_t, n~_t) as the reference's
``recurrent_vjp`` does, all m held on their argmax path; which of i_t or f_t + m_{t-1} is the max
is a property of the m sequence alone, so the kernel returns m_t for every t and the path's
contribution (through dht's m part) is added in NumPy afterwards, exactly as in the reference.
The read's normaliser couples all value columns (dz sums over V), so tasks are batch x heads
only (no value blocks). Checkpoints every ~sqrt(T) steps, as in ``_gla``.
"""
from __future__ import annotations

import numba as nb
import numpy as np

from ._common import REDUCTIONS, block_length, contiguous


@nb.njit(inline="always")
def _advance(C, n, m, b, t, h, k, v, ig, fg):
    """(C~, n~) in place from step t-1 to t; returns the new m."""
    K, V = C.shape
    m_new = max(fg[b, t, h] + m, ig[b, t, h])
    decay = np.exp(fg[b, t, h] + m - m_new)
    write = np.exp(ig[b, t, h] - m_new)
    kt, vt = k[b, t, h], v[b, t, h]
    for i in range(K):
        wk = write * kt[i]
        Ci = C[i]
        for j in range(V):
            Ci[j] = decay * Ci[j] + wk * vt[j]
        n[i] = decay * n[i] + wk
    return m_new


@nb.njit(inline="always")
def _denominator(z, m, tiny):
    return max(max(abs(z), np.exp(-m)), tiny)


@nb.njit(parallel=True, cache=True, nogil=True, fastmath=REDUCTIONS)
def mlstm_forward(q, k, v, ig, fg, scale, C0, n0, m0, zero, tiny, o, CT, nT, mT):
    B, T, H, K = q.shape
    V = v.shape[3]
    for task in nb.prange(B * H):
        b, h = task // H, task % H
        C = C0[b, h].copy()
        n = n0[b, h].copy()
        m = m0[b, h]
        num = np.empty(V, dtype=C0.dtype)
        for t in range(T):
            m = _advance(C, n, m, b, t, h, k, v, ig, fg)
            qt = q[b, t, h]
            num[:] = zero
            z = zero
            for i in range(K):
                qi = scale * qt[i]
                z += qi * n[i]
                Ci = C[i]
                for j in range(V):
                    num[j] += qi * Ci[j]
            den = _denominator(z, m, tiny)
            ot = o[b, t, h]
            for j in range(V):
                ot[j] = num[j] / den
        CT[b, h] = C
        nT[b, h] = n
        mT[b, h] = m


@nb.njit(parallel=True, cache=True, nogil=True, fastmath=REDUCTIONS)
def mlstm_backward(q, k, v, ig, fg, scale, C0, n0, m0, do, dC, dn, L, zero, tiny,
                   dq, dk, dv, di, df, M, CT, nT, dC0, dn0):
    """The loop's adjoint with m held on its path (module docstring). Writes dq, dk, dv [..],
    di, df [B, T, H] (without the path term), M [B, T, H] (m_t), the final C~, n~ and the
    cotangents (G, g) of the initial C~, n~."""
    B, T, H, K = q.shape
    V = v.shape[3]
    NB = (T + L - 1) // L
    for task in nb.prange(B * H):
        b, h = task // H, task % H
        ckC = np.empty((NB, K, V), dtype=C0.dtype)
        ckn = np.empty((NB, K), dtype=C0.dtype)
        ckm = np.empty(NB, dtype=C0.dtype)
        C = C0[b, h].copy()
        n = n0[b, h].copy()
        m = m0[b, h]
        for blk in range(NB):
            ckC[blk] = C
            ckn[blk] = n
            ckm[blk] = m
            for t in range(blk * L, min(T, (blk + 1) * L)):
                m = _advance(C, n, m, b, t, h, k, v, ig, fg)
                M[b, t, h] = m
        CT[b, h] = C
        nT[b, h] = n
        G = dC[b, h].copy()
        g = dn[b, h].copy()
        sC = np.empty((L + 1, K, V), dtype=C0.dtype)
        sn = np.empty((L + 1, K), dtype=C0.dtype)
        sm = np.empty(L + 1, dtype=C0.dtype)
        num = np.empty(V, dtype=C0.dtype)
        dnum = np.empty(V, dtype=C0.dtype)
        for blk in range(NB - 1, -1, -1):
            t0 = blk * L
            t1 = min(T, t0 + L)
            sC[0] = ckC[blk]
            sn[0] = ckn[blk]
            sm[0] = ckm[blk]
            for t in range(t0, t1):
                r = t - t0
                sC[r + 1] = sC[r]
                sn[r + 1] = sn[r]
                sm[r + 1] = _advance(sC[r + 1], sn[r + 1], sm[r], b, t, h, k, v, ig, fg)
            for t in range(t1 - 1, t0 - 1, -1):
                r = t - t0
                C_p, n_p, m_p = sC[r], sn[r], sm[r]
                C_t, n_t, m_t = sC[r + 1], sn[r + 1], sm[r + 1]
                qt, kt, vt, dot = q[b, t, h], k[b, t, h], v[b, t, h], do[b, t, h]
                num[:] = zero                                    # the read of step t
                z = zero
                for i in range(K):
                    qi = scale * qt[i]
                    z += qi * n_t[i]
                    Ci = C_t[i]
                    for j in range(V):
                        num[j] += qi * Ci[j]
                den = _denominator(z, m_t, tiny)
                doh = zero                                       # <do, h>
                for j in range(V):
                    doh += dot[j] * (num[j] / den)
                    dnum[j] = dot[j] / den
                floor_sign = (1.0 if z > 0 else (-1.0 if z < 0 else 0.0)) if abs(z) > np.exp(-m_t) else 0.0
                dz = -doh * floor_sign / den
                decay = np.exp(fg[b, t, h] + m_p - m_t)
                write = np.exp(ig[b, t, h] - m_t)
                dvt, dqt, dkt = dv[b, t, h], dq[b, t, h], dk[b, t, h]
                dvt[:] = zero
                di_t = zero
                dfC = zero
                for i in range(K):
                    qi = scale * qt[i]
                    ki = kt[i]
                    Gi, Cti, Cpi = G[i], C_t[i], C_p[i]
                    dq_i = zero
                    dk_i = zero
                    for j in range(V):
                        d = Gi[j] + qi * dnum[j]                 # read of C~_t
                        dq_i += Cti[j] * dnum[j]
                        dk_i += d * vt[j]
                        dvt[j] += ki * d
                        dfC += d * Cpi[j]
                        Gi[j] = decay * d                        # to C~_{t-1}
                    gi = g[i] + dz * qi                          # read of n~_t
                    dqt[i] = scale * (dq_i + dz * n_t[i])
                    dk_w = write * (dk_i + gi)
                    dkt[i] = dk_w
                    di_t += ki * dk_w
                    dfC += gi * n_p[i]
                    g[i] = decay * gi
                for j in range(V):
                    dvt[j] *= write
                di[b, t, h] = di_t
                df[b, t, h] = decay * dfC
        dC0[b, h] = G
        dn0[b, h] = g


def _prepared(q, k, v, i, f, initial_state):
    C0, n0, m0 = initial_state
    return contiguous(q, k, v, i, f, C0, n0, m0)


def recurrent(q, k, v, i, f, *, scale, initial_state):
    q, k, v, i, f, C0, n0, m0 = _prepared(q, k, v, i, f, initial_state)
    dtype = v.dtype
    o = np.empty(v.shape, dtype)
    CT, nT, mT = np.empty_like(C0), np.empty_like(n0), np.empty_like(m0)
    mlstm_forward(q, k, v, i, f, dtype.type(scale), C0, n0, m0, dtype.type(0),
                  dtype.type(np.finfo(dtype).tiny), o, CT, nT, mT)
    return o, (CT, nT, mT)


def recurrent_vjp(q, k, v, i, f, do, dht, *, scale, initial_state):
    q, k, v, i, f, C0, n0, m0 = _prepared(q, k, v, i, f, initial_state)
    dtype = v.dtype
    do, dC, dn = contiguous(do, dht[0], dht[1])
    T = q.shape[1]
    dq, dk, dv = np.empty_like(q), np.empty_like(k), np.empty_like(v)
    di, df, M = np.empty_like(i), np.empty_like(f), np.empty_like(i)
    CT, nT, dC0, dn0 = np.empty_like(C0), np.empty_like(n0), np.empty_like(C0), np.empty_like(n0)
    mlstm_backward(q, k, v, i, f, dtype.type(scale), C0, n0, m0, do, dC, dn, block_length(T),
                   dtype.type(0), dtype.type(np.finfo(dtype).tiny), dq, dk, dv, di, df, M, CT, nT,
                   dC0, dn0)
    # the argmax path of m_T, walking back from T: i_t wins where i_t > f_t + m_{t-1} (ties go to
    # the older term, as in the reference); the path is open at t while no later step's i won
    m_prev = np.concatenate([m0[:, None], M[:, :-1]], axis=1)       # [B, T, H]
    input_wins = i > f + m_prev
    later = np.zeros_like(input_wins)                               # some step after t won
    if T > 1:
        later[:, :-1] = np.logical_or.accumulate(input_wins[:, :0:-1], axis=1)[:, ::-1]
    open_at = ~later
    dm_eff = dht[2] - np.sum(dht[0] * CT, axis=(-2, -1)) - np.sum(dht[1] * nT, axis=-1)   # [B, H]
    di += dm_eff[:, None] * (open_at & input_wins)
    df += dm_eff[:, None] * (open_at & ~input_wins)
    open_path = ~np.any(input_wins, axis=1)                          # [B, H]
    dm0 = np.sum(dC0 * C0, axis=(-2, -1)) + np.sum(dn0 * n0, axis=-1) + dm_eff * open_path
    return {"q": dq, "k": dk, "v": dv, "i": di, "f": df, "initial_state": (dC0, dn0, dm0)}


def step(q, k, v, i, f, *, state, scale):
    o, s = recurrent(q[:, None], k[:, None], v[:, None], i[:, None], f[:, None], scale=scale,
                     initial_state=state)
    return o[:, 0], s


CORES = {"mlstm": {"recurrent": recurrent, "recurrent_vjp": recurrent_vjp, "step": step}}
