"""Benchmark: gla chunkwise forward (NumPy reference), float32, single BLAS thread.

    OPENBLAS_NUM_THREADS is pinned to 1 below, before numpy is imported (2-core machines
    oversubscribe otherwise). Median of >= 5 timed runs after one warm-up run.

    python bench/bench_gla_chunkwise.py [--T 2048] [--H 8] [--K 64] [--V 64] [--chunk 64] [--runs 7]

Reports tokens/s (B*T / median seconds) and GFLOP/s of the chunkwise forward, with the FLOP
count written out: per chunk of C tokens and head, scores 2C^2K, A V 2C^2V, state read 2CKV,
chunk state 2CKV (the multiply-adds of the four matmuls); elementwise work is not counted.
The same inputs also run through the recurrent form once (its time is printed for scale) and
the chunkwise output is checked against it.
"""
import argparse

import _harness  # noqa: F401  (pins BLAS threads before NumPy loads)
import numpy as np

from linrec_ref import testing
from linrec_ref._decay import chunk_decay
from linrec_ref._scan import to_chunks
from linrec_ref.ops import gla


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--H", type=int, default=8)
    ap.add_argument("--K", type=int, default=64)
    ap.add_argument("--V", type=int, default=64)
    ap.add_argument("--chunk", type=int, nargs="+", default=[64])
    ap.add_argument("--regime", default="typical")
    ap.add_argument("--variant", default="default", choices=("default", "value_gate"))
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    if args.runs < 5:
        ap.error("--runs must be >= 5")

    _harness.pin_threads()
    for key, value in _harness.environment().items():
        print(f"{key}: {value}")
    peak = _harness.matmul_gflops()
    print(f"named limit: this machine's single-thread float32 matmul, 1024^3: {peak:.1f} GFLOP/s")

    B, T, H, K, V = args.B, args.T, args.H, args.K, args.V
    x = testing.make_inputs("gla", args.regime, dtype=np.float32, variant=args.variant,
                            B=B, T=T, H=H, K=K, V=V)
    o_ref, _ = gla.recurrent(**testing.as_float64(x))
    t_rec, _ = _harness.median_time(lambda: gla.recurrent(**x), 1 if T > 512 else 5)
    print(f"shape B={B} T={T} H={H} K={K} V={V}, float32, regime={args.regime}, "
          f"variant={args.variant}; recurrent form: {t_rec * 1e3:.1f} ms ({B * T / t_rec:,.0f} tokens/s)")
    print("chunk  median_ms   min_ms   tokens/s   GFLOP/s  %peak  fast_chunks  err_vs_f64_recurrent")
    for C in args.chunk:
        t, times = _harness.median_time(lambda: gla.chunkwise(**x, chunk_size=C), args.runs)
        Ce = min(C, T)
        flops = _harness.flops_chunkwise(B, T, H, K, V, C)
        o, _ = gla.chunkwise(**x, chunk_size=C)
        err = testing.compare(o, o_ref, "float32")
        fast = chunk_decay(to_chunks(x["g"], Ce)).fast
        print(f"{C:5d} {t * 1e3:10.2f} {min(times) * 1e3:8.2f} {B * T / t:10,.0f} "
              f"{flops / t / 1e9:9.1f} {100 * flops / t / 1e9 / peak:5.0f}%  "
              f"{int(fast.sum()):5d}/{fast.size:<5d}  "
              f"max_rel={err.max_rel:.1e} ({'ok' if err.ok else 'FAIL'} float32 tier)")


if __name__ == "__main__":
    main()
