"""``linrec selectivbench ...``: describe a task, generate a dataset.

    linrec selectivbench describe --preset NAME [--amb N] [--seed S] [--n-train N] [--n-test N] [--no-baselines]
    linrec selectivbench generate --preset NAME --n N --out DIR [--seed S] [--split train|test]
                                  [--amb N] [--epoch E] [--shard-size K] [--overlap-compat]
    linrec selectivbench plot --preset NAME --out FILE.png [--amb N] [--seed S] [--idx I]
                              [--split train|test] [--epoch E]     (needs matplotlib)
    linrec selectivbench train --preset t1-small --model gdn [--d-model 64 --layers 4 --heads 2
                               --steps 2000 --lr 1e-3 --seed 1 ...] --out runs/   (resumes)
    linrec selectivbench eval RUN_DIR [--preset t4-small] [--gap 8] [--n 256]
    linrec selectivbench sweep PLAN.toml --out runs/ [--workers N] [--scheduler ADDR] [--dry-run]
    linrec selectivbench report runs/ --out results/ [--plans experiments/*.toml] [--no-plots]

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
    """``linrec selectivbench describe``: grammar statistics, lengths and the reference lines of a
    task."""
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
    """``linrec selectivbench generate``: write a split of a task to disk in shards (resumable)."""
    return _guarded(_generate, args)


def _generate(args) -> int:
    config = _config(args)
    folder = storage.generate(config, args.n, args.out, seed=args.seed, split=args.split, epoch=args.epoch,
                              overlap_compat=args.overlap_compat, shard_size=args.shard_size, progress=True)
    print(folder)
    return 0


def cmd_plot(args) -> int:
    """``linrec selectivbench plot``: a picture of the grammar and of one sample."""
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


def _model_and_train_config(args):
    from .model import ModelConfig
    from .train import TrainConfig
    mc = ModelConfig(model=args.model, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                     dropout=args.dropout, expand_v=args.expand_v, n_householder=args.n_householder,
                     allow_neg_eigval=args.allow_neg_eigval, decay_floor=args.decay_floor,
                     gate=not args.no_gate, gate_temperature=args.gate_temperature,
                     d_state=args.d_state, dtype=args.dtype)
    tc = TrainConfig(preset=args.preset, amb=args.amb, seed=args.seed, steps=args.steps,
                     batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, clip=args.clip,
                     eval_every=args.eval_every, eval_samples=args.eval_samples)
    return mc, tc


def cmd_train(args) -> int:
    """``linrec selectivbench train``: train (or resume) one run folder."""
    from . import train as tr
    try:
        mc, tc = _model_and_train_config(args)
        tr.prepare_run(mc, tc, args.out, args.name)          # every check before any work
    except ValueError as err:
        print(f"linrec selectivbench: {err}", file=sys.stderr)
        return 2
    try:
        run_dir = tr.train(mc, tc, args.out, name=args.name, backend=args.backend,
                           progress=not args.no_progress)
    except KeyboardInterrupt:
        return 130
    _print_eval(run_dir, None, None, args.eval_samples, args.backend)
    if importlib.util.find_spec("matplotlib") is not None:
        print(f"curve: {tr.plot_run(run_dir)}")
    return 0


def _print_eval(run_dir, preset, gap, n, backend) -> None:
    from . import train as tr
    ev = tr.evaluate_run(run_dir, preset, gap, n, backend)
    res, task, ref, mc, tc, step = ev.metrics, ev.task, ev.baselines, ev.model, ev.train, ev.step
    gap_text = f", test gap {task.test.gap_fixed}" if task.test.gap_fixed is not None else ""
    print(f"{run_dir}: {mc.model}, step {step}/{tc.steps}; test split of {task.name} (amb {task.n_amb}"
          f"{gap_text}), {n} samples")
    print(f"  loss {res['loss']:.4f}")
    for key in ("acc_pooled", "acc_step", "acc_after_distractor", "acc_after_reset"):
        if not np.isnan(res[key]):
            print(f"  {key[4:]:<17} {res[key]:.4f}")
    if len(res["acc_by_offset"]) > 1:
        print("  step accuracy by offset in the element (0 = token step): "
              + " ".join(f"{a:.3f}" for a in res["acc_by_offset"]))
    lines = "  ".join(f"{k} {ref[k]:.3f}" for k in ("1-gram", "2-gram", "3-gram", "bayes"))
    print(f"  reference lines (pooled): {lines}")


def cmd_eval(args) -> int:
    """``linrec selectivbench eval``: score a run's checkpoint, next to the reference lines."""
    def run(a):
        if a.n < 1:
            raise ValueError(f"eval: --n must be an integer >= 1, got {a.n}")
        if a.gap is not None and a.gap < 0:
            raise ValueError(f"eval: --gap must be an integer >= 0, got {a.gap}")
        _print_eval(a.run_dir, a.preset, a.gap, a.n, a.backend)
        return 0
    return _guarded(run, args)


def cmd_sweep(args) -> int:
    """``linrec selectivbench sweep``: run an experiment plan on Dask (exit 1 if a run failed, 130
    on Ctrl-C)."""
    from . import sweep

    def run(a):
        counts = sweep.sweep(a.plan, a.out, workers=a.workers, scheduler=a.scheduler, threads=a.threads,
                             dry_run=a.dry_run, progress=not a.no_progress, backend=a.backend)
        return 1 if counts["failed"] else 0
    try:
        return _guarded(run, args)
    except ImportError as err:
        print(f"linrec selectivbench: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished runs are kept, unfinished ones resume from their checkpoints "
              "when the same command runs again", file=sys.stderr)
        return 130


def cmd_report(args) -> int:
    """``linrec selectivbench report``: the CSV, figures and results page of a sweep's runs."""
    from pathlib import Path
    from . import report

    def run(a):
        summary = report.report(a.runs_dir, a.out, plots=not a.no_plots, plans=a.plans)
        report.main_summary(summary, Path(a.out))
        return 0
    try:
        return _guarded(run, args)
    except ImportError as err:
        print(f"linrec selectivbench: {err}", file=sys.stderr)
        return 2


def register(subparsers) -> None:
    """Adds ``selectivbench describe`` and ``selectivbench generate`` to the ``linrec`` command."""
    p = subparsers.add_parser("selectivbench", help="the SelectivBench tasks: describe, generate, plot, train, eval, sweep, report")
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

    from .model import MODELS, ALIASES
    from .train import TrainConfig
    from .model import ModelConfig
    t = sub.add_parser("train", help="train a model on a task (a run folder that resumes)")
    common(t)
    m, tdef = ModelConfig(), TrainConfig()
    t.add_argument("--model", required=True, choices=list(MODELS) + sorted(ALIASES))
    t.add_argument("--out", required=True, help="folder of run folders (one per configuration)")
    t.add_argument("--name", default=None, help="the run folder's name (default: from the configuration)")
    t.add_argument("--d-model", type=int, default=m.d_model)
    t.add_argument("--layers", type=int, default=m.n_layers)
    t.add_argument("--heads", type=int, default=m.n_heads)
    t.add_argument("--dropout", type=float, default=m.dropout)
    t.add_argument("--expand-v", type=float, default=m.expand_v)
    t.add_argument("--n-householder", type=int, default=m.n_householder, help="gated_delta_product")
    t.add_argument("--allow-neg-eigval", action="store_true", help="delta family: beta in (0, 2)")
    t.add_argument("--decay-floor", type=float, default=m.decay_floor, help="gated delta: alpha >= this")
    t.add_argument("--no-gate", action="store_true", help="gated_delta_net with alpha = 1")
    t.add_argument("--gate-temperature", type=float, default=m.gate_temperature, help="gla: 16 (1: off)")
    t.add_argument("--d-state", type=int, default=m.d_state, help="mamba, mamba2")
    t.add_argument("--dtype", choices=("float32", "float64"), default=m.dtype)
    t.add_argument("--steps", type=int, default=tdef.steps)
    t.add_argument("--batch-size", type=int, default=tdef.batch_size)
    t.add_argument("--lr", type=float, default=tdef.lr)
    t.add_argument("--warmup", type=int, default=tdef.warmup)
    t.add_argument("--clip", type=float, default=tdef.clip)
    t.add_argument("--eval-every", type=int, default=tdef.eval_every)
    t.add_argument("--eval-samples", type=int, default=tdef.eval_samples)
    t.add_argument("--backend", choices=("auto", "numba", "numpy"), default=None)
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="evaluate a run folder's checkpoint, next to the reference lines")
    e.add_argument("run_dir")
    e.add_argument("--preset", default=None, choices=sorted(presets.PRESETS),
                   help="evaluate on another task of the same grammar (e.g. t4-small)")
    e.add_argument("--gap", type=int, default=None, help="blanks per element at test")
    e.add_argument("--n", type=int, default=256, help="test samples")
    e.add_argument("--backend", choices=("auto", "numba", "numpy"), default=None)
    e.set_defaults(func=cmd_eval)

    w = sub.add_parser("sweep", help="run an experiment plan (TOML) on Dask: resumable, skips finished runs")
    w.add_argument("plan", help="a plan file, e.g. experiments/forgetting.toml")
    w.add_argument("--out", default="runs", help="folder of plan folders (default: runs)")
    w.add_argument("--workers", type=int, default=None,
                   help="LocalCluster worker processes (default: one per core)")
    w.add_argument("--scheduler", default=None, help="address of an existing Dask scheduler (tcp://...)")
    w.add_argument("--threads", type=int, default=None,
                   help="threads per run (default: cores // workers locally, 1 on a cluster)")
    w.add_argument("--dry-run", action="store_true", help="print the grid, the run count and a time estimate")
    w.add_argument("--backend", default=None, choices=["auto", "numba", "numpy"])
    w.add_argument("--no-progress", action="store_true")
    w.set_defaults(func=cmd_sweep)

    r = sub.add_parser("report", help="collect a sweep's runs into a CSV, figures and a results page")
    r.add_argument("runs_dir", help="a sweep's --out folder (or one plan folder inside it)")
    r.add_argument("--out", required=True, help="folder for runs.csv, evaluations.csv, *.png, results.md")
    r.add_argument("--plans", nargs="*", default=[],
                   help="plan files whose completeness the page lists (e.g. experiments/*.toml)")
    r.add_argument("--no-plots", action="store_true", help="tables and page only (no matplotlib)")
    r.set_defaults(func=cmd_report)
