"""Numba scans for lru, and its recurrent cores.

    h_t = lambda * h_{t-1} + u_t,   u_t = Bm x_t,   y_t = c Re(Cm h_t) + Dm x_t    (complex h, [S])

lambda, Bm, Cm, Dm do not depend on t, so the projections are matrix products over all tokens at
once (NumPy / BLAS): u = x Bm^T and y = c Re(H Cm^T) + x Dm^T. Only the scan over time, which is
elementwise per mode s, is a kernel. The adjoint (the reference's ``recurrent_vjp``, module
``linrec_ref.ops.lru``) is the reverse scan

    G_t = c conj(Cm)^T do_t + conj(lambda) G_{t+1}   (G_{T-1} adds dht),   dh_0 = conj(lambda) G_0

followed by products over all tokens: dx = Re(G conj(Bm)), dBm = sum_t G_t x_t^T,
dCm = c sum_t do_t conj(h_t)^T, dlog_lam = conj(lambda) sum_t conj(h_{t-1}) G_t.
Memory: the state sequence H [B, T, S] is kept (the size of the output when S ~ Q), not T states
of a matrix; the scans are parallel over batch x blocks of modes.
"""
from __future__ import annotations

import numba as nb
import numpy as np

from linrec_ref.ops import lru as np_lru

from ._common import contiguous

MODES_PER_TASK = 32


@nb.njit(parallel=True, cache=True, nogil=True)
def scan(lam, u, h0, H):
    """H [B, T, S] (written): H_t = lam * H_{t-1} + u_t from h0 [B, S]; complex arrays."""
    B, T, S = u.shape
    n_blocks = (S + MODES_PER_TASK - 1) // MODES_PER_TASK
    for task in nb.prange(B * n_blocks):
        b, sb = task // n_blocks, task % n_blocks
        s0, s1 = sb * MODES_PER_TASK, min(S, (sb + 1) * MODES_PER_TASK)
        h = h0[b, s0:s1].copy()
        lb = lam[s0:s1]
        for t in range(T):
            ut, Ht = u[b, t, s0:s1], H[b, t, s0:s1]
            for s in range(s1 - s0):
                h[s] = lb[s] * h[s] + ut[s]
                Ht[s] = h[s]


@nb.njit(parallel=True, cache=True, nogil=True)
def reverse_scan(lam_conj, dR, dht, G, dh0):
    """G [B, T, S] and dh0 [B, S] (written): G_t = dR_t + conj(lam) G_{t+1}, G_{T-1} = dR + dht."""
    B, T, S = dR.shape
    n_blocks = (S + MODES_PER_TASK - 1) // MODES_PER_TASK
    for task in nb.prange(B * n_blocks):
        b, sb = task // n_blocks, task % n_blocks
        s0, s1 = sb * MODES_PER_TASK, min(S, (sb + 1) * MODES_PER_TASK)
        g = dht[b, s0:s1].copy()
        lb = lam_conj[s0:s1]
        for t in range(T - 1, -1, -1):
            rt, Gt = dR[b, t, s0:s1], G[b, t, s0:s1]
            for s in range(s1 - s0):
                g[s] = g[s] + rt[s]
                Gt[s] = g[s]
                g[s] = lb[s] * g[s]
        dh0[b, s0:s1] = g


def _states(x, log_lam, Bm, initial_state):
    lam = np.exp(log_lam)                                          # [S]
    u = contiguous(x @ Bm.T)[0]                                    # [B, T, S] complex
    h0 = contiguous(initial_state.astype(u.dtype, copy=False))[0]
    H = np.empty_like(u)
    scan(lam.astype(u.dtype, copy=False), u, h0, H)
    return lam, H


def recurrent(x, log_lam, Bm, Cm, Dm, *, initial_state, output):
    c = np_lru._output_factor(output)
    _, H = _states(x, log_lam, Bm, initial_state)
    y = np_lru._skip(x, Dm, Cm.shape[0]) + c * (H @ Cm.T).real     # [B, T, Q]
    return y.astype(x.dtype, copy=False), H[:, -1].copy()


def recurrent_vjp(x, log_lam, Bm, Cm, Dm, do, dht, *, initial_state, output):
    c = np_lru._output_factor(output)
    lam, H = _states(x, log_lam, Bm, initial_state)
    dR = contiguous(c * (do @ Cm.conj()))[0]                        # [B, T, S]: the reads' part
    G, dh0 = np.empty_like(dR), np.empty(dht.shape, dR.dtype)
    reverse_scan(lam.conj().astype(dR.dtype, copy=False), dR,
                 contiguous(dht.astype(dR.dtype, copy=False))[0], G, dh0)
    B, T, S = G.shape
    tokens = lambda a: a.reshape(B * T, a.shape[-1])                  # [B*T, .]: one BLAS product
    # sum_t conj(h_{t-1}) G_t with h_{-1} = h0: the t >= 1 terms, then the h0 term
    dlam = np.sum(H[:, :-1].conj() * G[:, 1:], axis=(0, 1)) + np.sum(initial_state.conj() * G[:, 0], axis=0)
    grads = {"x": (G @ Bm.conj()).real.astype(x.dtype, copy=False),                  # [B, T, P]
             "log_lam": lam.conj() * dlam,                                             # [S]
             "Bm": tokens(G).T @ tokens(x),                                            # [S, P]
             "Cm": c * (tokens(do).T @ tokens(H).conj()),                              # [Q, S]
             "initial_state": dh0}
    return np_lru._skip_vjp(x, Dm, do, grads)


def step(x, log_lam, Bm, Cm, Dm, *, state, output):
    y, h = recurrent(x[:, None], log_lam, Bm, Cm, Dm, initial_state=state, output=output)
    return y[:, 0], h


CORES = {"lru": {"recurrent": recurrent, "recurrent_vjp": recurrent_vjp, "step": step}}
