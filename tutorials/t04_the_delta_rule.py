"""
The delta rule: regression online, Householder products, and the UT/WY chunk form
=================================================================================

**At the end of this page you can** read the delta rule as one step of online regression,
write its transition as a Householder-like matrix, say why multiplying those matrices token by
token costs d^3 per token, build the chunk's transition from one triangular solve (the UT/WY
form) and check it, and explain what a write strength beta in (1, 2) does: a negative eigenvalue.

The recurrence (one head; state ``S`` of shape [K, V] maps keys to values):

.. math::

    S_t = S_{t-1} + \\beta_t\\, k_t\\, (v_t - S_{t-1}^\\top k_t)^\\top
        = (I - \\beta_t k_t k_t^\\top)\\, S_{t-1} + \\beta_t k_t v_t^\\top,
    \\qquad o_t = \\text{scale}\\; S_t^\\top q_t .
"""

# %%
# 1. Online regression
# --------------------
# The state is a linear map from keys to values. Given a new pair :math:`(k_t, v_t)`, one step of
# gradient descent on the squared error :math:`\tfrac12 \|S^\top k_t - v_t\|^2` with learning rate
# :math:`\beta_t` is exactly the update above (the gradient is :math:`k_t (S^\top k_t - v_t)^\top`).
# With a unit key and :math:`\beta = 1` the step solves the regression for that key in one go:
# the value stored under :math:`k_t` *becomes* :math:`v_t`, overwriting what was there. Plain
# linear attention only ever adds (:math:`S_t = S_{t-1} + k_t v_t^\top`), so old values under the
# same key pile up instead.
import os

import numpy as np

import linrec_ref

QUICK = os.environ.get("LINREC_TUTORIAL_QUICK") == "1"
rng = np.random.default_rng(0)
K = V = 4 if QUICK else 8


def unit(x):
    return x / np.linalg.norm(x)


S = rng.standard_normal((K, V))
k, v_new = unit(rng.standard_normal(K)), rng.standard_normal(V)
S_delta = S + 1.0 * np.outer(k, v_new - S.T @ k)          # beta = 1
S_linear = S + np.outer(k, v_new)
print("read back under k, delta rule:     ", np.round(S_delta.T @ k, 3))
print("read back under k, linear attention:", np.round(S_linear.T @ k, 3))
print("the value written:                  ", np.round(v_new, 3))
assert np.allclose(S_delta.T @ k, v_new)                   # overwritten exactly
assert not np.allclose(S_linear.T @ k, v_new)              # added on top of the old value

# %%
# 2. The transition is a (generalised) Householder matrix
# -------------------------------------------------------
# :math:`H_t = I - \beta_t k_t k_t^\top`. For a unit key its eigenvalues are 1 (K - 1 times, every
# direction orthogonal to :math:`k_t` is left alone) and :math:`1 - \beta_t` (the direction
# :math:`k_t`). So :math:`\beta \in [0, 1]` shrinks the stored value along :math:`k_t`,
# :math:`\beta = 2` is a true reflection (eigenvalue -1), and :math:`\beta \in (1, 2)` gives a
# negative eigenvalue of magnitude below 1: the state still never grows, but it can flip sign
# along :math:`k_t`. That is what ``allow_neg_eigval`` in the training stack turns on, and what
# lets a delta model track parity-like state (a diagonal decay in [0, 1] cannot).
for beta in (0.5, 1.0, 1.5, 2.0):
    eig = np.linalg.eigvalsh(np.eye(K) - beta * np.outer(k, k))
    print(f"beta = {beta}: eigenvalues {np.round(np.sort(eig), 6)}")
    assert np.isclose(eig.min(), 1 - beta) and np.isclose(eig.max(), 1.0)

# %%
# 3. Why not multiply the transitions?
# ------------------------------------
# Unrolled, :math:`S_t = H_t H_{t-1} \cdots H_{s+1}` applied to what was written at s. The
# products are dense K x K matrices: forming them token by token costs :math:`K^3` per token
# (a parallel scan needs them too, so a scan costs :math:`O(K^3)` per combine), against
# :math:`K V` for the loop. At K = 128 that is 128 times the work of the recurrence itself.
# The chunkwise form avoids it: the product of C transitions has the *WY form*
#
# .. math::
#
#     \prod_{t=1}^{C} (I - \beta_t k_t k_t^\top) = I - K^\top W,
#
# with :math:`K` the chunk's keys as rows and :math:`W` (C x K) obtained from one C x C
# triangular solve: :math:`A = I + \text{tril}(\text{diag}(\beta) K K^\top, -1)`,
# :math:`T = A^{-1} \text{diag}(\beta)` (the "UT transform"), :math:`W = T K`. Cost: O(C^2 K)
# per chunk instead of C K^3. Check it against the explicit product:
C = 6 if QUICK else 16
keys = np.stack([unit(rng.standard_normal(K)) for _ in range(C)])     # [C, K]
beta = rng.uniform(0.1, 1.9, size=C)
product = np.eye(K)
for t in range(C):                                         # H_C ... H_1, newest on the left
    product = (np.eye(K) - beta[t] * np.outer(keys[t], keys[t])) @ product
A = np.eye(C) + np.tril(beta[:, None] * (keys @ keys.T), -1)
T_ut = np.linalg.solve(A, np.diag(beta))                   # A^{-1} diag(beta): lower triangular
W = T_ut @ keys                                            # [C, K]
wy = np.eye(K) - keys.T @ W
print(f"WY form vs the product of {C} transitions: {np.max(np.abs(wy - product)):.1e}")
assert np.allclose(wy, product, atol=1e-12)

# %%
# The same triangular system gives the values each token actually writes. Entering with state
# :math:`S_0`, the "new values" :math:`\delta_t = \beta_t (v_t - S_{t-1}^\top k_t)` satisfy
# :math:`A \Delta = \text{diag}(\beta) (V - K S_0)`, so :math:`\Delta = U - W S_0` with
# :math:`U = T V`; the chunk ends in :math:`S_C = S_0 + K^\top \Delta` and its outputs are
# :math:`O = \text{scale}\,[Q S_0 + \text{tril}(Q K^\top) \Delta]`. The library exposes these
# intermediates so that a kernel's sub-steps can be checked one by one:
T = 3 * C
q, kk = rng.standard_normal((1, T, 1, K)), rng.standard_normal((1, T, 1, K))
kk /= np.linalg.norm(kk, axis=-1, keepdims=True)
vv, bb = rng.standard_normal((1, T, 1, V)), rng.uniform(0.1, 1.9, size=(1, T, 1))
parts = linrec_ref.delta_rule.chunk_intermediates(q, kk, vv, bb, chunk_size=C)
print("intermediates:", sorted(parts))
# the loop's state after the first chunk is the state entering the second
_, S_after_first = linrec_ref.delta_rule(q[:, :C], kk[:, :C], vv[:, :C], bb[:, :C], form="recurrent",
                                         output_final_state=True)
assert np.allclose(parts["S_in"][0, 0, 1], S_after_first[0, 0], atol=1e-12)
# and the chunk's WY transition built from its w matches the explicit product for chunk 0
P0 = np.eye(K) - kk[0, :C, 0].T @ parts["w"][0, 0, 0]
explicit = np.eye(K)
for t in range(C):
    explicit = (np.eye(K) - bb[0, t, 0] * np.outer(kk[0, t, 0], kk[0, t, 0])) @ explicit
assert np.allclose(P0, explicit, atol=1e-12)

# %%
# 4. The three forms agree, beta in (0, 2) included
# -------------------------------------------------
o_loop, S_loop = linrec_ref.delta_rule(q, kk, vv, bb, form="recurrent", output_final_state=True)
for form, extra in (("parallel", {}), ("chunkwise", {"chunk_size": C})):
    o, S_end = linrec_ref.delta_rule(q, kk, vv, bb, form=form, output_final_state=True, **extra)
    err = np.max(np.abs(o - o_loop)) / np.max(np.abs(o_loop))
    print(f"{form:9s} vs recurrent: {err:.1e}")
    assert err < 1e-12 and np.allclose(S_end, S_loop, atol=1e-12)

# %%
# Negative eigenvalues at work: write v = 0 under the same unit key twice. With beta = 1 the
# value stored under the key is erased at once. With beta = 2 it is flipped, then flipped back:
# the transition has eigenvalue -1 along the key. A diagonal gate in [0, 1] could only shrink it.
key = unit(rng.standard_normal(K))[None, None, None, :]               # [1, 1, 1, K]
S0 = rng.standard_normal((1, 1, K, V))
stored0 = S0[0, 0].T @ key[0, 0, 0]                                   # the value under k at the start


def along(S):
    """The value stored under the key, projected on the starting one (signed)."""
    return float((S[0, 0].T @ key[0, 0, 0]) @ stored0 / np.linalg.norm(stored0))


zero_v = np.zeros((1, 1, 1, V))
for b in (1.0, 2.0):
    S, path = S0, [along(S0)]
    for _ in range(2):
        _, S = linrec_ref.delta_rule(key, key, zero_v, np.full((1, 1, 1), b), form="recurrent",
                                     initial_state=S, output_final_state=True)
        path.append(along(S))
    print(f"beta = {b}: the value under k after 0, 1, 2 writes of v = 0: {np.round(path, 4)}")
assert np.allclose(path, [path[0], -path[0], path[0]])     # beta = 2: flipped, then flipped back
print("beta = 2 reflects the value stored under k instead of erasing it")
