"""Numba kernels of the diagonal-plus-low-rank recurrence, and the cores of dplr and rwkv7.

Per batch b and head h (S is K x V, alpha_t = exp(w_t) per key channel):

    x_t = S_{t-1}^T a_t,   S_t = diag(alpha_t) S_{t-1} + b_t x_t^T + k_t v_t^T,   o_t = scale S_t^T q_t

(rwkv7 is this recurrence with q = r.) The adjoint, walking t = T-1 .. 0 with dS = dL/dS_t, is
the reference's (``linrec_ref._dplr.recurrent_vjp``):

    dS += scale q_t do_t^T;   dq_t = scale S_t do_t;   dx = dS^T b_t
    dk_t = dS v_t;   dv_t = dS^T k_t;   db_t = dS x_t;   da_t = S_{t-1} dx
    dw_t = alpha_t * rowsum(dS * S_{t-1});             dS = diag(alpha_t) dS + a_t dx^T

Two passes over S per step in each direction (x and dx are sums over all rows that the second
pass needs). Columns are independent, so value blocks split across threads as in ``_gla``.
"""
from __future__ import annotations

import numba as nb
import numpy as np

from ._common import REDUCTIONS, block_length, contiguous, n_value_blocks, value_block


@nb.njit(inline="always")
def _step(S, x, acc, b, t, h, j0, q, k, v, a, bb, alpha, zero):
    """S_{t-1} -> S_t in place (the block's columns); leaves S_t^T q_t in acc."""
    K, W = S.shape
    qt, kt, at, bt, wt, vt = q[b, t, h], k[b, t, h], a[b, t, h], bb[b, t, h], alpha[b, t, h], v[b, t, h, j0:j0 + W]
    x[:] = zero
    for i in range(K):                                          # x = S_{t-1}^T a
        ai = at[i]
        Si = S[i]
        for j in range(W):
            x[j] += ai * Si[j]
    acc[:] = zero
    for i in range(K):
        al = wt[i]
        bi = bt[i]
        ki = kt[i]
        qi = qt[i]
        Si = S[i]
        for j in range(W):
            s = al * Si[j] + bi * x[j] + ki * vt[j]
            Si[j] = s
            acc[j] += qi * s


@nb.njit(parallel=True, cache=True, nogil=True, fastmath=REDUCTIONS)
def dplr_forward(q, k, v, a, bb, alpha, scale, S0, n_vblocks, zero, o, ST):
    """o [B, T, H, V], ST [B, H, K, V] (written); q, k, a, bb (= b), alpha [B, T, H, K]."""
    B, T, H, K = q.shape
    V = v.shape[3]
    for task in nb.prange(B * H * n_vblocks):
        bh, jb = task // n_vblocks, task % n_vblocks
        b, h = bh // H, bh % H
        j0, j1 = value_block(V, n_vblocks, jb)
        W = j1 - j0
        S = S0[b, h, :, j0:j1].copy()
        x = np.empty(W, dtype=S0.dtype)
        acc = np.empty(W, dtype=S0.dtype)
        for t in range(T):
            _step(S, x, acc, b, t, h, j0, q, k, v, a, bb, alpha, zero)
            ot = o[b, t, h, j0:j1]
            for j in range(W):
                ot[j] = scale * acc[j]
        ST[b, h, :, j0:j1] = S


@nb.njit(parallel=True, cache=True, nogil=True, fastmath=REDUCTIONS)
def dplr_backward(q, k, v, a, bb, alpha, scale, S0, do, dST, n_vblocks, L, zero,
                  dq_part, dk_part, da_part, db_part, dw_part, dv, dS0):
    """The adjoint walk (module docstring): dv, dS0 written; dq, dk, da, db, dw as per-value-
    block partial sums [n_vblocks, B, T, H, K]."""
    B, T, H, K = q.shape
    V = v.shape[3]
    NB = (T + L - 1) // L
    for task in nb.prange(B * H * n_vblocks):
        bh, jb = task // n_vblocks, task % n_vblocks
        b, h = bh // H, bh % H
        j0, j1 = value_block(V, n_vblocks, jb)
        W = j1 - j0
        x = np.empty(W, dtype=S0.dtype)
        dx = np.empty(W, dtype=S0.dtype)
        acc = np.empty(W, dtype=S0.dtype)
        ck = np.empty((NB, K, W), dtype=S0.dtype)
        S = S0[b, h, :, j0:j1].copy()
        for n in range(NB):
            ck[n] = S
            for t in range(n * L, min(T, (n + 1) * L)):
                _step(S, x, acc, b, t, h, j0, q, k, v, a, bb, alpha, zero)
        dS = dST[b, h, :, j0:j1].copy()
        states = np.empty((L + 1, K, W), dtype=S0.dtype)
        for n in range(NB - 1, -1, -1):
            t0 = n * L
            t1 = min(T, t0 + L)
            states[0] = ck[n]
            for t in range(t0, t1):
                states[t - t0 + 1] = states[t - t0]
                _step(states[t - t0 + 1], x, acc, b, t, h, j0, q, k, v, a, bb, alpha, zero)
            for t in range(t1 - 1, t0 - 1, -1):
                S_prev = states[t - t0]
                S_t = states[t - t0 + 1]
                qt, kt, at, bt, wt = q[b, t, h], k[b, t, h], a[b, t, h], bb[b, t, h], alpha[b, t, h]
                vt, dot, dvt = v[b, t, h, j0:j1], do[b, t, h, j0:j1], dv[b, t, h, j0:j1]
                dqt, dkt, dat = dq_part[jb, b, t, h], dk_part[jb, b, t, h], da_part[jb, b, t, h]
                dbt, dwt = db_part[jb, b, t, h], dw_part[jb, b, t, h]
                x[:] = zero
                dx[:] = zero
                dvt[:] = zero
                for i in range(K):                               # pass 1: the read, sums over rows
                    sq = scale * qt[i]
                    ai = at[i]
                    bi = bt[i]
                    ki = kt[i]
                    dq_i = zero
                    dk_i = zero
                    dw_i = zero
                    dSi, Sti, Spi = dS[i], S_t[i], S_prev[i]
                    for j in range(W):
                        g = dSi[j] + sq * dot[j]
                        dSi[j] = g
                        dq_i += Sti[j] * dot[j]
                        x[j] += ai * Spi[j]
                        dx[j] += bi * g
                        dk_i += g * vt[j]
                        dvt[j] += ki * g
                        dw_i += g * Spi[j]
                    dqt[i] = scale * dq_i
                    dkt[i] = dk_i
                    dwt[i] = wt[i] * dw_i
                for i in range(K):                               # pass 2: needs x and dx
                    al = wt[i]
                    ai = at[i]
                    db_i = zero
                    da_i = zero
                    dSi, Spi = dS[i], S_prev[i]
                    for j in range(W):
                        db_i += dSi[j] * x[j]
                        da_i += Spi[j] * dx[j]
                        dSi[j] = al * dSi[j] + ai * dx[j]        # to dL/dS_{t-1}
                    dbt[i] = db_i
                    dat[i] = da_i
        dS0[b, h, :, j0:j1] = dS


def forward(q, k, v, a, b, w, scale, S0):
    B, T, H, K = q.shape
    dtype = v.dtype
    q, k, v, a, b, S0 = contiguous(q, k, v, a, b, S0)
    o = np.empty(v.shape, dtype)
    ST = np.empty(S0.shape, dtype)
    dplr_forward(q, k, v, a, b, np.exp(w), dtype.type(scale), S0, n_value_blocks(B * H, v.shape[3]),
                 dtype.type(0), o, ST)
    return o, ST


def backward(q, k, v, a, b, w, scale, S0, do, dST):
    B, T, H, K = q.shape
    dtype = v.dtype
    q, k, v, a, b, S0, do, dST = contiguous(q, k, v, a, b, S0, do, dST)
    nvb = n_value_blocks(B * H, v.shape[3])
    parts = [np.empty((nvb,) + q.shape, dtype) for _ in range(5)]
    dv = np.empty(v.shape, dtype)
    dS0 = np.empty(S0.shape, dtype)
    dplr_backward(q, k, v, a, b, np.exp(w), dtype.type(scale), S0, do, dST, nvb, block_length(T),
                  dtype.type(0), *parts, dv, dS0)
    dq, dk, da, db, dw = (p[0] if nvb == 1 else p.sum(0) for p in parts)
    return {"q": dq, "k": dk, "v": dv, "a": da, "b": db, "w": dw, "initial_state": dS0}


def dplr_recurrent(q, k, v, a, b, w, *, scale, initial_state):
    return forward(q, k, v, a, b, w, scale, initial_state)


def dplr_recurrent_vjp(q, k, v, a, b, w, do, dht, *, scale, initial_state):
    return backward(q, k, v, a, b, w, scale, initial_state, do, dht)


def dplr_step(q, k, v, a, b, w, *, state, scale):
    o, S = forward(q[:, None], k[:, None], v[:, None], a[:, None], b[:, None], w[:, None], scale, state)
    return o[:, 0], S


def rwkv7_recurrent(r, w, k, v, a, b, *, scale, initial_state):
    return forward(r, k, v, a, b, w, scale, initial_state)


def rwkv7_recurrent_vjp(r, w, k, v, a, b, do, dht, *, scale, initial_state):
    grads = backward(r, k, v, a, b, w, scale, initial_state, do, dht)
    grads["r"] = grads.pop("q")
    return grads


def rwkv7_step(r, w, k, v, a, b, *, state, scale):
    return dplr_step(r, k, v, a, b, w, state=state, scale=scale)


CORES = {
    "dplr": {"recurrent": dplr_recurrent, "recurrent_vjp": dplr_recurrent_vjp, "step": dplr_step},
    "rwkv7": {"recurrent": rwkv7_recurrent, "recurrent_vjp": rwkv7_recurrent_vjp, "step": rwkv7_step},
}
