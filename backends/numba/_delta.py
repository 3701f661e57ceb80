"""Numba kernels of the gated delta rule, and the cores of delta_rule, gated_delta_rule and kda.

The recurrence on mapped inputs (q, k after the optional l2 norm, beta after its activation;
per batch b and head h; S is K x V; a_t = exp(gk_t) per key channel):

    S'_t = diag(a_t) S_{t-1},   r_t = S'_t^T k_t,   delta_t = beta_t (v_t - r_t)
    S_t  = S'_t + k_t delta_t^T,                    o_t = scale S_t^T q_t

gated_delta_rule has one gate per head (gk_t[i] = g_t), kda one per key channel, delta_rule none
(gk = 0, exp(0) = 1 exactly). The adjoint, walking t = T-1 .. 0 with dS = dL/dS_t, is the
reference's ``recurrence_vjp`` (linrec_ref.ops.gated_delta_rule):

    dS     += scale q_t do_t^T;        dq_t = scale S_t do_t
    ddelta  = dS^T k_t;                dr = -beta_t ddelta
    dbeta_t = ddelta . (v_t - r_t);    dv_t = beta_t ddelta
    dk_t    = dS delta_t + S'_t dr
    dS'     = dS + k_t dr^T;           dgk_t = rowsum(dS' * S'_t);    dS = diag(a_t) dS'

Every update is columnwise in S, so the value axis splits into blocks across threads as in
``_gla``; dq, dk, dgk and dbeta (sums over columns) are summed over blocks afterwards. The
backward recomputes states from checkpoints every L ~ sqrt(T) steps.
"""
from __future__ import annotations

import numba as nb
import numpy as np

from linrec_ref.ops import gated_delta_rule as np_gdr
from linrec_ref.ops import kda as np_kda
from linrec_ref.ops.delta_rule import SPEC as DELTA_RULE_SPEC

from ._common import block_length, contiguous, full, n_value_blocks, value_block


# ------------------------------------------------------------------------------ kernels
@nb.njit(inline="always")
def _step(S, r, d, b, t, h, j0, q, k, v, gk, beta, zero):
    """S_{t-1} -> S_t in place on the block's columns; returns nothing, leaves S_t^T q_t in r."""
    K, W = S.shape
    r[:] = zero
    for i in range(K):                                          # S' = diag(a) S, r = S'^T k
        a = np.exp(gk[b, t, h, i])
        ki = k[b, t, h, i]
        for j in range(W):
            s = a * S[i, j]
            S[i, j] = s
            r[j] += ki * s
    bt = beta[b, t, h]
    for j in range(W):                                          # delta = beta (v - r)
        d[j] = bt * (v[b, t, h, j0 + j] - r[j])
    r[:] = zero
    for i in range(K):                                          # S = S' + k delta^T, read q
        ki = k[b, t, h, i]
        qi = q[b, t, h, i]
        for j in range(W):
            s = S[i, j] + ki * d[j]
            S[i, j] = s
            r[j] += qi * s


@nb.njit(parallel=True, cache=True, nogil=True)
def delta_forward(q, k, v, gk, beta, scale, S0, n_vblocks, zero, o, ST):
    """o [B, T, H, V] and ST [B, H, K, V] (written); gk [B, T, H, K], beta [B, T, H]."""
    B, T, H, K = q.shape
    V = v.shape[3]
    for task in nb.prange(B * H * n_vblocks):
        bh, jb = task // n_vblocks, task % n_vblocks   # (divmod does not type in prange)
        b, h = bh // H, bh % H
        j0, j1 = value_block(V, n_vblocks, jb)
        W = j1 - j0
        S = np.empty((K, W), dtype=S0.dtype)
        for i in range(K):
            for j in range(W):
                S[i, j] = S0[b, h, i, j0 + j]
        r = np.empty(W, dtype=S0.dtype)
        d = np.empty(W, dtype=S0.dtype)
        for t in range(T):
            _step(S, r, d, b, t, h, j0, q, k, v, gk, beta, zero)
            for j in range(W):
                o[b, t, h, j0 + j] = scale * r[j]
        for i in range(K):
            for j in range(W):
                ST[b, h, i, j0 + j] = S[i, j]


@nb.njit(parallel=True, cache=True, nogil=True)
def delta_backward(q, k, v, gk, beta, scale, S0, do, dST, n_vblocks, L, zero,
                   dq_part, dk_part, dgk_part, dbeta_part, dv, dS0):
    """The adjoint walk (module docstring). Writes dv, dS0 and the per-value-block partial sums
    dq_part, dk_part, dgk_part [n_vblocks, B, T, H, K] and dbeta_part [n_vblocks, B, T, H]."""
    B, T, H, K = q.shape
    V = v.shape[3]
    NB = (T + L - 1) // L
    for task in nb.prange(B * H * n_vblocks):
        bh, jb = task // n_vblocks, task % n_vblocks   # (divmod does not type in prange)
        b, h = bh // H, bh % H
        j0, j1 = value_block(V, n_vblocks, jb)
        W = j1 - j0
        r = np.empty(W, dtype=S0.dtype)
        d = np.empty(W, dtype=S0.dtype)
        ck = np.empty((NB, K, W), dtype=S0.dtype)              # S at the start of each block
        S = np.empty((K, W), dtype=S0.dtype)
        for i in range(K):
            for j in range(W):
                S[i, j] = S0[b, h, i, j0 + j]
        for n in range(NB):
            ck[n] = S
            for t in range(n * L, min(T, (n + 1) * L)):
                _step(S, r, d, b, t, h, j0, q, k, v, gk, beta, zero)
        dS = np.empty((K, W), dtype=S0.dtype)
        for i in range(K):
            for j in range(W):
                dS[i, j] = dST[b, h, i, j0 + j]
        states = np.empty((L + 1, K, W), dtype=S0.dtype)
        resid = np.empty(W, dtype=S0.dtype)
        ddelta = np.empty(W, dtype=S0.dtype)
        for n in range(NB - 1, -1, -1):
            t0 = n * L
            t1 = min(T, t0 + L)
            states[0] = ck[n]
            for t in range(t0, t1):
                states[t - t0 + 1] = states[t - t0]
                _step(states[t - t0 + 1], r, d, b, t, h, j0, q, k, v, gk, beta, zero)
            for t in range(t1 - 1, t0 - 1, -1):
                S_prev = states[t - t0]
                S_t = states[t - t0 + 1]
                bt = beta[b, t, h]
                r[:] = zero                                     # r = S'^T k
                ddelta[:] = zero                                # dS^T k (dS after the read)
                for i in range(K):
                    a = np.exp(gk[b, t, h, i])
                    ki = k[b, t, h, i]
                    sq = scale * q[b, t, h, i]
                    dq_i = zero
                    for j in range(W):
                        g = dS[i, j] + sq * do[b, t, h, j0 + j]   # read of S_t
                        dS[i, j] = g
                        dq_i += S_t[i, j] * do[b, t, h, j0 + j]
                        r[j] += ki * (a * S_prev[i, j])
                        ddelta[j] += ki * g
                    dq_part[jb, b, t, h, i] = scale * dq_i
                dbeta = zero
                for j in range(W):
                    resid[j] = v[b, t, h, j0 + j] - r[j]
                    d[j] = bt * resid[j]                         # delta
                    dbeta += ddelta[j] * resid[j]
                    dv[b, t, h, j0 + j] = bt * ddelta[j]
                    ddelta[j] = -bt * ddelta[j]                  # now dr
                dbeta_part[jb, b, t, h] = dbeta
                for i in range(K):
                    a = np.exp(gk[b, t, h, i])
                    ki = k[b, t, h, i]
                    dk_write = zero                              # dS delta
                    dk_read = zero                               # S' dr
                    dg_i = zero
                    for j in range(W):
                        sp = a * S_prev[i, j]
                        dk_write += dS[i, j] * d[j]
                        dk_read += sp * ddelta[j]
                        dsp = dS[i, j] + ki * ddelta[j]
                        dg_i += dsp * sp
                        dS[i, j] = a * dsp
                    dk_part[jb, b, t, h, i] = dk_write + dk_read
                    dgk_part[jb, b, t, h, i] = dg_i
        for i in range(K):
            for j in range(W):
                dS0[b, h, i, j0 + j] = dS[i, j]


# ------------------------------------------------------------------------------ drivers
def forward(q, k, v, gk, beta, scale, S0):
    """(o, S_T) on mapped inputs; gk broadcastable to q's shape [B, T, H, K]."""
    B, T, H, K = q.shape
    dtype = v.dtype
    q, k, v, beta, S0 = contiguous(q, k, v, beta, S0)
    gk = full(gk, q.shape)
    nvb = n_value_blocks(B * H, v.shape[3])
    o = np.empty(v.shape, dtype)
    ST = np.empty(S0.shape, dtype)
    delta_forward(q, k, v, gk, beta, dtype.type(scale), S0, nvb, dtype.type(0), o, ST)
    return o, ST


def backward(q, k, v, gk, beta, scale, S0, do, dST):
    """Gradients {q, k, v, beta, g: dgk [B, T, H, K], initial_state} on mapped inputs."""
    B, T, H, K = q.shape
    dtype = v.dtype
    q, k, v, beta, S0, do, dST = contiguous(q, k, v, beta, S0, do, dST)
    gk = full(gk, q.shape)
    nvb = n_value_blocks(B * H, v.shape[3])
    dq, dk, dgk = (np.empty((nvb,) + q.shape, dtype) for _ in range(3))
    dbeta = np.empty((nvb,) + beta.shape, dtype)
    dv = np.empty(v.shape, dtype)
    dS0 = np.empty(S0.shape, dtype)
    delta_backward(q, k, v, gk, beta, dtype.type(scale), S0, do, dST, nvb, block_length(T),
                   dtype.type(0), dq, dk, dgk, dbeta, dv, dS0)
    total = (lambda p: p[0]) if nvb == 1 else (lambda p: p.sum(0))
    return {"q": total(dq), "k": total(dk), "v": dv, "beta": total(dbeta), "g": total(dgk),
            "initial_state": dS0}


_NO_GATE = np.zeros((1, 1, 1, 1))


def _token(x):
    return x[:, None]


# ------------------------------------------------------------------------------ op cores
def gdr_recurrent(q, k, v, g, beta, *, scale, initial_state, **opts):
    q, k, beta = np_gdr.prepare("gated_delta_rule", q, k, beta, opts)
    return forward(q, k, v, g[..., None], beta, scale, initial_state)


def gdr_recurrent_vjp(q, k, v, g, beta, do, dht, *, scale, initial_state, **opts):
    qm, km, bm = np_gdr.prepare("gated_delta_rule", q, k, beta, opts)
    grads = backward(qm, km, v, g[..., None], bm, scale, initial_state, do, dht)
    grads["g"] = grads["g"].sum(-1)
    return np_gdr.pull_back(q, k, beta, grads, opts)


def gdr_step(q, k, v, g, beta, *, state, scale, **opts):
    o, S = gdr_recurrent(_token(q), _token(k), _token(v), _token(g), _token(beta), scale=scale,
                         initial_state=state, **opts)
    return o[:, 0], S


def dr_recurrent(q, k, v, beta, *, scale, initial_state, **opts):
    q, k, beta = np_gdr.prepare(DELTA_RULE_SPEC.name, q, k, beta, opts)
    return forward(q, k, v, _NO_GATE.astype(v.dtype), beta, scale, initial_state)


def dr_recurrent_vjp(q, k, v, beta, do, dht, *, scale, initial_state, **opts):
    qm, km, bm = np_gdr.prepare(DELTA_RULE_SPEC.name, q, k, beta, opts)
    grads = backward(qm, km, v, _NO_GATE.astype(v.dtype), bm, scale, initial_state, do, dht)
    grads.pop("g")
    return np_gdr.pull_back(q, k, beta, grads, opts)


def dr_step(q, k, v, beta, *, state, scale, **opts):
    o, S = dr_recurrent(_token(q), _token(k), _token(v), _token(beta), scale=scale,
                        initial_state=state, **opts)
    return o[:, 0], S


def kda_recurrent(q, k, v, g, beta, *, scale, initial_state, **opts):
    q, k, beta = np_kda.prepare(np_kda.SPEC.name, q, k, beta, opts)
    return forward(q, k, v, g, beta, scale, initial_state)


def kda_recurrent_vjp(q, k, v, g, beta, do, dht, *, scale, initial_state, **opts):
    qm, km, bm = np_kda.prepare(np_kda.SPEC.name, q, k, beta, opts)
    grads = backward(qm, km, v, g, bm, scale, initial_state, do, dht)
    return np_kda.pull_back(q, k, beta, grads, opts)


def kda_step(q, k, v, g, beta, *, state, scale, **opts):
    o, S = kda_recurrent(_token(q), _token(k), _token(v), _token(g), _token(beta), scale=scale,
                         initial_state=state, **opts)
    return o[:, 0], S


CORES = {
    "gated_delta_rule": {"recurrent": gdr_recurrent, "recurrent_vjp": gdr_recurrent_vjp, "step": gdr_step},
    "delta_rule": {"recurrent": dr_recurrent, "recurrent_vjp": dr_recurrent_vjp, "step": dr_step},
    "kda": {"recurrent": kda_recurrent, "recurrent_vjp": kda_recurrent_vjp, "step": kda_step},
}
