"""Numba kernels of mamba's selective scan, and its recurrent cores.

The recurrence (per batch b and channel d; the state h is a vector over n = 1..S):

    a_t = exp(dt_t A[d, :]),   h_t = a_t * h_{t-1} + (dt_t u_t) Bm_t,   y_t = Cm_t . h_t

then the skip term and the gate, y = (y + D u) * silu(z), which the cores apply with the
reference's own functions (``linrec_ref.ops.mamba``), as they take dt = softplus(delta + bias).
The adjoint, walking t = T-1 .. 0 with dh = dL/dh_t (dh_T = dht), is the reference's:

    dh    += dy_t Cm_t;              dCm_t = sum_d dy_t[d] h_t[d, :]
    dx_t   = dh . Bm_t  (x = dt u);  dBm_t = sum_d x_t[d] dh[d, :]
    dg     = dh * a_t * h_{t-1}      (g = dt A);  ddt_t += sum_n dg A,  dA += sum_t dg dt_t
    dh     = a_t * dh

Unlike the q/k/v ops, every state entry has its own decay, so there is one exp per entry and
step: a scalar exp in the kernel measured slower than the whole NumPy chunkwise form. The drivers
therefore walk time in blocks of BLOCK steps and form each block's decays with NumPy's vectorised
exp ([B, L, D, S], bounded memory); the kernels run the block, parallel over batch x channel
blocks, carrying h between blocks. The backward keeps the state at each block start and
recomputes the block's states inside the kernel: O(T/BLOCK + BLOCK) states per channel.
"""
from __future__ import annotations

import numba as nb
import numpy as np

from linrec_ref.ops import mamba as np_mamba

from ._common import REDUCTIONS, contiguous

BLOCK = 256                  # time steps per block: decays of one block are [B, BLOCK, D, S]
CHANNELS_PER_TASK = 16       # channels per parallel task


# ------------------------------------------------------------------------------ kernels
@nb.njit(parallel=True, cache=True, nogil=True, fastmath=REDUCTIONS)
def block_forward(a, x, Bm, Cm, h, y):
    """One block: a [B, L, D, S] decays, x [B, L, D] = dt u, Bm, Cm [B, L, S]; h [B, D, S] is
    read and overwritten with the block's last state; y [B, L, D] is written."""
    B, L, D, S = a.shape
    n_dblocks = (D + CHANNELS_PER_TASK - 1) // CHANNELS_PER_TASK
    for task in nb.prange(B * n_dblocks):
        b, db = task // n_dblocks, task % n_dblocks
        d0, d1 = db * CHANNELS_PER_TASK, min(D, (db + 1) * CHANNELS_PER_TASK)
        for t in range(L):
            Bt, Ct = Bm[b, t], Cm[b, t]
            for d in range(d0, d1):
                at, hd = a[b, t, d], h[b, d]
                xd = x[b, t, d]
                acc = hd[0] * 0
                for n in range(S):
                    s = at[n] * hd[n] + xd * Bt[n]
                    hd[n] = s
                    acc += Ct[n] * s
                y[b, t, d] = acc


@nb.njit(parallel=True, cache=True, nogil=True, fastmath=REDUCTIONS)
def block_backward(a, x, Bm, Cm, A, dt, h_start, dy, dh, dx, ddt_g, dA_part, dBm_part, dCm_part):
    """The adjoint over one block (module docstring). h_start [B, D, S]: the state before it;
    dh [B, D, S]: dL/dh at its end, overwritten with dL/dh before it. Writes dx, ddt_g (the
    sum_n dg A part of ddt) [B, L, D]; adds to dA_part [B, D, S]; writes the per-channel-block
    partial sums dBm_part, dCm_part [n_dblocks, B, L, S]."""
    B, L, D, S = a.shape
    n_dblocks = (D + CHANNELS_PER_TASK - 1) // CHANNELS_PER_TASK
    for task in nb.prange(B * n_dblocks):
        b, db = task // n_dblocks, task % n_dblocks
        d0, d1 = db * CHANNELS_PER_TASK, min(D, (db + 1) * CHANNELS_PER_TASK)
        W = d1 - d0
        states = np.empty((L + 1, W, S), dtype=a.dtype)        # h_{t0-1}, h_{t0}, ..
        states[0] = h_start[b, d0:d1]
        for t in range(L):
            for d in range(W):
                at, hp, hn = a[b, t, d0 + d], states[t, d], states[t + 1, d]
                xd = x[b, t, d0 + d]
                for n in range(S):
                    hn[n] = at[n] * hp[n] + xd * Bm[b, t, n]
        for t in range(L - 1, -1, -1):
            Bt, Ct = Bm[b, t], Cm[b, t]
            dBt, dCt = dBm_part[db, b, t], dCm_part[db, b, t]
            dBt[:] = 0
            dCt[:] = 0
            for d in range(W):
                at, hp, ht = a[b, t, d0 + d], states[t, d], states[t + 1, d]
                dhd, Ad, dAd = dh[b, d0 + d], A[d0 + d], dA_part[b, d0 + d]
                dyd, xd, dtd = dy[b, t, d0 + d], x[b, t, d0 + d], dt[b, t, d0 + d]
                dxd = dhd[0] * 0
                dgA = dxd
                for n in range(S):
                    g = dhd[n] + dyd * Ct[n]                     # read of h_t
                    dCt[n] += dyd * ht[n]
                    dxd += g * Bt[n]
                    dBt[n] += xd * g
                    dg = g * at[n] * hp[n]
                    dgA += dg * Ad[n]
                    dAd[n] += dg * dtd
                    dhd[n] = at[n] * g                           # to h_{t-1}
                dx[b, t, d0 + d] = dxd
                ddt_g[b, t, d0 + d] = dgA


# ------------------------------------------------------------------------------ drivers
def _blocks(T):
    return [(t0, min(T, t0 + BLOCK)) for t0 in range(0, T, BLOCK)]


def scan(dt, u, A, Bm, Cm, h0):
    """(y [B, T, D] before skip and gate, h_T [B, D, S]) of the selective scan."""
    dt, u, A, Bm, Cm = contiguous(dt, u, A, Bm, Cm)
    x = dt * u                                                     # [B, T, D]
    h = np.array(h0, dtype=u.dtype, order="C")                     # carried, [B, D, S]
    y = np.empty(u.shape, u.dtype)
    for t0, t1 in _blocks(u.shape[1]):
        a = np.exp(dt[:, t0:t1, :, None] * A)                      # [B, L, D, S], NumPy's SIMD exp
        yb = np.empty((u.shape[0], t1 - t0, u.shape[2]), u.dtype)
        block_forward(a, np.ascontiguousarray(x[:, t0:t1]), np.ascontiguousarray(Bm[:, t0:t1]),
                      np.ascontiguousarray(Cm[:, t0:t1]), h, yb)
        y[:, t0:t1] = yb
    return y, h


def scan_vjp(dt, u, A, Bm, Cm, h0, dy, dht):
    """Gradients of ``scan``: (dx = d/d(dt u), ddt_g = sum_n dg A, dA, dBm, dCm, dh0)."""
    dt, u, A, Bm, Cm, dy = contiguous(dt, u, A, Bm, Cm, dy)
    B, T, D = u.shape
    S = A.shape[1]
    x = dt * u
    blocks = _blocks(T)
    starts = []                                                    # the state before each block
    h = np.array(h0, dtype=u.dtype, order="C")
    for t0, t1 in blocks:
        starts.append(h.copy())
        block_forward(np.exp(dt[:, t0:t1, :, None] * A), np.ascontiguousarray(x[:, t0:t1]),
                      np.ascontiguousarray(Bm[:, t0:t1]), np.ascontiguousarray(Cm[:, t0:t1]), h,
                      np.empty((B, t1 - t0, D), u.dtype))
    n_dblocks = -(-D // CHANNELS_PER_TASK)
    dh = np.array(dht, dtype=u.dtype, order="C")
    dx, ddt_g = np.empty(u.shape, u.dtype), np.empty(u.shape, u.dtype)
    dA_part = np.zeros((B, D, S), u.dtype)
    dBm, dCm = np.empty(Bm.shape, u.dtype), np.empty(Cm.shape, u.dtype)
    for (t0, t1), h_start in zip(reversed(blocks), reversed(starts)):
        L = t1 - t0
        dBp, dCp = (np.empty((n_dblocks, B, L, S), u.dtype) for _ in range(2))
        dxb, dgb = np.empty((B, L, D), u.dtype), np.empty((B, L, D), u.dtype)
        block_backward(np.exp(dt[:, t0:t1, :, None] * A), np.ascontiguousarray(x[:, t0:t1]),
                       np.ascontiguousarray(Bm[:, t0:t1]), np.ascontiguousarray(Cm[:, t0:t1]), A,
                       np.ascontiguousarray(dt[:, t0:t1]), h_start, np.ascontiguousarray(dy[:, t0:t1]),
                       dh, dxb, dgb, dA_part, dBp, dCp)
        dx[:, t0:t1], ddt_g[:, t0:t1] = dxb, dgb
        dBm[:, t0:t1], dCm[:, t0:t1] = dBp.sum(0), dCp.sum(0)
    return dx, ddt_g, dA_part.sum(0), dBm, dCm, dh


# ------------------------------------------------------------------------------ op cores
def recurrent(u, delta, A, Bm, Cm, D, z, delta_bias, *, initial_state, delta_softplus):
    dt = np_mamba._step_sizes(delta, A, delta_bias, delta_softplus)   # [B, T, D]
    y, h = scan(dt, u, A, Bm, Cm, initial_state)
    return np_mamba._gated_output(y, u, D, z), h


def recurrent_vjp(u, delta, A, Bm, Cm, D, z, delta_bias, do, dht, *, initial_state, delta_softplus):
    dt = np_mamba._step_sizes(delta, A, delta_bias, delta_softplus)   # [B, T, D]
    dt_slope = np_mamba._step_size_slope(delta, delta_bias, delta_softplus)
    y_ssm = scan(dt, u, A, Bm, Cm, initial_state)[0] if z is not None else None
    gate = np_mamba._gated_output_vjp(y_ssm, u, D, z, do)             # dy = do * silu(z), ...
    dx, ddt_g, dA, dBm, dCm, dh0 = scan_vjp(dt, u, A, Bm, Cm, initial_state, gate.dy, dht)
    du = dx * dt if gate.du is None else dx * dt + gate.du
    ddelta, dbias = np_mamba._delta_grads(dx * u + ddt_g, dt_slope, delta_bias)
    return {"u": du, "delta": ddelta, "A": dA, "Bm": dBm, "Cm": dCm, "D": gate.dD, "z": gate.dz,
            "delta_bias": dbias, "initial_state": dh0}


def step(u, delta, A, Bm, Cm, D, z, delta_bias, *, state, delta_softplus):
    token = lambda a: None if a is None else a[:, None]
    o, h = recurrent(token(u), token(delta), A, token(Bm), token(Cm), D, token(z), delta_bias,
                     initial_state=state, delta_softplus=delta_softplus)
    return o[:, 0], h


CORES = {"mamba": {"recurrent": recurrent, "recurrent_vjp": recurrent_vjp, "step": step}}
