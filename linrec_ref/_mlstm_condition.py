"""How ill-conditioned mlstm's output is at each token: the measure behind
``testing.mlstm_condition`` and the redraw check of ``ops.mlstm.make_inputs``.

mlstm reads h_t = num_t / max(|z_t|, 1) with (unstabilised; q^ = scale q)

    num_t = sum_s w_ts (q^_t . k_s) v_s,    z_t = n_t . q^_t = sum_s w_ts (q^_t . k_s),
    w_ts  = exp(f_{s+1} + ... + f_t + i_s),

plus the initial state's term exp(f_1 + ... + f_t + m_0) (C~_0^T q^_t, n~_0 . q^_t). A sum of
terms x_s evaluated in floating point is off by about u * sum_s |x_s| (u the unit roundoff), so

    normaliser_t = sum_s |w_ts q^_t . k_s| / max(|z_t|, 1)
    numerator_t  = max_j sum_s |w_ts (q^_t . k_s) v_sj| / max_j |num_tj|

are the relative condition numbers of the denominator and of the numerator vector, and the
relative error of h_t is about u * (normaliser_t + numerator_t).

Cost. The terms are summed exactly over a window: the current block of C tokens and the block
before it (exact for T <= 2C). The older terms are carried as weighted sums (the state at the
window's start and its second moments), and their absolute values are bounded by Cauchy-Schwarz,
    sum_s w_s |x_s| <= sqrt(sum_s w_s) sqrt(sum_s w_s x_s^2),
so beyond 2C tokens the measure is an upper bound. Time and memory O(B H T C), float64; every
weight is stabilised by m_t, the running max of the log weights (mlstm's stabiliser).

The keys' side (everything but q) is computed once by ``mlstm_keys``; ``mlstm_queries`` then
measures any q, for all tokens or for chosen ones (the input generator's redraws).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ._scan import from_chunks, reverse_cumsum, to_chunks


class MlstmCondition(NamedTuple):
    """Per-token condition numbers of mlstm's output, [B, T, H] each (see the module docstring).

    normaliser:     sum_s |w_ts q^_t . k_s| / max(|n_t . q^_t|, 1) (at most 1 if nothing cancels)
    numerator:      max_j sum_s |w_ts (q^_t . k_s) v_sj| / max_j |(C_t^T q^_t)_j| (1 if nothing
                    cancels)
    log_normaliser: log |n_t . q^_t| (0 is the kink of the floor max(|.|, 1))
    """

    normaliser: np.ndarray
    numerator: np.ndarray
    log_normaliser: np.ndarray

    @property
    def output(self) -> np.ndarray:
        """normaliser + numerator: the relative error of h_t is about unit roundoff * this."""
        return self.normaliser + self.numerator


class MlstmKeys(NamedTuple):
    """Everything the measure needs besides q, in blocks of C tokens ([B, H, N, C, ...]).

    Token t of block n reads a window of 2C tokens exactly: block n - 1 and block n (an empty
    block before block 0). The older terms, those of blocks < n - 1, are carried as sums of
    weights times keys; the initial state is one more term.
    """

    weights: np.ndarray  # [B, H, N, C, 2C] w_ts e^{-m_t} over the window (0 for s > t)
    k: np.ndarray        # [B, H, N, 2C, K] the window's keys
    v: np.ndarray        # [B, H, N, 2C, V] the window's values
    m: np.ndarray        # [B, H, N, C]     m_t, the running max of the log weights
    old: np.ndarray      # [B, H, N, C]     factor of the older sums at t
    old_n: np.ndarray    # [B, H, N, K]     sum_s w k_s over the older terms (to the window start)
    old_C: np.ndarray    # [B, H, N, K, V]  sum_s w k_s v_s^T
    old_w: np.ndarray    # [B, H, N]        sum_s w
    old_kk: np.ndarray   # [B, H, N, K, K]  sum_s w k_s k_s^T
    old_vv: np.ndarray   # [B, H, N, V]     sum_s w v_s^2
    init: np.ndarray     # [B, H, N, C]     weight of the initial state at t
    n0: np.ndarray       # [B, H, K]        the initial n~_0 (zeros without one)
    C0: np.ndarray       # [B, H, K, V]     the initial C~_0


def mlstm_keys(k, v, i, f, initial_state, C: int) -> MlstmKeys:
    """The q-independent part of the measure. k: [B, T, H, K], v: [B, T, H, V], i, f: [B, T, H]
    (float64); initial_state (C~_0, n~_0, m_0) or None; C the block size."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    f_c, k_c, v_c = to_chunks(f, C), to_chunks(k, C), to_chunks(v, C)      # [B, H, N, C, ...]
    i_c = to_chunks(i, C).copy()                                            # [B, H, N, C]
    i_c.reshape(B, H, -1)[..., T:] = -np.inf                                # padding writes nothing
    N = f_c.shape[2]
    # log decays inside a block, as direct sums of the gates (numerics.md hazard 2)
    to_end = np.concatenate([reverse_cumsum(f_c, -1)[..., 1:], np.zeros_like(f_c[..., :1])], -1)
    from_start = np.cumsum(f_c, -1)                # [B, H, N, C]: f over [block start, t]
    total = from_start[..., -1]                    # [B, H, N]: the block's own decay

    # 1. each block's weighted sums at its end, stabilised by the block's own max
    log_w_end = to_end + i_c                                                 # [B, H, N, C]
    m_local = log_w_end.max(-1)                                              # [B, H, N]
    w = np.exp(log_w_end - m_local[..., None])                               # [B, H, N, C]
    wk = k_c * w[..., None]                                                  # [B, H, N, C, K]
    sums = (wk.sum(-2), np.swapaxes(wk, -1, -2) @ v_c, w.sum(-1)[..., None],
            np.swapaxes(wk, -1, -2) @ k_c, (v_c ** 2 * w[..., None]).sum(-2))   # n, C, w, kk, vv
    sizes = [int(np.prod(x.shape[3:])) for x in sums]                        # K, KV, 1, KK, V
    local = np.concatenate([x.reshape(B, H, N, p) for x, p in zip(sums, sizes)], -1)  # [B,H,N,P]

    # 2. carried across blocks: end[:, :, n], m_end[..., n] hold the sums after block n - 1
    m_end = np.full((B, H, N + 1), -np.inf)
    end = np.zeros((B, H, N + 1, local.shape[-1]))
    for n in range(N):
        m_end[..., n + 1] = np.maximum(total[..., n] + m_end[..., n], m_local[..., n])
        keep = np.exp(total[..., n] + m_end[..., n] - m_end[..., n + 1])     # [B, H]
        add = np.exp(m_local[..., n] - m_end[..., n + 1])                     # [B, H]
        end[:, :, n + 1] = keep[..., None] * end[:, :, n] + add[..., None] * local[:, :, n]
    # block n's window starts after block n - 2: its older terms are end[:, :, n - 1]
    older = lambda x: np.concatenate([x[:, :, :min(N, 1)], x[:, :, :N - 1]], axis=2)
    previous = lambda x, fill: np.concatenate([np.full_like(x[:, :, :1], fill), x[:, :, :-1]], 2)
    window = lambda x: np.concatenate([previous(x, 0), x], axis=3)          # [B, H, N, 2C, ...]
    old_sums = np.split(older(end), np.cumsum(sizes)[:-1], axis=-1)
    old_n, old_C, old_w, old_kk, old_vv = (x.reshape(s.shape) for x, s in zip(old_sums, sums))
    log_old = (previous(total, 0)[..., None] + from_start) + older(m_end)[..., None]  # [B,H,N,C]
    if initial_state is None:
        n0, C0, m0 = np.zeros((B, H, K)), np.zeros((B, H, K, V)), np.zeros((B, H))
    else:
        C0, n0, m0 = (np.asarray(s, np.float64) for s in initial_state)
    log_init = to_chunks(np.cumsum(f, axis=1) + m0[:, None], C)             # [B, H, N, C]

    # 3. the window's log weights, one cumulative sum down the block's tokens t: a column s of
    #    block n - 1 starts from its log weight at that block's end, a column s of block n starts
    #    with i_s at t = s, and every later token adds its f_t (direct sums again)
    start_before = previous(log_w_end, -np.inf)                             # [B, H, N, C]
    m = np.maximum(log_init, log_old)                                        # [B, H, N, C]
    weights = np.empty((B, H, N, C, 2 * C))
    diagonal, later = np.arange(C), np.tri(C, C, -1, dtype=bool)             # later: s < t
    for g in _block_groups(N, B * H * C * 2 * C):
        f_t = f_c[:, :, g, :, None]                                          # [B, H, G, C, 1]
        steps = np.empty(f_t.shape[:-1] + (2 * C,))                          # [B, H, G, C, 2C]
        steps[..., :C] = f_t
        steps[..., 0, :C] += start_before[:, :, g]
        steps[..., C:] = np.where(later, f_t, 0.0)
        steps[..., diagonal, C + diagonal] = i_c[:, :, g]
        log_w = np.cumsum(steps, axis=-2)                                    # [B, H, G, C, 2C]
        np.copyto(log_w[..., C:], -np.inf, where=~np.tri(C, C, 0, dtype=bool))      # s > t
        m[:, :, g] = np.maximum(m[:, :, g], log_w.max(-1))
        log_w -= m[:, :, g, :, None]
        np.exp(log_w, out=weights[:, :, g])
    return MlstmKeys(weights, window(k_c), window(v_c), m, np.exp(log_old - m), old_n, old_C,
                     old_w[..., 0], old_kk, old_vv, np.exp(log_init - m), n0, C0)


def mlstm_queries(keys: MlstmKeys, q_hat, rows=None) -> MlstmCondition:
    """The measure for scaled queries q^ = scale q [B, T, H, K] (float64).

    rows=None: every token, [B, T, H] arrays. rows=(b, h, n, c) index arrays (token n C + c of
    batch row b, head h): only those tokens, [R] arrays.
    """
    B, H, N, C = keys.m.shape
    q_c = to_chunks(q_hat, C)                                                # [B, H, N, C, K]
    # the blocks to read, as flat (b, h, n) indices: all, or those holding the rows
    if rows is None:
        flat = np.arange(B * H * N)
    else:
        flat, row_block = np.unique(np.ravel_multi_index(rows[:3], (B, H, N)), return_inverse=True)
    b, h, n = np.unravel_index(flat, (B, H, N))
    out = [np.empty((flat.size, C)) for _ in MlstmCondition._fields]         # [U, C] each
    for g in _block_groups(flat.size, C * 2 * C):
        blocks = lambda x: x[b[g], h[g], n[g]]        # per block [G, ...], per token [G, C, ...]
        heads = lambda x: x[b[g], h[g]]               # per (b, h) [G, ...]
        for whole, part in zip(out, _window_condition(blocks(q_c), keys, blocks, heads)):
            whole[g] = part
    if rows is not None:
        return MlstmCondition(*(x[row_block, rows[3]] for x in out))
    return MlstmCondition(*(from_chunks(x.reshape(B, H, N, C), q_hat.shape[1]) for x in out))


def _window_condition(q, keys: MlstmKeys, blocks, heads) -> MlstmCondition:
    """The measure for the C queries q [G, C, K] of G blocks, each reading its window;
    blocks(x) selects those blocks' entries of the keys, heads(x) their (b, h) entries."""
    qk = q @ np.swapaxes(blocks(keys.k), -1, -2)                             # [G, C, 2C]
    weights = blocks(keys.weights)                                           # [G, C, 2C]
    terms, terms_abs = weights * qk, weights * np.abs(qk)                    # [G, C, 2C]
    old, init, m = blocks(keys.old), blocks(keys.init), blocks(keys.m)       # [G, C]
    init_z = (q @ heads(keys.n0)[..., None])[..., 0]                         # [G, C]
    init_num = q @ heads(keys.C0)                                            # [G, C, V]
    # older terms: sum_s w_s |x_s| <= sqrt(sum_s w_s) sqrt(sum_s w_s x_s^2)
    old_qk = old * np.sqrt(((q @ blocks(keys.old_kk)) * q).sum(-1))          # [G, C]
    z = terms.sum(-1) + old * (q @ blocks(keys.old_n)[..., None])[..., 0] + init * init_z
    z_abs = (terms_abs.sum(-1) + old_qk * np.sqrt(blocks(keys.old_w))[:, None]
             + init * np.abs(init_z))                                        # [G, C]
    v = blocks(keys.v)                                                       # [G, 2C, V]
    num = terms @ v + old[..., None] * (q @ blocks(keys.old_C)) + init[..., None] * init_num
    num_abs = (terms_abs @ np.abs(v) + old_qk[..., None] * np.sqrt(blocks(keys.old_vv))[:, None]
               + init[..., None] * np.abs(init_num))                         # [G, C, V]
    floor = np.maximum(np.exp(-m), np.finfo(np.float64).tiny)   # the floor 1, stabilised by m_t
    num_abs_max, num_max = num_abs.max(-1), np.abs(num).max(-1)              # [G, C]
    with np.errstate(divide="ignore", invalid="ignore"):
        return MlstmCondition(z_abs / np.maximum(np.abs(z), floor),
                              np.where(num_abs_max > 0, num_abs_max / num_max, 0.0),
                              np.log(np.abs(z)) + m)


def _block_groups(N: int, per_block: int, target: int = 1 << 17):
    """Slices of N blocks, about ``target`` array entries at a time: the memory-bound steps
    above run several times faster on pieces that stay in the CPU cache."""
    step = max(1, target // max(per_block, 1))
    return [slice(lo, lo + step) for lo in range(0, N, step)]
