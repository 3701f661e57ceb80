"""Experiment plans: every shipped plan parses; bad plans are rejected naming the key."""
from pathlib import Path

import pytest

from linrec_ref.tasks import plans

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def write(tmp_path, text, name="p.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*.toml")), ids=lambda p: p.stem)
def test_every_shipped_plan_parses_into_distinct_runs(path):
    plan = plans.load_plan(path)
    names = [r.name for r in plan.runs]
    assert plan.runs and len(set(names)) == len(names)
    assert plan.name == path.stem


def test_grid_is_the_union_of_cartesian_products_without_repeats(tmp_path):
    plan = plans.load_plan(write(tmp_path, """
[train]
steps = 7
[[grid]]
model = ["gdn", "mamba2"]
seed = [1, 2, 3]
[[grid]]
model = "gated_delta_net"
seed = 1
[[grid]]
model = "gated_delta_net"
decay_floor = 0.99
seed = [1, 2]
[[evaluate]]
preset = "t4-small"
gap = [4, 8]
"""))
    # 6 + 0 (the second block repeats a run of the first) + 2
    assert len(plan.runs) == 8
    assert {r.model.model for r in plan.runs} == {"gated_delta_net", "mamba2"}
    assert all(r.train.steps == 7 for r in plan.runs)
    floored = [r for r in plan.runs if r.model.decay_floor == 0.99]
    assert len(floored) == 2 and all(r.name.endswith("-decay_floor0.99") for r in floored)
    assert [(e.preset, e.gap) for e in plan.evaluations] == [("t4-small", 4), ("t4-small", 8)]


@pytest.mark.parametrize("text, message", [
    ('[[grid]]\nmodel = "gpt"\n', "unknown model 'gpt'"),
    ('[[grid]]\nmodel = "gdn"\npreset = "t9"\n', "unknown preset 't9'"),
    ('[[grid]]\nmodel = "gdn"\nwidth = 64\n', "unknown key(s) ['width']"),
    ('[[grid]]\nmodel = "gdn"\nd_model = 0\n', "d_model must be an integer >= 1"),
    ('[[grid]]\nmodel = "gdn"\nseed = []\n', "seed is an empty list"),
    ('[[grid]]\nseed = 1\n', "needs a model key"),
    ('[train]\nsteps = 0\n[[grid]]\nmodel = "gdn"\n', "steps must be an integer >= 1"),
    ('[train]\nlearning_rate = 1\n[[grid]]\nmodel = "gdn"\n', "[train] has unknown key(s) ['learning_rate']"),
    ('runs = 3\n[[grid]]\nmodel = "gdn"\n', "unknown top-level key(s) ['runs']"),
    ('name = "x"\n', "at least one [[grid]] block"),
    ('[[grid]]\nmodel = "gdn"\n[[evaluate]]\npreset = "t4-small"\ngap = -1\n', "gap must be an integer >= 0"),
    ('[[grid]]\nmodel = "gdn"\n[[evaluate]]\npreset = "t7"\n', "unknown preset 't7'"),
    ('[[grid]\nmodel = "gdn"\n', "not valid TOML"),
    ('[[grid]]\nmodel = "gdn"\nlr = [1e-3, 3e-3]\n', "would share the folder"),
])
def test_bad_plans_are_rejected_with_the_block_and_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ValueError) as e:
        plans.load_plan(path)
    assert message in str(e.value) and str(path) in str(e.value)


def test_a_missing_plan_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="is not a file"):
        plans.load_plan(tmp_path / "none.toml")
