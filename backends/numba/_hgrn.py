"""Numba kernels of hgrn's elementwise recurrence, and its recurrent cores.

    h_t = exp(g_t) * h_{t-1} + x_t,   o_t = h_t          (per batch b and channel d)

The adjoint, walking t = T-1 .. 0 with dh = dL/dh_t (dh_T = dht), is the reference's:

    dh += do_t;   dx_t = dh;   dg_t = exp(g_t) dh h_{t-1};   dh = exp(g_t) dh

The output is the state sequence itself, so the backward recomputes it into an array the size of
the output ([B, T, D]) and reads h_{t-1} from there. Parallel over batch x blocks of channels;
the inner loops run over contiguous channels. Decays come from NumPy's vectorised exp.
"""
from __future__ import annotations

import numba as nb
import numpy as np

from ._common import contiguous

CHANNELS_PER_TASK = 64


@nb.njit(parallel=True, cache=True, nogil=True)
def scan_forward(a, x, h0, o):
    """o [B, T, D] (written) of h_t = a_t * h_{t-1} + x_t from h0 [B, D]; a, x [B, T, D]."""
    B, T, D = x.shape
    n_blocks = (D + CHANNELS_PER_TASK - 1) // CHANNELS_PER_TASK
    for task in nb.prange(B * n_blocks):
        b, db = task // n_blocks, task % n_blocks
        d0, d1 = db * CHANNELS_PER_TASK, min(D, (db + 1) * CHANNELS_PER_TASK)
        h = h0[b, d0:d1].copy()
        for t in range(T):
            at, xt, ot = a[b, t, d0:d1], x[b, t, d0:d1], o[b, t, d0:d1]
            for d in range(d1 - d0):
                h[d] = at[d] * h[d] + xt[d]
                ot[d] = h[d]


@nb.njit(parallel=True, cache=True, nogil=True)
def scan_backward(a, h0, hs, do, dht, dx, dg, dh0):
    """dx, dg [B, T, D] and dh0 [B, D] (written); hs [B, T, D] are the states h_1..h_T."""
    B, T, D = hs.shape
    n_blocks = (D + CHANNELS_PER_TASK - 1) // CHANNELS_PER_TASK
    for task in nb.prange(B * n_blocks):
        b, db = task // n_blocks, task % n_blocks
        d0, d1 = db * CHANNELS_PER_TASK, min(D, (db + 1) * CHANNELS_PER_TASK)
        dh = dht[b, d0:d1].copy()
        for t in range(T - 1, -1, -1):
            at, dot, dxt, dgt = a[b, t, d0:d1], do[b, t, d0:d1], dx[b, t, d0:d1], dg[b, t, d0:d1]
            hp = hs[b, t - 1, d0:d1] if t > 0 else h0[b, d0:d1]
            for d in range(d1 - d0):
                g = dh[d] + dot[d]                                 # read o_t = h_t
                dxt[d] = g
                dgt[d] = at[d] * g * hp[d]
                dh[d] = at[d] * g                                  # to h_{t-1}
        dh0[b, d0:d1] = dh


def recurrent(x, g, *, initial_state):
    x, h0 = contiguous(x, initial_state)
    o = np.empty_like(x)
    scan_forward(np.exp(g), x, h0, o)
    return o, o[:, -1].copy()


def recurrent_vjp(x, g, do, dht, *, initial_state):
    x, h0, do, dht = contiguous(x, initial_state, do, dht)
    a = np.exp(g)
    hs = np.empty_like(x)
    scan_forward(a, x, h0, hs)
    dx, dg, dh0 = np.empty_like(x), np.empty_like(x), np.empty_like(h0)
    scan_backward(a, h0, hs, do, dht, dx, dg, dh0)
    return {"x": dx, "g": dg, "initial_state": dh0}


CORES = {"hgrn": {"recurrent": recurrent, "recurrent_vjp": recurrent_vjp}}
