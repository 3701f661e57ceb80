"""Speed of the NumPy reference itself, as ratios measured in one run (protocol: bench/README.md).

    OPENBLAS_NUM_THREADS=1 python bench/bench_reference.py [--ops gla simple_gla] [--T 2048]

For every op: the float32 chunkwise forward and forward+backward at B=1, T=2048, H=8, K=V=64 (ops
with other dimension letters use the sizes in SIZES), median of >= 5 runs after a warm-up, in
tokens/s. Reported next to two yardsticks measured in the same run:
  * the machine's float32 matmul rate (a 1024^3 product, GFLOP/s), and the fraction of it that the
    chunkwise forward reaches (FLOPs counted by flops_chunkwise; only for GLA_SHAPED ops);
  * PyTorch CPU eager (when installed): the same recurrence written as the obvious torch loop
    over time, the CPU peer a user would otherwise pick. The ratio is torch time / reference time.
Results go to bench/results/reference.json. Timings are never asserted anywhere.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import _harness  # pins BLAS threads before NumPy loads
import numpy as np

import linrec_ref
from linrec_ref import registry, testing

QKV_SIZES = {"B": 1, "H": 8, "K": 64, "V": 64}
# ops whose chunkwise forward is the four matmuls counted by _harness.flops_chunkwise; the delta
# family (extra K K^T, solve, w, u) and softmax attention (T^2 work) are not, so no fraction
GLA_SHAPED = ("linear_attention", "retnet", "simple_gla", "gla", "rwkv6", "mlstm")
SIZES = {  # ops whose dimension letters differ from B, H, K, V
    "mamba": {"B": 1, "D": 64, "S": 16},
    "hgrn": {"B": 1, "D": 512},
    "lru": {"B": 1, "P": 64, "Q": 64, "S": 64},
}


def torch_peer(op: str, x: dict):
    """The obvious PyTorch eager loop over time for ops where one is a few lines; else None."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(1)
    if op not in ("gla", "simple_gla", "linear_attention"):
        return None
    q, k, v = (torch.from_numpy(x[n]) for n in ("q", "k", "v"))
    B, T, H, K = q.shape
    V = v.shape[-1]
    if op == "linear_attention":
        a = torch.ones(B, T, H, K, 1)
    elif op == "simple_gla":
        a = torch.from_numpy(np.exp(x["g"]))[..., None, None].expand(B, T, H, 1, 1)
    else:
        a = torch.from_numpy(np.exp(x["g"]))[..., None]
    scale = K ** -0.5

    def run():
        S = torch.zeros(B, H, K, V)
        out = torch.empty(B, T, H, V)
        for t in range(T):
            S = a[:, t] * S + k[:, t, :, :, None] * v[:, t, :, None, :]
            out[:, t] = scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S)
        return out

    return run


def bench_op(op: str, T: int, chunk: int, repeats: int) -> dict:
    defaults = registry.spec(op).default_dims
    sizes = dict(defaults, **SIZES.get(op, {k: v for k, v in QKV_SIZES.items() if k in defaults}), T=T)
    if "HV" in sizes:  # grouped-head ops: benchmark the plain case, one value head per q/k head
        sizes["HV"] = sizes["H"]
    x = testing.make_inputs(op, "typical", dtype=np.float32, **sizes)
    fwd = lambda: registry.form(op, "chunkwise")(**x, chunk_size=chunk)
    o, _ = fwd()
    do = np.ones_like(o)
    bwd = lambda: registry.form(op, "chunkwise_vjp")(**x, do=do, chunk_size=chunk)
    t_fwd = _harness.median_time(fwd, repeats)[0]
    t_fb = t_fwd + _harness.median_time(bwd, repeats)[0]
    row = {"op": op, "shape": sizes, "dtype": "float32", "chunk": chunk,
           "fwd_ms": 1e3 * t_fwd, "fwd_tokens_per_s": T / t_fwd,
           "fwd_bwd_ms": 1e3 * t_fb, "bwd_over_fwd": t_fb / t_fwd - 1}
    if op in GLA_SHAPED:
        row["fwd_gflops"] = _harness.flops_chunkwise(1, T, sizes["H"], sizes["K"], sizes["V"], chunk) / t_fwd / 1e9
    peer = torch_peer(op, x)
    if peer is not None:
        t_peer = _harness.median_time(peer, max(3, repeats // 2))[0]
        row["torch_eager_loop_ms"] = 1e3 * t_peer
        row["speedup_vs_torch_eager_loop"] = t_peer / t_fwd
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ops", nargs="*", default=None, help="default: every op")
    p.add_argument("--T", type=int, default=2048)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "reference.json"))
    args = p.parse_args(argv)
    _harness.pin_threads()
    env = dict(_harness.environment(), linrec_ref=linrec_ref.__version__)
    env["matmul_gflops_fp32"] = _harness.matmul_gflops()
    for key, value in env.items():
        print(f"{key}: {value}")
    rows = []
    for op in args.ops or registry.available():
        row = bench_op(op, args.T, args.chunk, args.repeats)
        if "fwd_gflops" in row:
            row["fraction_of_matmul_rate"] = row["fwd_gflops"] / env["matmul_gflops_fp32"]
        rows.append(row)
        extra = (f"  {row['speedup_vs_torch_eager_loop']:.1f}x the torch eager loop"
                 if "speedup_vs_torch_eager_loop" in row else "")
        frac = (f"  {100 * row['fraction_of_matmul_rate']:.0f}% of matmul rate"
                if "fraction_of_matmul_rate" in row else "")
        print(f"{op:18s} fwd {row['fwd_ms']:8.2f} ms  {row['fwd_tokens_per_s']:>10,.0f} tok/s  "
              f"fwd+bwd {row['fwd_bwd_ms']:8.2f} ms (bwd = {row['bwd_over_fwd']:.1f}x fwd){frac}{extra}")
    out = Path(args.out)
    _harness.write_json_atomic(out, {"env": env, "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
