"""
The family portrait: every op's implicit attention, and what each transition can forget
=======================================================================================

**At the end of this page you can** compute the implicit attention matrix of any op in the
library, read off from it how the op mixes the past, and place each op in its transition class
(none, scalar, diagonal, Householder, diagonal plus low rank) with what that class can and
cannot forget.

Every linear recurrence with a zero initial state computes :math:`o = M v` for some causal
T x T matrix :math:`M` that depends on the queries, keys and gates but not on the values: its
*implicit attention*. ``linrec_ref.<op>.attention_matrix`` returns it ([B, H, T, T]).
"""

# %%
# The same queries and keys for every op
# --------------------------------------
# Each op gets its own gates from ``linrec_ref.testing.make_inputs`` (the "typical" regime); the
# queries and keys (receptance ``r`` for the RWKV ops) are shared, unit norm, so that the
# differences between the pictures are the transitions alone.
import inspect
import os

import numpy as np

import linrec_ref
from linrec_ref import registry, testing

QUICK = os.environ.get("LINREC_TUTORIAL_QUICK") == "1"
T = 16 if QUICK else 48
rng = np.random.default_rng(0)
shared_q = rng.standard_normal((1, T, 1, 8))
shared_q /= np.linalg.norm(shared_q, axis=-1, keepdims=True)
shared_k = rng.standard_normal((1, T, 1, 8))
shared_k /= np.linalg.norm(shared_k, axis=-1, keepdims=True)

maps, inputs = {}, {}
for op in registry.OP_NAMES:
    module = registry.module(op)
    if not hasattr(module, "attention_matrix"):
        print(f"{op}: no attention matrix (its state is a vector driven by inputs, not keys)")
        continue
    dims = {"T": T, "B": 1, **({"H": 1} if "H" in testing.default_dims(op) else {})}
    x = testing.make_inputs(op, "typical", **dims)
    for name, shared in (("q", shared_q), ("r", shared_q), ("k", shared_k)):
        if name in x and x[name].shape == shared.shape:
            x[name] = shared
    accepted = inspect.signature(module.attention_matrix).parameters
    maps[op] = getattr(linrec_ref, op).attention_matrix(**{k: v for k, v in x.items() if k in accepted})
    inputs[op] = x
print(f"{len(maps)} ops have an implicit attention matrix")

# %%
# The claim o = M v, checked
# --------------------------
# For the ops whose output is exactly the attention matrix times the values (no skip term, no
# normaliser applied after the product), the recurrent loop and ``M @ v`` agree to rounding.
exact = ("linear_attention", "retnet", "simple_gla", "gla", "delta_rule", "gated_delta_rule",
         "kda", "dplr", "rwkv7", "softmax_attention")
for op in exact:
    x = inputs[op]
    o, _ = testing.run(op, "recurrent", x)                         # [B, T, HV, V]
    M = maps[op]                                                   # [B, HV, T, T]
    o_from_M = np.moveaxis(M @ np.moveaxis(x["v"], 1, 2), 2, 1)
    err = np.max(np.abs(o - o_from_M)) / np.max(np.abs(o))
    assert err < 1e-12, (op, err)
print("o = M v to 1e-12 for:", ", ".join(exact))

# %%
# The portrait
# ------------
# One panel per op (batch 0, head 0; for mamba and hgrn, one channel). Colour is signed: red
# positive, blue negative, white zero; each panel has its own scale.
import matplotlib.pyplot as plt

ncols = 5
nrows = -(-len(maps) // ncols)
fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols, 2.7 * nrows))
for ax in axes.flat:
    ax.axis("off")
for ax, (op, M) in zip(axes.flat, maps.items()):
    m = M[0, 0]
    lim = np.abs(m).max() or 1.0
    ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_title(f"{op}\n({registry.spec(op).transition})", fontsize=8)
fig.suptitle("implicit attention M[t, s] (rows: query t, columns: key s)", fontsize=10)
fig.tight_layout()
plt.show()

# %%
# Reading the pictures
# --------------------
# * **linear_attention** has no transition: every past key counts with its raw score forever,
#   and the rows never fade.
# * **retnet** has one fixed decay per head: the same geometric fade in every row.
# * **simple_gla / mamba2 / mlstm** have a scalar, data-dependent decay: rows fade at a rate
#   chosen per token, the same for every channel.
# * **gla, mamba, rwkv6, hgrn** decay each channel separately (diagonal): the picture depends on
#   which channels the query reads.
# * **delta_rule, gated_delta_rule, kda, delta_product** are Householder-type: a new key
#   *removes* what older similar keys wrote, so the map has negative entries where a key was
#   overwritten; the gated versions also fade.
# * **dplr / rwkv7** add a low-rank correction to a diagonal decay: a generalised delta rule.
# * **softmax_attention** is the baseline: no state of fixed size; its rows are probability
#   distributions (non-negative, summing to 1).
row_sums = maps["softmax_attention"][0, 0].sum(axis=-1)
assert np.allclose(row_sums, 1.0) and (maps["softmax_attention"] >= 0).all()
assert (maps["delta_rule"][0, 0] < -1e-3).any()                   # overwrites show as negatives
print("softmax rows sum to 1; the delta rule's map has negative (overwritten) entries")

# %%
# What each transition class can forget
# -------------------------------------
# The transition :math:`A_t` multiplies the state each step (:math:`S_t = A_t S_{t-1} + \dots`).
#
# ======================  ========================  ================================================
# class                   A_t                       what it can forget
# ======================  ========================  ================================================
# none                    I                         nothing: the state only accumulates
# scalar                  a_t I, a_t in [0, 1]      everything at once, at a rate chosen per token
# diagonal                diag(a_t)                 each key channel at its own rate
# Householder             I - beta_t k_t k_t^T      exactly the direction k_t (overwrite, not fade)
# gated Householder       a_t (I - beta_t k k^T)    both: fade everything, overwrite one direction
# diagonal plus low rank  diag(w_t) + a_t b_t^T     a channel-wise fade plus a rank-1 edit
# ======================  ========================  ================================================
#
# The class of every op, as the registry records it:
for op in registry.OP_NAMES:
    print(f"  {op:18s} {registry.spec(op).transition}")
