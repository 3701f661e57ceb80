"""
Checking your own kernel
========================

**At the end of this page you can** check a chunked kernel of your own against the float64
reference in a few lines, find an off-by-one in its decays and a float32 accumulator with
``linrec_ref.testing`` and the input regimes, read the comparison report, and tell an input
that no float32 evaluation can get right (an ill-conditioned mlstm) from a bug.

The kernel under test is a chunked simple_gla written the way a kernel writer would write it,
with two switches that plant the bugs we will hunt.
"""

# %%
# A kernel with three possible bugs
# ---------------------------------
# ``off_by_one=True`` includes the key's own step in its decay, :math:`e^{g_s + \dots + g_t}`
# instead of :math:`e^{g_{s+1} + \dots + g_t}` (an easy slip when indices are 0-based and
# 1-based in the same head). ``float32_state=True`` keeps the carried state in float32 while
# everything else runs in float64: what a kernel does when its accumulator is float32.
# ``naive_decay=True`` takes the decays as differences of cumulative sums (tutorial 2's foil).
import os

import numpy as np

import linrec_ref
from linrec_ref import testing
from linrec_ref._scan import segsum

QUICK = os.environ.get("LINREC_TUTORIAL_QUICK") == "1"


def my_chunked_simple_gla(q, k, v, g, chunk=16, off_by_one=False, float32_state=False,
                          naive_decay=False):
    """q, k [B, T, H, K], v [B, T, H, V], g [B, T, H] -> o [B, T, H, V] (scale K^-1/2)."""
    B, T, H, K = q.shape
    scale = K ** -0.5
    o = np.zeros(v.shape, np.float64)
    state_dtype = np.float32 if float32_state else np.float64
    for b in range(B):
        for h in range(H):
            S = np.zeros((K, v.shape[-1]), state_dtype)
            for start in range(0, T, chunk):
                sl = slice(start, min(start + chunk, T))
                qc, kc, vc, gc = q[b, sl, h], k[b, sl, h], v[b, sl, h], g[b, sl, h]
                G = np.cumsum(gc)                           # e^{G_t}: decay from the chunk start
                if naive_decay:                             # bug 3: a difference of cumsums
                    with np.errstate(invalid="ignore"):
                        L = np.where(np.tri(len(gc), dtype=bool), G[:, None] - G[None, :], -np.inf)
                else:
                    L = segsum(gc)                          # L[t, s] = g_{s+1} + .. + g_t
                if off_by_one:                              # bug 1: the key's own decay too
                    L = L + gc[None, :]
                D = np.exp(L)
                o[b, sl, h] = (scale * (qc @ kc.T) * D) @ vc + scale * np.exp(G)[:, None] * (qc @ S)
                S = (np.exp(G[-1]) * S + (kc * D[-1][:, None]).T @ vc).astype(state_dtype)
    return o


# %%
# The check: one call per regime
# ------------------------------
# ``testing.make_inputs`` draws inputs of a named regime (the decay regimes of every gated op:
# typical, slow decay, fast forgetting, hard reset); ``testing.run`` calls any form of the
# reference; ``testing.compare`` measures the error against a tolerance tier and says why it
# passed or failed. Against float64, a float64 kernel must meet the "float64" tier.
T = 64 if QUICK else 256
regimes = linrec_ref.simple_gla.spec.regimes


def check(kernel, tier="float64", **kw):
    results = {}
    for regime in regimes:
        x = testing.make_inputs("simple_gla", regime, T=T, seed=3)
        reference, _ = testing.run("simple_gla", "recurrent", x)
        results[regime] = testing.compare(kernel(x["q"], x["k"], x["v"], x["g"], **kw), reference,
                                          tier, name=f"{regime:15s}")
    return results


for regime, c in check(my_chunked_simple_gla).items():
    print(c)
    assert c.ok
print("the correct kernel passes the float64 tier in every regime")

# %%
# Bug 1: the off-by-one decay
# ---------------------------
# The report shows a relative error of order one in every regime: each score is scaled by one
# extra decay factor. Where that factor is close to 1 (slow decay) the error is smaller, which is
# why testing only slowly decaying inputs can hide this bug.
bug1 = check(my_chunked_simple_gla, off_by_one=True)
for regime, c in bug1.items():
    print(c)
assert not any(c.ok for c in bug1.values())
assert bug1["slow_decay"].max_rel < bug1["fast_forgetting"].max_rel
print("off-by-one: fails everywhere, least visibly in slow decay")

# %%
# Bug 2: a float32 accumulator
# ----------------------------
# A float32 state is not wrong, only less precise: judge it by the "float32" tier and it passes;
# the float64 tier catches it: its error is float32's rounding (about 1e-8 to 1e-7 relative).
bug2_64 = check(my_chunked_simple_gla, float32_state=True)
bug2_32 = check(my_chunked_simple_gla, "float32", float32_state=True)
for regime in regimes:
    print(f"{regime:15s} float32 state: max_rel {bug2_64[regime].max_rel:.1e}; "
          f"float64 tier {'ok' if bug2_64[regime].ok else 'FAIL'}, "
          f"float32 tier {'ok' if bug2_32[regime].ok else 'FAIL'}")
assert not any(c.ok for c in bug2_64.values()) and all(c.ok for c in bug2_32.values())

# %%
# Bug 3: decays as differences of cumulative sums
# -----------------------------------------------
# Right on three regimes, NaN on the fourth: a hard reset (g = -inf) makes ``G_t - G_s`` equal
# ``-inf - (-inf)``. The report counts the non-finite entries and says where the first one is.
bug3 = check(my_chunked_simple_gla, naive_decay=True)
for regime, c in bug3.items():
    print(c)
assert [c.ok for c in bug3.values()] == [r != "hard_reset" for r in regimes]
assert bug3["hard_reset"].actual_nonfinite.count > 0

# %%
# Where is the error? A picture of the absolute difference over (time, channel) often says at once: an
# off-by-one is spread over every step, a float32 state starts at the first chunk boundary.
import matplotlib.pyplot as plt

x = testing.make_inputs("simple_gla", "typical", T=T, seed=3)
reference, _ = testing.run("simple_gla", "recurrent", x)
fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
for ax, (title, kw) in zip(axes, (("off-by-one decay", {"off_by_one": True}),
                                  ("float32 state", {"float32_state": True}))):
    diff = np.abs(my_chunked_simple_gla(x["q"], x["k"], x["v"], x["g"], **kw) - reference)
    im = ax.imshow(np.log10(diff[0, :, 0].T + 1e-18), aspect="auto", cmap="magma")
    ax.set(title=f"{title}: log10 |difference|", xlabel="t", ylabel="value channel")
    fig.colorbar(im, ax=ax)
fig.tight_layout()
plt.show()

# %%
# Bug or ill-posed input? mlstm
# -----------------------------
# Some inputs cannot be evaluated accurately in float32 by any algorithm: mlstm divides two sums
# over the past whose terms can cancel. ``testing.mlstm_condition`` measures, per token, how
# much rounding is amplified (kappa); a float32 evaluation is expected to err by up to a few
# hundred times ``6e-8 * kappa``. Far above that is a bug; near it, the input is to blame.
rng = np.random.default_rng(0)
Tm = 128 if QUICK else 512
x = testing.make_inputs("mlstm", "typical", T=Tm, H=1, K=32, V=32, seed=0)   # well conditioned
hard = {"q": 1e3 * rng.standard_normal(x["q"].shape),    # large scores of both signs: they cancel
        "k": 1e3 * rng.standard_normal(x["k"].shape),
        "v": rng.standard_normal(x["v"].shape),
        "i": 3.0 * rng.standard_normal(x["i"].shape),     # input gates spread over e^{+-9}
        "f": np.full(x["f"].shape, np.log(0.999))}        # slow decay: many terms in each sum


def float32_error_in_u_kappa(inputs, bug=False):
    """Per-token float32 error of the library's chunkwise mlstm, in units of 6e-8 * kappa.
    bug=True plants an off-by-one: the kernel reads each token's input gate one step late."""
    ref, _ = testing.run("mlstm", "recurrent", inputs)
    x32 = {k: (v.astype(np.float32) if isinstance(v, np.ndarray) else v) for k, v in inputs.items()}
    if bug:
        x32["i"] = np.concatenate([x32["i"][:, :1], x32["i"][:, :-1]], axis=1)
    o32, _ = testing.run("mlstm", "chunkwise", x32)
    err = np.abs(o32 - ref).max(-1) / np.abs(ref).max(-1)                 # [B, T, H]
    kappa = testing.mlstm_condition(**inputs).output
    tier_ok = testing.compare(o32, ref, "float32").ok
    return err.max(), (err / (6e-8 * kappa)).max(), kappa.max(), tier_ok


for name, inputs, bug in (("typical", x, False), ("ill-conditioned", hard, False),
                          ("typical, buggy", x, True)):
    err, in_units, kappa, tier_ok = float32_error_in_u_kappa(inputs, bug)
    print(f"mlstm {name:16s}: float32 error {err:.1e}, max kappa {kappa:.1e}, error = "
          f"{in_units:.0f} u kappa; float32 tier {'ok' if tier_ok else 'FAIL'}")
    if bug:
        assert in_units > 1e4               # far beyond what rounding can do: a bug
    else:
        assert in_units < 2000              # rounding, amplified by the input: not a bug

# %%
# Reading it: the ill-conditioned input's error is tens of times the typical one's, yet the same
# small multiple of ``u kappa``: the input is to blame, and no float32 kernel could do much
# better. The buggy kernel's error is millions of ``u kappa`` on a well-conditioned input.
# For your own mlstm kernel the rule of thumb is: a few hundred ``u kappa`` at most is
# rounding; 1e4 and more is a bug.
