"""The results of a sweep: one CSV of every finished run, figures, and a page of verdicts.

    linrec selectivbench report RUNS_DIR --out results/ [--plans experiments/*.toml]

RUNS_DIR is a sweep's ``--out`` folder (plan folders of run folders) or one plan folder. Every
run folder with a ``done.json`` counts; the report reads only the files a sweep writes there
(config.json, metrics.jsonl, done.json, baselines.json), never a checkpoint, so it works on a
copy of the records alone. It writes into ``--out``:

    runs.csv          one row per finished run: its configuration, final test metrics and the
                      n-gram / Bayes reference lines of its grammar
    evaluations.csv   one row per extra evaluation of a run (t4-small at another gap, ...)
    *.png             the figures (needs matplotlib; --no-plots skips them)
    results.md        the page: each claim, what was measured, with spread, and the verdict

Statistics. A *cell* is one configuration less its seed; its seeds give the mean, the standard
deviation and the range. Two cells compare as "A higher" when every seed of A beats every seed
of B (min A > max B), "B higher" the other way round, and "no clear difference" when the seed
ranges overlap. With 3 seeds that is a strict rule (all 9 pairs agree); a claim is called
reproduced only when its expected outcome holds under it. "Best model" picks the cell with the
highest mean on the same runs, which favours it slightly; the page says which model was picked.

A run name appears once per plan; two plans may train the same configuration (a run copied
from another plan by the sweep, or trained twice): the report keeps one row per configuration
and seed, the first plan's in name order, and lists the rest as duplicates.
"""
from __future__ import annotations

import csv
import io
import json
import math
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

from .model import ModelConfig
from .plans import option_suffix
from .train import TrainConfig, atomic_write, read_config, read_metrics

DIAGONAL = ("mamba2", "gla", "mamba")                 # gated models with a diagonal transition
DELTA = ("gated_delta_net", "gated_delta_product")    # Householder (channel-mixing) transitions
RECURRENT = DIAGONAL + DELTA + ("delta_net", "linear_attention", "retnet")
T2_LONGEST_TRAIN_GAP = 4                              # t2-small trains with 1..4 blanks per element
REFERENCE_LINES = ("2-gram", "3-gram", "4-gram", "bayes")


@dataclass(frozen=True)
class RunRecord:
    """One finished run, as read from its folder."""

    plan: str
    run: str
    model: ModelConfig
    train: TrainConfig
    final: dict                 # the last evaluation record (done.json's "final")
    evaluations: tuple          # extra evaluations (done.json's "evaluations")
    baselines: dict             # reference lines of the run's own task
    seconds: float              # training + evaluations wall time
    folder: Path

    @property
    def variant(self) -> str:
        """The non-default ModelConfig options ('' for the model as defined)."""
        return option_suffix(self.model).lstrip("-")

    @property
    def cell(self) -> tuple:
        """The configuration less the seed (the key the seeds are pooled over)."""
        t = self.train
        return (self.model.model, self.variant, t.preset, t.task().n_amb, self.model.d_model,
                self.model.n_layers, t.steps)


def baselines(folder: Path) -> dict:
    """The run's reference lines: its baselines.json, computed (about a second) and cached there
    when a run finished without one."""
    from .train import baselines as run_baselines
    return run_baselines(folder)


def collect(runs_dir: Union[str, Path]) -> Tuple[List[RunRecord], List[str]]:
    """Every finished run under runs_dir (plan folders of run folders, or one plan folder),
    one per configuration and seed; returns (records, duplicates skipped)."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise ValueError(f"report: RUNS_DIR {runs_dir} is not a folder")
    done = sorted(runs_dir.glob("*/*/done.json")) + sorted(runs_dir.glob("*/done.json"))
    records, seen, duplicates = [], {}, []
    for path in done:
        folder = path.parent
        if not (folder / "config.json").exists():
            continue
        mc, tc = read_config(folder)
        d = json.loads(path.read_text())
        rec = RunRecord(plan=folder.parent.name,
                        run=folder.name, model=mc, train=tc, final=d["final"],
                        evaluations=tuple(d.get("evaluations", ())),
                        baselines=baselines(folder),
                        seconds=float(d.get("seconds", float("nan"))), folder=folder)
        key = (rec.cell, tc.seed, json.dumps([mc.to_dict(), tc.to_dict()], sort_keys=True))
        if key in seen:
            duplicates.append(f"{rec.plan}/{rec.run} (same as {seen[key]})")
            continue
        seen[key] = f"{rec.plan}/{rec.run}"
        records.append(rec)
    if not records:
        raise ValueError(f"report: no finished run (a run folder with done.json) under {runs_dir}")
    return records, duplicates


# ------------------------------------------------------------------------------ tables
RUN_COLUMNS = ("plan", "run", "model", "variant", "preset", "amb", "d_model", "n_layers", "seed",
               "steps", "n_params", "seconds", "loss", "acc_pooled", "acc_step",
               "acc_after_distractor", "acc_after_reset", "acc_by_offset",
               "1-gram", "2-gram", "3-gram", "4-gram", "bayes")
EVAL_COLUMNS = ("plan", "run", "model", "variant", "d_model", "seed", "preset", "gap",
                "gap_multiple", "loss", "acc_pooled", "acc_step", "acc_after_reset",
                "acc_by_offset", "3-gram", "4-gram", "bayes")


def _cell_text(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else repr(v)
    if isinstance(v, (list, tuple)):
        return " ".join(_cell_text(x) for x in v)
    return str(v)


def n_params(rec: RunRecord) -> int:
    """Trainable parameters of the run's network (rebuilt from its configuration)."""
    from .train import build_model
    model, _ = build_model(rec.model, rec.train, "numpy")
    return int(sum(p.size for p in model.parameters().values()))


def run_rows(records: Sequence[RunRecord]) -> List[dict]:
    """One dict per run: the columns of runs.csv (RUN_COLUMNS)."""
    rows, sizes = [], {}
    for r in records:
        size_key = (r.model.to_dict().__repr__(), r.train.preset, r.train.task().n_amb)
        if size_key not in sizes:
            sizes[size_key] = n_params(r)
        rows.append({"plan": r.plan, "run": r.run, "model": r.model.model, "variant": r.variant,
                     "preset": r.train.preset, "amb": r.train.task().n_amb,
                     "d_model": r.model.d_model, "n_layers": r.model.n_layers, "seed": r.train.seed,
                     "steps": r.train.steps, "n_params": sizes[size_key], "seconds": r.seconds,
                     **{k: r.final.get(k) for k in RUN_COLUMNS[12:18]},
                     **{k: r.baselines.get(k) for k in RUN_COLUMNS[18:]}})
    return rows


def eval_rows(records: Sequence[RunRecord]) -> List[dict]:
    """One dict per extra evaluation of a run: the columns of evaluations.csv (EVAL_COLUMNS)."""
    rows = []
    for r in records:
        for ev in r.evaluations:
            gap = ev.get("gap")
            rows.append({"plan": r.plan, "run": r.run, "model": r.model.model, "variant": r.variant,
                         "d_model": r.model.d_model, "seed": r.train.seed, "preset": ev["preset"],
                         "gap": gap, "gap_multiple": None if gap is None else gap / T2_LONGEST_TRAIN_GAP,
                         **{k: ev.get(k) for k in EVAL_COLUMNS[9:14]},
                         **{k: ev.get("baselines", {}).get(k) for k in EVAL_COLUMNS[14:]}})
    return rows


def csv_text(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """The rows as CSV text with the given columns (NaN and None as empty cells, lists
    space-separated)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for row in rows:
        w.writerow([_cell_text(row.get(c)) for c in columns])
    return buf.getvalue()


# ------------------------------------------------------------------------------ statistics
@dataclass(frozen=True)
class Stat:
    values: tuple

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return sum(self.values) / self.n if self.n else float("nan")

    @property
    def std(self) -> float:
        if self.n < 2:
            return float("nan")
        m = self.mean
        return math.sqrt(sum((v - m) ** 2 for v in self.values) / (self.n - 1))

    def text(self) -> str:
        if not self.n:
            return "n/a"
        spread = f" ± {self.std:.3f}" if self.n > 1 else ""
        return f"{self.mean:.3f}{spread} (n={self.n}, {min(self.values):.3f}..{max(self.values):.3f})"


def stat(values) -> Stat:
    """A Stat of the finite values (None and NaN dropped)."""
    return Stat(tuple(float(v) for v in values if v is not None and not math.isnan(float(v))))


def compare(a: Stat, b: Stat) -> str:
    """'A higher', 'B higher' (the seed ranges do not overlap), 'no clear difference',
    'not run' (no run on a side) or 'too few seeds' (one on a side)."""
    if a.n == 0 or b.n == 0:
        return "not run"
    if a.n < 2 or b.n < 2:
        return "too few seeds"
    if min(a.values) > max(b.values):
        return "A higher"
    if max(a.values) < min(b.values):
        return "B higher"
    return "no clear difference"


def select(records: Sequence[RunRecord], **where) -> List[RunRecord]:
    """Records whose fields match: model, variant, preset, amb, d_model, n_layers (None: any)."""
    out = []
    for r in records:
        have = {"model": r.model.model, "variant": r.variant, "preset": r.train.preset,
                "amb": r.train.task().n_amb, "d_model": r.model.d_model, "n_layers": r.model.n_layers}
        if all(v is None or have[k] == v for k, v in where.items()):
            out.append(r)
    return out


def metric(records: Sequence[RunRecord], key: str) -> Stat:
    """The Stat over runs of one final metric (e.g. "acc_pooled")."""
    return stat(r.final.get(key) for r in records)


def eval_metric(records: Sequence[RunRecord], preset: str, gap: int, key: str = "acc_pooled") -> Stat:
    """The Stat over runs of one metric of their extra evaluation on (preset, gap)."""
    return stat(ev.get(key) for r in records for ev in r.evaluations
                if ev.get("preset") == preset and ev.get("gap") == gap)


def best_of(records, models, score: Callable[[List[RunRecord]], Stat], **where) -> Tuple[Optional[str], Stat]:
    """The model among `models` with the highest mean score (default variant) and its Stat."""
    best, best_stat = None, Stat(())
    for m in models:
        s = score(select(records, model=m, variant="", **where))
        if s.n and (best is None or s.mean > best_stat.mean):
            best, best_stat = m, s
    return best, best_stat


# ------------------------------------------------------------------------------ claims
@dataclass(frozen=True)
class Comparison:
    what: str           # e.g. "t2-small pooled accuracy"
    a: str
    b: str
    a_stat: Stat
    b_stat: Stat
    expected: Tuple[str, ...]    # outcomes that agree with the claim

    @property
    def outcome(self) -> str:
        return compare(self.a_stat, self.b_stat)

    @property
    def agrees(self) -> Optional[bool]:
        """True / False; None when it cannot be told (missing runs, too few seeds)."""
        if self.outcome in ("too few seeds", "not run"):
            return None
        return self.outcome in self.expected


@dataclass(frozen=True)
class Claim:
    key: str
    title: str
    paper: str
    comparisons: Tuple[Comparison, ...]
    figures: Tuple[str, ...]
    plans: Tuple[str, ...]
    notes: str = ""

    @property
    def verdict(self) -> str:
        told = [c.agrees for c in self.comparisons if c.agrees is not None]
        if not told:
            return "not run"
        if len(told) < len(self.comparisons):
            prefix = "partly run: "
        else:
            prefix = ""
        if all(told):
            return prefix + "reproduced"
        if not any(told):
            return prefix + "not reproduced"
        return prefix + "mixed"


def _cmp(what, a_name, a, b_name, b, expected) -> Comparison:
    return Comparison(what, a_name, b_name, a, b, tuple(expected))


def claims(records: Sequence[RunRecord]) -> List[Claim]:
    """The paper's claims, each as comparisons between cells of the runs."""
    out = []
    t1 = dict(preset="t1-small", amb=12, d_model=64)
    acc = lambda rs: metric(rs, "acc_pooled")              # noqa: E731
    reset = lambda rs: metric(rs, "acc_after_reset")        # noqa: E731

    def cell(model, variant="", **where):
        return select(records, model=model, variant=variant, **{**t1, **where})

    gdn = cell("gated_delta_net")
    comps = [
        _cmp("t1-small pooled accuracy", "gated_delta_net", acc(gdn), "delta_net", acc(cell("delta_net")), ["A higher"]),
        _cmp("t1-small accuracy on the 5 elements after each #", "gated_delta_net", reset(gdn),
             "delta_net", reset(cell("delta_net")), ["A higher"]),
        _cmp("t1-small pooled accuracy", "gated_delta_net", acc(gdn), "gated_delta_net, alpha = 1",
             acc(cell("gated_delta_net", "gateFalse")), ["A higher"]),
        _cmp("t1-small pooled accuracy", "gated_delta_net", acc(gdn), "gated_delta_net, alpha >= 0.99",
             acc(cell("gated_delta_net", "decay_floor0.99")), ["A higher"]),
        _cmp("t1-small pooled accuracy", "gla, gate / 1", acc(cell("gla", "gate_temperature1.0")),
             "gla, gate / 16", acc(cell("gla")), ["A higher"]),
    ]
    out.append(Claim(
        "forgetting", "Gating and rapid forgetting help recall",
        "a data-dependent gate that can forget fast (gated delta net over the delta net; no floor on "
        "the decay; GLA without the /16 temperature that keeps its decay near 1) recalls better",
        tuple(comps), ("forgetting.png",), ("forgetting",)))

    comps = []
    for preset, key, label in (("t2-small", "acc_pooled", "pooled accuracy"),
                               ("t3-small", "acc_pooled", "pooled accuracy"),
                               ("t3-small", "acc_after_distractor", "accuracy right after a distractor")):
        score = lambda rs, k=key: metric(rs, k)     # noqa: E731
        dm, ds = best_of(records, DIAGONAL, score, preset=preset, amb=12, d_model=64)
        lm, ls = best_of(records, DELTA, score, preset=preset, amb=12, d_model=64)
        comps.append(_cmp(f"{preset} {label}", f"best diagonal ({dm or 'none run'})", ds,
                          f"best delta ({lm or 'none run'})", ls, ["A higher", "no clear difference"]))
    out.append(Claim(
        "selectivity", "In-state channel mixing is unnecessary for selectivity",
        "a diagonal gated model (mamba2, gla, mamba) selects as well as a delta model (gated delta "
        "net, gated delta product) on gaps (t2) and distractors (t3)",
        tuple(comps), ("mixing_offsets.png", "bars_by_task.png"), ("mixing",)))

    comps = []
    for gap in (8, 20, 40):
        score = lambda rs, g=gap: eval_metric(rs, "t4-small", g)     # noqa: E731
        dm, ds = best_of(records, DIAGONAL, score, preset="t2-small", amb=12, d_model=64)
        lm, ls = best_of(records, DELTA, score, preset="t2-small", amb=12, d_model=64)
        comps.append(_cmp(f"t4-small pooled accuracy at {gap} blanks ({gap / T2_LONGEST_TRAIN_GAP:g}x "
                          "the longest training gap)", f"best delta ({lm or 'none run'})", ls,
                          f"best diagonal ({dm or 'none run'})", ds, ["A higher"]))
    out.append(Claim(
        "generalisation", "In-state channel mixing is critical for generalisation to longer gaps",
        "trained on gaps of 1..4 blanks (t2-small), delta models keep their accuracy at longer test "
        "gaps where diagonal models lose it",
        tuple(comps), ("accuracy_vs_gap.png",), ("generalisation",)))

    comps = []
    for preset in ("t1-small", "t2-small", "t3-small"):
        rm, rs = best_of(records, RECURRENT, acc, preset=preset, amb=12, d_model=64)
        for d, how in ((64, "equal width"), (48, "matched parameters")):
            tr = acc(select(records, model="transformer", variant="", preset=preset, amb=12, d_model=d))
            comps.append(_cmp(f"{preset} pooled accuracy, {how}", f"transformer D={d}", tr,
                              f"best recurrent D=64 ({rm or 'none run'})", rs, ["A higher"]))
    out.append(Claim(
        "attention", "Softmax attention stays dominant",
        "a transformer of the same size beats the best recurrent model",
        tuple(comps), ("bars_by_task.png", "curves.png"), ("attention",)))
    return out


# ------------------------------------------------------------------------------ figures
def _color(model: str):
    order = ("transformer", "gated_delta_net", "gated_delta_product", "delta_net", "mamba2", "gla",
             "mamba", "linear_attention", "retnet")
    i = order.index(model) if model in order else len(order)
    return f"C{i % 10}"


def _line_by_x(ax, records, x_of, models, score, jitter=0.0):
    """One line per model: the mean score against x, seeds as points."""
    drawn = False
    for mi, m in enumerate(models):
        by_x: Dict[float, List[float]] = {}
        for r in select(records, model=m, variant=""):
            for x, v in x_of(r, score):
                if v is not None and not math.isnan(v):
                    by_x.setdefault(x, []).append(v)
        if not by_x:
            continue
        xs = sorted(by_x)
        ax.plot(xs, [sum(by_x[x]) / len(by_x[x]) for x in xs], "o-", color=_color(m), label=m, lw=1.5, ms=4)
        for x in xs:
            ax.plot([x * (1 + jitter * (mi - len(models) / 2))] * len(by_x[x]), by_x[x], ".",
                    color=_color(m), alpha=0.5, ms=5)
        drawn = True
    return drawn


def _reference_lines(ax, records, x_of_rec, keys=REFERENCE_LINES):
    styles = {"2-gram": (0, (1, 3)), "3-gram": ":", "4-gram": "--", "bayes": "-."}
    by_x: Dict[float, Dict[str, List[float]]] = {}
    for r in records:
        x = x_of_rec(r)
        for k in keys:
            if r.baselines.get(k) is not None:
                by_x.setdefault(x, {}).setdefault(k, []).append(r.baselines[k])
    xs = sorted(by_x)
    for k in keys:
        ys = [sum(by_x[x].get(k, [math.nan])) / max(1, len(by_x[x].get(k, []))) for x in xs]
        if xs:
            ax.plot(xs, ys, color="gray", ls=styles[k], lw=1, label=k)


def figures(records: Sequence[RunRecord], out: Path) -> List[str]:
    """Draw every figure the runs allow; returns the file names written."""
    from .plot import _pyplot, save
    plt = _pyplot()
    written = []
    models = ("transformer", "gated_delta_net", "gated_delta_product", "delta_net", "mamba2",
              "gla", "mamba")

    def finish(fig, ax_list, name):
        for ax in ax_list:
            ax.grid(alpha=0.3)
        fig.tight_layout()
        save(fig, out / name)
        plt.close(fig)
        written.append(name)

    # accuracy against amb (t1-small, D = 64)
    rs = select(records, preset="t1-small", d_model=64)
    if len({r.train.task().n_amb for r in rs}) > 1:
        fig, ax = plt.subplots(figsize=(6, 4))
        _line_by_x(ax, rs, lambda r, s: [(r.train.task().n_amb, r.final.get("acc_pooled"))], models, None)
        _reference_lines(ax, select(rs, variant=""), lambda r: r.train.task().n_amb)
        ax.set(xlabel="amb (ambiguous letters = copies per letter)", ylabel="test pooled accuracy",
               title="t1-small, D = 64: accuracy against grammar size")
        ax.legend(fontsize=7, ncol=2)
        finish(fig, [ax], "accuracy_vs_amb.png")

    # accuracy against width (t1-small, amb 12)
    rs = select(records, preset="t1-small", amb=12)
    if len({r.model.d_model for r in rs}) > 1:
        fig, ax = plt.subplots(figsize=(6, 4))
        _line_by_x(ax, rs, lambda r, s: [(r.model.d_model, r.final.get("acc_pooled"))], models, None)
        _reference_lines(ax, select(rs, variant=""), lambda r: r.model.d_model, ("3-gram", "4-gram", "bayes"))
        ax.set(xscale="log", xlabel="width D", ylabel="test pooled accuracy",
               title="t1-small, amb 12: accuracy against width")
        ax.set_xticks(sorted({r.model.d_model for r in rs}), [str(d) for d in sorted({r.model.d_model for r in rs})])
        ax.legend(fontsize=7, ncol=2)
        finish(fig, [ax], "accuracy_vs_width.png")

    # accuracy against gap multiple (t4-small evaluations of t2-small runs)
    rs = [r for r in select(records, preset="t2-small", d_model=64)
          if any(ev.get("preset") == "t4-small" for ev in r.evaluations)]
    if rs:
        fig, ax = plt.subplots(figsize=(6, 4))
        _line_by_x(ax, rs, lambda r, s: [(ev["gap"] / T2_LONGEST_TRAIN_GAP, ev.get("acc_pooled"))
                                         for ev in r.evaluations if ev.get("preset") == "t4-small"],
                   models, None, jitter=0.01)
        bayes = stat(ev.get("baselines", {}).get("bayes") for r in rs for ev in r.evaluations)
        three = stat(ev.get("baselines", {}).get("3-gram") for r in rs for ev in r.evaluations)
        if bayes.n:
            ax.axhline(bayes.mean, color="gray", ls="-.", lw=1, label="bayes")
        if three.n:
            ax.axhline(three.mean, color="gray", ls=":", lw=1, label="3-gram")
        ax.set(xscale="log", xlabel="test gap / longest training gap (4 blanks)",
               ylabel="test pooled accuracy", title="trained on t2-small, tested on t4-small")
        ax.set_xticks([1, 2, 5, 10], ["1", "2", "5", "10"])
        ax.legend(fontsize=7, ncol=2)
        finish(fig, [ax], "accuracy_vs_gap.png")

    # per-model bars per task (D = 64, amb 12, default variants), seeds as points
    tasks = [p for p in ("t1-small", "t2-small", "t3-small")
             if select(records, preset=p, amb=12, d_model=64, variant="")]
    if tasks:
        fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.8), squeeze=False)
        for ax, preset in zip(axes[0], tasks):
            rs = select(records, preset=preset, amb=12, d_model=64, variant="")
            here = [m for m in models if select(rs, model=m)]
            for i, m in enumerate(here):
                s = metric(select(rs, model=m), "acc_pooled")
                ax.bar(i, s.mean, color=_color(m), alpha=0.7)
                ax.plot([i] * s.n, s.values, "k.", ms=5)
            for k, ls in (("3-gram", ":"), ("4-gram", "--"), ("bayes", "-.")):
                line = stat(r.baselines.get(k) for r in rs)
                if line.n:
                    ax.axhline(line.mean, color="gray", ls=ls, lw=1, label=k)
            ax.set_xticks(range(len(here)), [m.replace("gated_", "g.") for m in here], rotation=35,
                          ha="right", fontsize=8)
            ax.set(title=preset, ylabel="test pooled accuracy", ylim=(0, 1.02))
            ax.legend(fontsize=7, loc="lower left")
        finish(fig, list(axes[0]), "bars_by_task.png")

    # forgetting variants (t1-small, amb 12, D = 64)
    rs = select(records, preset="t1-small", amb=12, d_model=64)
    variants = [("delta_net", ""), ("gated_delta_net", ""), ("gated_delta_net", "gateFalse"),
                ("gated_delta_net", "decay_floor0.99"), ("gla", ""), ("gla", "gate_temperature1.0"),
                ("mamba2", "")]
    variants = [v for v in variants if select(rs, model=v[0], variant=v[1])]
    if len(variants) > 1:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for ax, key, title in ((axes[0], "acc_pooled", "pooled accuracy"),
                               (axes[1], "acc_after_reset", "accuracy on the 5 elements after each #")):
            for i, (m, v) in enumerate(variants):      # a dot per seed, a bar at the mean
                s = metric(select(rs, model=m, variant=v), key)
                ax.plot([i] * s.n, s.values, "o", color=_color(m), alpha=0.6, ms=5,
                        mfc="none" if v else _color(m))
                ax.hlines(s.mean, i - 0.3, i + 0.3, color=_color(m), lw=2)
            labels = [m.replace("gated_delta_net", "gdn") + (f"\n{v}" if v else "") for m, v in variants]
            ax.set_xticks(range(len(variants)), labels, fontsize=7)
            ax.set(title=f"t1-small amb 12: {title}", ylabel="test accuracy (mean: bar, seeds: dots)")
        finish(fig, list(axes), "forgetting.png")

    # recall across a gap (t2-small: step accuracy by offset) and after distractors (t3-small)
    t2 = select(records, preset="t2-small", amb=12, d_model=64, variant="")
    t3 = select(records, preset="t3-small", amb=12, d_model=64, variant="")
    if t2 or t3:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for m in models:
            curves = [r.final.get("acc_by_offset") or [] for r in select(t2, model=m)]
            curves = [c for c in curves if c]
            if curves:
                n = min(len(c) for c in curves)
                axes[0].plot(range(n), [sum(c[j] for c in curves) / len(curves) for j in range(n)],
                             "o-", color=_color(m), label=m, ms=4)
        axes[0].set(xlabel="offset inside the element (0 = the letter, j = j-th blank)",
                    ylabel="per-step test accuracy", title="t2-small: recall across a gap of 4 blanks")
        axes[0].legend(fontsize=7)
        here = [m for m in models if select(t3, model=m)]
        for i, m in enumerate(here):
            s = metric(select(t3, model=m), "acc_after_distractor")
            axes[1].bar(i, s.mean, color=_color(m), alpha=0.7)
            axes[1].plot([i] * s.n, s.values, "k.", ms=5)
        axes[1].set_xticks(range(len(here)), [m.replace("gated_", "g.") for m in here], rotation=35,
                           ha="right", fontsize=8)
        axes[1].set(title="t3-small: accuracy right after a distractor", ylim=(0, 1.02))
        finish(fig, list(axes), "mixing_offsets.png")

    # training curves: test pooled accuracy against step, mean over seeds, per task
    if tasks:
        fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
        for ax, preset in zip(axes[0], tasks):
            rs = select(records, preset=preset, amb=12, d_model=64, variant="")
            for m in models:
                by_step: Dict[int, List[float]] = {}
                for r in select(rs, model=m):
                    for rec in read_metrics(r.folder):
                        if rec["kind"] == "eval" and rec.get("acc_pooled") is not None:
                            by_step.setdefault(rec["step"], []).append(rec["acc_pooled"])
                if by_step:
                    steps = sorted(by_step)
                    ax.plot(steps, [sum(by_step[s]) / len(by_step[s]) for s in steps], "o-",
                            color=_color(m), label=m, ms=3)
            ax.set(title=preset, xlabel="step", ylabel="test pooled accuracy (mean of seeds)")
            ax.legend(fontsize=7)
        finish(fig, list(axes[0]), "curves.png")
    return written


# ------------------------------------------------------------------------------ the page
def _versions() -> str:
    import numpy
    from linrec_ref import __version__
    parts = [f"linrec_ref {__version__}", f"Python {platform.python_version()}", f"NumPy {numpy.__version__}"]
    try:
        import numba
        parts.append(f"Numba {numba.__version__}")
    except ImportError:
        pass
    try:
        import distributed
        parts.append(f"Dask distributed {distributed.__version__}")
    except ImportError:
        pass
    import os
    parts.append(f"{platform.machine()}, {os.cpu_count()} cores")
    return ", ".join(parts)


def _sweep_log(runs_dir: Path) -> List[dict]:
    out = []
    for path in sorted(runs_dir.glob("*/sweeps.jsonl")) + sorted(runs_dir.glob("sweeps.jsonl")):
        out += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return out


def plan_progress(plan, runs_dir: Path) -> dict:
    """Of one plan under runs_dir: runs done (trained here), copied from another plan, to do;
    the measured hours of the runs trained here, the estimated hours of those left (1 thread)."""
    from .sweep import estimate_seconds
    trained, copied, todo, hours, left = 0, 0, 0, 0.0, 0.0
    for run in plan.runs:
        done = runs_dir / plan.name / run.name / "done.json"
        if done.exists():
            d = json.loads(done.read_text())
            if "copied_from" in d:
                copied += 1
            else:
                trained += 1
                hours += float(d.get("seconds", 0.0)) / 3600
        else:
            todo += 1
            left += estimate_seconds(run, 1) / 3600
    return {"trained": trained, "copied": copied, "todo": todo, "hours": hours, "left_hours": left}


def plan_table_lines(plans, runs_dir: Path) -> List[str]:
    """The page's table of plans (``plan_progress`` of each) and the total hours line."""
    lines = ["| plan | runs | trained | copied from another plan | to do | run time so far | "
             "estimated run time left | command |", "|---|---|---|---|---|---|---|---|"]
    total, left, n_runs, n_todo = 0.0, 0.0, 0, 0
    for plan in plans:
        p = plan_progress(plan, runs_dir)
        total += p["hours"]
        left += p["left_hours"]
        n_runs += len(plan.runs)
        n_todo += p["todo"]
        lines.append(f"| {plan.name} | {len(plan.runs)} | {p['trained']} | {p['copied']} | {p['todo']} | "
                     f"{p['hours']:.2f} h | {p['left_hours']:.2f} h | "
                     f"`linrec selectivbench sweep {plan.source} --out {runs_dir}` |")
    if n_todo:
        lines = [f"**A partial run: {n_runs - n_todo} of the plans' {n_runs} runs are done.** The "
                 "verdicts below are those of the runs done; a comparison whose runs are missing says "
                 "\"not run\". The same commands finish the rest (finished runs are kept).", ""] + lines
    lines += ["", f"Run time so far {total:.2f} h; estimated left {left:.2f} h of run time (from the "
              "measured step times; runs that a later plan can copy count in full), "
              f"about {left / 2:.2f} h of wall time on 2 workers.", ""]
    return lines


def page(records, duplicates, claim_list, written, runs_dir: Path, plans: Sequence = ()) -> str:
    """The results page (Markdown): header, plans, sweeps, verdicts, one section per claim, every
    cell."""
    lines = ["# SelectivBench at CPU scale: do the paper's claims reproduce?", ""]
    hours = sum(r.seconds for r in records if not math.isnan(r.seconds)) / 3600
    lines += [f"Made by `linrec selectivbench report {runs_dir} --out <this folder>` from "
              f"{len(records)} finished runs ({hours:.2f} h of run time in all); {_versions()}.", ""]
    if plans:
        lines += plan_table_lines(plans, runs_dir)
    log = _sweep_log(runs_dir)
    if log:
        lines += ["Sweeps (wall time against the sum of run times / workers; Dask's overhead is their ratio):", "",
                  "| plan | workers x threads | runs done | wall | sum of runs / workers | ratio |",
                  "|---|---|---|---|---|---|"]
        for e in log:
            ideal = e["run_seconds"] / e["workers"] if e["workers"] else float("nan")
            ratio = e["wall_seconds"] / ideal if ideal > 0 else float("nan")
            lines.append(f"| {e['plan']} | {e['workers']} x {e['threads']} | {e['done']} | "
                         f"{e['wall_seconds'] / 60:.1f} min | {ideal / 60:.1f} min | {ratio:.2f} |")
        lines.append("")
    lines += ["How to read it: a *cell* is one configuration, its seeds (grammar and initialisation) "
              "pooled; numbers are mean ± standard deviation (n seeds, min..max). \"A higher\" means "
              "every seed of A beat every seed of B; overlapping seed ranges are \"no clear "
              "difference\". A claim is *reproduced* when every comparison it makes comes out as the "
              "paper says under that rule, *not reproduced* when none does, *mixed* otherwise.", ""]
    lines += ["## Verdicts", "", "| claim | verdict |", "|---|---|"]
    for c in claim_list:
        lines.append(f"| {c.title} | **{c.verdict}** |")
    lines.append("")
    for c in claim_list:
        lines += [f"## {c.title}", "", f"The paper: {c.paper}. Verdict at this scale: **{c.verdict}**.", "",
                  "| measured | A | B | outcome | as the paper says? |", "|---|---|---|---|---|"]
        for cmp_ in c.comparisons:
            agree = {True: "yes", False: "no", None: "not told"}[cmp_.agrees]
            lines.append(f"| {cmp_.what} | {cmp_.a}: {cmp_.a_stat.text()} | {cmp_.b}: {cmp_.b_stat.text()} "
                         f"| {cmp_.outcome} | {agree} |")
        lines.append("")
        for f in c.figures:
            if f in written:
                lines += [f"![{f}]({f})", ""]
    extra = [f for f in ("accuracy_vs_amb.png", "accuracy_vs_width.png") if f in written]
    if extra:
        lines += ["## Difficulty and width", ""]
        for f in extra:
            lines += [f"![{f}]({f})", ""]
    lines += ["## Every cell", "", "| model | variant | preset | amb | D | pooled accuracy | after # | step accuracy |",
              "|---|---|---|---|---|---|---|---|"]
    cells: Dict[tuple, List[RunRecord]] = {}
    for r in records:
        cells.setdefault(r.cell, []).append(r)
    for key in sorted(cells, key=lambda k: (k[2], k[3], k[4], k[0], k[1])):
        rs = cells[key]
        lines.append(f"| {key[0]} | {key[1] or '-'} | {key[2]} | {key[3]} | {key[4]} | "
                     f"{metric(rs, 'acc_pooled').text()} | {metric(rs, 'acc_after_reset').text()} | "
                     f"{metric(rs, 'acc_step').text()} |")
    lines.append("")
    if duplicates:
        lines += ["Runs trained in more than one plan (counted once): " + "; ".join(duplicates), ""]
    lines += ["Data: `runs.csv` (one row per run) and `evaluations.csv` (the extra evaluations) beside "
              "this page.", ""]
    return "\n".join(lines)


def report(runs_dir: Union[str, Path], out: Union[str, Path], *, plots: bool = True,
           plans: Sequence[Union[str, Path]] = ()) -> Dict[str, object]:
    """Write runs.csv, evaluations.csv, the figures and results.md into out; returns a summary
    {runs, duplicates, figures, claims: {key: verdict}}. Nothing is written when RUNS_DIR
    holds no finished run or a plan file is invalid."""
    from .plans import load_plan
    runs_dir, out = Path(runs_dir), Path(out)
    loaded = [load_plan(p) for p in plans]
    records, duplicates = collect(runs_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"report: --out must be a folder, but {out} is a file")
    if plots:
        from .plot import _pyplot
        _pyplot()                                     # ImportError naming the extra, before writing
    out.mkdir(parents=True, exist_ok=True)
    runs_csv = csv_text(run_rows(records), RUN_COLUMNS)
    evals_csv = csv_text(eval_rows(records), EVAL_COLUMNS)
    atomic_write(out / "runs.csv", lambda f: f.write(runs_csv))
    atomic_write(out / "evaluations.csv", lambda f: f.write(evals_csv))
    written = figures(records, out) if plots else []
    claim_list = claims(records)
    text = page(records, duplicates, claim_list, written, runs_dir, loaded)
    atomic_write(out / "results.md", lambda f: f.write(text))
    return {"runs": len(records), "duplicates": len(duplicates), "figures": written,
            "claims": {c.key: c.verdict for c in claim_list}}


def main_summary(summary: dict, out: Path, file=sys.stdout) -> None:
    """Print what ``report`` wrote and each claim's verdict."""
    print(f"report: {summary['runs']} runs -> {out / 'runs.csv'}, {out / 'evaluations.csv'}, "
          f"{len(summary['figures'])} figures, {out / 'results.md'}", file=file)
    for key, verdict in summary["claims"].items():
        print(f"  {key:<15} {verdict}", file=file)
