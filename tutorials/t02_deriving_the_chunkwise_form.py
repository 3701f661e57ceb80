"""
Deriving the chunkwise form, and computing its decays safely
============================================================

**At the end of this page you can** derive the chunkwise form of a gated linear recurrence from
the loop in three steps, explain why the obvious way of computing the decays
(``exp(cumsum(g)[t] - cumsum(g)[s])``) returns NaN on a hard reset and loses every digit on
long or strongly decaying inputs, and compute them the stable way (a *segment sum*).

We use simple_gla (one log decay ``g_t <= 0`` per step and head), as in tutorial 1.
"""

# %%
# Step 1: unroll the loop
# -----------------------
# :math:`S_t = a_t S_{t-1} + k_t v_t^\top` unrolls to
# :math:`S_t = \sum_{s \le t} (\prod_{j=s+1}^{t} a_j)\, k_s v_s^\top`, and with
# :math:`a_j = e^{g_j}` the product is :math:`\exp(\sum_{j=s+1}^t g_j)`. Everything below is
# about computing those sums: :math:`L_{ts} = \sum_{j=s+1}^{t} g_j` for :math:`s \le t`.
import os

import numpy as np

import linrec_ref
from linrec_ref._scan import segsum

QUICK = os.environ.get("LINREC_TUTORIAL_QUICK") == "1"


def segsum_naive(g):
    """L[t, s] = G_t - G_s with G = cumsum(g): the textbook shortcut (do not use)."""
    G = np.cumsum(g)
    L = G[:, None] - G[None, :]
    return np.where(np.tri(len(g), dtype=bool), L, -np.inf)


def segsum_loop(g):
    """L[t, s] = g_{s+1} + ... + g_t summed term by term: the definition, O(T^3)."""
    T = len(g)
    L = np.full((T, T), -np.inf)
    for t in range(T):
        for s in range(t + 1):
            L[t, s] = sum(g[s + 1:t + 1]) if t > s else 0.0
    return L


rng = np.random.default_rng(0)
g = np.log(rng.uniform(0.5, 0.99, size=12))
assert np.allclose(np.exp(segsum_naive(g)), np.exp(segsum_loop(g)), rtol=1e-13, atol=0)
assert np.allclose(np.exp(segsum(g)), np.exp(segsum_loop(g)), rtol=1e-13, atol=0)
print("on tame inputs both agree with the term-by-term sums")

# %%
# The foil, failure 1: a hard reset gives NaN
# -------------------------------------------
# A gate that closes completely (:math:`a_t = 0`, ``g_t = -inf``: a document boundary, a
# forget gate at zero) makes every cumulative sum after it ``-inf``. The difference of two of
# them is ``-inf - (-inf) = NaN``, and the NaN spreads through ``o = M V`` to every later output.
g_reset = g.copy()
g_reset[5] = -np.inf
with np.errstate(invalid="ignore"):
    naive = np.exp(segsum_naive(g_reset))
stable = np.exp(segsum(g_reset))
print("NaN entries, naive:", int(np.isnan(naive).sum()), "  segsum:", int(np.isnan(stable).sum()))
assert np.isnan(naive).any() and not np.isnan(stable).any()
# the stable mask is exact: nothing before the reset reaches anything at or after it
assert np.all(stable[5:, :5] == 0.0)
assert np.allclose(stable, np.exp(segsum_loop(g_reset)), rtol=1e-13, atol=0)

# %%
# The foil, failure 2: long or strongly decaying sequences lose their digits
# --------------------------------------------------------------------------
# In float32 (what kernels compute in), ``cumsum(g)`` grows like ``t * mean(g)``; once it is
# large its rounding error is larger than the short-range sums we need. Take a strong decay,
# ``g = -2`` per step, over T steps: :math:`G_T = -2T`. The exact decay between neighbours is
# :math:`e^{-2} = 0.135`; the naive difference ``G_t - G_{t-1}`` is computed from two numbers of
# size 2t and carries their rounding error, about :math:`2t \cdot 6\times10^{-8}`.
T = 2048 if QUICK else 16384
g32 = np.full(T, -2.0, dtype=np.float32) + np.float32(1e-3) * rng.standard_normal(T).astype(np.float32)
G32 = np.cumsum(g32, dtype=np.float32)
neighbour_naive = np.exp((G32[1:] - G32[:-1]).astype(np.float64))       # e^{G_t - G_{t-1}}
neighbour_exact = np.exp(g32[1:].astype(np.float64))                    # e^{g_t}: what it should be
err = np.abs(neighbour_naive / neighbour_exact - 1)
print(f"relative error of e^(G_t - G_(t-1)), float32, T = {T}: median {np.median(err):.1e}, "
      f"worst {err.max():.1e} (float32 rounding is 6e-8)")
assert err.max() > 1e-4          # thousands of times float32's rounding: the digits are gone

# %%
# The other shortcut, ``exp(G_t) / exp(G_s)``, is worse: ``exp(-2 T)`` underflows to 0 after
# about 50 steps in float32, and 0 / 0 = NaN.
with np.errstate(invalid="ignore", under="ignore", divide="ignore"):
    ratio = np.exp(G32[1:]) / np.exp(G32[:-1])
print("NaN entries of exp(G_t) / exp(G_s):", int(np.isnan(ratio).sum()), "of", ratio.size)
assert np.isnan(ratio).any()

# %%
# The stable segment sum
# ----------------------
# ``linrec_ref._scan.segsum`` builds :math:`L_{ts}` as a cumulative sum *down each column* of a
# masked copy of g: column s holds :math:`g_t` for :math:`t > s` and 0 elsewhere, so the running
# sum down the column is exactly :math:`g_{s+1} + \dots + g_t`, no subtraction anywhere. A
# ``-inf`` stays ``-inf`` (an exact 0 after exp) and every entry is a sum of only the terms it
# needs, so its rounding error is that of a sum of ``t - s`` numbers, not of ``t``. It costs
# O(T^2) memory, which is why kernels use it only inside a chunk of C steps.
L = segsum(g32[:64].astype(np.float64))
assert np.allclose(np.diag(L, -1), g32[1:64])           # neighbours: exactly g_t
print("segsum's neighbour sums are exactly g_t; its source is short enough to read:")
import inspect

print(inspect.getsource(segsum))

# %%
# Step 2: split time into chunks
# ------------------------------
# Write t as (chunk n, offset i). For a query in chunk n, the keys split into those in the same
# chunk (a small masked-attention problem, the parallel form of tutorial 1 on C x C matrices) and
# those in earlier chunks, which reach it only through the state :math:`S_{in}` entering the
# chunk. With :math:`G_i` the cumulative log decay inside the chunk (a sum of at most C terms):
#
# .. math::
#
#     o_{t} = \sum_{s \in \text{chunk}, s \le t} \text{scale}\,(q_t \cdot k_s)\, e^{L_{ts}} v_s
#             + \text{scale}\; e^{G_i}\, S_{in}^\top q_t .
#
# Step 3: carry the state across chunks
# -------------------------------------
# The state at the end of a chunk is the state entering it, decayed over the whole chunk, plus
# the chunk's own writes decayed to the chunk's end:
#
# .. math::
#
#     S_{out} = e^{G_C} S_{in} + \sum_{s \in \text{chunk}} e^{L_{Cs}}\, k_s v_s^\top .
#
# Every decay is now either a segment sum inside one chunk (``segsum``, exact) or a cumulative
# sum of at most C log gates (``G_i``, small). Hard resets give exact zeros and nothing grows
# with T. Here is the whole form, checked against the loop on a sequence with a hard reset and
# strongly decaying gates.


def chunkwise_simple_gla(q, k, v, g, C, scale):
    """One head: q, k [T, K], v [T, V], g [T]. Returns o [T, V] and the final state [K, V]."""
    T, K = k.shape
    S = np.zeros((K, v.shape[1]))
    o = np.zeros((T, v.shape[1]))
    for start in range(0, T, C):
        sl = slice(start, min(start + C, T))
        L = segsum(g[sl])                                   # step 1, inside the chunk only
        G = np.cumsum(g[sl])
        o[sl] = (scale * (q[sl] @ k[sl].T) * np.exp(L)) @ v[sl] \
            + scale * np.exp(G)[:, None] * (q[sl] @ S)      # step 2
        S = np.exp(G[-1]) * S + (k[sl] * np.exp(L[-1])[:, None]).T @ v[sl]   # step 3
    return o, S


T2, K, V = (40, 4, 4) if QUICK else (200, 8, 8)
q, k, v = (rng.standard_normal((T2, d)) for d in (K, K, V))
g = np.log(rng.uniform(0.05, 0.99, size=T2))
g[T2 // 3] = -np.inf                                        # a hard reset
o_chunk, S_chunk = chunkwise_simple_gla(q, k, v, g, C=16, scale=K ** -0.5)

o_loop, S_loop = linrec_ref.simple_gla(q[None, :, None], k[None, :, None], v[None, :, None],
                                       g[None, :, None], form="recurrent", output_final_state=True)
err = np.max(np.abs(o_chunk - o_loop[0, :, 0])) / np.max(np.abs(o_loop))
print(f"chunkwise (by hand) vs the loop, with a hard reset: {err:.1e}")
assert err < 1e-14 and np.isfinite(o_chunk).all()

# %%
# What the library adds
# ---------------------
# ``linrec_ref.simple_gla(..., form="chunkwise")`` is the same three steps, vectorised over
# batch, heads and chunks (one matrix product per step for all chunks at once, then a loop over
# chunks for the carry), with T not a multiple of C, initial and final states and packed
# variable-length batches. Per-channel decays (GLA, KDA) need one more idea, because the decay
# is then a vector and cannot be pulled out of ``q . k``: see the module ``linrec_ref._decay``.
o_lib, _ = linrec_ref.simple_gla(q[None, :, None], k[None, :, None], v[None, :, None],
                                 g[None, :, None], form="chunkwise", chunk_size=16)
assert np.max(np.abs(o_lib[0, :, 0] - o_chunk)) / np.max(np.abs(o_chunk)) < 1e-14
print("the library's chunkwise form gives the same outputs")
