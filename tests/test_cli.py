"""The ``linrec`` command line and the SelectivBench API around it: every rejected command exits
with status 2 and one line on stderr before anything is printed or created; pipes closed early
end quietly; generate cleans up after killed runs; plot draws exactly what generate writes."""
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from linrec_ref import cli
from linrec_ref.tasks import presets as P
from linrec_ref.tasks import storage as st

SAMPLE_FIELDS = ("x", "y", "element", "is_token", "after_distractor", "step_class")


def _same(a, b) -> bool:
    return all(np.array_equal(getattr(a, f), getattr(b, f)) for f in SAMPLE_FIELDS)


def _rejected(capsys, argv, match: str) -> None:
    """The command exits 2 with one line on stderr naming the problem, and prints nothing."""
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert re.search(match, err), err


# ---- linrec selectivbench generate / describe: arguments checked first -----------------------

@pytest.mark.parametrize("extra, match", [
    (["--n", "-5"], r"n must be an integer >= 1, got -5"),
    (["--n", "0"], r"n must be an integer >= 1, got 0"),
    (["--n", "5", "--seed", "0"], r"seed must be an integer >= 1.*got 0"),
    (["--n", "5", "--seed", "-1"], r"seed must be an integer >= 1.*got -1"),
    (["--n", "5", "--epoch", "-1"], r"epoch must be an integer >= 0, got -1"),
    (["--n", "5", "--shard-size", "0"], r"shard_size must be an integer >= 1, got 0"),
    (["--n", str(10 ** 9 + 1)], r"n must be <= 1000000000 for the train split"),
    (["--n", "5", "--amb", "1"], r"amb=1 gives 1 state.*use amb >= 2"),
])
def test_generate_rejects_bad_arguments_before_creating_anything(tmp_path, capsys, extra, match):
    out = tmp_path / "data"
    _rejected(capsys, ["selectivbench", "generate", "--preset", "t1-small", "--out", str(out)] + extra, match)
    assert not out.exists()


def test_generate_into_a_file_is_a_clear_error(tmp_path, capsys):
    target = tmp_path / "a_file"
    target.write_text("not a folder")
    _rejected(capsys, ["selectivbench", "generate", "--preset", "t1-small", "--n", "2", "--out", str(target)],
              r"out_dir must be a folder, but .*a_file is a file")
    with pytest.raises(ValueError, match="out_dir must be a folder"):
        st.generate("t1-small", 2, target / "below", progress=False)
    assert target.read_text() == "not a folder"


@pytest.mark.parametrize("n", [-5, 0])
def test_storage_generate_rejects_n_below_1(tmp_path, n):
    with pytest.raises(ValueError, match=f"generate: n must be an integer >= 1, got {n}"):
        st.generate("t1-small", n, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kwargs, match", [({"seed": 0}, "seed must be an integer >= 1"),
                                           ({"seed": -1}, "seed must be an integer >= 1"),
                                           ({"epoch": -1}, "epoch must be an integer >= 0")])
def test_dataset_checks_seed_and_epoch_at_the_call(kwargs, match):
    with pytest.raises(ValueError, match=match):
        P.dataset("t1-small", "train", 3, **kwargs)          # no next(): the call itself raises


@pytest.mark.parametrize("extra, match", [
    (["--seed", "0"], r"seed must be an integer >= 1.*got 0"),
    (["--seed", "0", "--no-baselines"], r"seed must be an integer >= 1.*got 0"),
    (["--n-train", "0"], r"--n-train must be an integer >= 1, got 0"),
    (["--n-test", "-2"], r"--n-test must be an integer >= 1, got -2"),
    (["--amb", "1"], r"amb=1 gives 1 state.*use amb >= 2"),
    (["--amb", "0"], r"amb must be an integer >= 1, got 0"),
])
def test_describe_rejects_bad_arguments_before_printing(capsys, extra, match):
    _rejected(capsys, ["selectivbench", "describe", "--preset", "t1-small"] + extra, match)


def test_amb_errors_name_amb_not_parameters_the_user_never_set():
    with pytest.raises(ValueError) as err:
        P.get_preset("t1-small", amb=1)
    message = str(err.value)
    assert "amb=1" in message and "amb >= 2" in message
    assert not message.startswith("make_grammar")               # the old message blamed n_start
    P.get_preset("t1-small", amb=1, n_start=1)                  # what the message offers works
    with pytest.raises(ValueError, match=r"amb must be <= 52"):
        P.get_preset("t1-small", amb=53)


# ---- grammar density: refuse what cannot succeed, say so when a search is slow ----------------

def test_hopeless_tau_fails_before_searching(monkeypatch):
    from linrec_ref.tasks import grammar

    def no_search(*args, **kwargs):
        raise AssertionError("the grammar search ran")

    monkeypatch.setattr(grammar, "_draw_edges", no_search)
    with pytest.raises(ValueError, match=r"tau=1e-09 is too small.*raise tau \(the default is 0.4 / depth"):
        P.get_preset("t1-small", tau=1e-9)
    with pytest.raises(ValueError, match="too small"):
        grammar.make_grammar(12, 12, 12, seed=1, tau=1e-9)


def test_hopeless_bound_never_refuses_the_default_density():
    from linrec_ref.tasks import grammar
    for amb in range(2, grammar.MAX_LETTERS + 1):
        for scale in (1.0, 0.5):                                 # the default and half of it
            log10_all = grammar.log10_valid_chance(amb, amb, amb, scale * 0.4 / amb) + np.log10(100000)
            assert log10_all > np.log10(grammar.HOPELESS), (amb, scale)


def test_valid_chance_bound_holds_against_the_search():
    """The bound is an upper bound: compare it with the success rate of the real construction."""
    from linrec_ref.tasks import grammar
    n, amb, tau = 300, 3, 0.4 / 3 * 0.5
    found = 0
    for seed in range(n):
        try:
            grammar.make_grammar(amb, amb, amb, seed, tau=tau, max_tries=1)
            found += 1
        except ValueError:
            pass
    bound = 10 ** grammar.log10_valid_chance(amb, amb, amb, tau)
    assert found / n <= bound + 4 * np.sqrt(bound * (1 - bound) / n) + 1e-12


def test_slow_grammar_search_warns_with_what_to_change(monkeypatch):
    from linrec_ref.tasks import grammar
    monkeypatch.setattr(grammar, "SLOW_SEARCH_S", -1.0)         # "slow" from the first try on
    with pytest.warns(RuntimeWarning, match=r"no valid grammar in \d+ of max_tries=3 tries.*raise tau"):
        with pytest.raises(ValueError, match="max_tries = 3"):
            grammar.make_grammar(6, 6, 6, seed=1, tau=0.0333, max_tries=3)


# ---- linrec selectivbench plot -----------------------------------------------------------------

def _plot_argv(out, *extra):
    return ["selectivbench", "plot", "--preset", "t1-small", "--amb", "6", "--out", str(out)] + list(extra)


@pytest.mark.parametrize("extra, match", [
    (["--idx", "-1"], r"--idx must be an integer >= 0, got -1"),
    (["--idx", "100000000000"], r"--idx must be < 1000000000 for the train split, got 100000000000"),
    (["--seed", "0"], r"seed must be an integer >= 1"),
    (["--epoch", "-1"], r"--epoch must be an integer >= 0"),
])
def test_plot_checks_its_arguments(tmp_path, capsys, extra, match):
    pytest.importorskip("matplotlib")
    out = tmp_path / "sub" / "p.png"
    _rejected(capsys, _plot_argv(out, *extra), match)
    assert not (tmp_path / "sub").exists()


def test_plot_unknown_extension_lists_the_formats(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    _rejected(capsys, _plot_argv(tmp_path / "y.xyz"), r"unknown image format '\.xyz'.*\.png.*\.svg")
    assert os.listdir(tmp_path) == []


def test_plot_without_extension_writes_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "y"
    assert cli.main(_plot_argv(out)) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(tmp_path) == ["y"]                         # no temporary file left


def test_sample_index_is_the_item_of_sample_indices():
    c = P.get_preset("t1-small")
    for split in P.SPLITS:
        for compat in (False, True):
            indices = P.sample_indices(c, split, 7, compat, start=5)
            assert [P.sample_index(c, split, 5 + i, compat) for i in range(7)] == indices.tolist()
    with pytest.raises(ValueError, match="item must be < 1000000000"):
        P.sample_index(c, "train", 10 ** 9)
    with pytest.raises(ValueError, match="item must be an integer >= 0"):
        P.sample_index(c, "test", -1)


@pytest.mark.parametrize("split, epoch", [("train", 0), ("test", 2)])
def test_plot_draws_what_generate_writes(tmp_path, capsys, monkeypatch, split, epoch):
    """Item i of ``plot --idx i`` is item i of ``generate`` (same split, epoch); no index arrays."""
    pytest.importorskip("matplotlib")
    from linrec_ref.tasks import plot
    folder = st.generate(P.get_preset("t1-small", amb=6), 5, tmp_path, seed=3, split=split, epoch=epoch,
                         progress=False)
    written, _ = st.load(folder)
    drawn = []
    monkeypatch.setattr(plot, "plot_sample", lambda sample, grammar, ax: drawn.append(sample))
    monkeypatch.setattr(P, "sample_indices", None)               # one sample, never an index array
    for i in (0, 4):
        assert cli.main(_plot_argv(tmp_path / f"{i}.png", "--seed", "3", "--idx", str(i), "--split", split,
                                   "--epoch", str(epoch))) == 0
        assert _same(drawn[-1], written[i])


def test_plot_far_index_is_one_sample(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from linrec_ref.tasks import plot
    drawn = []
    monkeypatch.setattr(plot, "plot_sample", lambda sample, grammar, ax: drawn.append(sample))
    monkeypatch.setattr(P, "sample_indices", None)
    assert cli.main(_plot_argv(tmp_path / "far.png", "--idx", str(10 ** 9 - 1))) == 0
    config = P.get_preset("t1-small", amb=6)
    assert _same(drawn[0], P.make_sample(config, 1, 10 ** 9, "train"))   # item 10^9 - 1 is index 10^9


# ---- pipes closed early ------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [["ops", "-v"],
                                  ["selectivbench", "describe", "--preset", "t1-small", "--no-baselines"]])
def test_closed_pipe_ends_quietly(argv):
    """The reader is gone before the command writes (as `| head -1` after its line): no traceback."""
    child = subprocess.Popen([sys.executable, "-m", "linrec_ref.cli"] + argv, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    child.stdout.close()                                          # no reader: every write fails (EPIPE)
    err = child.stderr.read().decode()
    assert child.wait() == cli.EXIT_BROKEN_PIPE
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


# ---- temporary files of killed generate runs ---------------------------------------------------

_WRITE_FOREVER = """
import sys, time
from pathlib import Path
from linrec_ref.tasks import storage
def write(f):
    f.write(b"partial")
    f.flush()
    time.sleep(600)
storage._atomic_write(Path(sys.argv[1]), write)
"""


def test_generate_removes_the_temp_file_of_a_killed_run(tmp_path):
    folder = st.generate("t1-small", 3, tmp_path, seed=1, shard_size=2, progress=False)
    os.remove(folder / "dataset.json")
    os.remove(folder / "shard-00001.npz")
    writer = subprocess.Popen([sys.executable, "-c", _WRITE_FOREVER, str(folder / "shard-00001.npz")])
    try:
        deadline = time.monotonic() + 60
        while not list(folder.glob(".*.tmp")) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
    [temp] = folder.glob(".*.tmp")
    assert str(writer.pid) in temp.name
    st.generate("t1-small", 3, tmp_path, seed=1, shard_size=2, progress=False)
    assert not temp.exists() and not list(folder.glob(".*.tmp"))
    assert len(st.load(folder)[0]) == 3


def test_stale_temps_only_of_writers_that_are_gone(tmp_path):
    live = tmp_path / f".shard-00000.npz.pid{os.getpid()}@{st._host()}.abc123.tmp"
    other_host_fresh = tmp_path / ".shard-00001.npz.pid1@another-host.abc123.tmp"
    legacy_fresh = tmp_path / ".shard-00002.npz.abc123.tmp"
    legacy_old = tmp_path / ".shard-00003.npz.def456.tmp"
    for path in (live, other_host_fresh, legacy_fresh, legacy_old):
        path.write_bytes(b"partial")
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(legacy_old, (two_days_ago, two_days_ago))
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    dead = tmp_path / f".dataset.json.pid{int(finished.stdout)}@{st._host()}.xyz789.tmp"
    dead.write_bytes(b"partial")
    removed = st.remove_stale_temps(tmp_path)
    assert sorted(removed) == sorted([legacy_old] + ([dead] if os.name == "posix" else []))
    assert live.exists() and other_host_fresh.exists() and legacy_fresh.exists()


# ---- linrec ops / linrec check -----------------------------------------------------------------

def test_ops_fits_100_columns(capsys):
    assert cli.main(["ops"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 100
    from linrec_ref import registry
    for name in registry.available():
        assert any(line.startswith(name + " ") for line in lines)


def test_check_prints_a_summary_by_default_and_the_full_table_with_a_flag(capsys):
    assert cli.main(["check", "--op", "hgrn"]) == 0
    summary = capsys.readouterr().out.splitlines()
    assert cli.main(["check", "--op", "hgrn", "--full-table"]) == 0
    full = capsys.readouterr().out.splitlines()
    assert cli.main(["check", "--op", "hgrn", "--compact"]) == 0
    compact = capsys.readouterr().out.splitlines()
    for out in (summary, full):
        assert re.fullmatch(r"\d+ comparisons, 0 failed, [\d.]+s: all passed", out[-1])
    assert summary[0].split() == ["op", "dtype", "comparison", "cases", "max", "rel", "err", "status"]
    assert "rtol / atol*max|ref|" in full[0] and "worst case" in full[0]
    assert len(summary) < len(full)
    assert compact[:-1] == summary[:-1]                           # --compact: the default, kept working


def test_check_failure_keeps_the_verdict_last(monkeypatch, capsys):
    from linrec_ref.ops import hgrn
    real = hgrn.parallel

    def broken(*args, **kwargs):
        o, h = real(*args, **kwargs)
        return o * (1 + 1e-6), h

    monkeypatch.setattr(hgrn, "parallel", broken)
    assert cli.main(["check", "--op", "hgrn"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"\d+ comparisons, [1-9]\d* failed, [\d.]+s: FAILED", lines[-1])
    assert any(line.startswith("FAIL hgrn") for line in lines)
