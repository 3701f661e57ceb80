r"""Per-channel decays inside chunks: the machinery shared by gla, rwkv6 and mamba.

The problem
    Inside a chunk of C tokens, an op with a per-channel log decay g_t in R^D (g <= 0, -inf is a
    hard reset) needs sums of the form

        W[t, s] = sum_d x_t[d] y_s[d] exp(Gq_t[d] - G_s[d])           (scores)
        out_t   = sum_s W[t, s] y_s * exp(Gq_t - G_s)                  ("mix", e.g. dq)
        out_s   = sum_t W[t, s] x_t * exp(Gq_t - G_s)                  ("mix_t", e.g. dk)

    over a causal mask, where G_t = g_0 + ... + g_t is the chunk-local cumulative log decay and
    Gq_t, the query-side decay, is
        inclusive (read after the update, gla / mamba):  Gq_t = G_t,     mask s <= t;
        strict    (read before the update, rwkv6):       Gq_t = G_{t-1}, mask s < t  (G_{-1} = 0).
    On the mask Gq_t - G_s = g_{s+1} + ... + g_t (or up to t-1) <= 0: every decay is <= 1.

Two paths, one result (numerics.md, hazard 1)
    fast (factored): exp(Gq_t - G_s) = exp(Gq_t) * exp(-G_s), so a score matrix is ONE matmul,
        (x * exp(Gq)) @ (y * exp(-G))^T. exp(-G_s) grows with the chunk's total decay, so this is
        used only for chunks whose range  max_d(-G_last[d])  is below ``FAST_BOUND[dtype]``
        (60 for float32, 600 for float64: exp(60) ~ 1e26 and exp(600) ~ 1e260 are far from
        overflow, and exp(-60) / exp(-600) far from the subnormals). Within the bound the factored
        decay's relative error is about eps * |G| (G from one cumulative sum), at most ~60 eps in
        float32 (measured: 1e-6 normwise at the bound, 2e-7 for the exact path) and ~600 eps in
        float64 (2e-15).
    exact (elementwise): the other chunks (fast forgetting, hard resets g = -inf) get the decay
        tensor exp(segment sum) [C, C, D] built from segment sums (as ``_scan.segsum``: a
        cumulative sum of a masked copy, never a difference of cumulative sums, never exp of a
        positive number; -inf gives an exact 0, never NaN). They are selected by boolean
        indexing and processed in blocks of at most ``EXACT_BLOCK`` elements.
    Tests force either path through ``fast_bound`` (0 -> all exact, inf -> factored wherever
    the chunk has no -inf gate) and compare.

API (arrays are [..., C, D] with any leading dims, e.g. [B, H, N]; W is [..., C, C])
    decay = chunk_decay(g, strict=False, fast_bound=None)           # once per gate: a ChunkDecay
    decayed_scores(x, y, decay)  -> [..., C, C]   W[t, s] above (0 off the mask)
    decayed_mix(W, y, decay)     -> [..., C, D]   out_t = sum_s W[t, s] y_s exp(Gq_t - G_s)
    decayed_mix_t(W, x, decay)   -> [..., C, D]   out_s = sum_t W[t, s] x_t exp(Gq_t - G_s)
    exact_decay(g, strict)       -> [M, C, C, D]  the exact decay tensor of M chunks (slow path)
    cumsum_in_chunks(x)                           along the chunk axis -2
    reverse_cumsum_in_chunks(x, exclusive=False, reset=None)   the gate identity's dg, restarting
                                                  at hard resets (reset = isneginf(g))
    decay.exp_Gq  exp(Gq_t) <= 1            (read of the state entering the chunk)
    decay.to_end  exp(G_last - G_s) <= 1    (contribution of token s to the chunk's end state)
    decay.total   exp(G_last) <= 1          (decay of the entering state over the whole chunk)
    W is only read on the mask (entries off it are ignored). For the backward of a chunk
    o = (x y^T . decay) z: dW = decayed_scores(do, z, ...) or do z^T, then
    dx = decayed_mix(dW, y, decay) and dy = decayed_mix_t(dW, x, decay).
"""
from __future__ import annotations

from typing import Iterator, NamedTuple, Optional, Tuple

import numpy as np

# Largest chunk range max_d(-G_last[d]) for which the factored (fast) path is used.
FAST_BOUND = {np.dtype(np.float32): 60.0, np.dtype(np.float64): 600.0}
# Elements of one block of the exact path's [M, C, C, D] decay tensor (bounds its memory).
EXACT_BLOCK = 1 << 21


class ChunkDecay(NamedTuple):
    """The decays of one gate over chunks. Arrays [..., C, D] unless noted.

    g:       the log gates of each chunk (-inf allowed).
    strict:  read before the update (query decay at t-1, mask s < t) instead of after (s <= t).
    fast:    [...] bool, the chunk's range max_d(-G_last[d]) < fast_bound (factored path).
    exp_Gq:  exp(Gq_t) <= 1, the query-side decay from the chunk start.
    exp_neg_G: exp(-G_s) in fast chunks (<= exp(fast_bound)), 0 in the others (never read there).
    to_end:  exp(G_last - G_s) <= 1, from token s to the chunk's end (fast chunks: computed as
             exp(G_last) * exp(-G_s); other chunks: exp of the segment sum).
    total:   [..., D] exp(G_last) <= 1, the decay over the whole chunk.
    """

    g: np.ndarray
    strict: bool
    fast: np.ndarray
    exp_Gq: np.ndarray
    exp_neg_G: np.ndarray
    to_end: np.ndarray
    total: np.ndarray

    @property
    def mask(self) -> np.ndarray:
        """[C, C] bool causal mask: s <= t (inclusive) or s < t (strict)."""
        C = self.g.shape[-2]
        return np.tri(C, C, -1 if self.strict else 0, dtype=bool)


# ----------------------------------------------------------------------------- cumulative sums
def cumsum_in_chunks(x: np.ndarray) -> np.ndarray:
    """out[..., t, :] = x[..., 0, :] + ... + x[..., t, :] along axis -2.

    A loop over the C positions: same sequential rounding as np.cumsum, ~5x faster than
    np.cumsum along a middle axis. -inf entries stay -inf (no NaN: gates are never +inf).
    """
    out = np.empty_like(x)
    acc = out[..., 0, :] = x[..., 0, :]
    for t in range(1, x.shape[-2]):
        acc = out[..., t, :] = acc + x[..., t, :]
    return out


def reverse_cumsum_in_chunks(x: np.ndarray, exclusive: bool = False,
                             reset: Optional[np.ndarray] = None) -> np.ndarray:
    """out[..., t, :] = sum_{j >= t} x[..., j, :] (j > t if exclusive) along axis -2.

    reset: optional bool [..., C, D] (a gate that is -inf). The sum restarts there: out = 0 at a
    reset and out[t] = sum_{t <= j < r} x[j] before the next reset r. This is the gate identity's
    dg at hard resets: shifting every G_j, j >= r, leaves the loss unchanged (g_r = -inf stays
    -inf), so those terms sum to exactly 0 and are not added (no rounding residual).
    """
    C = x.shape[-2]
    out = np.empty_like(x)
    acc = np.zeros_like(x[..., 0, :])
    if reset is not None and not reset.any():
        reset = None
    for t in reversed(range(C)):
        if exclusive:
            out[..., t, :] = acc
            acc = acc + x[..., t, :]
        else:
            acc = acc + x[..., t, :]
            if reset is not None:
                acc = np.where(reset[..., t, :], 0, acc)
            out[..., t, :] = acc
    return out


# ----------------------------------------------------------------------------- set-up
def chunk_decay(g: np.ndarray, strict: bool = False, fast_bound: Optional[float] = None) -> ChunkDecay:
    """Precompute the decays of log gates g: [..., C, D] (chunked, e.g. [B, H, N, C, D]).

    fast_bound: the range below which a chunk is factored; None -> FAST_BOUND[g.dtype].
    """
    bound = FAST_BOUND[g.dtype] if fast_bound is None else float(fast_bound)
    G = cumsum_in_chunks(g)                                        # [..., C, D], <= 0
    fast = np.max(-G[..., -1, :], axis=-1) < bound                 # [...]; -inf -> not fast
    exp_G = np.exp(G, out=G)                                       # [..., C, D], <= 1 (reuses G)
    if strict:                                                     # Gq_t = G_{t-1}, Gq_0 = 0
        exp_Gq = np.concatenate([np.ones_like(exp_G[..., :1, :]), exp_G[..., :-1, :]], axis=-2)
    else:
        exp_Gq = exp_G
    # exp(-G) only where it is bounded by exp(bound); 1 / exp(G) costs less than another exp
    if fast.all():
        exp_neg_G = 1.0 / exp_G                                     # [..., C, D]
    else:
        exp_neg_G = np.zeros_like(exp_G)                            # [..., C, D]
        np.divide(1.0, exp_G, out=exp_neg_G, where=fast[..., None, None])
    total = exp_G[..., -1, :]                                      # [..., D]
    # exp(G_last - G_s) <= 1: in fast chunks the product of the two bounded factors (the same
    # factoring as the scores); elsewhere exp of the segment sums g_{s+1} + ... + g_last (a
    # reverse cumulative sum: no -inf - (-inf), no positive exponent)
    to_end = total[..., None, :] * exp_neg_G                        # [..., C, D]
    if not fast.all():
        slow = ~fast
        to_end[slow] = np.exp(reverse_cumsum_in_chunks(g[slow], exclusive=True))
    return ChunkDecay(g=g, strict=strict, fast=fast, exp_Gq=exp_Gq, exp_neg_G=exp_neg_G,
                      to_end=to_end, total=total)


# ----------------------------------------------------------------------------- exact path
def exact_decay(g: np.ndarray, strict: bool) -> np.ndarray:
    """[M, C, D] log gates -> E: [M, C, C, D], E[m, t, s] = exp(Gq_t - G_s) on the mask, else 0.

    Built from segment sums seg[t, s] = g_{s+1} + ... + g_t (a cumulative sum over t of g masked
    to t > s), so every exponent is a sum of gates (<= 0) and -inf gives an exact 0.
    """
    M, C, D = g.shape
    later = np.tri(C, C, -1, dtype=bool)[None, :, :, None]         # [1, C, C, 1]: t > s
    x = np.where(later, g[:, :, None, :], 0)                       # [M, C, C, D]
    seg = cumsum_in_chunks(np.moveaxis(x, 1, 2))                   # [M, C(s), C(t), D], sum over t
    seg = np.moveaxis(seg, 2, 1)                                   # [M, C(t), C(s), D]
    if strict:                                                     # Gq_t - G_s = seg[t-1, s]
        seg = np.concatenate([np.zeros_like(seg[:, :1]), seg[:, :-1]], axis=1)
    mask = np.tri(C, C, -1 if strict else 0, dtype=bool)[None, :, :, None]
    return np.where(mask, np.exp(seg), 0)                          # [M, C, C, D]


def _exact_blocks(decay: ChunkDecay) -> Iterator[Tuple[tuple, np.ndarray]]:
    """Yield (index, E) for the chunks that are not fast, in blocks of <= EXACT_BLOCK elements.

    index is a tuple of integer arrays over the leading dims; E = exact_decay(decay.g[index]).
    """
    if decay.fast.all():
        return
    idx = np.nonzero(~decay.fast)                                   # tuple of [M] arrays
    C, D = decay.g.shape[-2:]
    per_block = max(1, EXACT_BLOCK // (C * C * D))
    for lo in range(0, len(idx[0]), per_block):
        sel = tuple(i[lo:lo + per_block] for i in idx)
        yield sel, exact_decay(decay.g[sel], decay.strict)


# ----------------------------------------------------------------------------- products
def decayed_scores(x: np.ndarray, y: np.ndarray, decay: ChunkDecay) -> np.ndarray:
    """W[..., t, s] = sum_k x_t[k] y_s[k] exp(Gq_t[k] - G_s[k]) on the mask, 0 off it.

    x, y: [..., C, D]  ->  [..., C, C].
    """
    W = (x * decay.exp_Gq) @ (y * decay.exp_neg_G).swapaxes(-1, -2)   # [..., C, C], fast chunks
    W *= decay.mask
    for sel, E in _exact_blocks(decay):
        if E.shape[-1] == 1:  # a gate shared by all channels: the decay is a [C, C] mask
            W[sel] = (x[sel] @ y[sel].swapaxes(-1, -2)) * E[..., 0]
        else:
            W[sel] = np.einsum("mtd,msd,mtsd->mts", x[sel], y[sel], E)
    return W


def decayed_mix(W: np.ndarray, y: np.ndarray, decay: ChunkDecay) -> np.ndarray:
    """out[..., t, :] = sum_s W[t, s] y_s * exp(Gq_t - G_s) over the mask (e.g. dq from dW).

    W: [..., C, C]; y: [..., C, D]  ->  [..., C, D].
    """
    Wm = W * decay.mask                                             # [..., C, C]
    out = decay.exp_Gq * (Wm @ (y * decay.exp_neg_G))               # [..., C, D], fast chunks
    for sel, E in _exact_blocks(decay):
        if E.shape[-1] == 1:  # a gate shared by all channels
            out[sel] = (Wm[sel] * E[..., 0]) @ y[sel]
        else:
            out[sel] = np.einsum("mts,msd,mtsd->mtd", Wm[sel], y[sel], E)
    return out


def decayed_mix_t(W: np.ndarray, x: np.ndarray, decay: ChunkDecay) -> np.ndarray:
    """out[..., s, :] = sum_t W[t, s] x_t * exp(Gq_t - G_s) over the mask (e.g. dk from dW).

    W: [..., C, C]; x: [..., C, D]  ->  [..., C, D].
    """
    Wm = W * decay.mask                                             # [..., C, C]
    out = decay.exp_neg_G * (Wm.swapaxes(-1, -2) @ (x * decay.exp_Gq))   # [..., C, D], fast chunks
    for sel, E in _exact_blocks(decay):
        if E.shape[-1] == 1:  # a gate shared by all channels
            out[sel] = (Wm[sel] * E[..., 0]).swapaxes(-1, -2) @ x[sel]
        else:
            out[sel] = np.einsum("mts,mtd,mtsd->msd", Wm[sel], x[sel], E)
    return out
