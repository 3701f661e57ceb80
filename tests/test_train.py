"""The SelectivBench model and training loop: a whole-model gradient check, learning, resuming,
rejected configurations."""
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

from linrec_ref import testing
from linrec_ref.nn import functional as F
from linrec_ref.tasks import model as md
from linrec_ref.tasks import train as tr

TINY = dict(d_model=8, n_layers=2, n_heads=2, d_state=4)


def tiny_train(**kw):
    base = dict(preset="t1-small", amb=6, steps=6, batch_size=4, lr=3e-3, warmup=1, eval_every=3,
                eval_samples=8, log_every=1, checkpoint_every=2)
    base.update(kw)
    return tr.TrainConfig(**base)


def test_whole_model_gradient_against_finite_differences():
    mc = md.ModelConfig(model="gated_delta_net", dtype="float64", **TINY)
    tc = tiny_train()
    model, task = tr.build_model(mc, tc, backend="numpy")
    batch = tr.train_batch(task, tc.seed, 1, 2)
    x = batch.x.astype(np.float64)
    params = {k: v.copy() for k, v in model.parameters().items()}
    z, cache = model.forward(x)
    ce = F.cross_entropy(z, batch.y, batch.mask)
    _, grads = model.backward(cache, ce.dlogits)
    assert set(grads) == set(params)

    def loss(d):
        model.load(d)
        return F.cross_entropy(model.forward(x)[0], batch.y, batch.mask).loss

    names = ["embed.W", "blocks.0.mixer.q_proj.W", "blocks.0.mixer.A_log", "blocks.1.mixer.k_conv.w",
             "blocks.1.norm.w", "decoder.b"]
    res = testing.fd_check(loss, params, grads, names, n_entries=2)
    for name, comparison in res.items():
        assert comparison.ok, comparison


@pytest.mark.parametrize("name", md.MODELS)
def test_training_lowers_the_loss_for_every_model(name, tmp_path):
    mc = md.ModelConfig(model=name, **TINY)
    tc = tiny_train(steps=8, lr=1e-2, batch_size=8, eval_every=8)
    run = tr.train(mc, tc, tmp_path, progress=False)
    losses = [r["loss"] for r in tr.read_metrics(run) if r["kind"] == "train"]
    assert len(losses) == 8 and all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.05, losses


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    mc = md.ModelConfig(model="gla", dropout=0.1, **TINY)
    tc = tiny_train()
    straight = tr.train(mc, tc, tmp_path / "a", progress=False)
    part = tr.train(mc, tc, tmp_path / "b", progress=False, stop_at=3)
    with np.load(part / "checkpoint.npz") as z:
        assert int(z["step"]) == 3
    resumed = tr.train(mc, tc, tmp_path / "b", progress=False)
    with np.load(straight / "checkpoint.npz") as a, np.load(resumed / "checkpoint.npz") as b:
        assert a.files == b.files
        for k in a.files:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    def strict(constant):
        raise AssertionError(f"metrics.jsonl holds {constant}, not strict JSON")

    for line in (resumed / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=strict)
    ra, rb = tr.read_metrics(straight), tr.read_metrics(resumed)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]


@pytest.mark.parametrize("model_kw, train_kw, message", [
    ({"model": "lstm"}, {}, "unknown model"),
    ({"d_model": 0}, {}, "d_model must be an integer >= 1"),
    ({"d_model": 10, "n_heads": 4}, {}, "must divide d_model"),
    ({}, {"lr": 0.0}, "lr must be a number > 0"),
    ({}, {"lr": -1e-3}, "lr must be a number > 0"),
    ({}, {"steps": 0}, "steps must be an integer >= 1"),
    ({}, {"preset": "t9"}, "unknown preset"),
    ({"dropout": 1.5}, {}, "dropout must lie in"),
])
def test_bad_configuration_is_rejected_before_anything_is_written(tmp_path, model_kw, train_kw, message):
    mc = md.ModelConfig(**{**TINY, **model_kw})
    with pytest.raises(ValueError, match=message):
        tr.train(mc, tiny_train(**train_kw), tmp_path / "runs", progress=False)
    assert not (tmp_path / "runs").exists()


def test_a_folder_with_another_configuration_is_rejected(tmp_path):
    mc = md.ModelConfig(**TINY)
    run = tr.train(mc, tiny_train(steps=2), tmp_path, progress=False)
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(ValueError, match="different configuration .*train.lr"):
        tr.train(mc, tiny_train(steps=2, lr=1e-4), tmp_path, progress=False, name=run.name)
    assert sorted(p.name for p in run.iterdir()) == before


def test_cli_train_and_eval(tmp_path):
    base = [sys.executable, "-m", "linrec_ref.cli", "selectivbench"]
    args = ["train", "--preset", "t1-small", "--amb", "6", "--model", "gdn", "--d-model", "8",
            "--layers", "1", "--steps", "3", "--batch-size", "4", "--eval-every", "3",
            "--eval-samples", "8", "--warmup", "1", "--out", str(tmp_path), "--no-progress"]
    p = subprocess.run(base + args, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    run = tmp_path / "t1-small-amb6-gated_delta_net-d8-l1-s1"
    assert json.loads((run / "config.json").read_text())["model"]["model"] == "gated_delta_net"
    assert "reference lines" in p.stdout and "3-gram" in p.stdout
    e = subprocess.run(base + ["eval", str(run), "--preset", "t4-small", "--gap", "8", "--n", "8"],
                       capture_output=True, text=True, timeout=300)
    assert e.returncode == 0, e.stderr
    assert "test gap 8" in e.stdout and "pooled" in e.stdout
    bad = subprocess.run(base + ["train", "--preset", "t1-small", "--model", "gdn", "--lr", "0",
                                 "--out", str(tmp_path / "new")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "lr must be a number > 0" in bad.stderr
    assert not (tmp_path / "new").exists()
    missing = subprocess.run(base + ["eval", str(tmp_path / "nothing")], capture_output=True, text=True)
    assert missing.returncode == 2 and "not a run folder" in missing.stderr


def test_ctrl_c_saves_a_checkpoint_and_the_same_command_resumes(tmp_path):
    """SIGINT (Ctrl-C) to a running `linrec selectivbench train`: exit status 130, a checkpoint of
    the last finished step; the same command then finishes the run."""
    import os
    import signal
    import time

    cmd = [sys.executable, "-m", "linrec_ref.cli", "selectivbench", "train", "--preset", "t1-small",
           "--amb", "6", "--model", "gla", "--d-model", "8", "--layers", "1", "--steps", "400",
           "--batch-size", "4", "--eval-every", "400", "--eval-samples", "8", "--warmup", "1",
           "--out", str(tmp_path), "--no-progress"]
    # a shell that starts the suite in the background hands it SIGINT ignored, and Python then
    # never installs its Ctrl-C handler in the child: give the child the default disposition
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    run = tmp_path / "t1-small-amb6-gla-d8-l1-s1"
    deadline = time.time() + 240
    while not (run / "checkpoint.npz").exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
    assert p.poll() is None, "the run ended before it could be interrupted"
    os.kill(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "interrupted: checkpoint at step" in err
    with np.load(run / "checkpoint.npz") as z:
        stopped = int(z["step"])
    assert 0 < stopped < 400
    assert all(r["step"] <= stopped for r in tr.read_metrics(run))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    with np.load(run / "checkpoint.npz") as z:
        assert int(z["step"]) == 400


def test_blas_runs_on_one_thread_only_beside_numba_kernels():
    gdn, tf = md.ModelConfig(model="gated_delta_net"), md.ModelConfig(model="transformer")
    assert tr.blas_threads(gdn, "numpy") is None
    assert tr.blas_threads(tf, "auto") is None
    if importlib.util.find_spec("numba") is None:
        assert tr.blas_threads(gdn, "auto") is None
        return
    assert tr.blas_threads(gdn, "numba") == 1
    threadpoolctl = pytest.importorskip("threadpoolctl")
    with tr.blas_limit(1):
        assert all(p["num_threads"] == 1 for p in threadpoolctl.threadpool_info()
                   if p["user_api"] == "blas")
