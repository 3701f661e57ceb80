"""Numba kernels of the diagonally gated outer-product recurrence, and the op cores built on it.

The recurrence (per batch b and head h; S is K x V):

    S_t = diag(exp(gk_t)) S_{t-1} diag(exp(gv_t)) + k_t v_t^T,      o_t = scale S_t^T q_t

covers linear_attention (gk = gv = 0), retnet (gk_t[i] = g[h]), simple_gla (gk_t[i] = g_t),
and gla (gk_t = g_t per key channel, optional gv_t per value channel). Its adjoint, walking
t = T-1 .. 0 with dS = dL/dS_t (dS_T = dht), is the reference's ``recurrent_vjp``:

    dS    += scale q_t do_t^T
    dq_t   = scale S_t do_t,      dk_t = dS v_t,      dv_t = dS^T k_t
    P      = diag(a_t) S_{t-1} diag(b_t)              (a = exp(gk), b = exp(gv))
    dgk_t  = rowsum(dS * P),      dgv_t = colsum(dS * P)
    dS     = diag(a_t) dS diag(b_t)                    (now dL/dS_{t-1}; dS_0 is dh0)

Kernel layout: one task per (b, h, value block); the columns j of S are independent in both
directions (every update is columnwise, only the sums over j in dq, dk and dgk couple them), so
when B*H is smaller than the thread count the V axis is split into ``n_vblocks`` blocks and
those three gradients are summed over blocks afterwards. The state lives in a local K x W array;
the backward keeps checkpoints of it every L steps and recomputes one block of L states at a
time: O((T/L + L) K W) memory per task, L ~ sqrt(T), like ``linrec_ref._scan.reverse_steps``.
"""
from __future__ import annotations

import numba as nb
import numpy as np

from linrec_ref.ops import linear_attention as np_linear_attention
from linrec_ref.ops import retnet as np_retnet

from ._common import REDUCTIONS, block_length, contiguous, decays, n_value_blocks, value_block

# ------------------------------------------------------------------------------ kernels
# Inner loops run over 1-D row views (S[i], v[b, t, h, j0:j1], ...): indexing the 4-D arrays
# directly in the innermost loop measured 3-4x slower (it keeps LLVM from vectorising).
@nb.njit(inline="always")
def _value_gates(bv, bk, use_gv, b, t, h, j0):
    """bv <- b_t = exp(gv_t) on the block's columns (left at 1 without gv)."""
    if use_gv:
        bt = bk[b, t, h, j0:j0 + bv.shape[0]]
        for j in range(bv.shape[0]):
            bv[j] = bt[j]


@nb.njit(inline="always")
def _advance(S, bv, b, t, h, j0, k, v, ak):
    """S <- diag(a_t) S diag(b_t) + k_t v_t^T in place (the block's columns j0..; bv = b_t)."""
    K, W = S.shape
    kt, at, vt = k[b, t, h], ak[b, t, h], v[b, t, h, j0:j0 + W]
    last = at.shape[0] - 1                                      # 0 for one gate per head
    for i in range(K):
        a = at[min(i, last)]
        ki = kt[i]
        Si = S[i]
        for j in range(W):
            Si[j] = a * Si[j] * bv[j] + ki * vt[j]


@nb.njit(parallel=True, cache=True, nogil=True, fastmath=REDUCTIONS)
def gated_forward(q, k, v, ak, scale, S0, n_vblocks, zero, o, ST):
    """o [B, T, H, V] and ST [B, H, K, V] (written) from q, k, the decays ak = exp(gk)
    [B, T, H, K] or [B, T, H, 1] (one per head: row i reads ak[..., min(i, last)]), v and S0
    [B, H, K, V], without a value gate (gated_forward_gv has one).

    Four rows of S per pass over the columns: acc (S^T q) is read and written a quarter as
    often, measured 1.25-1.5x faster than one row at a time at K = V = 64. The loop is written
    out: through a helper, or with a branch or a value-gate factor in it, most of that was lost."""
    B, T, H, K = q.shape
    V = v.shape[3]
    for task in nb.prange(B * H * n_vblocks):
        bh, jb = task // n_vblocks, task % n_vblocks   # (divmod does not type in prange)
        b, h = bh // H, bh % H
        j0, j1 = value_block(V, n_vblocks, jb)
        W = j1 - j0
        S = S0[b, h, :, j0:j1].copy()                           # [K, W] the block's columns
        acc = np.empty(W, dtype=S0.dtype)                        # S_t^T q_t
        last = ak.shape[3] - 1
        for t in range(T):
            qt, kt, at, vt = q[b, t, h], k[b, t, h], ak[b, t, h], v[b, t, h, j0:j1]
            acc[:] = zero
            i = 0
            while i + 4 <= K:
                a0 = at[min(i, last)]
                a1 = at[min(i + 1, last)]
                a2 = at[min(i + 2, last)]
                a3 = at[min(i + 3, last)]
                k0 = kt[i]
                k1 = kt[i + 1]
                k2 = kt[i + 2]
                k3 = kt[i + 3]
                q0 = qt[i]
                q1 = qt[i + 1]
                q2 = qt[i + 2]
                q3 = qt[i + 3]
                R0 = S[i]
                R1 = S[i + 1]
                R2 = S[i + 2]
                R3 = S[i + 3]
                for j in range(W):
                    vj = vt[j]
                    s0 = a0 * R0[j] + k0 * vj
                    s1 = a1 * R1[j] + k1 * vj
                    s2 = a2 * R2[j] + k2 * vj
                    s3 = a3 * R3[j] + k3 * vj
                    R0[j] = s0
                    R1[j] = s1
                    R2[j] = s2
                    R3[j] = s3
                    acc[j] += (q0 * s0 + q1 * s1) + (q2 * s2 + q3 * s3)
                i += 4
            while i < K:                                         # the K % 4 rows left
                a0 = at[min(i, last)]
                k0 = kt[i]
                q0 = qt[i]
                R0 = S[i]
                for j in range(W):
                    s0 = a0 * R0[j] + k0 * vt[j]
                    R0[j] = s0
                    acc[j] += q0 * s0
                i += 1
            ot = o[b, t, h, j0:j1]
            for j in range(W):
                ot[j] = scale * acc[j]
        ST[b, h, :, j0:j1] = S


@nb.njit(parallel=True, cache=True, nogil=True, fastmath=REDUCTIONS)
def gated_forward_gv(q, k, v, ak, bk, scale, S0, n_vblocks, zero, o, ST):
    """gated_forward with a value gate: bk = exp(gv) [B, T, H, V]; one row at a time."""
    B, T, H, K = q.shape
    V = v.shape[3]
    for task in nb.prange(B * H * n_vblocks):
        bh, jb = task // n_vblocks, task % n_vblocks
        b, h = bh // H, bh % H
        j0, j1 = value_block(V, n_vblocks, jb)
        W = j1 - j0
        S = S0[b, h, :, j0:j1].copy()
        bv = np.ones(W, dtype=S0.dtype)
        acc = np.empty(W, dtype=S0.dtype)
        last = ak.shape[3] - 1
        for t in range(T):
            _value_gates(bv, bk, True, b, t, h, j0)
            qt, kt, at, vt = q[b, t, h], k[b, t, h], ak[b, t, h], v[b, t, h, j0:j1]
            acc[:] = zero
            for i in range(K):
                a = at[min(i, last)]
                ki = kt[i]
                qi = qt[i]
                Si = S[i]
                for j in range(W):
                    s = a * Si[j] * bv[j] + ki * vt[j]
                    Si[j] = s
                    acc[j] += qi * s
            ot = o[b, t, h, j0:j1]
            for j in range(W):
                ot[j] = scale * acc[j]
        ST[b, h, :, j0:j1] = S


@nb.njit(parallel=True, cache=True, nogil=True, fastmath=REDUCTIONS)
def gated_backward(q, k, v, ak, bk, use_gv, scale, S0, do, dST, n_vblocks, L, zero,
                   dq_part, dk_part, dgk_part, dv, dgv, dS0):
    """The adjoint walk (module docstring). Writes dv, dgv (when use_gv), dS0 and the per-value-
    block partial sums dq_part, dk_part [n_vblocks, B, T, H, K] and dgk_part [n_vblocks, B, T,
    H, Kg] (Kg = ak's last axis: K, or 1 with one gate per head, whose rows' sums it adds up).
    zero: 0 in the inputs' dtype (sums are accumulated in it, as the reference does)."""
    B, T, H, K = q.shape
    V = v.shape[3]
    NB = (T + L - 1) // L                                       # checkpoint blocks
    for task in nb.prange(B * H * n_vblocks):
        bh, jb = task // n_vblocks, task % n_vblocks
        b, h = bh // H, bh % H
        j0, j1 = value_block(V, n_vblocks, jb)
        W = j1 - j0
        # forward: S at the start of every block of L steps
        ck = np.empty((NB, K, W), dtype=S0.dtype)
        S = S0[b, h, :, j0:j1].copy()
        bv = np.ones(W, dtype=S0.dtype)
        for n in range(NB):
            ck[n] = S
            for t in range(n * L, min(T, (n + 1) * L)):
                _value_gates(bv, bk, use_gv, b, t, h, j0)
                _advance(S, bv, b, t, h, j0, k, v, ak)
        # backward, one block at a time: recompute its states, then walk it in reverse
        dS = dST[b, h, :, j0:j1].copy()
        states = np.empty((L + 1, K, W), dtype=S0.dtype)         # S_{t0-1}, S_{t0}, ..
        scratch = np.empty(W, dtype=S0.dtype)
        for n in range(NB - 1, -1, -1):
            t0 = n * L
            t1 = min(T, t0 + L)
            states[0] = ck[n]
            for t in range(t0, t1):
                states[t - t0 + 1] = states[t - t0]
                _value_gates(bv, bk, use_gv, b, t, h, j0)
                _advance(states[t - t0 + 1], bv, b, t, h, j0, k, v, ak)
            for t in range(t1 - 1, t0 - 1, -1):
                S_prev = states[t - t0]
                S_t = states[t - t0 + 1]
                _value_gates(bv, bk, use_gv, b, t, h, j0)
                qt, kt, at = q[b, t, h], k[b, t, h], ak[b, t, h]
                vt, dot = v[b, t, h, j0:j1], do[b, t, h, j0:j1]
                dvt = dv[b, t, h, j0:j1]
                # dgv_t, or a scratch row without gv: no branch in the inner loop (it kept LLVM
                # from vectorising it)
                dgvt = dgv[b, t, h, j0:j1] if use_gv else scratch
                dgvt[:] = zero
                dqt, dkt, dgt = dq_part[jb, b, t, h], dk_part[jb, b, t, h], dgk_part[jb, b, t, h]
                dvt[:] = zero
                dgt[:] = zero
                last = at.shape[0] - 1
                for i in range(K):                               # one pass over dS per step
                    a = at[min(i, last)]
                    sq = scale * qt[i]
                    ki = kt[i]
                    dq_i = zero
                    dk_i = zero
                    dg_i = zero
                    dSi, Sti, Spi = dS[i], S_t[i], S_prev[i]
                    for j in range(W):
                        d = dSi[j] + sq * dot[j]                 # dS after the read of S_t
                        dq_i += Sti[j] * dot[j]
                        dk_i += d * vt[j]
                        dvt[j] += ki * d                         # dv_t = dS^T k_t
                        dSP = d * (a * Spi[j] * bv[j])
                        dg_i += dSP
                        dgvt[j] += dSP
                        dSi[j] = a * d * bv[j]                   # to dL/dS_{t-1}
                    dqt[i] = scale * dq_i
                    dkt[i] = dk_i
                    dgt[min(i, last)] += dg_i
        dS0[b, h, :, j0:j1] = dS


# ------------------------------------------------------------------------------ drivers
def _decays(gk, gv, q_shape, v_shape, dtype):
    """(a = exp(gk) (decays), b = exp(gv) [B, T, H, V] or a stand-in, whether gv is given)."""
    ak = decays(gk, q_shape)
    if gv is None:
        return ak, np.ones((1, 1, 1, 1), dtype), False
    return ak, np.exp(np.broadcast_to(gv, v_shape)), True


def forward(q, k, v, gk, gv, scale, S0):
    """(o, S_T) of the recurrence; gk broadcastable to q's shape, gv to v's or None."""
    B, T, H, K = q.shape
    dtype = v.dtype
    q, k, v, S0 = contiguous(q, k, v, S0)
    ak, bk, use_gv = _decays(gk, gv, q.shape, v.shape, dtype)
    nvb = n_value_blocks(B * H, v.shape[3])
    o = np.empty(v.shape, dtype)
    ST = np.empty(S0.shape, dtype)
    if use_gv:
        gated_forward_gv(q, k, v, ak, bk, dtype.type(scale), S0, nvb, dtype.type(0), o, ST)
    else:
        gated_forward(q, k, v, ak, dtype.type(scale), S0, nvb, dtype.type(0), o, ST)
    return o, ST


def backward(q, k, v, gk, gv, scale, S0, do, dST):
    """Gradients (dq, dk, dv, dgk [B, T, H, Kg] (gk's last axis), dgv or None, dS0)."""
    B, T, H, K = q.shape
    dtype = v.dtype
    q, k, v, S0, do, dST = contiguous(q, k, v, S0, do, dST)
    ak, bk, use_gv = _decays(gk, gv, q.shape, v.shape, dtype)
    nvb = n_value_blocks(B * H, v.shape[3])
    parts = [np.empty((nvb,) + q.shape, dtype) for _ in range(2)] + [np.empty((nvb,) + ak.shape, dtype)]
    dv = np.empty(v.shape, dtype)
    dgv = np.empty(v.shape, dtype) if use_gv else np.zeros((1, 1, 1, 1), dtype)
    dS0 = np.empty(S0.shape, dtype)
    gated_backward(q, k, v, ak, bk, use_gv, dtype.type(scale), S0, do, dST, nvb,
                   block_length(T), dtype.type(0), *parts, dv, dgv, dS0)
    dq, dk, dgk = (p[0] if nvb == 1 else p.sum(0) for p in parts)
    return dq, dk, dv, dgk, (dgv if use_gv else None), dS0


# ------------------------------------------------------------------------------ op cores
# The dense cores the validation layer wraps (same names and keywords as the NumPy cores).
def la_recurrent(q, k, v, *, scale, initial_state, normalize):
    if normalize:     # the normalised variant keeps the NumPy loop (a second state, a division)
        return np_linear_attention.recurrent.core(q, k, v, scale=scale, initial_state=initial_state,
                                                  normalize=normalize)
    return forward(q, k, v, np.zeros((1, 1, 1, 1), q.dtype), None, scale, initial_state)


def la_recurrent_vjp(q, k, v, do, dht, *, scale, initial_state, normalize):
    if normalize:
        return np_linear_attention.recurrent_vjp.core(q, k, v, do=do, dht=dht, scale=scale,
                                                      initial_state=initial_state, normalize=normalize)
    dq, dk, dv, _, _, dS0 = backward(q, k, v, np.zeros((1, 1, 1, 1), q.dtype), None, scale,
                                     initial_state, do, dht)
    return {"q": dq, "k": dk, "v": dv, "initial_state": dS0}


def _retnet_gate(g, q):
    return np_retnet._log_decay(g, q)[None, None, :, None]              # [1, 1, H, 1]


def retnet_recurrent(q, k, v, g, *, scale, initial_state):
    return forward(q, k, v, _retnet_gate(g, q), None, scale, initial_state)


def retnet_recurrent_vjp(q, k, v, g, do, dht, *, scale, initial_state):
    dq, dk, dv, dgk, _, dS0 = backward(q, k, v, _retnet_gate(g, q), None, scale, initial_state, do, dht)
    return {"q": dq, "k": dk, "v": dv, "g": dgk.sum(axis=(0, 1, 3)), "initial_state": dS0}


def simple_gla_recurrent(q, k, v, g, *, scale, initial_state):
    return forward(q, k, v, g[..., None], None, scale, initial_state)


def simple_gla_recurrent_vjp(q, k, v, g, do, dht, *, scale, initial_state):
    dq, dk, dv, dgk, _, dS0 = backward(q, k, v, g[..., None], None, scale, initial_state, do, dht)
    return {"q": dq, "k": dk, "v": dv, "g": dgk[..., 0], "initial_state": dS0}


def gla_recurrent(q, k, v, g, gv, *, scale, initial_state):
    return forward(q, k, v, g, gv, scale, initial_state)


def gla_recurrent_vjp(q, k, v, g, gv, do, dht, *, scale, initial_state):
    dq, dk, dv, dg, dgv, dS0 = backward(q, k, v, g, gv, scale, initial_state, do, dht)
    return {"q": dq, "k": dk, "v": dv, "g": dg, "gv": dgv, "initial_state": dS0}


def _token(x):
    """A step's [B, ...] input as a one-token sequence [B, 1, ...] (None stays None)."""
    return None if x is None else x[:, None]


def la_step(q, k, v, *, state, scale, normalize):
    if normalize:
        return np_linear_attention.step.core(q, k, v, state=state, scale=scale, normalize=normalize)
    o, S = la_recurrent(_token(q), _token(k), _token(v), scale=scale, initial_state=state,
                        normalize=normalize)
    return o[:, 0], S


def retnet_step(q, k, v, g, *, state, scale):
    o, S = retnet_recurrent(_token(q), _token(k), _token(v), g, scale=scale, initial_state=state)
    return o[:, 0], S


def simple_gla_step(q, k, v, g, *, state, scale):
    o, S = simple_gla_recurrent(_token(q), _token(k), _token(v), _token(g), scale=scale,
                                initial_state=state)
    return o[:, 0], S


def gla_step(q, k, v, g, gv, *, state, scale):
    o, S = gla_recurrent(_token(q), _token(k), _token(v), _token(g), _token(gv), scale=scale,
                         initial_state=state)
    return o[:, 0], S


CORES = {
    "linear_attention": {"recurrent": la_recurrent, "recurrent_vjp": la_recurrent_vjp, "step": la_step},
    "retnet": {"recurrent": retnet_recurrent, "recurrent_vjp": retnet_recurrent_vjp, "step": retnet_step},
    "simple_gla": {"recurrent": simple_gla_recurrent, "recurrent_vjp": simple_gla_recurrent_vjp,
                   "step": simple_gla_step},
    "gla": {"recurrent": gla_recurrent, "recurrent_vjp": gla_recurrent_vjp, "step": gla_step},
}
