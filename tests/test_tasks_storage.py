"""SelectivBench datasets on disk: round trip, names, atomic files, resumable generation, CLI."""
import json
import os

import numpy as np
import pytest

from linrec_ref.tasks import presets as P
from linrec_ref.tasks import storage as st


def _same(a, b):
    return all(np.array_equal(getattr(a, f), getattr(b, f))
               for f in ("x", "y", "element", "is_token", "after_distractor", "step_class"))


@pytest.mark.parametrize("name", ["t1-small", "t2-small", "t3-small"])
def test_round_trip(tmp_path, name):
    c = P.get_preset(name)
    samples = list(P.dataset(c, "train", 6, seed=3))
    path = st.save(tmp_path, samples, c, "train", seed=3)
    back, c2 = st.load(path)
    assert c2 == c and len(back) == 6 and all(_same(a, b) for a, b in zip(samples, back))
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["seed"] == 3 and meta["config"]["name"] == name
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    with np.load(path) as z:                    # x stored only when it is not a plain one-hot
        assert ("x" in z.files) == (c.noise > 0)


def test_dataset_name_is_stable_and_parameter_sensitive():
    c = P.get_preset("t1-small")
    n1 = st.dataset_name(c, "train", 100, 1, 0)
    assert n1 == st.dataset_name(P.get_preset("t1-small"), "train", 100, 1, 0)
    assert n1.startswith("t1-small_amb12_train_n100_s1_e0_")
    others = {st.dataset_name(c, "test", 100, 1, 0), st.dataset_name(c, "train", 101, 1, 0),
              st.dataset_name(c, "train", 100, 2, 0), st.dataset_name(c, "train", 100, 1, 1),
              st.dataset_name(P.get_preset("t1-small", noise=0.1), "train", 100, 1, 0),
              st.dataset_name(c, "train", 100, 1, 0, overlap_compat=True)}
    assert n1 not in others and len(others) == 6


def test_generate_resumes_after_interruption(tmp_path):
    folder = st.generate("t3-small", 25, tmp_path, seed=2, shard_size=10, progress=False)
    full, _ = st.load(folder)
    assert len(full) == 25
    # simulate an interrupted run: the manifest and the last shard missing, a stray temp file
    os.remove(folder / "dataset.json")
    os.remove(folder / "shard-00002.npz")
    (folder / ".shard-00002.npz.abc.tmp").write_bytes(b"partial")
    with pytest.raises(ValueError, match="dataset.json"):
        st.load(folder)
    kept = (folder / "shard-00000.npz").stat().st_mtime_ns
    st.generate("t3-small", 25, tmp_path, seed=2, shard_size=10, progress=False)
    assert (folder / "shard-00000.npz").stat().st_mtime_ns == kept      # finished shards kept
    again, _ = st.load(folder)
    assert all(_same(a, b) for a, b in zip(full, again))
    direct = list(P.dataset("t3-small", "train", 25, seed=2))
    assert all(_same(a, b) for a, b in zip(direct, again))


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    def boom(f):
        f.write(b"half")
        raise RuntimeError("interrupted")
    with pytest.raises(RuntimeError):
        st._atomic_write(tmp_path / "x.npz", boom)
    assert os.listdir(tmp_path) == []


def test_cli_generate_and_describe(tmp_path, capsys):
    from linrec_ref import cli
    assert cli.main(["selectivbench", "generate", "--preset", "t1-small", "--amb", "6", "--n", "4",
                     "--out", str(tmp_path), "--split", "test"]) == 0
    folder = capsys.readouterr().out.strip().splitlines()[-1]
    samples, c = st.load(folder)
    assert len(samples) == 4 and c.amb == 6
    assert cli.main(["selectivbench", "describe", "--preset", "t1-small", "--amb", "6", "--no-baselines"]) == 0
    out = capsys.readouterr().out
    assert "states:            37" in out and "classes:           37" in out
    assert cli.main(["selectivbench", "describe", "--preset", "t1-small", "--amb", "60"]) == 2
