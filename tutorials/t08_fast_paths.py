"""
Fast paths: one op on every backend, verified, then timed
=========================================================

**At the end of this page you can** run an op on the NumPy reference, the Numba CPU backend
(and the CuPy GPU backend where one is installed) with the same call, verify each against the
float64 loop before trusting its speed, time it the way the benchmark harness does, and say
where the time goes: compilation, the time loop, the backward's recomputation.

The rule of the library: a fast path is validated against the reference *before* it is timed,
and a timing is only ever a ratio against a peer measured in the same run.
"""

# %%
# Which backends are here
# -----------------------
# ``backend="numpy"`` is the readable reference; ``"numba"`` compiles the recurrent forms, their
# backwards and ``step``; ``"auto"`` (the default) picks numba when it is installed.
import os
import time

import numpy as np

import linrec_ref
from linrec_ref import backends, testing

QUICK = os.environ.get("LINREC_TUTORIAL_QUICK") == "1"
print("backends available:", backends.available(), "; auto means", backends.resolved_name("auto"))
have_numba = backends.numba_installed()             # registered is not installed
have_cupy = "cupy" in backends.available()

# %%
# Verify first
# ------------
# gated_delta_rule (Gated DeltaNet's core) on inputs of every regime, float32 and float64, on
# each backend, against the float64 recurrent loop of the reference: float64 results must meet
# the float64 tier, float32 results the float32 tier.
dims = dict(B=1, T=64, H=2, HV=2, K=16, V=16) if QUICK else dict(B=2, T=256, H=4, HV=4, K=32, V=32)
names = ["numpy"] + (["numba"] if have_numba else []) + (["cupy"] if have_cupy else [])
op = "gated_delta_rule"
for regime in linrec_ref.gated_delta_rule.spec.regimes:
    x64 = testing.make_inputs(op, regime, **dims)
    reference, _ = testing.run(op, "recurrent", x64)
    for dtype in (np.float64, np.float32):
        x = {k: (v.astype(dtype) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v)
             for k, v in x64.items()}
        for name in names:
            o, _ = testing.run(op, "recurrent", x, backend=name)
            c = testing.compare(np.asarray(o, np.float64), reference, testing.tier_for(dtype),
                                name=f"{regime:15s} {np.dtype(dtype).name} {name}")
            assert c.ok, str(c)
print(f"{op}: {len(names)} backend(s) x 2 dtypes x {len(linrec_ref.gated_delta_rule.spec.regimes)} "
      "regimes, all within their tiers")

# %%
# Then time
# ---------
# The first call of a Numba kernel compiles it (or loads it from the cache in
# ``~/.cache/linrec_ref/numba``); time that separately. Then the median of several calls, each
# form against the NumPy reference in the same run. These numbers are this machine's today;
# the benchmark harness (``python -m bench cpu``) does the same with more care (pinned threads,
# warm-up, medians of many calls) and writes tables.


def median_seconds(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


x = testing.make_inputs(op, "typical", **dims)
do = np.random.default_rng(0).standard_normal(x["v"].shape)
repeats = 2 if QUICK else 5
timings = {}
for name in names:
    t0 = time.perf_counter()
    linrec_ref.gated_delta_rule(**x, form="recurrent", backend=name)
    first = time.perf_counter() - t0
    fwd = median_seconds(lambda: linrec_ref.gated_delta_rule(**x, form="recurrent", backend=name), repeats)
    bwd = median_seconds(lambda: linrec_ref.gated_delta_rule.vjp(**x, do=do, form="recurrent", backend=name), repeats)
    timings[name] = (first, fwd, bwd)
chunk = median_seconds(lambda: linrec_ref.gated_delta_rule(**x, form="chunkwise", backend="numpy"), repeats)
print(f"T = {dims['T']}, B x H = {dims['B'] * dims['H']}, K = V = {dims['K']}, float64:")
for name, (first, fwd, bwd) in timings.items():
    print(f"  {name:6s} recurrent: first call {first * 1e3:8.1f} ms, forward {fwd * 1e3:7.2f} ms, "
          f"vjp {bwd * 1e3:7.2f} ms ({bwd / fwd:.1f}x the forward)")
print(f"  numpy  chunkwise forward {chunk * 1e3:7.2f} ms")
if have_numba:
    ratio = timings["numpy"][1] / timings["numba"][1]
    print(f"  the NumPy recurrent loop took {ratio:.1f}x the time of the numba kernel here")

# %%
# Threads
# -------
# The Numba kernels run batch x heads in parallel on Numba's thread pool (all cores by default;
# ``num_threads=n`` per call, or NUMBA_NUM_THREADS). A parallel kernel is fast only when its
# threads have cores to themselves: on a machine where other processes are busy (a sweep, a
# build, a second test run), threads that wait for each other lose more than they gain, and one
# thread can be the faster choice. Measure both on your machine:
if have_numba:
    outputs = []
    for n in (1, os.cpu_count() or 1):
        t = median_seconds(lambda: linrec_ref.gated_delta_rule(**x, form="recurrent", backend="numba",
                                                               num_threads=n), repeats)
        print(f"  numba recurrent forward, num_threads={n}: {t * 1e3:.2f} ms")
        outputs.append(linrec_ref.gated_delta_rule(**x, form="recurrent", backend="numba", num_threads=n)[0])
    # each (batch, head) is computed by one thread in the same order: the threads change the
    # time, never the result
    assert np.array_equal(outputs[0], outputs[-1])

# %%
# Where the time goes
# -------------------
# * **The NumPy loop** pays Python's interpreter once per token: T iterations of a few small
#   array operations, each with its call overhead; that is why it is the slowest form and why
#   the NumPy chunkwise form (a loop over chunks, matrix products inside) is much faster.
# * **The Numba kernel** runs the same loop compiled, parallel over batch x heads, with the
#   state in a local K x V array: its time is T steps of O(K V) arithmetic, no Python in between.
# * **The backward** (``vjp``) walks time backwards and needs every state; the kernels keep a
#   checkpoint every ~sqrt(T) steps and recompute the states in between, so a vjp costs several
#   forwards (the ratio printed above) but only O(sqrt(T) K V) memory.
# * **Compilation** is paid once per kernel and dtype per machine (the cache keeps it).
#
# Growing T shows the shape of it: the recurrent forms scale linearly in T.
Ts = (32, 64, 128) if QUICK else (128, 256, 512, 1024)
rows = []
for T in Ts:
    xt = testing.make_inputs(op, "typical", **{**dims, "T": T})
    row = [T]
    for name in names:
        row.append(median_seconds(lambda: linrec_ref.gated_delta_rule(**xt, form="recurrent", backend=name), repeats))
    row.append(median_seconds(lambda: linrec_ref.gated_delta_rule(**xt, form="chunkwise", backend="numpy"), repeats))
    rows.append(row)

import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(6, 4))
labels = [f"{n} recurrent" for n in names] + ["numpy chunkwise"]
for j, label in enumerate(labels, start=1):
    ax.plot(Ts, [r[j] * 1e3 for r in rows], "o-", label=label)
ax.set(xscale="log", yscale="log", xlabel="T", ylabel="forward time (ms, median)",
       title=f"{op}, float64, B x H = {dims['B'] * dims['H']}, K = V = {dims['K']}")
ax.legend()
plt.show()
for r in rows:
    assert all(t > 0 for t in r[1:])
