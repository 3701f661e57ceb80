"""``linrec selectivbench ...``: describe a task, generate a dataset.

    linrec selectivbench describe --preset NAME [--amb N] [--seed S] [--n-train N] [--n-test N] [--no-baselines]
    linrec selectivbench generate --preset NAME --n N --out DIR [--seed S] [--split train|test]
                                  [--amb N] [--epoch E] [--shard-size K] [--overlap-compat]
    linrec selectivbench plot --preset NAME --out FILE.png [--amb N] [--seed S] [--idx I]
                              [--split train|test] [--epoch E]     (needs matplotlib)

Every argument is checked before anything is printed or created: a bad one prints one line on
stderr and exits with status 2.
"""
from __future__ import annotations

import importlib.util
import sys

import numpy as np

from . import presets, storage
from .presets import check_int
from .sequences import sample_string


def _guarded(fn, args) -> int:
    """Runs a command; a bad parameter (ValueError) prints one line and exits with status 2."""
    try:
        return fn(args)
    except ValueError as err:
        print(f"linrec selectivbench: {err}", file=sys.stderr)
        return 2


def _config(args):
    overrides = {} if args.amb is None else {"amb": args.amb}
    return presets.get_preset(args.preset, **overrides)


def string_stats(grammar, config, seed: int, n_strings: int = 2000) -> dict:
    """Mean / min / max length of accepted strings (final '#' included), sampled with default_rng(seed)."""
    rng = np.random.default_rng(seed)
    lengths = np.array([len(sample_string(grammar, rng, config.L_min, config.L_max)) for _ in range(n_strings)])
    return {"mean": float(lengths.mean()), "min": int(lengths.min()), "max": int(lengths.max()), "n": n_strings}


def cmd_describe(args) -> int:
    return _guarded(_describe, args)


def _describe(args) -> int:
    config = _config(args)
    presets.check_seed("describe", args.seed)
    check_int("describe", "--n-train", args.n_train, 1)
    check_int("describe", "--n-test", args.n_test, 1)
    g = config.grammar(args.seed)
    d = g.describe()
    stats = string_stats(g, config, args.seed)
    amb_letters = "".join(sorted(g.ambiguous, key=g.letters.index))
    print(f"SelectivBench task {config.name} (seed {args.seed})")
    print(f"  letters:           {g.n_letters} + '#'  ({''.join(g.letters)})")
    print(f"  ambiguous letters: {g.n_amb} x depth {g.depth}  ({amb_letters or '-'})")
    print(f"  states:            {g.n_states}")
    print(f"  classes:           {g.n_classes} hidden-state ids, {g.n_input_classes} input classes")
    print(f"  edges:             {g.n_edges}  (mean out-degree {d['mean_out_degree']:.2f}, tau {g.tau:.4g})")
    print(f"  start states:      {', '.join(d['start_states'])}")
    print(f"  string length:     mean {stats['mean']:.1f}, min {stats['min']}, max {stats['max']} "
          f"(over {stats['n']} accepted strings; L_min {config.L_min}, L_max {config.L_max})")
    print(f"  sequence length:   L = {config.L} tokens")
    for split in presets.SPLITS:
        r = config.regime(split)
        gap = f"k = {r.gap_fixed}" if r.gap_fixed is not None else f"d ~ U({r.gap_min}, {r.gap_max})"
        print(f"  {split + ':':<18} mode {r.mode}, from token {r.gap_start}, p = {r.gap_prob}, {gap}")
    print(f"  noise:             U[0, {config.noise})")
    if config.test_gaps:
        print(f"  test gap sweep:    {list(config.test_gaps)}")
    if args.no_baselines:
        return 0
    if importlib.util.find_spec("linrec_ref.tasks.baselines") is None:
        print("  baselines: not available")
        return 0
    from . import baselines
    report = baselines.report(config, seed=args.seed, n_train=args.n_train, n_test=args.n_test)
    print(f"  baselines (pooled accuracy, {args.n_train} train / {args.n_test} test samples):")
    accuracies = {k: v for k, v in report.items() if k.endswith("gram") or k.startswith("bayes")}
    for name, value in accuracies.items():
        print(f"    {name:<16} {value:.4f}")
    counts = {k: v for k, v in report.items() if k not in accuracies}
    print("    " + ", ".join(f"{k} = {int(v)}" for k, v in counts.items()))
    return 0


def cmd_generate(args) -> int:
    return _guarded(_generate, args)


def _generate(args) -> int:
    config = _config(args)
    folder = storage.generate(config, args.n, args.out, seed=args.seed, split=args.split, epoch=args.epoch,
                              overlap_compat=args.overlap_compat, shard_size=args.shard_size, progress=True)
    print(folder)
    return 0


def cmd_plot(args) -> int:
    return _guarded(_plot, args)


def _plot(args) -> int:
    try:
        from . import plot
        plt = plot._pyplot()
    except ImportError as err:
        print(f"linrec selectivbench: {err}", file=sys.stderr)
        return 2
    config = _config(args)
    presets.check_seed("plot", args.seed)
    check_int("plot", "--epoch", args.epoch, 0)
    plot.image_format(args.out)
    check_int("plot", "--idx", args.idx, 0)
    if args.idx >= presets.max_items(config, args.split):
        raise ValueError(f"plot: --idx must be < {presets.max_items(config, args.split)} for the {args.split} "
                         f"split, got {args.idx}")
    index = presets.sample_index(config, args.split, args.idx)     # the index generate gives item idx
    grammar = config.grammar(args.seed)
    sample = presets.make_sample(config, args.seed, index, split=args.split, epoch=args.epoch, grammar=grammar)
    fig = plt.figure(figsize=(11, 9))
    plot.plot_grammar(grammar, fig.add_subplot(2, 1, 1))
    plot.plot_sample(sample, grammar, fig.add_subplot(2, 1, 2))
    fig.suptitle(f"SelectivBench {config.name}, seed {args.seed}, {args.split} sample {args.idx}"
                 + (f", epoch {args.epoch}" if args.epoch else ""))
    print(plot.save(fig, args.out))
    return 0


def register(subparsers) -> None:
    """Adds ``selectivbench describe`` and ``selectivbench generate`` to the ``linrec`` command."""
    p = subparsers.add_parser("selectivbench", help="the SelectivBench tasks: describe, generate, plot")
    sub = p.add_subparsers(dest="selectivbench_command", required=True)

    def common(q):
        q.add_argument("--preset", required=True, choices=sorted(presets.PRESETS))
        q.add_argument("--amb", type=int, default=None, help="A = n_amb = depth (overrides the preset's)")
        q.add_argument("--seed", type=int, default=1)

    d = sub.add_parser("describe", help="grammar statistics, lengths, baselines")
    common(d)
    d.add_argument("--n-train", type=int, default=1000)
    d.add_argument("--n-test", type=int, default=200)
    d.add_argument("--no-baselines", action="store_true")
    d.set_defaults(func=cmd_describe)

    g = sub.add_parser("generate", help="write a dataset to disk (resumable)")
    common(g)
    g.add_argument("--n", type=int, required=True)
    g.add_argument("--out", required=True)
    g.add_argument("--split", choices=presets.SPLITS, default="train")
    g.add_argument("--epoch", type=int, default=0)
    g.add_argument("--shard-size", type=int, default=1000)
    g.add_argument("--overlap-compat", action="store_true")
    g.set_defaults(func=cmd_generate)

    pl = sub.add_parser("plot", help="picture of the grammar and of one sample (needs matplotlib)")
    common(pl)
    pl.add_argument("--out", required=True, help="image file (.png, .pdf, .svg, ...; PNG without an extension)")
    pl.add_argument("--idx", type=int, default=0,
                    help="which item of the split (0-based, as generate numbers them; train: < 10^9)")
    pl.add_argument("--split", choices=presets.SPLITS, default="train")
    pl.add_argument("--epoch", type=int, default=0, help="the expansion epoch (as in generate)")
    pl.set_defaults(func=cmd_plot)
