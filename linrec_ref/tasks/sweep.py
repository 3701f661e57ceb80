"""Run an experiment plan on Dask distributed: one training run per task, resumable.

    linrec selectivbench sweep experiments/forgetting.toml --out runs/ [--workers 2]
    linrec selectivbench sweep PLAN --out runs/ --scheduler tcp://host:8786    # an existing cluster

Layout: ``OUT/<plan name>/<run name>/`` is an ordinary run folder (``linrec selectivbench
train``'s), plus ``done.json`` once the run and its extra evaluations finished, or ``error.json``
when it failed (the traceback; the run is retried by the next sweep). A sweep skips every run with
a ``done.json``; a run with a checkpoint and no ``done.json`` resumes from its checkpoint (the
training loop does that), so a killed sweep loses at most the steps since each run's last
checkpoint, and a second sweep over the same folder repeats no finished work.

Threads: by default a ``LocalCluster`` of k worker processes, one task at a time each, and each
run limited to cores // k threads (Numba's pool and BLAS; the training loop runs BLAS on one
thread beside Numba kernels), so workers x threads <= cores. With ``--scheduler`` the plan is
submitted to that cluster's workers as they are; each run then uses ``--threads`` (default 1).
"""
from __future__ import annotations

import functools
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Union

from .plans import Plan, Run, load_plan
from .train import atomic_write

# Measured ms per training step (python -m bench train_step, batch 32 x 128 steps of t1-small,
# D = 64, 4 layers; 2026-12-04, 2 cores): the dry-run's time estimate, scaled by width and by the
# preset's sample length. Recurrent models other than these are estimated as gated_delta_net.
STEP_MS = {("gated_delta_net", 1): 295.0, ("gated_delta_net", 2): 216.5,
           ("transformer", 1): 315.7, ("transformer", 2): 289.9}


def _write_json(path: Path, obj) -> None:
    atomic_write(path, lambda f: json.dump(obj, f, indent=2, allow_nan=False))


def run_dir(out: Union[str, Path], plan: Plan, run: Run) -> Path:
    """The folder of one run of a plan: out/<plan name>/<run name>."""
    return Path(out) / plan.name / run.name


def status(out: Union[str, Path], plan: Plan, run: Run) -> str:
    """'done', 'failed' (the last attempt raised), 'partial' (a checkpoint, not finished), 'new'."""
    d = run_dir(out, plan, run)
    if (d / "done.json").exists():
        return "done"
    if (d / "error.json").exists():
        return "failed"
    return "partial" if (d / "checkpoint.npz").exists() else "new"


def estimate_seconds(run: Run, threads: int) -> float:
    """Rough wall time of one run from the measured step times (STEP_MS)."""
    mc, tc = run.model, run.train
    key = "transformer" if mc.model == "transformer" else "gated_delta_net"
    ms = STEP_MS[(key, min(max(threads, 1), 2))]
    length = _steps_per_sample(tc.preset, tc.amb) / 128          # the bench's batch has 128 steps
    width = (mc.d_model / 64) ** 1.5 * (mc.n_layers / 4)
    evals = (tc.steps // tc.eval_every + 1) * tc.eval_samples / tc.batch_size / 3   # forward only
    return (tc.steps + evals) * ms * width * max(length, 0.25) * tc.batch_size / 32 / 1e3


@functools.lru_cache(maxsize=None)
def _steps_per_sample(preset: str, amb: Optional[int]) -> int:
    """Time steps of a training batch of the preset (its longest sample), from one drawn batch."""
    from .train import TrainConfig, train_batch
    tc = TrainConfig(preset=preset, amb=amb)
    return train_batch(tc.task(), 1, 1, 8).n_steps


@dataclass(frozen=True)
class Outcome:
    name: str
    status: str                 # "done" or "failed"
    seconds: float
    error: str = ""


def run_one(out: str, plan: Plan, run: Run, threads: int, backend: Optional[str] = None) -> Outcome:
    """Train (or resume) one run and its extra evaluations; never raises (a failure is recorded
    in error.json and returned). Runs inside a Dask worker."""
    from . import train as tr
    d = run_dir(out, plan, run)
    t0 = time.perf_counter()
    try:
        _set_threads(threads)
        tr.train(run.model, run.train, Path(out) / plan.name, name=run.name, backend=backend,
                 progress=False)
        final = next(r for r in reversed(tr.read_metrics(d))
                     if r["kind"] == "eval" and r["step"] == run.train.steps)
        tr.baselines(d)                                  # the reference lines, cached for the report
        extra = []
        for ev in plan.evaluations:
            r = tr.evaluate_run(d, ev.preset, ev.gap, run.train.eval_samples, backend)
            extra.append({"preset": ev.preset, "gap": ev.gap, **r.metrics, "baselines": r.baselines})
        if (d / "error.json").exists():
            os.unlink(d / "error.json")
        seconds = time.perf_counter() - t0
        _write_json(d / "done.json", tr._json_value({"final": final, "evaluations": extra,
                                                     "seconds": seconds, "threads": threads}))
        return Outcome(run.name, "done", seconds)
    except Exception as err:                             # recorded; the sweep goes on
        seconds = time.perf_counter() - t0
        text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
        d.mkdir(parents=True, exist_ok=True)
        _write_json(d / "error.json", {"error": f"{type(err).__name__}: {err}", "traceback": text,
                                       "seconds": seconds})
        return Outcome(run.name, "failed", seconds, f"{type(err).__name__}: {err}")


RECORDS = ("config.json", "metrics.jsonl", "baselines.json", "checkpoint.npz")


def reusable(out: Union[str, Path], plan: Plan, run: Run) -> Optional[Path]:
    """A finished run of the same configuration in another plan folder of `out` that this plan
    can copy instead of training (plans share runs: gated_delta_net on t1-small at amb 12 is in
    four of them): one that has every extra evaluation this plan asks for, while this plan's own
    folder for the run is absent or empty. None when there is none."""
    from .train import read_config
    want = {(e.preset, e.gap) for e in plan.evaluations}
    dest = run_dir(out, plan, run)
    if dest.exists() and any(dest.iterdir()):
        return None                             # started here: it resumes here
    for src in sorted(Path(out).glob(f"*/{run.name}/done.json")):
        folder = src.parent
        if folder.parent.name == plan.name or not (folder / "config.json").exists():
            continue
        if read_config(folder) != (run.model, run.train):
            continue
        done = json.loads(src.read_text())
        if want <= {(e["preset"], e["gap"]) for e in done.get("evaluations", [])}:
            return folder
    return None


def reuse(out: Union[str, Path], plan: Plan, run: Run) -> Optional[Path]:
    """Copy the ``reusable`` run's records and checkpoint into this plan's folder (done.json
    says ``copied_from``, and keeps the evaluations this plan asks for); returns the source."""
    import shutil
    folder = reusable(out, plan, run)
    if folder is None:
        return None
    want = {(e.preset, e.gap) for e in plan.evaluations}
    done = json.loads((folder / "done.json").read_text())
    dest = run_dir(out, plan, run)
    tmp = dest.with_name(f".{dest.name}.copy")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in RECORDS:
        if (folder / name).exists():
            shutil.copy2(folder / name, tmp / name)
    done["copied_from"] = f"{folder.parent.name}/{folder.name}"
    done["evaluations"] = [e for e in done.get("evaluations", []) if (e["preset"], e["gap"]) in want]
    _write_json(tmp / "done.json", done)
    if dest.exists():                           # an empty folder left by an earlier attempt
        dest.rmdir()
    os.replace(tmp, dest)
    return folder


def _set_threads(threads: int) -> None:
    """Numba's pool and BLAS limited to `threads` for the rest of this worker process."""
    try:
        import numba
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    except ImportError:
        pass
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(limits=threads, user_api="blas")
    except ImportError:
        pass


# Dask's nanny sets MALLOC_TRIM_THRESHOLD_=65536 in its workers' environment. Setting any malloc
# threshold turns off glibc's adaptive mmap threshold, so every array above 128 KiB is mmap'ed
# and unmapped again, its pages faulted in afresh each time: a 40-step gated_delta_net run took
# 35 s in a worker (as much system time as user time; strace: 55k munmap) against 10.4 s in a
# plain process. None unsets the variable (Dask's documented way to drop a default).
# Runs last minutes: the scheduler hands a worker its next run only when it is free
# (saturation 1.0: one task per worker thread), so no run waits behind another on a busy worker
# and the scheduler's "processing" count is the runs executing.
WORKER_CONFIG = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,
                 "distributed.scheduler.worker-saturation": 1.0}


def thread_env(threads: int) -> Dict[str, str]:
    """Environment of a LocalCluster's worker processes: every thread pool (Numba's, OpenMP's,
    BLAS's) sized to `threads` before it starts, so that workers x threads <= cores."""
    n = str(threads)
    return {"NUMBA_NUM_THREADS": n, "OMP_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n,
            "MKL_NUM_THREADS": n}


def plan_table(plan: Plan, out: Union[str, Path], threads: int) -> List[Dict]:
    """[{run, status, estimate_s}] for every run of the plan (status as ``status``)."""
    return [{"run": r.name, "status": status(out, plan, r), "estimate_s": estimate_seconds(r, threads)}
            for r in plan.runs]


def sweep(plan: Union[str, Path, Plan], out: Union[str, Path], *, workers: Optional[int] = None,
          scheduler: Optional[str] = None, threads: Optional[int] = None, dry_run: bool = False,
          progress: bool = True, backend: Optional[str] = None) -> Dict[str, int]:
    """Run every unfinished run of the plan; returns the counts {done, failed, skipped}."""
    plan = plan if isinstance(plan, Plan) else load_plan(plan)
    cores = os.cpu_count() or 1
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"sweep: --workers must be an integer >= 1, got {workers!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"sweep: --threads must be an integer >= 1, got {threads!r}")
    k = workers or (1 if scheduler else cores)
    if scheduler is None:
        k = min(k, cores)
    per_run = threads or (1 if scheduler else max(1, cores // k))
    table = plan_table(plan, out, per_run)
    reused = 0
    for r, row in zip(plan.runs, table):
        if row["status"] == "new" and (reusable if dry_run else reuse)(out, plan, r):
            row["status"] = "copy" if dry_run else "done"
            reused += 1
    todo = [r for r, row in zip(plan.runs, table) if row["status"] not in ("done", "copy")]
    if dry_run:
        _print_dry_run(plan, table, k, per_run)
        return {"done": 0, "failed": 0, "skipped": len(table) - len(todo) - reused, "reused": 0}
    counts = {"done": 0, "failed": 0, "skipped": len(table) - len(todo) - reused, "reused": reused}
    if not todo:
        print(f"sweep {plan.name}: all {len(table)} runs already done in {Path(out) / plan.name}")
        return counts
    try:
        import dask
        from dask.distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise ImportError("linrec selectivbench sweep needs Dask distributed: "
                          "pip install 'linrec_ref[sweep]'") from None
    (Path(out) / plan.name).mkdir(parents=True, exist_ok=True)
    cluster = None
    if scheduler is None:
        with dask.config.set(WORKER_CONFIG):
            cluster = LocalCluster(n_workers=k, threads_per_worker=1, processes=True,
                                   dashboard_address=":0", silence_logs=40, env=thread_env(per_run))
        client = Client(cluster)
    else:
        client = Client(scheduler)
    try:
        print(f"sweep {plan.name}: {len(todo)} of {len(table)} runs to do ({counts['skipped']} done), "
              f"{k} workers x {per_run} threads; dashboard {client.dashboard_link}", flush=True)
        futures = [client.submit(run_one, str(out), plan, r, per_run, backend, key=f"{plan.name}/{r.name}",
                                 pure=False) for r in todo]
        bar = _bar(progress, len(todo), plan.name)
        t0, run_seconds = time.perf_counter(), 0.0
        for fut in as_completed(futures):
            o: Outcome = fut.result()
            counts[o.status] += 1
            run_seconds += o.seconds
            if o.status == "failed":
                print(f"  failed: {o.name}: {o.error}", file=sys.stderr, flush=True)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(done=counts["done"], failed=counts["failed"], running=_running(client))
        if bar is not None:
            bar.close()
        _log_sweep(Path(out) / plan.name, plan, k, per_run, counts, time.perf_counter() - t0, run_seconds)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    print(f"sweep {plan.name}: {counts['done']} done, {counts['failed']} failed, "
          f"{counts['skipped']} skipped (already done), {counts['reused']} copied from other plans")
    return counts


def _running(client) -> int:
    """Tasks the workers are executing now (the scheduler's count)."""
    try:
        return sum(len(v) for v in client.processing().values())
    except Exception:                    # a scheduler that does not answer: no count, no failure
        return -1


def _log_sweep(folder: Path, plan: Plan, workers: int, threads: int, counts: Dict[str, int],
               wall: float, run_seconds: float) -> None:
    """Append this sweep's record to folder/sweeps.jsonl (wall time against the sum of its runs'
    times: the Dask overhead the report shows)."""
    from .report import _versions
    path = folder / "sweeps.jsonl"
    old = path.read_text() if path.exists() else ""
    entry = {"plan": plan.name, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "workers": workers,
             "threads": threads, **counts, "wall_seconds": wall, "run_seconds": run_seconds,
             "versions": _versions()}
    atomic_write(path, lambda f: f.write(old + json.dumps(entry) + "\n"))


def _bar(progress: bool, total: int, desc: str):
    if not progress:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="run", dynamic_ncols=True)


def _print_dry_run(plan: Plan, table: List[Dict], workers: int, threads: int) -> None:
    print(f"plan {plan.name} ({plan.source}): {plan.description}")
    width = max(len(r["run"]) for r in table)
    for r in table:
        print(f"  {r['run']:<{width}}  {r['status']:<8} ~{r['estimate_s'] / 60:5.1f} min")
    todo = [r["estimate_s"] for r in table if r["status"] not in ("done", "copy")]
    total = sum(todo)
    copies = sum(r["status"] == "copy" for r in table)
    copied = f" ({copies} more copied from other plans)" if copies else ""
    print(f"{len(table)} runs, {len(todo)} to do{copied}; estimated {total / 3600:.2f} h of run time, "
          f"~{total / workers / 3600:.2f} h on {workers} workers x {threads} threads "
          "(from the measured step times; a rough guide)")
    for ev in plan.evaluations:
        print(f"  then each run evaluated on {ev.preset} with gap {ev.gap}")
