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


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """The tiny plan's sweep, SIGKILLed once a run finished, then run again to the end."""
    tmp_path = tmp_path_factory.mktemp("sweep")
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
    res = subprocess.run(_cmd(plan_path, out), capture_output=True, text=True, timeout=300)
    return plan_path, out, first, res


def test_a_killed_sweep_resumes_without_repeating_finished_runs(killed_and_resumed):
    plan_path, out, first, res = killed_and_resumed
    assert first, "no run finished before the kill"
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
    log = [json.loads(line) for line in (out / "tiny" / "sweeps.jsonl").read_text().splitlines()]
    assert log[-1]["done"] == 4 - len(first) and log[-1]["wall_seconds"] > 0


def test_a_run_finished_in_another_plan_is_copied_not_retrained(killed_and_resumed, tmp_path):
    _, out, _, _ = killed_and_resumed
    other = _write(tmp_path, PLAN.replace('name = "tiny"', 'name = "tiny_again"').split("[[evaluate]]")[0])
    dry = sweep.sweep(other, out, workers=1, dry_run=True)
    assert dry["reused"] == 0 and dry["skipped"] == 0 and not (out / "tiny_again").exists()
    counts = sweep.sweep(other, out, workers=1, progress=False)     # no cluster needed: nothing to train
    assert counts == {"done": 0, "failed": 0, "skipped": 0, "reused": 4}
    for name, text in _done(out).items():
        copy = json.loads((out / "tiny_again" / name / "done.json").read_text())
        assert copy["copied_from"] == f"tiny/{name}"
        assert copy["final"] == json.loads(text)["final"] and copy["evaluations"] == []
    # a plan asking for an evaluation the finished runs lack is not served by copies
    wants_more = plans.load_plan(_write(tmp_path, PLAN.replace('name = "tiny"', 'name = "tiny_gap3"')
                                        .replace("gap = 2", "gap = 3")))
    assert sweep.reuse(out, wants_more, wants_more.runs[0]) is None


def test_report_collects_the_runs_into_csv_figures_and_a_page(killed_and_resumed, tmp_path):
    import csv
    import shutil
    from linrec_ref.tasks import report
    pytest.importorskip("matplotlib")
    plan_path, out, _, _ = killed_and_resumed
    summary = report.report(out, tmp_path / "rep", plans=[plan_path])
    rows = list(csv.DictReader(open(tmp_path / "rep" / "runs.csv")))
    finished = {name: json.loads(text) for name, text in _done(out).items()}
    assert sorted(r["run"] for r in rows) == sorted(finished)        # copies in other plans once
    for r in rows:
        final = finished[r["run"]]["final"]
        assert float(r["acc_pooled"]) == final["acc_pooled"] and float(r["loss"]) == final["loss"]
        assert r["acc_by_offset"].split() == [repr(v) for v in final["acc_by_offset"]]
        assert float(r["bayes"]) > 0 and int(r["n_params"]) > 0
    evals = list(csv.DictReader(open(tmp_path / "rep" / "evaluations.csv")))
    assert len(evals) == 4 and {e["gap"] for e in evals} == {"2"}
    page = (tmp_path / "rep" / "results.md").read_text()
    assert "| tiny | 4 | 4 |" in page and "## Verdicts" in page
    assert set(summary["claims"]) == {"forgetting", "selectivity", "generalisation", "attention"}
    # from a copy of the records alone (no checkpoints) the CSV comes out the same
    records = tmp_path / "records"
    for done in out.glob("tiny/*/done.json"):
        dest = records / "tiny" / done.parent.name
        dest.mkdir(parents=True)
        for name in ("config.json", "metrics.jsonl", "done.json", "baselines.json"):
            shutil.copy2(done.parent / name, dest / name)
    report.report(records, tmp_path / "rep2", plots=False)
    for name in ("runs.csv", "evaluations.csv"):
        assert (tmp_path / "rep2" / name).read_text() == (tmp_path / "rep" / name).read_text()


def test_report_rejects_a_folder_without_finished_runs(tmp_path):
    from linrec_ref.tasks import report
    (tmp_path / "runs" / "p" / "r").mkdir(parents=True)
    with pytest.raises(ValueError, match="no finished run"):
        report.report(tmp_path / "runs", tmp_path / "rep")
    assert not (tmp_path / "rep").exists()
    with pytest.raises(ValueError, match="is not a folder"):
        report.report(tmp_path / "nothing", tmp_path / "rep")


def test_comparison_rule_and_verdicts():
    from linrec_ref.tasks.report import Claim, Comparison, compare, stat
    hi, lo, mid = stat([0.9, 0.92, 0.95]), stat([0.7, 0.8, 0.85]), stat([0.84, 0.93])
    assert compare(hi, lo) == "A higher" and compare(lo, hi) == "B higher"
    assert compare(hi, mid) == "no clear difference"
    assert compare(hi, stat([0.5])) == "too few seeds" and compare(hi, stat([])) == "not run"
    assert abs(hi.mean - 0.92333333) < 1e-6 and abs(hi.std - 0.02516611) < 1e-6
    yes = Comparison("x", "a", "b", hi, lo, ("A higher",))
    no = Comparison("x", "a", "b", lo, hi, ("A higher",))
    missing = Comparison("x", "a", "b", hi, stat([]), ("A higher",))
    verdict = lambda *c: Claim("k", "t", "p", c, (), ()).verdict     # noqa: E731
    assert verdict(yes, yes) == "reproduced" and verdict(no) == "not reproduced"
    assert verdict(yes, no) == "mixed" and verdict(yes, missing) == "partly run: reproduced"
    assert verdict(missing) == "not run"


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
    assert counts == {"done": 0, "failed": 0, "skipped": 0, "reused": 0}
    assert not (tmp_path / "runs").exists()


def test_bad_sweep_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="--workers must be an integer >= 1"):
        sweep.sweep(_write(tmp_path, PLAN), tmp_path / "runs", workers=0)
    assert not (tmp_path / "runs").exists()


def _write(tmp_path, text):
    path = tmp_path / "tiny.toml"
    path.write_text(text)
    return path


def test_the_same_plan_runs_on_an_existing_cluster(tmp_path):
    """--scheduler ADDRESS: the plan goes to that cluster's workers, unchanged."""
    from dask.distributed import LocalCluster
    plan = _write(tmp_path, PLAN.replace('model = ["gated_delta_net", "mamba2"]', 'model = "mamba2"'))
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        counts = sweep.sweep(plan, tmp_path / "runs", scheduler=cluster.scheduler_address, progress=False)
    assert counts == {"done": 2, "failed": 0, "skipped": 0, "reused": 0}
    assert len(list((tmp_path / "runs" / "tiny").glob("*/done.json"))) == 2
