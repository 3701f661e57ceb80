"""mamba's speed: the NumPy chunkwise form against its recurrent form and a PyTorch eager loop.

    OPENBLAS_NUM_THREADS=1 python bench/bench_mamba.py [--T 2048] [--D 512] [--S 16] [--chunk 64]
    pip install torch==2.13.0   # the optional CPU peer; without it the torch rows are skipped

One run, float32, B=1, T=2048, D=512, S=16, the "default" variant (softplus step size with a bias,
skip weights D, output gate z), typical decays (exp(dt A) in 0.5..0.99), the same inputs for all:
  * NumPy chunkwise forward, and forward + backward (``chunkwise_vjp`` after the forward);
  * NumPy recurrent forward (the loop over time, for scale);
  * PyTorch eager, when installed: the obvious loop over time written in torch (softplus,
    h = exp(dt A) * h + dt u Bm, y = h Cm, skip and gate), forward under no_grad, and forward +
    backward with autograd. torch.set_num_threads(1), like the pinned BLAS.
Each figure is the median of >= 5 runs after a warm-up, and the ratios NumPy / PyTorch are taken
within the same run (below 1: NumPy is faster): these 2-core machines are shared, and absolute
times vary 2-5x between runs. Before anything is timed, the float32 NumPy chunkwise output and
final state are compared with the float64 recurrent loop at the full T, its gradients with the
float64 recurrent backward at --check-T tokens, and the torch loop's output with the NumPy
reference, all at the float32 tier of docs/numerics.md. Results also go to
bench/results/mamba.json. Timings are never asserted anywhere.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import _harness  # pins BLAS threads before NumPy loads
import numpy as np

import linrec_ref
from linrec_ref import testing
from linrec_ref.ops import mamba

INPUTS = ("u", "delta", "A", "Bm", "Cm", "D", "z", "delta_bias")


def torch_loop(x: dict):
    """The obvious PyTorch eager loop over time for mamba (sequence-first layout, like x), or
    None without torch. Returns (forward, forward_backward) closures over torch copies of x."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(1)
    F = torch.nn.functional

    def run(u, delta, A, Bm, Cm, D, z, delta_bias):
        dt = F.softplus(delta + delta_bias)                         # [B, T, D]
        h = u.new_zeros(u.shape[0], A.shape[0], A.shape[1])         # [B, D, S]
        ys = []
        for dt_t, u_t, B_t, C_t in zip(dt.unbind(1), u.unbind(1), Bm.unbind(1), Cm.unbind(1)):
            h = torch.exp(dt_t[:, :, None] * A) * h + (dt_t * u_t)[:, :, None] * B_t[:, None, :]
            ys.append((h @ C_t[:, :, None])[..., 0])                # [B, D]
        y = torch.stack(ys, 1)                                      # [B, T, D]
        return (y + D * u) * F.silu(z), h

    args = [torch.from_numpy(x[n]) for n in INPUTS]
    leaves = [a.clone().requires_grad_(True) for a in args]
    do = torch.from_numpy(np.random.default_rng(1).standard_normal(x["u"].shape).astype(x["u"].dtype))

    def forward():
        with torch.no_grad():
            return run(*args)

    def forward_backward():
        for leaf in leaves:
            leaf.grad = None
        y, _ = run(*leaves)
        y.backward(do)

    return forward, forward_backward


def validate(x: dict, chunk: int, check_T: int, peer) -> list:
    """The float32 chunkwise form (forward, vjp) and the torch loop against the float64 loop."""
    x64 = testing.as_float64(x)
    reports = [testing.compare(mamba.chunkwise(**x, chunk_size=chunk, output_final_state=True),
                               mamba.recurrent(**x64, output_final_state=True), "float32",
                               f"chunkwise forward (y, h_T), T={x['u'].shape[1]}")]
    short = {k: (v[:, :check_T] if k in ("u", "delta", "Bm", "Cm", "z") else v) for k, v in x.items()}
    short64 = testing.as_float64(short)
    do = np.random.default_rng(2).standard_normal(short["u"].shape)
    reports.append(testing.compare(
        mamba.chunkwise_vjp(**short, do=do.astype(np.float32), chunk_size=chunk),
        mamba.recurrent_vjp(**short64, do=do), "float32", f"chunkwise_vjp, T={check_T}"))
    if peer is not None:
        y_torch = peer[0]()[0].numpy()
        reports.append(testing.compare(y_torch, mamba.recurrent(**x64)[0], "float32",
                                       "torch eager loop forward"))
    return reports


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--T", type=int, default=2048)
    p.add_argument("--D", type=int, default=512)
    p.add_argument("--S", type=int, default=16)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--regime", default="typical", choices=mamba.SPEC.regimes)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--check-T", type=int, default=256, help="T of the gradient check (default 256)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "mamba.json"))
    args = p.parse_args(argv)
    if args.repeats < 5:
        p.error("--repeats must be >= 5 (median of >= 5 runs)")
    _harness.pin_threads()
    env = dict(_harness.environment(), linrec_ref=linrec_ref.__version__,
               linrec_ref_path=str(Path(linrec_ref.__file__).parent))
    for key, value in env.items():
        print(f"{key}: {value}")
    shape = {"B": args.B, "T": args.T, "D": args.D, "S": args.S}
    x = testing.make_inputs("mamba", args.regime, dtype=np.float32, **shape)
    print(f"shape: {shape}, float32, variant default (softplus, delta_bias, D, z), regime "
          f"{args.regime}, chunk_size {args.chunk}, median of {args.repeats} runs after a warm-up")

    peer = torch_loop(x)
    checks = validate(x, args.chunk, min(args.check_T, args.T), peer)
    for c in checks:
        print("check:", c)
    if not all(c.ok for c in checks):
        print("validation failed: nothing timed")
        return 1

    do = np.random.default_rng(1).standard_normal(x["u"].shape).astype(np.float32)
    rows = {
        "numpy chunkwise forward": lambda: mamba.chunkwise(**x, chunk_size=args.chunk),
        "numpy chunkwise forward+backward": lambda: (
            mamba.chunkwise(**x, chunk_size=args.chunk),
            mamba.chunkwise_vjp(**x, do=do, chunk_size=args.chunk)),
        "numpy recurrent forward": lambda: mamba.recurrent(**x),
    }
    if peer is not None:
        rows["torch eager loop forward"], rows["torch eager loop forward+backward"] = peer
    ms = {}
    for name, fn in rows.items():
        ms[name] = 1e3 * _harness.median_time(fn, args.repeats)[0]
        print(f"{name:34s} {ms[name]:9.1f} ms  {args.B * args.T / ms[name] * 1e3:>10,.0f} tokens/s")
    ratios = {}
    if peer is not None:
        ratios = {"forward": ms["numpy chunkwise forward"] / ms["torch eager loop forward"],
                  "forward+backward": ms["numpy chunkwise forward+backward"]
                  / ms["torch eager loop forward+backward"]}
        for what, r in ratios.items():
            print(f"ratio numpy chunkwise / torch eager loop, {what}: {r:.2f} "
                  f"({'numpy faster' if r < 1 else 'torch faster'})")
    else:
        print("torch not installed: no PyTorch rows or ratios (pip install torch==2.13.0)")
    out = Path(args.out)
    _harness.write_json_atomic(out, {"env": env, "shape": shape, "dtype": "float32",
                                     "chunk": args.chunk, "regime": args.regime, "ms": ms,
                                     "ratios_numpy_over_torch": ratios,
                                     "checks": [str(c) for c in checks]})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
