"""Random inputs for the regimes of numerics.md (used by every op's ``make_inputs``).

All generators take an explicit ``numpy.random.Generator``; nothing uses global random state.
Values are signed (N(0, 1)), never only U[0, 1] (numerics.md, hazard 11).
"""
from __future__ import annotations

import numpy as np

# regime name -> what it means for the decay a = exp(g)
DECAY_REGIMES = {
    "slow_decay": "a in [0.999, 0.9999] (long memory; g close to 0)",
    "typical": "a ~ U(0.5, 0.99)",
    "fast_forgetting": "a ~ U(0.05, 0.3) (chunk products underflow if factored naively)",
    "hard_reset": "typical, with g = -inf (a = 0, an exact reset) at some steps",
}


def normal(rng: np.random.Generator, shape, dtype) -> np.ndarray:
    """Signed N(0, 1) entries."""
    return rng.standard_normal(shape).astype(dtype)


def log_decay(rng: np.random.Generator, shape, regime: str, dtype, time_axis: int = 1) -> np.ndarray:
    """Natural-log decays g <= 0 for a regime of DECAY_REGIMES.

    shape: the gate's shape, e.g. [B, T, H] or [B, T, H, K]; time_axis: the T axis. In
    "hard_reset", every entry at the chosen steps is -inf (the whole state resets).
    """
    if regime not in DECAY_REGIMES:
        raise ValueError(f"unknown regime {regime!r}; expected one of {sorted(DECAY_REGIMES)}")
    lo, hi = {"slow_decay": (0.999, 0.9999), "typical": (0.5, 0.99),
              "fast_forgetting": (0.05, 0.3), "hard_reset": (0.5, 0.99)}[regime]
    g = np.log(rng.uniform(lo, hi, size=shape))
    if regime == "hard_reset":
        T = shape[time_axis]
        # never at t = 0, so that an initial state still matters before the first reset
        resets = np.flatnonzero(rng.uniform(size=T) < 0.15)
        resets = resets[resets > 0]
        if T > 1:
            resets = np.union1d(resets, [T // 2])
        index = [slice(None)] * len(shape)
        index[time_axis] = resets
        g[tuple(index)] = -np.inf
    return g.astype(dtype)


def log_decay_per_channel(rng: np.random.Generator, shape, regime: str, dtype) -> np.ndarray:
    """Per-channel log decays [B, T, ..., D] for a regime: ``log_decay``, and in "hard_reset"
    also single channels reset (-inf) at ~5% of the (t, channel) entries after t = 0, on top of
    the whole-step resets (for the ops whose gate has a channel axis: gla, rwkv6, kda, dplr)."""
    g = log_decay(rng, shape, regime, np.float64)
    if regime == "hard_reset":
        partial = rng.uniform(size=shape) < 0.05
        partial[:, 0] = False
        g[partial] = -np.inf
    return g.astype(dtype)
