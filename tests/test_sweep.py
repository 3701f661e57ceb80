"""linrec selectivbench sweep: a tiny plan on a LocalCluster, killed half-way and resumed."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("distributed", reason="the sweep needs Dask distributed (the sweep extra)")

from linrec_ref.tasks import plans, sweep  # noqa: E402

PLAN = """
name = "tiny"
[train]
steps = 6
warmup = 1
eval_every = 3
eval_samples = 4
batch_size = 4
checkpoint_every = 2
[[grid]]
model = ["gated_delta_net", "mamba2"]
preset = "t1-small"
amb = 4
d_model = 8
n_layers = 1
seed = [1, 2]
[[evaluate]]
preset = "t4-small"
gap = 2
"""


def _cmd(plan, out, *extra):
    return [sys.executable, "-m", "linrec_ref.cli", "selectivbench", "sweep", str(plan), "--out", str(out),
            "--workers", "1", "--no-progress", *extra]


def _done(out):
    return {p.parent.name: p.read_text() for p in (out / "tiny").glob("*/done.json")}


def test_a_killed_sweep_resumes_without_repeating_finished_runs(tmp_path):
    plan_path = tmp_path / "tiny.toml"
    plan_path.write_text(PLAN)
    out = tmp_path / "runs"
    proc = subprocess.Popen(_cmd(plan_path, out), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not _done(out) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)              # the sweep and its workers, mid-run
    proc.wait()
    first = _done(out)
    assert first, "no run finished before the kill"
    res = subprocess.run(_cmd(plan_path, out), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    after = _done(out)
    assert len(after) == 4
    assert all(after[name] == text for name, text in first.items())   # finished runs not redone
    assert f"{len(first)} skipped" in res.stdout
    for text in after.values():
        record = json.loads(text)
        assert record["final"]["step"] == 6 and record["evaluations"][0]["gap"] == 2
    again = subprocess.run(_cmd(plan_path, out), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "all 4 runs already done" in again.stdout


def test_a_failing_run_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    plan = plans.load_plan(_write(tmp_path, PLAN))
    bad = plan.runs[0]
    # a run that cannot train: its folder already holds another configuration
    d = sweep.run_dir(tmp_path, plan, bad)
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"model": {"model": "mamba"}, "train": {}}))
    outcome = sweep.run_one(str(tmp_path), plan, bad, threads=1)
    assert outcome.status == "failed" and "config" in outcome.error
    assert sweep.status(tmp_path, plan, bad) == "failed"
    assert "Error" in json.loads((d / "error.json").read_text())["error"]
    good = sweep.run_one(str(tmp_path), plan, plan.runs[1], threads=1)
    assert good.status == "done" and sweep.status(tmp_path, plan, plan.runs[1]) == "done"


def test_dry_run_prints_the_grid_and_writes_nothing(tmp_path, capsys):
    counts = sweep.sweep(_write(tmp_path, PLAN), tmp_path / "runs", workers=1, dry_run=True)
    text = capsys.readouterr().out
    assert "4 runs, 4 to do" in text and "estimated" in text
    assert counts == {"done": 0, "failed": 0, "skipped": 0}
    assert not (tmp_path / "runs").exists()


def test_bad_sweep_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="--workers must be an integer >= 1"):
        sweep.sweep(_write(tmp_path, PLAN), tmp_path / "runs", workers=0)
    assert not (tmp_path / "runs").exists()


def _write(tmp_path, text):
    path = tmp_path / "tiny.toml"
    path.write_text(text)
    return path
