"""
One recurrence, three ways
==========================

**At the end of this page you can** write the scalar-gated linear recurrence behind Mamba-2 and
simple GLA as a loop, as masked attention and in chunks, say what each form costs, and check that
the three agree to rounding (1e-15 relative, in float64) on your own inputs.

The recurrence, for one head (state ``S`` of shape [K, V], inputs at step t):

.. math::

    S_t = a_t S_{t-1} + k_t v_t^\\top, \\qquad o_t = \\text{scale} \\cdot S_t^\\top q_t,
    \\qquad a_t = e^{g_t} \\in [0, 1].

``g_t <= 0`` is the log of the decay: the library's convention, and the field's.
"""

# %%
# Inputs
# ------
# Shapes follow the layout [B, T, H, D]: batch, time, heads, channels. One batch element and one
# head keep the arithmetic visible; every line below works for any B and H.
import os

import numpy as np

import linrec_ref

QUICK = os.environ.get("LINREC_TUTORIAL_QUICK") == "1"    # the test suite runs a smaller copy
T, K, V = (24, 4, 4) if QUICK else (64, 8, 8)
rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((1, T, 1, d)) for d in (K, K, V))
g = np.log(rng.uniform(0.80, 0.99, size=(1, T, 1)))      # log decays, one per step and head
scale = K ** -0.5


def rel_err(x, ref):
    """max |x - ref| / max |ref|: the error measure used on this page."""
    return float(np.max(np.abs(x - ref)) / np.max(np.abs(ref)))


# %%
# 1. The loop: the definition
# ---------------------------
# Four lines. Memory is one [K, V] state; time is T steps of O(K V) work that cannot run in
# parallel over t. This is the ground truth every other form is checked against.
S = np.zeros((K, V))
o_loop = np.zeros((T, V))
for t in range(T):
    S = np.exp(g[0, t, 0]) * S + np.outer(k[0, t, 0], v[0, t, 0])
    o_loop[t] = scale * S.T @ q[0, t, 0]

# every form returns (o, final_state); the state is None unless output_final_state=True
o_ref, _ = linrec_ref.simple_gla(q, k, v, g, form="recurrent", backend="numpy")
print("loop vs linrec_ref recurrent:", rel_err(o_loop, o_ref[0, :, 0]))
assert rel_err(o_loop, o_ref[0, :, 0]) < 1e-15

# %%
# 2. Masked attention: the parallel form
# --------------------------------------
# Unroll the loop: :math:`S_t = \sum_{s \le t} (a_{s+1} \cdots a_t)\, k_s v_s^\top`, so
#
# .. math::
#
#     o_t = \sum_{s \le t} \underbrace{\text{scale}\,(q_t \cdot k_s)\, D_{ts}}_{M_{ts}} v_s,
#     \qquad D_{ts} = \exp\Big(\sum_{j=s+1}^{t} g_j\Big) \ (s \le t), \quad 0 \ (s > t).
#
# ``D`` is the *decay mask*: causal, 1 on the diagonal, fading away from it. ``M`` is the op's
# implicit attention matrix, and ``o = M V`` is one matrix product: parallel over t, but T x T
# memory and O(T^2 K) work. The sums of ``g`` come from ``segsum``, which never subtracts two
# cumulative sums (tutorial 2 shows why).
from linrec_ref._scan import segsum

D = np.exp(segsum(g[0, :, 0]))                           # [T, T], D[t, s]
M = scale * (q[0, :, 0] @ k[0, :, 0].T) * D              # [T, T]
o_par = M @ v[0, :, 0]
print("masked attention vs loop:   ", rel_err(o_par, o_loop))
assert rel_err(o_par, o_loop) < 1e-15

# the library computes the same matrix, for every batch element and head: [B, H, T, T]
M_lib = linrec_ref.simple_gla.attention_matrix(q, k, g, scale=scale)
assert rel_err(M_lib[0, 0], M) < 1e-15

# %%
# Here is what the two matrices look like. The decay mask is lower-triangular and smooth; the
# attention matrix is the decay mask times the (signed) query-key scores.
import matplotlib.pyplot as plt

fig, axes = plt.subplots(1, 2, figsize=(9, 4))
im = axes[0].imshow(D, cmap="viridis", vmin=0, vmax=1)
axes[0].set(title="decay mask D[t, s]", xlabel="s (key position)", ylabel="t (query position)")
fig.colorbar(im, ax=axes[0], shrink=0.8)
lim = np.abs(M).max()
im = axes[1].imshow(M, cmap="RdBu_r", vmin=-lim, vmax=lim)
axes[1].set(title="implicit attention M = scale (Q K^T) * D", xlabel="s", ylabel="t")
fig.colorbar(im, ax=axes[1], shrink=0.8)
fig.tight_layout()
plt.show()

# %%
# 3. Chunks: the form fast kernels use
# ------------------------------------
# Cut time into chunks of C steps. Inside a chunk use the parallel form (small C x C matrices, on
# tensor cores in a GPU kernel); across chunks carry the state with the recurrence. With
# :math:`G_t` the cumulative log decay *inside* the chunk (``G = cumsum(g_chunk)``), the state
# entering the chunk ``S_in`` and the chunk's own writes:
#
# .. math::
#
#     o_t = \underbrace{\sum_{s \le t \in \text{chunk}} M_{ts} v_s}_{\text{intra}}
#           + \underbrace{\text{scale}\, e^{G_t} S_{in}^\top q_t}_{\text{inter}}, \qquad
#     S_{out} = e^{G_C} S_{in} + \sum_{s} e^{G_C - G_s} k_s v_s^\top .
#
# Work: O(T C K) inside chunks plus O(T/C * K V) for the carries; memory O(T/C * K V) if the
# chunk states are kept for the backward. ``G_C - G_s`` is a difference of cumulative sums, but
# over at most C steps, and it is taken from ``segsum``'s last row below, so it stays exact.
C = 8 if QUICK else 16
S_in = np.zeros((K, V))
o_chunk = np.zeros((T, V))
for start in range(0, T, C):
    sl = slice(start, min(start + C, T))
    qc, kc, vc, gc = q[0, sl, 0], k[0, sl, 0], v[0, sl, 0], g[0, sl, 0]
    Dc = np.exp(segsum(gc))                              # [C, C] the chunk's decay mask
    a_from_start = np.exp(np.cumsum(gc))                 # e^{G_t}
    a_to_end = Dc[-1]                                    # e^{G_C - G_s}, from segsum: exact
    intra = (scale * (qc @ kc.T) * Dc) @ vc
    inter = scale * a_from_start[:, None] * (qc @ S_in)
    o_chunk[sl] = intra + inter
    S_in = a_from_start[-1] * S_in + (kc * a_to_end[:, None]).T @ vc

print("chunks vs loop:             ", rel_err(o_chunk, o_loop))
assert rel_err(o_chunk, o_loop) < 1e-15
o_lib, _ = linrec_ref.simple_gla(q, k, v, g, form="chunkwise", chunk_size=C, backend="numpy")
assert rel_err(o_lib[0, :, 0], o_loop) < 1e-15

# %%
# The final state is the same in every form too (``output_final_state=True`` returns it), so a
# long sequence can be processed in pieces: the state after the first half is the initial state
# of the second.
o1, S1 = linrec_ref.simple_gla(q[:, :T // 2], k[:, :T // 2], v[:, :T // 2], g[:, :T // 2],
                               form="chunkwise", chunk_size=C, output_final_state=True)
o2, S2 = linrec_ref.simple_gla(q[:, T // 2:], k[:, T // 2:], v[:, T // 2:], g[:, T // 2:],
                               form="parallel", initial_state=S1, output_final_state=True)
assert rel_err(np.concatenate([o1, o2], axis=1)[0, :, 0], o_loop) < 1e-15
assert rel_err(S2[0, 0], S) < 1e-15
print("split in two, carried state: agrees; final state vs loop:", rel_err(S2[0, 0], S))

# %%
# What each form costs
# --------------------
# =========  ===============  ==============  ===========================================
# form       work             memory          where it is used
# =========  ===============  ==============  ===========================================
# recurrent  T K V, serial    K V             decoding; the definition; the ground truth
# parallel   T^2 (K + V)      T^2             short sequences; it shows the attention map
# chunkwise  T C (K + V)      T/C K V         training kernels: matrix products of size C
#            + T K V
# =========  ===============  ==============  ===========================================
#
# All three agree to rounding on these inputs (the asserts above). The next tutorial derives
# the chunkwise form step by step, including the way *not* to compute the decays.
