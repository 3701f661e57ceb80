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

from linrec_ref.ops import delta_product as np_dp
from linrec_ref.ops import gated_delta_rule as np_gdr
from linrec_ref.ops import kda as np_kda
from linrec_ref.ops.delta_rule import SPEC as DELTA_RULE_SPEC

from ._common import REDUCTIONS, block_length, contiguous, decays, n_value_blocks, value_block


# ------------------------------------------------------------------------------ kernels
# Inner loops run over 1-D row views (see _gla: 3-4x faster than 4-D indexing there).
@nb.njit(inline="always")
def _step(S, r, d, b, t, h, j0, q, k, v, ak, beta, zero):
    """S_{t-1} -> S_t in place on the block's columns; leaves S_t^T q_t in r."""
    K, W = S.shape
    qt, kt, at, vt = q[b, t, h], k[b, t, h], ak[b, t, h], v[b, t, h, j0:j0 + W]
    last = at.shape[0] - 1                                      # 0 for one gate per head
    r[:] = zero
    for i in range(K):                                          # S' = diag(a) S, r = S'^T k
        a = at[min(i, last)]
        ki = kt[i]
        Si = S[i]
        for j in range(W):
            s = a * Si[j]
            Si[j] = s
            r[j] += ki * s
    bt = beta[b, t, h]
    for j in range(W):                                          # delta = beta (v - r)
        d[j] = bt * (vt[j] - r[j])
    r[:] = zero
    for i in range(K):                                          # S = S' + k delta^T, read q
        ki = kt[i]
        qi = qt[i]
        Si = S[i]
        for j in range(W):
            s = Si[j] + ki * d[j]
            Si[j] = s
            r[j] += qi * s


@nb.njit(parallel=True, cache=True, nogil=True, fastmath=REDUCTIONS)
def delta_forward(q, k, v, ak, beta, scale, S0, n_vblocks, zero, o, ST):
    """o [B, T, H, V] and ST [B, H, K, V] (written); decays ak = exp(gk) [B, T, H, K], or
    [B, T, H, 1] for one gate per head; beta [B, T, H].

    One pass over S per step (``_step`` takes two): with c_t = a_t * k_t (per row),
    r_t = S'_t^T k_t = S_{t-1}^T c_t, so the pass that writes S_t = diag(a_t) S_{t-1} + k_t delta_t^T
    also accumulates o_t from S_t^T q_t and the next step's r_{t+1} = S_t^T c_{t+1}. Measured
    1.0-1.3x faster than the two passes at K = V = 64; four rows per pass as in _gla measured
    slower here (1.1-1.2x), with seven arrays in the inner loop."""
    B, T, H, K = q.shape
    V = v.shape[3]
    last = ak.shape[3] - 1                                      # 0 for one gate per head
    for task in nb.prange(B * H * n_vblocks):
        bh, jb = task // n_vblocks, task % n_vblocks   # (divmod does not type in prange)
        b, h = bh // H, bh % H
        j0, j1 = value_block(V, n_vblocks, jb)
        W = j1 - j0
        S = S0[b, h, :, j0:j1].copy()                           # [K, W]
        r = np.empty(W, dtype=S0.dtype)                          # S_{t-1}^T c_t
        r_next = np.empty(W, dtype=S0.dtype)
        acc = np.empty(W, dtype=S0.dtype)                        # S_t^T q_t
        d = np.empty(W, dtype=S0.dtype)                          # delta_t
        c = np.empty(K, dtype=S0.dtype)                          # c_{t+1} = a_{t+1} k_{t+1}
        r[:] = zero
        if T > 0:
            k0, a0 = k[b, 0, h], ak[b, 0, h]
            for i in range(K):
                ci = a0[min(i, last)] * k0[i]
                Si = S[i]
                for j in range(W):
                    r[j] += ci * Si[j]
        for t in range(T):
            qt, kt, at, vt = q[b, t, h], k[b, t, h], ak[b, t, h], v[b, t, h, j0:j1]
            if t + 1 < T:
                kn, an = k[b, t + 1, h], ak[b, t + 1, h]
                for i in range(K):
                    c[i] = an[min(i, last)] * kn[i]
            else:
                c[:] = zero
            bt = beta[b, t, h]
            for j in range(W):
                d[j] = bt * (vt[j] - r[j])
            acc[:] = zero
            r_next[:] = zero
            for i in range(K):
                a = at[min(i, last)]
                ki = kt[i]
                qi = qt[i]
                ci = c[i]
                Si = S[i]
                for j in range(W):
                    s = a * Si[j] + ki * d[j]
                    Si[j] = s
                    acc[j] += qi * s
                    r_next[j] += ci * s
            ot = o[b, t, h, j0:j1]
            for j in range(W):
                ot[j] = scale * acc[j]
                r[j] = r_next[j]
        ST[b, h, :, j0:j1] = S


@nb.njit(parallel=True, cache=True, nogil=True, fastmath=REDUCTIONS)
def delta_backward(q, k, v, ak, beta, scale, S0, do, dST, n_vblocks, L, zero,
                   dq_part, dk_part, dgk_part, dbeta_part, dv, dS0):
    """The adjoint walk (module docstring). Writes dv, dS0 and the per-value-block partial sums
    dq_part, dk_part [n_vblocks, B, T, H, K], dgk_part [n_vblocks, B, T, H, Kg] (Kg = ak's last
    axis; with one gate per head the rows' sums are added up) and dbeta_part [n_vblocks, B, T, H]."""
    B, T, H, K = q.shape
    V = v.shape[3]
    NB = (T + L - 1) // L
    for task in nb.prange(B * H * n_vblocks):
        bh, jb = task // n_vblocks, task % n_vblocks
        b, h = bh // H, bh % H
        j0, j1 = value_block(V, n_vblocks, jb)
        W = j1 - j0
        r = np.empty(W, dtype=S0.dtype)
        d = np.empty(W, dtype=S0.dtype)
        ck = np.empty((NB, K, W), dtype=S0.dtype)              # S at the start of each block
        S = S0[b, h, :, j0:j1].copy()
        for n in range(NB):
            ck[n] = S
            for t in range(n * L, min(T, (n + 1) * L)):
                _step(S, r, d, b, t, h, j0, q, k, v, ak, beta, zero)
        dS = dST[b, h, :, j0:j1].copy()
        states = np.empty((L + 1, K, W), dtype=S0.dtype)
        resid = np.empty(W, dtype=S0.dtype)
        ddelta = np.empty(W, dtype=S0.dtype)
        for n in range(NB - 1, -1, -1):
            t0 = n * L
            t1 = min(T, t0 + L)
            states[0] = ck[n]
            for t in range(t0, t1):
                states[t - t0 + 1] = states[t - t0]
                _step(states[t - t0 + 1], r, d, b, t, h, j0, q, k, v, ak, beta, zero)
            for t in range(t1 - 1, t0 - 1, -1):
                S_prev = states[t - t0]
                S_t = states[t - t0 + 1]
                bt = beta[b, t, h]
                qt, kt, at = q[b, t, h], k[b, t, h], ak[b, t, h]
                vt, dot, dvt = v[b, t, h, j0:j1], do[b, t, h, j0:j1], dv[b, t, h, j0:j1]
                dqt, dkt, dgt = dq_part[jb, b, t, h], dk_part[jb, b, t, h], dgk_part[jb, b, t, h]
                last = at.shape[0] - 1
                r[:] = zero                                     # r = S'^T k
                ddelta[:] = zero                                # dS^T k (dS after the read)
                for i in range(K):
                    a = at[min(i, last)]
                    ki = kt[i]
                    sq = scale * qt[i]
                    dq_i = zero
                    dSi, Sti, Spi = dS[i], S_t[i], S_prev[i]
                    for j in range(W):
                        g = dSi[j] + sq * dot[j]                 # read of S_t
                        dSi[j] = g
                        dq_i += Sti[j] * dot[j]
                        r[j] += ki * (a * Spi[j])
                        ddelta[j] += ki * g
                    dqt[i] = scale * dq_i
                dbeta = zero
                for j in range(W):
                    resid[j] = vt[j] - r[j]
                    d[j] = bt * resid[j]                         # delta
                    dbeta += ddelta[j] * resid[j]
                    dvt[j] = bt * ddelta[j]
                    ddelta[j] = -bt * ddelta[j]                  # now dr
                dbeta_part[jb, b, t, h] = dbeta
                dgt[:] = zero
                for i in range(K):
                    a = at[min(i, last)]
                    ki = kt[i]
                    dk_write = zero                              # dS delta
                    dk_read = zero                               # S' dr
                    dg_i = zero
                    dSi, Spi = dS[i], S_prev[i]
                    for j in range(W):
                        sp = a * Spi[j]
                        dk_write += dSi[j] * d[j]
                        dk_read += sp * ddelta[j]
                        dsp = dSi[j] + ki * ddelta[j]
                        dg_i += dsp * sp
                        dSi[j] = a * dsp
                    dkt[i] = dk_write + dk_read
                    dgt[min(i, last)] += dg_i
        dS0[b, h, :, j0:j1] = dS


# ------------------------------------------------------------------------------ drivers
def forward(q, k, v, gk, beta, scale, S0):
    """(o, S_T) on mapped inputs; gk [..., K] per key channel or [..., 1] per head, broadcastable
    to [B, T, H, K] or [B, T, H, 1]."""
    B, T, H, K = q.shape
    dtype = v.dtype
    q, k, v, beta, S0 = contiguous(q, k, v, beta, S0)
    ak = decays(gk, q.shape)
    nvb = n_value_blocks(B * H, v.shape[3])
    o = np.empty(v.shape, dtype)
    ST = np.empty(S0.shape, dtype)
    delta_forward(q, k, v, ak, beta, dtype.type(scale), S0, nvb, dtype.type(0), o, ST)
    return o, ST


def backward(q, k, v, gk, beta, scale, S0, do, dST):
    """Gradients {q, k, v, beta, g: dgk [B, T, H, Kg] (gk's last axis), initial_state} on mapped
    inputs."""
    B, T, H, K = q.shape
    dtype = v.dtype
    q, k, v, beta, S0, do, dST = contiguous(q, k, v, beta, S0, do, dST)
    ak = decays(gk, q.shape)
    nvb = n_value_blocks(B * H, v.shape[3])
    dq, dk = (np.empty((nvb,) + q.shape, dtype) for _ in range(2))
    dgk = np.empty((nvb,) + ak.shape, dtype)
    dbeta = np.empty((nvb,) + beta.shape, dtype)
    dv = np.empty(v.shape, dtype)
    dS0 = np.empty(S0.shape, dtype)
    delta_backward(q, k, v, ak, beta, dtype.type(scale), S0, do, dST, nvb, block_length(T),
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
    grads["g"] = grads["g"][..., 0]
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


# delta_product: the expanded sequence of T * n_h sub-steps is a gated delta rule (its module
# docstring): run the kernels on it, read at the last sub-step of each token.
def dp_recurrent(q, k, v, beta, g=None, *, scale, initial_state, **opts):
    qm, km, bm = np_dp.prepare(np_dp.SPEC.name, q, k, beta, opts)
    NH = k.shape[2]
    x = np_dp._expand(qm, km, v, bm, g)
    o_sub, S = forward(x["q"], x["k"], x["v"], x["g"][..., None], x["beta"], scale, initial_state)
    return np.ascontiguousarray(o_sub[:, NH - 1::NH]), S


def dp_recurrent_vjp(q, k, v, beta, g=None, *, do, dht, scale, initial_state, **opts):
    qm, km, bm = np_dp.prepare(np_dp.SPEC.name, q, k, beta, opts)
    x = np_dp._expand(qm, km, v, bm, g)
    grads = backward(x["q"], x["k"], x["v"], x["g"][..., None], x["beta"], scale, initial_state,
                     np_dp._expand_do(do, k.shape[2]), dht)
    grads["g"] = grads["g"][..., 0]
    return np_dp.pull_back(q, k, beta, np_dp._collapse_grads(grads, k, g), opts)


def dp_step(q, k, v, beta, g=None, *, state, scale, **opts):
    o, S = dp_recurrent(_token(q), _token(k), _token(v), _token(beta), None if g is None else _token(g),
                        scale=scale, initial_state=state, **opts)
    return o[:, 0], S


CORES["delta_product"] = {"recurrent": dp_recurrent, "recurrent_vjp": dp_recurrent_vjp, "step": dp_step}
