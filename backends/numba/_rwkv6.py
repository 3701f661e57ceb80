"""Numba kernels of rwkv6's time mixing, and its recurrent cores.

Per batch b and head h (S is K x V, a_t = exp(w_t) per key channel):

    o_t = scale [S_{t-1}^T r_t + (r_t . (u * k_t)) v_t],     S_t = diag(a_t) S_{t-1} + k_t v_t^T

The read comes before the update; the bonus term and its gradients are the reference's own
functions (``linrec_ref.ops.rwkv6._bonus`` / ``_bonus_vjp``, plain NumPy). The adjoint of the
loop, walking t = T-1 .. 0 with dS = dL/dS_t (dS_T = dht), adds to them:

    dk_t += dS v_t,   dv_t += dS^T k_t,   dw_t = a_t * rowsum(dS * S_{t-1})
    dr_t += scale S_{t-1} do_t,           dS = diag(a_t) dS + scale r_t do_t^T

in one pass over dS per step. Layout, value blocks and checkpoints as in ``_gla``.
"""
from __future__ import annotations

import numba as nb
import numpy as np

from linrec_ref.ops import rwkv6 as np_rwkv6

from ._common import REDUCTIONS, block_length, contiguous, n_value_blocks, value_block


@nb.njit(inline="always")
def _advance(S, b, t, h, j0, k, v, ak):
    K, W = S.shape
    kt, at, vt = k[b, t, h], ak[b, t, h], v[b, t, h, j0:j0 + W]
    for i in range(K):
        a = at[i]
        ki = kt[i]
        Si = S[i]
        for j in range(W):
            Si[j] = a * Si[j] + ki * vt[j]


@nb.njit(parallel=True, cache=True, nogil=True, fastmath=REDUCTIONS)
def rwkv6_forward(r, k, v, ak, bonus, scale, S0, n_vblocks, zero, o, ST):
    """o [B, T, H, V], ST [B, H, K, V] (written); ak = exp(w) [B, T, H, K]; bonus [B, T, H]."""
    B, T, H, K = r.shape
    V = v.shape[3]
    for task in nb.prange(B * H * n_vblocks):
        bh, jb = task // n_vblocks, task % n_vblocks
        b, h = bh // H, bh % H
        j0, j1 = value_block(V, n_vblocks, jb)
        W = j1 - j0
        S = S0[b, h, :, j0:j1].copy()
        acc = np.empty(W, dtype=S0.dtype)
        for t in range(T):
            rt, kt, at, vt = r[b, t, h], k[b, t, h], ak[b, t, h], v[b, t, h, j0:j1]
            acc[:] = zero
            for i in range(K):                                   # read S_{t-1}, then update
                a = at[i]
                ki = kt[i]
                ri = rt[i]
                Si = S[i]
                for j in range(W):
                    s = Si[j]
                    acc[j] += ri * s
                    Si[j] = a * s + ki * vt[j]
            ot = o[b, t, h, j0:j1]
            bt = bonus[b, t, h]
            for j in range(W):
                ot[j] = scale * (acc[j] + bt * vt[j])
        ST[b, h, :, j0:j1] = S


@nb.njit(parallel=True, cache=True, nogil=True, fastmath=REDUCTIONS)
def rwkv6_backward(r, k, v, ak, scale, S0, do, dST, n_vblocks, L, zero,
                   dr_part, dk_part, dw_part, dv, dS0):
    """The loop's part of the adjoint (module docstring): dv (written, add the bonus part),
    dS0, and per-value-block partial sums dr_part, dk_part, dw_part [n_vblocks, B, T, H, K]."""
    B, T, H, K = r.shape
    V = v.shape[3]
    NB = (T + L - 1) // L
    for task in nb.prange(B * H * n_vblocks):
        bh, jb = task // n_vblocks, task % n_vblocks
        b, h = bh // H, bh % H
        j0, j1 = value_block(V, n_vblocks, jb)
        W = j1 - j0
        ck = np.empty((NB, K, W), dtype=S0.dtype)
        S = S0[b, h, :, j0:j1].copy()
        for n in range(NB):
            ck[n] = S
            for t in range(n * L, min(T, (n + 1) * L)):
                _advance(S, b, t, h, j0, k, v, ak)
        dS = dST[b, h, :, j0:j1].copy()
        states = np.empty((L + 1, K, W), dtype=S0.dtype)
        for n in range(NB - 1, -1, -1):
            t0 = n * L
            t1 = min(T, t0 + L)
            states[0] = ck[n]
            for t in range(t0, t1):
                states[t - t0 + 1] = states[t - t0]
                _advance(states[t - t0 + 1], b, t, h, j0, k, v, ak)
            for t in range(t1 - 1, t0 - 1, -1):
                S_prev = states[t - t0]
                rt, kt, at = r[b, t, h], k[b, t, h], ak[b, t, h]
                vt, dot, dvt = v[b, t, h, j0:j1], do[b, t, h, j0:j1], dv[b, t, h, j0:j1]
                drt, dkt, dwt = dr_part[jb, b, t, h], dk_part[jb, b, t, h], dw_part[jb, b, t, h]
                dvt[:] = zero
                for i in range(K):
                    a = at[i]
                    ki = kt[i]
                    sr = scale * rt[i]
                    dk_i = zero
                    dw_i = zero
                    dr_i = zero
                    dSi, Spi = dS[i], S_prev[i]
                    for j in range(W):
                        g = dSi[j]                               # dL/dS_t
                        dk_i += g * vt[j]
                        dvt[j] += ki * g
                        dw_i += g * Spi[j]
                        dr_i += Spi[j] * dot[j]
                        dSi[j] = a * g + sr * dot[j]             # dL/dS_{t-1}
                    dkt[i] = dk_i
                    dwt[i] = a * dw_i
                    drt[i] = scale * dr_i
        dS0[b, h, :, j0:j1] = dS


def recurrent(r, k, v, w, u, *, scale, initial_state):
    B, T, H, K = r.shape
    dtype = v.dtype
    r, k, v, S0 = contiguous(r, k, v, initial_state)
    bonus = np.ascontiguousarray(np_rwkv6._bonus(r, k, u))
    o = np.empty(v.shape, dtype)
    ST = np.empty(S0.shape, dtype)
    rwkv6_forward(r, k, v, np.exp(w), bonus, dtype.type(scale), S0, n_value_blocks(B * H, v.shape[3]),
                  dtype.type(0), o, ST)
    return o, ST


def recurrent_vjp(r, k, v, w, u, do, dht, *, scale, initial_state):
    B, T, H, K = r.shape
    dtype = v.dtype
    r, k, v, S0, do, dht = contiguous(r, k, v, initial_state, do, dht)
    dr, dk, dv_bonus, du = np_rwkv6._bonus_vjp(r, k, v, u, do, scale)
    nvb = n_value_blocks(B * H, v.shape[3])
    parts = [np.empty((nvb,) + r.shape, dtype) for _ in range(3)]
    dv = np.empty(v.shape, dtype)
    dS0 = np.empty(S0.shape, dtype)
    rwkv6_backward(r, k, v, np.exp(w), dtype.type(scale), S0, do, dht, nvb, block_length(T),
                   dtype.type(0), *parts, dv, dS0)
    dr_loop, dk_loop, dw = (p[0] if nvb == 1 else p.sum(0) for p in parts)
    return {"r": dr + dr_loop, "k": dk + dk_loop, "v": dv_bonus + dv, "w": dw, "u": du,
            "initial_state": dS0}


def step(r, k, v, w, u, *, state, scale):
    o, S = recurrent(r[:, None], k[:, None], v[:, None], w[:, None], u, scale=scale, initial_state=state)
    return o[:, 0], S


CORES = {"rwkv6": {"recurrent": recurrent, "recurrent_vjp": recurrent_vjp, "step": step}}
