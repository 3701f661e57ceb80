"""The CPU benchmark: the Numba backend against the NumPy reference and PyTorch, in one run.

    python -m bench cpu [--ops gla simple_gla] [--quick] [--threads 1 2] [--fresh]
    pip install 'linrec_ref[bench]' torch==2.13.0 && pip install --no-deps fla-core==0.6.0 einops

What is timed, per op x shape x threads (float32, the op's default variant, zero initial state):
    numba recurrent      backend="numba", form="recurrent"  (forward; forward + recurrent_vjp)
    numba chunkwise      backend="numba", form="chunkwise"  (the NumPy form where no kernel exists)
    numpy chunkwise      the reference's chunkwise form and its vjp
    torch loop           the obvious PyTorch eager loop over time (bench/_torch_peers.py); the
                         backward by autograd
    torch chunked        the peer library's torch chunked functions (naive_chunk_*), autograd
    numba floor          a plain 20-line Numba loop (simple_gla only): the recurrent kernel
                         should be at least as fast
Shapes: B=1 T=2048 H=8 K=V=64 ("main"); B=8 T=512 H=4 K=V=64 ("batch"); a T sweep 256..16384
at the main shape for a few ops ("sweep"); K=V=128 at T=4096 for simple_gla ("wide"); mamba at
D=512, S=16 in place of H, K, V.

Protocol: BLAS, Numba and torch threads pinned to the row's thread count (threadpoolctl,
num_threads=, torch.set_num_threads); median of >= 5 runs after a warm-up; every result validated
before it is timed (float32 outputs against the float64 NumPy loop at the float32 tier; gradients
at T=256); a row that fails validation is reported and not timed. Timings are never asserted.

Yardsticks measured in the same run: the float32 sgemm rate (1024^3, 1 and 2 threads), and the
FLOP counts written down here:
    recurrent  5 B T H K V         per token and head: diag(a) S + k v^T (3 K V), S^T q (2 K V)
    chunkwise  _harness.flops_chunkwise: Q K^T, scores V, K^T V, Q S per chunk (matmuls only)
GFLOP/s is given for the ops whose update is that GLA shape (linear_attention, retnet,
simple_gla, gla). First-call compile times are measured in a subprocess with an empty Numba
cache, apart from the run times; peak RSS of the recurrent form at T=2048 and 16384 likewise.

Output (bench/results/): cpu.csv (one row per measurement, written atomically after each, so an
interrupted run resumes where it stopped; --fresh starts over), cpu.md (the tables and the
target rows, hit or missed), cpu_T.png (time against T per op, log-log, with the sgemm limit).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional

import _harness  # noqa: F401  (pins BLAS threads before NumPy loads)
import numpy as np

import linrec_ref
from linrec_ref import registry, testing

import _torch_peers

RESULTS = Path(__file__).parent / "results"
GLA_SHAPED = ("linear_attention", "retnet", "simple_gla", "gla")
SWEEP_OPS = ("simple_gla", "gla", "gated_delta_rule")
SWEEP_T = (256, 1024, 4096, 16384)
TORCH_LOOP_MAX_T = 4096        # the eager loop's backward at T=16384 takes minutes
FIELDS = ["op", "shape", "B", "T", "H", "K", "V", "threads", "impl", "pass", "ms", "tokens_per_s",
          "gflops", "note"]


# ------------------------------------------------------------------------------ cases
def sizes_for(op: str, shape: str, T: Optional[int] = None) -> dict:
    defaults = registry.spec(op).default_dims
    if op == "mamba":
        base = {"B": 1 if shape != "batch" else 8, "D": 512, "S": 16}
    elif op == "hgrn":
        base = {"B": 1 if shape != "batch" else 8, "D": 512}
    elif op == "lru":
        base = {"B": 1 if shape != "batch" else 8, "P": 64, "Q": 64, "S": 64}
    else:
        B, H, K = {"main": (1, 8, 64), "batch": (8, 4, 64), "sweep": (1, 8, 64), "wide": (1, 8, 128)}[shape]
        base = {d: v for d, v in {"B": B, "H": H, "K": K, "V": K}.items() if d in defaults}
    sizes = dict(defaults, **base)
    if "HV" in sizes:
        sizes["HV"] = sizes["H"]              # one value head per q/k head
    if "NH" in sizes:
        sizes["NH"] = 2
    sizes["T"] = T or {"main": 2048, "batch": 512, "wide": 4096}.get(shape, 2048)
    return sizes


def cases(ops: List[str], quick: bool) -> List[tuple]:
    out = [(op, "main", None) for op in ops]
    if quick:
        return out
    out += [(op, "batch", None) for op in ops if op != "softmax_attention"]
    out += [(op, "sweep", T) for op in SWEEP_OPS if op in ops for T in SWEEP_T if T != 2048]
    if "simple_gla" in ops:
        out.append(("simple_gla", "wide", None))
    return out


def flops_recurrent(s: dict) -> float:
    return 5.0 * s["B"] * s["T"] * s["H"] * s["K"] * s["V"]


# ------------------------------------------------------------------------------ the floor
def numba_floor():
    """A plain Numba loop for simple_gla (one thread, no blocks): the kernel's floor."""
    import numba

    @numba.njit(cache=False)
    def loop(q, k, v, g, scale, o):
        B, T, H, K = q.shape
        V = v.shape[3]
        for b in range(B):
            for h in range(H):
                S = np.zeros((K, V), dtype=q.dtype)
                for t in range(T):
                    a = np.exp(g[b, t, h])
                    qt, kt, vt, ot = q[b, t, h], k[b, t, h], v[b, t, h], o[b, t, h]
                    ot[:] = 0
                    for i in range(K):
                        Si = S[i]
                        for j in range(V):
                            Si[j] = a * Si[j] + kt[i] * vt[j]
                            ot[j] += qt[i] * Si[j]
                    for j in range(V):
                        ot[j] *= scale
        return o

    return loop


# ------------------------------------------------------------------------------ measuring
def timed(fn: Callable, repeats: int) -> float:
    return _harness.median_time(fn, repeats)[0]


class Limits:
    """BLAS, Numba and torch threads set to n inside the block."""

    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        from threadpoolctl import threadpool_limits
        self._blas = threadpool_limits(self.n)
        try:
            import torch
            self._torch = torch.get_num_threads()
            torch.set_num_threads(self.n)
        except ImportError:
            self._torch = None
        return self

    def __exit__(self, *exc):
        self._blas.restore_original_limits()
        if self._torch is not None:
            import torch
            torch.set_num_threads(self._torch)


def implementations(op: str, x: dict, do: np.ndarray, threads: int) -> Dict[str, tuple]:
    """{impl: (forward, forward_backward or None, note)} for one case."""
    nb = dict(backend="numba", num_threads=threads)
    numba_own = set(registry.numba_forms(op))
    impls = {}
    for form in ("recurrent", "chunkwise"):
        note = "" if form in numba_own else "NumPy form (no kernel)"
        impls[f"numba {form}"] = (
            lambda f=form: linrec_ref.Op(op)(**x, form=f, **nb),
            lambda f=form: (linrec_ref.Op(op)(**x, form=f, output_final_state=True, **nb),
                            linrec_ref.Op(op).vjp(**x, do=do, form=f, **nb)),
            note)
    impls["numpy chunkwise"] = (
        lambda: registry.form(op, "chunkwise")(**x),
        lambda: (registry.form(op, "chunkwise")(**x, output_final_state=True),
                 registry.form(op, "chunkwise_vjp")(**x, do=do)), "")
    T = x[registry.spec(op).inputs[0].name].shape[1]
    loop = _torch_peers.eager_loop(op, x, do) if T <= TORCH_LOOP_MAX_T else None
    if loop:
        impls["torch loop"] = (*loop, "")
    chunked = _torch_peers.fla_chunked(op, x, do)
    if chunked:
        impls["torch chunked"] = (*chunked, "fla naive_chunk")
    if op == "simple_gla" and threads == 1:
        loop_fn = numba_floor()
        o = np.empty_like(x["v"])
        scale = np.float32(x["q"].shape[-1] ** -0.5)
        impls["numba floor"] = (lambda: loop_fn(x["q"], x["k"], x["v"], x["g"], scale, o), None, "20-line loop")
    return impls


def validate(op: str, x: dict, impls: dict) -> Dict[str, str]:
    """'' for each impl whose forward output (and the numba gradients at T<=256) match the float64
    loop at the float32 tier, else the failed comparison's report."""
    x64 = testing.as_float64(x)
    ref = testing.run(op, "recurrent", x64)[0]
    verdict = {}
    for name, (fwd, _, _) in impls.items():
        try:
            out = fwd()
        except Exception as e:          # a peer that cannot run this case is reported, not timed
            verdict[name] = f"{type(e).__name__}: {e}"
            continue
        o = out[0] if isinstance(out, tuple) else out
        o = o.detach().numpy() if hasattr(o, "detach") else o
        try:
            c = testing.compare(np.asarray(o, dtype=np.float64), ref, "float32", name)
        except ValueError as e:         # e.g. a peer returning another layout
            verdict[name] = str(e)
            continue
        verdict[name] = "" if c.ok else str(c)
    per_token = [a.name for a in registry.spec(op).inputs if a.per_token]
    short = {k: (v[:, :256] if k in per_token and v is not None else v) for k, v in x.items()}
    o, ht = testing.run(op, "recurrent", testing.as_float64(short))
    do, _ = testing.cotangents(o, None)
    g_ref = testing.vjp(op, "recurrent", testing.as_float64(short), do)
    for form in ("recurrent", "chunkwise"):
        g = testing.vjp(op, form, short, do.astype(np.float32), backend="numba")
        c = testing.compare({k: g[k] for k in g_ref if g_ref[k] is not None},
                            {k: v for k, v in g_ref.items() if v is not None}, "float32", f"numba {form}_vjp")
        if not c.ok:
            verdict[f"numba {form}"] = str(c)
    return verdict


# ------------------------------------------------------------------------------ results
def load_rows(path: Path) -> List[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def save_rows(path: Path, rows: List[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp", newline="") as f:
        w = csv.DictWriter(f, FIELDS)
        w.writeheader()
        w.writerows(rows)
    os.replace(f.name, path)


def key(r: dict) -> tuple:
    return (r["op"], r["shape"], str(r["T"]), str(r["threads"]), r["impl"], r["pass"])


def compile_times() -> List[dict]:
    """First call (compile, empty cache) and second call of the numba recurrent forward + vjp of
    one op per kernel module, float32, in a fresh subprocess each."""
    out = []
    code = """
import time, numpy as np, linrec_ref
from linrec_ref import testing
x = testing.make_inputs({op!r}, dtype=np.float32, T=64)
def once():
    o, h = linrec_ref.Op({op!r})(**x, form="recurrent", backend="numba", output_final_state=True)
    linrec_ref.Op({op!r}).vjp(**x, do=np.ones_like(o), form="recurrent", backend="numba")
t = time.perf_counter(); once(); first = time.perf_counter() - t
t = time.perf_counter(); once(); second = time.perf_counter() - t
print(first, second)
"""
    for op in ("simple_gla", "gated_delta_rule", "mamba"):
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, NUMBA_CACHE_DIR=cache)
            for label in ("empty cache", "cached"):
                p = subprocess.run([sys.executable, "-c", code.format(op=op)], env=env,
                                   capture_output=True, text=True, timeout=600)
                if p.returncode:
                    out.append({"op": op, "cache": label, "error": p.stderr.strip().splitlines()[-1]})
                    continue
                first, second = (float(v) for v in p.stdout.split())
                out.append({"op": op, "cache": label, "first_call_s": first, "second_call_ms": 1e3 * second})
    return out


def peak_rss() -> List[dict]:
    """Peak RSS of the numba recurrent forward (and vjp) of gated_delta_rule at T=2048 and 16384,
    beyond what the process held just before the call (inputs generated, kernels loaded).

    ru_maxrss cannot give this: it is the process's high-water mark, which generating the inputs
    already set, so a call that stays below it reads 0. A thread samples the current RSS
    (/proc/self/statm) every 0.5 ms while the call runs instead; the kernels release the GIL."""
    code = """
import os, threading, time, numpy as np, linrec_ref
from linrec_ref import testing
PAGE = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE
def peak_during(fn):
    top, stop = [rss()], threading.Event()
    def sample():
        while not stop.is_set():
            top[0] = max(top[0], rss()); time.sleep(0.0005)
    th = threading.Thread(target=sample); before = rss(); th.start()
    try:
        out = fn()
    finally:
        stop.set(); th.join()
    return out, max(top[0], rss()) - before
op = linrec_ref.gated_delta_rule
small = testing.make_inputs("gated_delta_rule", dtype=np.float32, T=8)
op.vjp(**small, do=np.ones_like(small["v"]), form="recurrent", backend="numba")   # load the kernels
x = testing.make_inputs("gated_delta_rule", dtype=np.float32, B=1, T={T}, H=8, HV=8, K=64, V=64)
do = np.ones_like(x["v"])
(o, h), fwd = peak_during(lambda: op(**x, form="recurrent", backend="numba", output_final_state=True))
g, bwd = peak_during(lambda: op.vjp(**x, do=do, form="recurrent", backend="numba"))
inputs = sum(a.nbytes for a in x.values() if hasattr(a, "nbytes"))
grads = sum(a.nbytes for a in g.values() if hasattr(a, "nbytes"))
print(inputs, fwd, o.nbytes + h.nbytes, bwd, grads)
"""
    out = []
    for T in (2048, 16384):
        p = subprocess.run([sys.executable, "-c", code.format(T=T)], capture_output=True, text=True, timeout=600)
        if p.returncode:
            out.append({"T": T, "error": p.stderr.strip().splitlines()[-1]})
            continue
        inputs, fwd, fwd_out, bwd, bwd_out = (int(v) for v in p.stdout.split())
        mb = 2.0 ** 20
        out.append({"T": T, "inputs_MB": inputs / mb, "forward_extra_MB": fwd / mb,
                    "forward_outputs_MB": fwd_out / mb, "vjp_extra_MB": bwd / mb,
                    "vjp_outputs_MB": bwd_out / mb})
    return out


# ------------------------------------------------------------------------------ report
def ms(rows, **match) -> Optional[float]:
    for r in rows:
        if all(str(r[k]) == str(v) for k, v in match.items()) and r["ms"] not in ("", None):
            return float(r["ms"])
    return None


def ratio(a, b) -> str:
    return "n/a" if a is None or b is None else f"{a / b:.2f}"


def targets(rows: List[dict], env: dict) -> List[tuple]:
    """(target, measured, hit) rows of the issue's targets, from this run's measurements."""
    out = []
    main = dict(shape="main", T=2048)
    t_np = ms(rows, op="simple_gla", impl="numpy chunkwise", threads=1, **{"pass": "forward"}, **main)
    for op in ("simple_gla", "gla", "gated_delta_rule", "delta_rule"):
        t1 = ms(rows, op=op, impl="numba recurrent", threads=1, **{"pass": "forward"}, **main)
        t2 = ms(rows, op=op, impl="numba recurrent", threads=2, **{"pass": "forward"}, **main)
        npc = ms(rows, op=op, impl="numpy chunkwise", threads=1, **{"pass": "forward"}, **main)
        if t1 and npc:
            out.append((f"{op}: numba recurrent fwd >= 3x numpy chunkwise fwd (1 thread)",
                        f"{npc / t1:.2f}x", npc / t1 >= 3))
        if t1 and t2:
            out.append((f"{op}: 2 threads >= 1.7x 1 thread (numba recurrent fwd)", f"{t1 / t2:.2f}x", t1 / t2 >= 1.7))
    floor = ms(rows, op="simple_gla", impl="numba floor", threads=1, **{"pass": "forward"}, **main)
    t1 = ms(rows, op="simple_gla", impl="numba recurrent", threads=1, **{"pass": "forward"}, **main)
    if floor and t1:
        out.append(("simple_gla: numba recurrent fwd at least as fast as the 20-line loop", f"{floor / t1:.2f}x",
                    t1 <= floor))
    _ = t_np
    for op in sorted({r["op"] for r in rows}):
        for threads in (1, 2):
            kw = dict(op=op, threads=threads, **main)
            best_f = min([v for v in (ms(rows, impl=i, **{"pass": "forward"}, **kw)
                                      for i in ("numba recurrent", "numba chunkwise")) if v] or [None]) \
                if any(ms(rows, impl=i, **{"pass": "forward"}, **kw) for i in ("numba recurrent", "numba chunkwise")) else None
            best_fb = min([v for v in (ms(rows, impl=i, **{"pass": "forward+backward"}, **kw)
                                       for i in ("numba recurrent", "numba chunkwise")) if v] or [None]) \
                if any(ms(rows, impl=i, **{"pass": "forward+backward"}, **kw) for i in ("numba recurrent", "numba chunkwise")) else None
            loop = ms(rows, impl="torch loop", **{"pass": "forward"}, **kw)
            chunked_fb = ms(rows, impl="torch chunked", **{"pass": "forward+backward"}, **kw)
            if best_f and loop:
                out.append((f"{op} ({threads} thr): fwd >= 10x torch eager loop", f"{loop / best_f:.1f}x",
                            loop / best_f >= 10))
            if best_fb and chunked_fb:
                out.append((f"{op} ({threads} thr): fwd+bwd >= 5x torch chunked (autograd)",
                            f"{chunked_fb / best_fb:.1f}x", chunked_fb / best_fb >= 5))
            if best_f and best_fb:
                out.append((f"{op} ({threads} thr): fwd+bwd <= 3x its own fwd", f"{best_fb / best_f:.1f}x",
                            best_fb / best_f <= 3))
    for T in (4096, 16384):
        c = ms(rows, op="simple_gla", impl="numba chunkwise", threads=1, T=T, **{"pass": "forward"})
        if c:
            s = sizes_for("simple_gla", "sweep", T)
            rate = _harness.flops_chunkwise(s["B"], T, s["H"], s["K"], s["V"], 64) / (c / 1e3) / 1e9
            out.append((f"simple_gla T={T}: chunkwise fwd >= 50% of sgemm (1 thread)",
                        f"{100 * rate / env['sgemm_gflops_1']:.0f}%", rate >= 0.5 * env["sgemm_gflops_1"]))
    wc = ms(rows, op="simple_gla", shape="wide", impl="numba chunkwise", threads=1, **{"pass": "forward"})
    wr = ms(rows, op="simple_gla", shape="wide", impl="numba recurrent", threads=1, **{"pass": "forward"})
    if wc and wr:
        out.append(("simple_gla K=V=128 T=4096: chunkwise fwd faster than numba recurrent", f"{wr / wc:.2f}x", wc < wr))
    for threads in (1, 2):
        m = ms(rows, op="mamba", impl="numba recurrent", threads=threads, **{"pass": "forward"}, **main)
        loop = ms(rows, op="mamba", impl="torch loop", threads=threads, **{"pass": "forward"}, **main)
        if m and loop:
            out.append((f"mamba ({threads} thr): numba fwd <= 0.5x torch eager loop", f"{m / loop:.2f}x", m / loop <= 0.5))
    return out


def write_markdown(path: Path, rows: List[dict], env: dict, extra: dict) -> None:
    lines = ["# CPU benchmark (`python -m bench cpu`)", "",
             "Written by bench/cpu.py; every figure is from the run whose environment is listed.", "",
             "## Environment", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    lines += ["", "## Targets", "", "| target | measured | hit |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {'yes' if h else 'MISSED'} |" for t, m, h in targets(rows, env)]
    lines += ["", "## Compile time (first call, empty Numba cache) and cached load", "",
              "| op | cache | first call s | second call ms |", "|---|---|---|---|"]
    for c in extra.get("compile", []):
        lines.append(f"| {c['op']} | {c['cache']} | {c.get('first_call_s', c.get('error', '')):.3} | "
                     f"{c.get('second_call_ms', 0):.1f} |" if "error" not in c else f"| {c['op']} | {c['cache']} | {c['error']} | |")
    lines += ["", "## Peak RSS of gated_delta_rule's numba recurrent form during the call", "",
              "Beyond what the process held before the call; the outputs (o and the final state, or",
              "the gradients) are part of it and listed next to it: what is left is the working memory.",
              "", "| T | inputs MB | forward peak MB | of which outputs | vjp peak MB | of which gradients |",
              "|---|---|---|---|---|---|"]
    for m in extra.get("rss", []):
        if "error" in m:
            lines.append(f"| {m['T']} | {m['error']} | | | | |")
            continue
        lines.append(f"| {m['T']} | {m['inputs_MB']:.1f} | {m['forward_extra_MB']:.1f} | "
                     f"{m['forward_outputs_MB']:.1f} | {m['vjp_extra_MB']:.1f} | {m['vjp_outputs_MB']:.1f} |")
    lines += ["", "## All measurements (ms, median of >= 5 runs)", "",
              "| op | shape | T | threads | impl | pass | ms | tokens/s | GFLOP/s | note |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['op']} | {r['shape']} | {r['T']} | {r['threads']} | {r['impl']} | {r['pass']} | "
                     f"{r['ms']} | {r['tokens_per_s']} | {r['gflops']} | {r['note']} |")
    path.write_text("\n".join(lines) + "\n")


def plot(path: Path, rows: List[dict], env: dict) -> Optional[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: no plot (pip install 'linrec_ref[plot]')"
    ops = [op for op in SWEEP_OPS if any(r["op"] == op and r["shape"] in ("sweep", "main") for r in rows)]
    if not ops:
        return None
    fig, axes = plt.subplots(1, len(ops), figsize=(5 * len(ops), 4), squeeze=False)
    for ax, op in zip(axes[0], ops):
        mine = [r for r in rows if r["op"] == op and r["shape"] in ("sweep", "main") and r["ms"]
                and r["threads"] == "1" and r["pass"] == "forward"]
        for impl in sorted({r["impl"] for r in mine}):
            pts = sorted((int(r["T"]), float(r["ms"])) for r in mine if r["impl"] == impl)
            ax.loglog(*zip(*pts), marker="o", label=impl)
        Ts = np.array(sorted({int(r["T"]) for r in mine}))
        s = sizes_for(op, "sweep", 1)
        for n, style in ((1, ":"), (2, "--")):
            flops = np.array([_harness.flops_chunkwise(1, T, s["H"], s["K"], s["V"], 64) for T in Ts])
            ax.loglog(Ts, 1e3 * flops / (env[f"sgemm_gflops_{n}"] * 1e9), "k" + style,
                      label=f"chunkwise matmuls at sgemm rate ({n} thr)")
        ax.set_title(f"{op}, forward, 1 thread, B=1 H=8 K=V=64")
        ax.set_xlabel("T")
        ax.set_ylabel("ms")
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, path)
    return None


# ------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench cpu", description=__doc__.split("\n")[0])
    p.add_argument("--ops", nargs="*", default=None, help="default: every op in the registry")
    p.add_argument("--threads", nargs="*", type=int, default=[1, 2])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="the main shape only")
    p.add_argument("--fresh", action="store_true", help="forget the measurements of an earlier run")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.repeats < 5:
        p.error("--repeats must be >= 5 (median of >= 5 runs)")
    ops = args.ops or list(registry.available())
    for op in ops:
        registry.spec(op)
    from linrec_ref.backends import numba as numba_backend
    numba = numba_backend.import_numba("python -m bench cpu")
    if max(args.threads) > numba.config.NUMBA_NUM_THREADS:
        p.error(f"--threads above NUMBA_NUM_THREADS={numba.config.NUMBA_NUM_THREADS}")
    out = Path(args.out)
    csv_path = out / "cpu.csv"
    if args.fresh and csv_path.exists():
        csv_path.unlink()
    rows = load_rows(csv_path)
    done = {key(r) for r in rows}

    env = dict(_harness.environment(), linrec_ref=linrec_ref.__version__, numba=numba.__version__,
               NUMBA_NUM_THREADS=numba.config.NUMBA_NUM_THREADS)
    for n in (1, 2):
        with Limits(n):
            env[f"sgemm_gflops_{n}"] = round(_harness.matmul_gflops(), 1)
    for k, v in env.items():
        print(f"{k}: {v}")

    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    todo = cases(ops, args.quick)
    bar = tqdm(todo, desc="cases", unit="case") if tqdm else todo
    for op, shape, T in bar:
        s = sizes_for(op, shape, T)
        x = testing.make_inputs(op, "typical", dtype=np.float32, **s)
        o = testing.run(op, "chunkwise", x)[0]
        do = np.random.default_rng(1).standard_normal(o.shape).astype(np.float32)
        verdict = None
        for threads in args.threads:
            with Limits(threads):
                impls = implementations(op, x, do, threads)
                if verdict is None:
                    verdict = validate(op, x, impls)
                for impl, (fwd, fb, note) in impls.items():
                    for pass_, fn in (("forward", fwd), ("forward+backward", fb)):
                        if fn is None:
                            continue
                        row = {"op": op, "shape": shape, "B": s.get("B"), "T": s["T"], "H": s.get("H", s.get("D")),
                               "K": s.get("K", s.get("S")), "V": s.get("V", 1), "threads": threads,
                               "impl": impl, "pass": pass_, "note": note}
                        if key({k: str(v) for k, v in row.items()}) in done:
                            continue
                        if verdict.get(impl):
                            row.update(ms="", tokens_per_s="", gflops="", note=f"not timed: {verdict[impl][:120]}")
                        else:
                            t = timed(fn, args.repeats)
                            row.update(ms=f"{1e3 * t:.3f}", tokens_per_s=f"{s['B'] * s['T'] / t:.0f}")
                            row["gflops"] = ""
                            if op in GLA_SHAPED and pass_ == "forward":
                                flops = (flops_recurrent(s) if "recurrent" in impl or impl.startswith("torch loop")
                                         or impl == "numba floor"
                                         else _harness.flops_chunkwise(s["B"], s["T"], s["H"], s["K"], s["V"], 64))
                                row["gflops"] = f"{flops / t / 1e9:.2f}"
                        rows.append(row)
                        done.add(key({k: str(v) for k, v in row.items()}))
                        save_rows(csv_path, rows)
                        if not tqdm:
                            print(f"{op:18s} {shape:6s} T={s['T']:<6d} thr={threads} {impl:16s} {pass_:17s} "
                                  f"{row['ms'] or row['note']}", flush=True)
    rows = load_rows(csv_path)
    extra = {"compile": compile_times(), "rss": peak_rss()}
    (out / "cpu_extra.json").write_text(json.dumps({"env": env, **extra}, indent=1))
    write_markdown(out / "cpu.md", rows, env, extra)
    msg = plot(out / "cpu_T.png", rows, env)
    if msg:
        print(msg)
    print("\n".join(f"{'HIT ' if h else 'MISS'} {t}: {m}" for t, m, h in targets(rows, env)))
    print(f"wrote {csv_path}, {out / 'cpu.md'}, {out / 'cpu_T.png'}")
    return 0
