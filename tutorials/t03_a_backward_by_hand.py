"""
A backward pass by hand
=======================

**At the end of this page you can** derive the backward pass of a gated linear recurrence (its
*adjoint recurrence*, which runs backwards in time), write it in a dozen lines, check it with
finite differences, and read the chunkwise backward the library uses, including the identity
that gives the gradient of the gates without storing every state.

Notation: a ``d`` prefix is a cotangent, the gradient of a scalar loss :math:`\\mathcal{L}`:
``do`` = :math:`\\partial\\mathcal{L}/\\partial o`, and so on. The recurrence (simple_gla, one
head):

.. math::

    S_t = a_t S_{t-1} + k_t v_t^\\top,\\quad o_t = \\text{scale}\\; S_t^\\top q_t,\\quad a_t = e^{g_t}.
"""

# %%
# Deriving the adjoint
# --------------------
# :math:`S_t` influences the loss through :math:`o_t` and through :math:`S_{t+1}`. Collecting both
# paths gives the cotangent of the state, a recurrence that runs from t = T down to 1:
#
# .. math::
#
#     dS_t = \text{scale}\; q_t\, do_t^\top + a_{t+1}\, dS_{t+1}, \qquad dS_{T+1} = 0
#
# (or the cotangent of the final state, when the loss uses it). Then each input's gradient is
# read off the step it enters:
#
# .. math::
#
#     dq_t = \text{scale}\; S_t\, do_t,\quad dk_t = dS_t\, v_t,\quad dv_t = dS_t^\top k_t,\quad
#     dg_t = a_t \langle dS_t, S_{t-1} \rangle .
#
# The adjoint of a linear recurrence is the same kind of recurrence, reversed: the decays
# :math:`a_{t+1}` now carry cotangents backwards. It needs :math:`S_{t-1}` and :math:`S_t` at
# every step; storing all T states costs T K V memory, so the library's recurrent backward
# recomputes them from checkpoints every ~sqrt(T) steps instead.
import os

import numpy as np

import linrec_ref

QUICK = os.environ.get("LINREC_TUTORIAL_QUICK") == "1"
T, K, V = (12, 3, 2) if QUICK else (32, 4, 3)
rng = np.random.default_rng(1)
q, k, v = (rng.standard_normal((T, d)) for d in (K, K, V))
g = np.log(rng.uniform(0.6, 0.99, size=T))
do = rng.standard_normal((T, V))                 # the cotangent of the outputs
scale = K ** -0.5


def forward(q, k, v, g):
    S = np.zeros((K, V))
    states, o = [S], np.zeros((T, V))
    for t in range(T):
        S = np.exp(g[t]) * S + np.outer(k[t], v[t])
        states.append(S)
        o[t] = scale * S.T @ q[t]
    return o, states                             # states[t + 1] = S_t, states[0] = S_0 = 0


def backward(q, k, v, g, do):
    """The adjoint recurrence above, t = T .. 1 (0-based: T-1 .. 0)."""
    _, states = forward(q, k, v, g)
    dq, dk, dv, dg = (np.zeros_like(x) for x in (q, k, v, g))
    dS = np.zeros((K, V))
    for t in reversed(range(T)):
        a_next = np.exp(g[t + 1]) if t + 1 < T else 0.0
        dS = scale * np.outer(q[t], do[t]) + a_next * dS
        dq[t] = scale * states[t + 1] @ do[t]
        dk[t] = dS @ v[t]
        dv[t] = dS.T @ k[t]
        dg[t] = np.exp(g[t]) * np.sum(dS * states[t])
    return {"q": dq, "k": dk, "v": dv, "g": dg}


grads = backward(q, k, v, g, do)

# %%
# Checking it with finite differences
# -----------------------------------
# The loss is :math:`\mathcal{L} = \sum_t do_t \cdot o_t`, so its gradient is exactly what the
# backward returns. A central difference :math:`(\mathcal{L}(x + h e_i) - \mathcal{L}(x - h e_i))
# / 2h` is accurate to :math:`O(h^2)` plus rounding :math:`O(\epsilon / h)`; in float64,
# ``h = 1e-6`` gives about 1e-9 relative. We check every entry of every input.


def loss(q, k, v, g):
    return float(np.sum(forward(q, k, v, g)[0] * do))


def numerical_gradient(name, h=1e-6):
    inputs = {"q": q, "k": k, "v": v, "g": g}
    x = inputs[name]
    out = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        plus, minus = x.copy(), x.copy()
        plus[i] += h
        minus[i] -= h
        out[i] = (loss(**{**inputs, name: plus}) - loss(**{**inputs, name: minus})) / (2 * h)
    return out


for name in ("q", "k", "v", "g"):
    fd = numerical_gradient(name)
    err = np.max(np.abs(grads[name] - fd)) / np.max(np.abs(fd))
    print(f"d{name}: hand-written vs finite differences {err:.1e}")
    assert err < 1e-7

# %%
# The library's recurrent backward is this same recurrence (vectorised over batch and heads,
# with checkpoints, initial and final states). Shapes go to [B, T, H, D]:
lib = linrec_ref.simple_gla.vjp(q[None, :, None], k[None, :, None], v[None, :, None],
                                g[None, :, None], do=do[None, :, None], form="recurrent",
                                backend="numpy")
for name in ("q", "k", "v", "g"):
    err = np.max(np.abs(lib[name][0, :, 0] - grads[name])) / np.max(np.abs(grads[name]))
    assert err < 1e-13, (name, err)
print("linrec_ref.simple_gla.vjp(form='recurrent') returns the same gradients")

# %%
# The chunkwise backward and the gate identity
# --------------------------------------------
# The chunkwise backward computes dq, dk, dv with the same matrix products as the chunkwise
# forward (transposed), and the state cotangent is carried across chunks exactly like the state,
# backwards. The gates need one more idea. Inside a chunk every decay is a function of the
# cumulative sums :math:`G_t = g_1 + \dots + g_t`: :math:`q_t` meets
# :math:`e^{G_t}` and :math:`k_s` meets :math:`e^{-G_s}` (combined as
# :math:`e^{G_t - G_s}`). Differentiating the loss through those factors gives, for every t,
#
# .. math::
#
#     \frac{\partial \mathcal{L}}{\partial G_t} = q_t \cdot dq_t - k_t \cdot dk_t
#     \quad (+\ \langle dS_{end}, S_{end} \rangle \text{ at the chunk's last step}),
#
# and since :math:`G_t` sums :math:`g_1 .. g_t`, :math:`dg_s = \sum_{t \ge s} \partial
# \mathcal{L}/\partial G_t`: a reverse cumulative sum. No state is needed, only the gradients
# already computed. Over the whole sequence (one chunk):
dG = np.sum(q * grads["q"] - k * grads["k"], axis=1)                  # [T]
dg_identity = np.cumsum(dG[::-1])[::-1]                               # reverse cumulative sum
err = np.max(np.abs(dg_identity - grads["g"])) / np.max(np.abs(grads["g"]))
print(f"dg from the gate identity vs the adjoint recurrence: {err:.1e}")
assert err < 1e-12

# %%
# The identity holds for every chunk separately, which is why kernels reverse-sum dg inside a
# chunk only (summing across chunks instead would count the carried state twice). The library's
# chunkwise backward agrees with the recurrent one:
C = 4 if QUICK else 8
chunk = linrec_ref.simple_gla.vjp(q[None, :, None], k[None, :, None], v[None, :, None],
                                  g[None, :, None], do=do[None, :, None], form="chunkwise",
                                  chunk_size=C, backend="numpy")
for name in ("q", "k", "v", "g"):
    err = np.max(np.abs(chunk[name][0, :, 0] - grads[name])) / np.max(np.abs(grads[name]))
    assert err < 1e-13, (name, err)
print(f"chunkwise backward (C = {C}) agrees with the hand-written one to 1e-13")

# %%
# Finite differences on the library, in one call
# ----------------------------------------------
# ``linrec_ref.testing.fd_check`` is the check the test suite runs on every backward: directional
# derivatives along random directions and the largest entries of each gradient, with a
# fourth-order stencil, judged under the "fd" tolerance tier. Here it checks the chunkwise
# backward of the library on inputs of the "hard reset" regime (some g = -inf: those entries are
# not perturbed, and their gradient must come out finite).
from linrec_ref import testing

x = testing.make_inputs("simple_gla", "hard_reset", T=T, H=1, K=K, V=V)
o, _ = testing.run("simple_gla", "chunkwise", x, chunk_size=C)
do_x = rng.standard_normal(o.shape)
grads_x = linrec_ref.simple_gla.vjp(**x, do=do_x, form="chunkwise", chunk_size=C)


def loss_x(inputs):
    return float(np.sum(testing.run("simple_gla", "recurrent", inputs)[0] * do_x))


assert np.isneginf(x["g"]).any()                       # the regime did put hard resets in
assert all(np.isfinite(grads_x[name]).all() for name in ("q", "k", "v", "g"))
report = testing.fd_check(loss_x, x, grads_x, ["q", "k", "v", "g"])
for name, comparison in report.items():
    print(comparison)
    assert comparison.ok
