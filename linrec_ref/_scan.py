"""Helpers shared by the forms: stable segment sums, chunking, a checkpointed reverse walk, and
two small pieces of math used by several ops (``sigmoid``, ``split_diagonal``).

Numerical rule (numerics.md, hazard 1 and 2): a decay between positions s <= t is only ever
computed as exp(sum of the log gates in (s, t]), which is <= 0 in the exponent. ``segsum`` builds
those sums without subtracting cumulative sums, so a hard reset (g = -inf) gives an exact 0 and
never -inf - (-inf) = NaN.
"""
from __future__ import annotations

from typing import Callable, Iterator, List, Tuple

import numpy as np


def segsum(g: np.ndarray) -> np.ndarray:
    """Stable segment sums of log gates along the last axis.

    g: [..., T]  ->  [..., T, T] with out[..., t, s] = sum_{j=s+1..t} g[..., j] for s <= t
    (0 on the diagonal) and -inf above the diagonal (s > t), so exp(out) is the causal decay mask.

    Built as a cumulative sum of a masked copy (no difference of cumulative sums), so -inf gates
    give -inf (an exact 0 after exp) and never NaN.
    """
    T = g.shape[-1]
    x = np.broadcast_to(g[..., :, None], g.shape + (T,))          # x[..., t, s] = g_t
    strictly_lower = np.tri(T, T, -1, dtype=bool)                  # s < t
    x = np.where(strictly_lower, x, 0)                             # keep g_t only where t > s
    out = np.cumsum(x, axis=-2)                                    # sum over s < j <= t
    return np.where(np.tri(T, T, 0, dtype=bool), out, -np.inf)     # [..., T, T]


def num_chunks(T: int, C: int) -> int:
    return -(-T // C)


def to_chunks(x: np.ndarray, C: int) -> np.ndarray:
    """[B, T, H, ...] -> [B, H, N, C, ...], zero-padding T up to N*C (N = ceil(T / C)).

    Zero padding is neutral for every op here: padded tokens have zero keys/inputs (no write)
    and zero log gates (decay 1), so the carried state is unchanged by them.
    When C divides T no padding is needed and the result is a read-only view of x (no copy;
    writing into it raises instead of silently changing the caller's array).
    """
    B, T = x.shape[:2]
    N = num_chunks(T, C)
    if N * C == T:
        view = chunk_view(x, C)
        view.flags.writeable = False
        return view
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, N * C - T)
    x = np.pad(x, pad)                                             # [B, N*C, H, ...]
    x = x.reshape((B, N, C) + x.shape[2:])                         # [B, N, C, H, ...]
    return np.moveaxis(x, 3, 1)                                    # [B, H, N, C, ...]


def chunk_view(x: np.ndarray, C: int) -> np.ndarray:
    """[B, N*C, H, ...] -> a writable view [B, H, N, C, ...] (T must be a multiple of C).

    For writing a chunked result straight into an output array without a copy."""
    B, T = x.shape[:2]
    if T % C:
        raise ValueError(f"chunk_view needs T divisible by C, got T={T}, C={C}")
    return np.moveaxis(x.reshape((B, T // C, C) + x.shape[2:]), 3, 1)      # [B, H, N, C, ...]


def from_chunks(x: np.ndarray, T: int) -> np.ndarray:
    """[B, H, N, C, ...] -> [B, T, H, ...] (drops the padding)."""
    B, H, N, C = x.shape[:4]
    x = np.moveaxis(x, 1, 3)                                       # [B, N, C, H, ...]
    x = x.reshape((B, N * C, H) + x.shape[4:])                     # [B, N*C, H, ...]
    return x[:, :T]


def reverse_cumsum(x: np.ndarray, axis: int) -> np.ndarray:
    """out[i] = sum_{j >= i} x[j] along axis."""
    return np.flip(np.cumsum(np.flip(x, axis), axis), axis)


def split_diagonal(W: np.ndarray):
    """(W with its s = t entries set to 0, those entries as [..., C, 1]). W: [..., C, C].

    For the backward of an inclusive (s <= t) chunk score W = x y^T: the s = t terms of dx_t and
    dy_t (W[t, t] y_t and W[t, t] x_t, no decay) cancel exactly in the gate identity
    x_t dx_t - y_t dy_t, but they are its largest terms in fast-forgetting chunks. Leaving them
    out of the identity (and adding them to dx, dy afterwards) keeps their rounding out of the
    gate gradient, which matters in float32.
    """
    diag = np.diagonal(W, axis1=-2, axis2=-1)[..., None].copy()    # [..., C, 1]
    off = W.copy()                                                 # [..., C, C]
    idx = np.arange(W.shape[-1])
    off[..., idx, idx] = 0
    return off, diag


def softplus(x: np.ndarray) -> np.ndarray:
    """log(1 + exp(x)) in x's dtype as max(x, 0) + log1p(exp(-|x|)): no exp overflows, and
    within an ulp or two of np.logaddexp(0, x) (4.4e-16 relative in float64) at a tenth of its
    cost (1.8 ms against 21 ms for 1M float32 values here)."""
    return (np.maximum(x, 0) + np.log1p(np.exp(-np.abs(x)))).astype(x.dtype, copy=False)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function 1 / (1 + exp(-x)) in x's dtype. For x < -88 (float32) or -709 (float64)
    exp(-x) overflows to inf (the warning is silenced) and the result is 0: off by at most the
    subnormal value itself (< 1e-38 in float32). Measured against a long-double reference on 1M
    N(0, 20^2) inputs: at most 3.3 ulp (float32) / 2.2 ulp (float64) where the value is normal,
    as the two-branch form with exp(-|x|) (3.1 / 2.3 ulp), at a fifth of its time (1.3 against
    7.1 ms per 1M float32 values here)."""
    with np.errstate(over="ignore"):
        return (1 / (1 + np.exp(-x))).astype(x.dtype, copy=False)


def reverse_chunk_carry(P: np.ndarray, local: np.ndarray, dht: np.ndarray):
    """Carry a state cotangent backwards across chunks whose transition is a matrix.

    Chunk n maps its entering state to S_end[n] = P_n S_in[n] + (writes); its reads add
    local[n] to the cotangent of S_in[n]. With dS_end[N-1] = dht:
        dS_end[n-1] = P_n^T dS_end[n] + local[n]
    P: [B, H, N, K, K]; local, dht: [B, H, N, K, V] and [B, H, K, V].
    Returns (dS_end [B, H, N, K, V], the cotangent of the initial state [B, H, K, V]).
    """
    dS_end = np.empty(local.shape, dtype=np.result_type(local, dht))
    dS = dht
    for n in reversed(range(local.shape[2])):
        dS_end[:, :, n] = dS
        dS = P[:, :, n].swapaxes(-1, -2) @ dS + local[:, :, n]
    return dS_end, dS


def reverse_steps(advance: Callable, h0, T: int, block: int = 64) -> Iterator[Tuple[int, object, object]]:
    """Walk a recurrence backwards in time without storing all T states.

    advance(S_prev, t) -> S_t is one step of the forward recurrence. Yields (t, S_{t-1}, S_t)
    for t = T-1, ..., 0, the order a backward pass needs, so a vjp reads as its adjoint loop:

        for t, S_prev, S_t in reverse_steps(advance, S_0, T):
            dS = dS + ...                     # the adjoint recurrence, one step back

    Memory: the state at the start of every block of ``block`` steps is kept (ceil(T/block)
    states) and a block's states are recomputed when the walk reaches it (block + 1 states),
    so memory is O((T/block + block) * |S|), never O(T * |S|). The checkpoints are taken by a
    forward pass that runs before the first yield.
    """
    checkpoints: List = []
    S = h0
    for t0 in range(0, T, block):
        checkpoints.append(S)
        for t in range(t0, min(t0 + block, T)):
            S = advance(S, t)
    for b in reversed(range(len(checkpoints))):
        t0, t1 = b * block, min((b + 1) * block, T)
        states = [checkpoints[b]]
        for t in range(t0, t1):
            states.append(advance(states[-1], t))
        for t in reversed(range(t0, t1)):
            yield t, states[t - t0], states[t - t0 + 1]
