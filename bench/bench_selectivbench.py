"""Speed of the SelectivBench data path (not a test; nothing is asserted).

    OPENBLAS_NUM_THREADS=1 python bench/bench_selectivbench.py [--amb 40] [--n 200] [--seed 1]

Reports, at A = n_amb = Dp = amb (L = 200 tokens):
  * grammar construction (make_grammar, timed once, separately: it is cached per seed);
  * the time per 200-token sample, median over n samples after a warm-up of 20, for the training
    regimes of tasks 1b (1 blank), 2 (1..10 blanks + noise) and 3 (distractors), split into the
    sequence (selectivbench.md section 3) and the expansion (section 4). Target: <= 5 ms per sample.
"""
from __future__ import annotations

import argparse
import time

import _harness  # noqa: F401  (pins BLAS threads before NumPy loads)
import numpy as np

from linrec_ref.tasks import grammar as gm
from linrec_ref.tasks import presets as P
from linrec_ref.tasks import sequences as sq


def per_sample(fn, indices, warmup=20):
    for i in indices[:warmup]:
        fn(int(i))
    times = []
    for i in indices:
        t0 = time.perf_counter()
        fn(int(i))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--amb", type=int, default=40)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    t0 = time.perf_counter()
    g = gm.make_grammar(args.amb, args.amb, args.amb, args.seed)
    t_grammar = time.perf_counter() - t0
    print(f"grammar amb={args.amb}: {g.n_states} states, {g.n_edges} edges, built in {t_grammar * 1e3:.0f} ms")
    indices = np.arange(1, args.n + 1)
    for task in ("1b", "2", "3"):
        c = P.get_preset(task, amb=args.amb)
        r = c.train
        seq = lambda i: sq.sample_sequence(g, args.seed, i, c.L, c.L_min, c.L_max)
        full = lambda i: P.make_sample(c, args.seed, i, "train", 0, g)
        t_seq, t_full = per_sample(seq, indices), per_sample(full, indices)
        steps = np.mean([full(int(i)).n_steps for i in indices[:20]])
        print(f"task {task:>2} ({r.mode}, ~{steps:.0f} steps): {t_full * 1e3:.2f} ms / sample "
              f"(sequence {t_seq * 1e3:.2f} ms, expansion {(t_full - t_seq) * 1e3:.2f} ms); target <= 5 ms")


if __name__ == "__main__":
    main()
