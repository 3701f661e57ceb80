r"""Training and evaluating the SelectivBench models on a CPU, in run folders that resume.

The loop (one step n = 1 .. N):

    batch  = training items (n-1) b .. n b - 1 of the task (fresh samples: none is seen twice)
    z      = model(batch.x)                          (dropout drawn from default_rng([seed, n]))
    loss   = mean cross-entropy over the real steps (batch.mask)
    grads  = model.backward(dloss/dz)                (hand-written, no autodiff engine)
    clip the global gradient norm to ``clip``; Adam step with lr = warmup_cosine(n)

Every ``eval_every`` steps and at the end: loss, pooled (the paper's), per-step and
after-distractor accuracy on the first ``eval_samples`` items of the disjoint test split.

A run folder holds
    config.json       the task, model and training configuration (what makes a run the same run)
    metrics.jsonl     one JSON object per logged step ("train") and evaluation ("eval")
    checkpoint.npz    weights, Adam moments and the step, written atomically
    baselines.json    the n-gram and Bayes reference lines of the task's grammar (on request)
    curve.png         loss and accuracy against step (``plot_run``, needs matplotlib)
Running the same configuration into the same folder resumes from the checkpoint; the data of
step n and its dropout mask depend on (seed, n) only, so a resumed run ends with the same
weights as an uninterrupted one. Ctrl-C saves a checkpoint and exits.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, NamedTuple, Optional, Union

import numpy as np

from ..nn import functional as F
from ..nn import optim
from ..nn.layers import EVAL, Context
from . import batching, metrics, presets
from .model import ModelConfig, SelectivBenchModel, validate_model_config


@dataclass(frozen=True)
class TrainConfig:
    """The task and the optimisation (the model's shape is ModelConfig)."""

    preset: str = "t1-small"
    amb: Optional[int] = None         # overrides the preset's grammar size (t1-small default 12)
    seed: int = 1                     # draws the grammar, the samples and the initialisation
    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 100
    clip: float = 1.0
    eval_every: int = 200
    eval_samples: int = 256
    log_every: int = 10
    checkpoint_every: int = 50

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def task(self) -> presets.TaskConfig:
        return presets.get_preset(self.preset, **({} if self.amb is None else {"amb": self.amb}))


def _int_at_least(name, value, low):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"train config: {name} must be an integer >= {low}, got {value!r}")


def validate_train_config(c: TrainConfig) -> TrainConfig:
    """c if valid, else a ValueError naming the field (unknown preset, bad amb, steps < 1, ...)."""
    c.task()                                              # unknown preset, bad amb: ValueError
    presets.check_seed("train config", c.seed)
    for name in ("steps", "batch_size", "eval_every", "eval_samples", "log_every", "checkpoint_every"):
        _int_at_least(name, getattr(c, name), 1)
    _int_at_least("warmup", c.warmup, 0)
    for name in ("lr", "clip"):
        v = getattr(c, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"train config: {name} must be a number > 0, got {v!r}")
    return c


# ------------------------------------------------------------------------------ files
def atomic_write(path: Path, write, mode: str = "w") -> None:
    """Write through a temporary file in the same folder and rename it over path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def run_name(model: ModelConfig, train: TrainConfig) -> str:
    """The run folder's default name: <preset>-amb<A>-<model>-d<D>-l<L>-s<seed>."""
    amb = train.task().n_amb
    return f"{train.preset}-amb{amb}-{model.model}-d{model.d_model}-l{model.n_layers}-s{train.seed}"


def _config_record(model: ModelConfig, train: TrainConfig) -> dict:
    return {"model": model.to_dict(), "train": train.to_dict()}


def read_config(run_dir: Union[str, Path]):
    """(ModelConfig, TrainConfig) from a run folder's config.json."""
    d = json.loads((Path(run_dir) / "config.json").read_text())
    return ModelConfig(**d["model"]), TrainConfig(**d["train"])


def read_metrics(run_dir: Union[str, Path]) -> list:
    """The records of a run folder's metrics.jsonl ([] when there is none)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _json_value(v):
    """NaN (an accuracy over no steps, e.g. after-distractor on a task without distractors) as
    null, inside lists and dicts too, so that every line is strict JSON."""
    if isinstance(v, dict):
        return {k: _json_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    return None if isinstance(v, float) and math.isnan(v) else v


def _write_metrics(path: Path, records: list) -> None:
    atomic_write(path, lambda f: f.writelines(
        json.dumps(_json_value(r), allow_nan=False) + "\n" for r in records))


def prepare_run(model: ModelConfig, train: TrainConfig, out: Union[str, Path],
                name: Optional[str] = None) -> Path:
    """The run folder for this configuration: created (config.json written) or, when it exists
    with the same configuration, reused. Everything is validated before anything is written;
    a folder holding a different configuration is an error."""
    model = validate_model_config(model)
    train = validate_train_config(train)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"train: --out must be a folder, but {out} is a file")
    run_dir = out / (name or run_name(model, train))
    record = _config_record(model, train)
    cfg = run_dir / "config.json"
    if cfg.exists():
        old = json.loads(cfg.read_text())
        if old != record:
            diff = sorted(f"{part}.{k}" for part in record for k in record[part]
                          if old.get(part, {}).get(k) != record[part][k])
            raise ValueError(f"train: {run_dir} holds a run with a different configuration "
                             f"(differs in {', '.join(diff)}); choose another --name or --out, "
                             "or delete the folder")
        return run_dir
    atomic_write(cfg, lambda f: json.dump(record, f, indent=2))
    return run_dir


# ------------------------------------------------------------------------------ data
def train_batch(task: presets.TaskConfig, seed: int, step: int, batch_size: int) -> batching.Batch:
    """The batch of step (1-based): training items (step-1) b .. step b - 1."""
    grammar = task.grammar(seed)
    first = (step - 1) * batch_size
    return batching.collate([presets.make_sample(task, seed, presets.sample_index(task, "train", i),
                                                 "train", 0, grammar)
                             for i in range(first, first + batch_size)])


def evaluate(model: SelectivBenchModel, task: presets.TaskConfig, seed: int, n: int,
             batch_size: int = 64) -> Dict[str, object]:
    """Loss and accuracies on the first n items of the test split (summed exactly over batches).

    acc_pooled (the paper's), acc_step, acc_after_distractor, acc_after_reset (elements 1..5
    after each "#") are floats (NaN where nothing counts); acc_by_offset is a list, the step
    accuracy at offset j = 0, 1, ... inside an element (0: the token step, j: the j-th inserted
    step)."""
    grammar = task.grammar(seed)
    totals = {"pooled": [0, 0], "step": [0, 0], "after_distractor": [0, 0], "after_reset": [0, 0]}
    by_offset = [np.zeros(0, np.int64), np.zeros(0, np.int64)]
    loss_sum, loss_n = 0.0, 0
    for start in range(0, n, batch_size):
        items = range(start, min(n, start + batch_size))
        batch = batching.collate([presets.make_sample(task, seed, presets.sample_index(task, "test", i),
                                                      "test", 0, grammar) for i in items])
        z, _ = model.forward(batch.x, EVAL)
        ce = F.cross_entropy(z, batch.y, batch.mask)
        loss_sum += ce.loss * ce.n
        loss_n += ce.n
        for name, fn in (("pooled", metrics.pooled_accuracy), ("step", metrics.step_accuracy),
                         ("after_distractor", metrics.after_distractor_accuracy),
                         ("after_reset", metrics.after_reset_accuracy)):
            good, total = fn(z, batch, return_counts=True)
            totals[name][0] += good
            totals[name][1] += total
        for i, counts in enumerate(metrics.offset_accuracy(z, batch)):
            size = max(by_offset[i].size, counts.size)
            by_offset[i] = np.pad(by_offset[i], (0, size - by_offset[i].size)) + np.pad(counts, (0, size - counts.size))
    out = {"loss": loss_sum / loss_n}
    for name, (good, total) in totals.items():
        out[f"acc_{name}"] = good / total if total else float("nan")
    right, total = by_offset
    out["acc_by_offset"] = [float(r / t) for r, t in zip(right, total)]
    return out


# ------------------------------------------------------------------------------ checkpoints
def save_checkpoint(run_dir: Path, model, opt: optim.Adam, step: int) -> None:
    """Write the weights, Adam's state and the step to run_dir/checkpoint.npz (atomically)."""
    arrays = {"step": np.array(step)}
    arrays.update({"param." + k: v for k, v in model.parameters().items()})
    arrays.update({"adam." + k: v for k, v in opt.state().items()})
    atomic_write(run_dir / "checkpoint.npz", lambda f: np.savez(f, **arrays), mode="wb")


def load_checkpoint(run_dir: Path, model, opt: Optional[optim.Adam] = None) -> int:
    """Load run_dir/checkpoint.npz into the model (and the optimiser); returns its step."""
    with np.load(run_dir / "checkpoint.npz") as z:
        model.load({k[6:]: z[k] for k in z.files if k.startswith("param.")})
        if opt is not None:
            opt.load({k[5:]: z[k] for k in z.files if k.startswith("adam.")})
        return int(z["step"])


def build_model(model: ModelConfig, train: TrainConfig, backend: Optional[str] = None):
    """(SelectivBenchModel initialised from the seed, TaskConfig) of a run's configuration."""
    task = train.task()
    g = task.grammar(train.seed)
    return SelectivBenchModel(model, g.n_input_classes, g.n_classes, train.seed, backend), task


# ------------------------------------------------------------------------------ the loop
def blas_threads(model: ModelConfig, backend: Optional[str]):
    """The BLAS thread limit of a run (None: leave BLAS as it is).

    A model whose mixers run Numba kernels alternates Numba's parallel regions with BLAS calls;
    both pools spin-wait after their work, so with both at the core count each steals the other's
    cores (measured: a gated_delta_net step 355 ms with BLAS on 2 threads, 265 ms on 1, with
    Numba on 2). Those models run BLAS on one thread; the transformer, all BLAS, keeps them all."""
    from linrec_ref import backends
    if model.model == "transformer" or backends.resolved_name(backend) != "numba":
        return None
    return 1


def blas_limit(limit):
    """A context that limits BLAS to `limit` threads (None, or threadpoolctl missing: no limit)."""
    if limit is None:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:         # installed with the numba extra; without it BLAS keeps its threads
        return contextlib.nullcontext()
    return threadpool_limits(limits=limit, user_api="blas")


def train(model_config: ModelConfig, train_config: TrainConfig, out: Union[str, Path], *,
          name: Optional[str] = None, backend: Optional[str] = None, progress: bool = True,
          stop_at: Optional[int] = None) -> Path:
    """Train (or resume) the run of this configuration under out/; returns the run folder.

    stop_at: stop after this step (saving a checkpoint), as an interruption would; a later call
    resumes. backend: the ops' backend (None: the default, "auto"); not part of the run's
    identity (backends agree to float32 rounding)."""
    run_dir = prepare_run(model_config, train_config, out, name)
    mc, tc = read_config(run_dir)
    model, task = build_model(mc, tc, backend)
    params = model.parameters()
    opt = optim.Adam(params)
    step = 0
    if (run_dir / "checkpoint.npz").exists():
        step = load_checkpoint(run_dir, model, opt)
    records = [r for r in read_metrics(run_dir) if r["step"] <= step]   # drop what the checkpoint lacks
    _write_metrics(run_dir / "metrics.jsonl", records)
    last = tc.steps if stop_at is None else min(tc.steps, stop_at)
    bar = _bar(progress, step, tc.steps, run_dir.name)
    tokens, t_start = 0, time.perf_counter()
    with blas_limit(blas_threads(mc, backend)):
        return _loop(run_dir, model, opt, task, mc, tc, step, last, records, bar, tokens, t_start)


def _loop(run_dir, model, opt, task, mc, tc, step, last, records, bar, tokens, t_start) -> Path:
    try:
        while step < last:
            n = step + 1
            batch = train_batch(task, tc.seed, n, tc.batch_size)
            ctx = Context(True, np.random.default_rng([tc.seed, n]))
            z, cache = model.forward(batch.x, ctx)
            ce = F.cross_entropy(z, batch.y, batch.mask)
            _, grads = model.backward(cache, ce.dlogits)
            norm = optim.clip_by_global_norm(grads, tc.clip)
            lr = optim.warmup_cosine(n, tc.steps, tc.lr, tc.warmup)
            opt.step(grads, lr)
            step = n
            tokens += int(batch.mask.sum())
            if not math.isfinite(ce.loss):
                raise FloatingPointError(f"train: the loss is {ce.loss} at step {n}")
            new = []
            if n % tc.log_every == 0 or n == tc.steps:
                acc = metrics.pooled_accuracy(z, batch)
                new.append({"kind": "train", "step": n, "loss": ce.loss, "acc_pooled": acc,
                            "grad_norm": norm, "lr": lr})
            if n % tc.eval_every == 0 or n == tc.steps:
                new.append({"kind": "eval", "step": n, **evaluate(model, task, tc.seed, tc.eval_samples)})
            if new:
                records += new
                _write_metrics(run_dir / "metrics.jsonl", records)
            if n % tc.checkpoint_every == 0 or n == last:
                save_checkpoint(run_dir, model, opt, n)
            if bar is not None:
                rate = tokens / max(time.perf_counter() - t_start, 1e-9)
                bar.update(1)
                bar.set_postfix(loss=f"{ce.loss:.3f}", acc=f"{metrics.step_accuracy(z, batch):.3f}",
                                tok_s=f"{rate:.0f}")
    except KeyboardInterrupt:
        save_checkpoint(run_dir, model, opt, step)
        _write_metrics(run_dir / "metrics.jsonl", [r for r in records if r["step"] <= step])
        if bar is not None:
            bar.close()
        print(f"\ninterrupted: checkpoint at step {step} saved in {run_dir}; run the same command "
              "to resume", file=sys.stderr)
        raise
    if bar is not None:
        bar.close()
    return run_dir


def _bar(progress: bool, done: int, total: int, desc: str):
    if not progress:
        return None
    try:
        from tqdm import tqdm
    except ImportError:            # tqdm is optional: no bar, the metrics log still records
        return None
    return tqdm(total=total, initial=done, desc=desc, unit="step", dynamic_ncols=True)


def load_run(run_dir: Union[str, Path], backend: Optional[str] = None):
    """(model with the checkpoint's weights, its ModelConfig, TrainConfig, step)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists():
        raise ValueError(f"eval: {run_dir} is not a run folder (no config.json)")
    if not (run_dir / "checkpoint.npz").exists():
        raise ValueError(f"eval: {run_dir} has no checkpoint yet (train it first)")
    mc, tc = read_config(run_dir)
    model, _ = build_model(mc, tc, backend)
    step = load_checkpoint(run_dir, model)
    return model, mc, tc, step


class RunEvaluation(NamedTuple):
    metrics: Dict[str, object]      # evaluate()'s: loss, acc_pooled, acc_step, ..., acc_by_offset
    task: presets.TaskConfig        # the task it was scored on
    baselines: dict                 # the n-gram and Bayes reference lines of that task
    model: ModelConfig
    train: TrainConfig
    step: int                       # the checkpoint's step


def evaluate_run(run_dir: Union[str, Path], preset: Optional[str] = None, gap: Optional[int] = None,
                 n: int = 256, backend: Optional[str] = None):
    """Score a run's checkpoint on its own test split, or on `preset` of the same grammar with
    `gap` blanks per element (``RunEvaluation``)."""
    model, mc, tc, step = load_run(run_dir, backend)
    task = tc.task()
    if preset is not None or gap is not None:
        overrides = {} if tc.amb is None else {"amb": tc.amb}
        if gap is not None:
            overrides["test_gap"] = gap
        task = presets.get_preset(preset or tc.preset, **overrides)
    with blas_limit(blas_threads(mc, backend)):
        res = evaluate(model, task, tc.seed, n)
    ref = baselines(run_dir, None if task == tc.task() else task)
    return RunEvaluation(res, task, ref, mc, tc, step)


def baselines(run_dir: Union[str, Path], task: Optional[presets.TaskConfig] = None) -> dict:
    """The n-gram and Bayes reference lines of the run's grammar on its test split (cached in
    baselines.json for the run's own task)."""
    from .baselines import report
    run_dir = Path(run_dir)
    _, tc = read_config(run_dir)
    own = task is None
    task = tc.task() if own else task
    path = run_dir / "baselines.json"
    if own and path.exists():
        return json.loads(path.read_text())
    out = report(task, seed=tc.seed, n_train=2000, n_test=min(tc.eval_samples, 500))
    if own:
        atomic_write(path, lambda f: json.dump(out, f, indent=2))
    return out


def plot_run(run_dir: Union[str, Path], path: Optional[Union[str, Path]] = None) -> Path:
    """Loss and test accuracy against step (curve.png in the run folder by default)."""
    from .plot import _pyplot, save
    plt = _pyplot()
    run_dir = Path(run_dir)
    recs = read_metrics(run_dir)
    tr = [r for r in recs if r["kind"] == "train"]
    ev = [r for r in recs if r["kind"] == "eval"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.2))
    a1.plot([r["step"] for r in tr], [r["loss"] for r in tr], label="train")
    a1.plot([r["step"] for r in ev], [r["loss"] for r in ev], "o-", label="test")
    a1.set(xlabel="step", ylabel="cross-entropy", yscale="log", title=run_dir.name)
    a1.legend()
    a2.plot([r["step"] for r in ev], [r["acc_pooled"] for r in ev], "o-", label="pooled (paper)")
    a2.plot([r["step"] for r in ev], [r["acc_step"] for r in ev], "s--", label="per step")
    bl = run_dir / "baselines.json"
    if bl.exists():
        b = json.loads(bl.read_text())
        for key, style in (("3-gram", ":"), ("bayes", "-.")):
            a2.axhline(b[key], color="gray", ls=style, label=key)
    a2.set(xlabel="step", ylabel="test accuracy", ylim=(0, 1.02))
    a2.legend(fontsize=7)
    fig.tight_layout()
    return save(fig, Path(path) if path else run_dir / "curve.png")
