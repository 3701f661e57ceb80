"""Experiment plans: a grid of SelectivBench training runs, written as data (TOML).

A plan is the union of its grid blocks; each block is the cartesian product of its keys:

    name = "forgetting"
    description = "delta_net against gated_delta_net, alpha fixed to 1, a decay floor"
    [train]                        # TrainConfig fields shared by every run of the plan
    steps = 2000
    lr = 1e-3
    [[grid]]
    model = ["delta_net", "gated_delta_net"]
    preset = "t1-small"            # a scalar is a list of one
    seed = [1, 2, 3]
    [[grid]]
    model = "gated_delta_net"
    gate = false                   # any ModelConfig or TrainConfig field
    seed = [1, 2, 3]
    [[evaluate]]                   # extra evaluations of every finished run (optional)
    preset = "t4-small"
    gap = [4, 8, 20, 40]

Every key is checked when the plan is read: an unknown key, model, preset or option value is a
ValueError naming the plan file, the block and the key, before any run starts. Runs are named
from their configuration (``run_name``) plus every ModelConfig option that differs from its
default, so two runs of a plan never share a folder; a run listed twice is kept once.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple, Union

from . import presets
from .model import ModelConfig, validate_model_config
from .train import TrainConfig, run_name, validate_train_config

MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))
TRAIN_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))
# fields that already appear in run_name, or that every run of a plan shares
_NAMED = {"model", "d_model", "n_layers"}


@dataclass(frozen=True)
class Run:
    """One training run of a plan: its folder name and its two configurations."""

    name: str
    model: ModelConfig
    train: TrainConfig


@dataclass(frozen=True)
class Evaluation:
    """An extra evaluation of each finished run on another task of its grammar."""

    preset: str
    gap: int


@dataclass(frozen=True)
class Plan:
    name: str
    description: str
    runs: Tuple[Run, ...]
    evaluations: Tuple[Evaluation, ...]
    source: str


def _load_toml(path: Path) -> dict:
    try:
        import tomllib                                   # Python >= 3.11
    except ImportError:
        try:
            import tomli as tomllib
        except ImportError:
            raise ImportError("reading a plan needs Python >= 3.11 or the tomli package: "
                              "pip install tomli") from None
    with open(path, "rb") as f:
        try:
            return tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"plan {path}: not valid TOML: {e}") from None


def _as_list(where: str, key: str, value) -> list:
    values = value if isinstance(value, list) else [value]
    if not values:
        raise ValueError(f"{where}: {key} is an empty list")
    for v in values:
        if isinstance(v, (dict, list)):
            raise ValueError(f"{where}: {key} must be a value or a list of values, got {value!r}")
    return values


def option_suffix(model: ModelConfig) -> str:
    """'-decay_floor0.99-gateFalse' for the ModelConfig options that differ from the default."""
    default = ModelConfig()
    parts = [f"{f}{getattr(model, f)}" for f in MODEL_FIELDS
             if f not in _NAMED and getattr(model, f) != getattr(default, f)]
    return "".join("-" + p for p in parts)


def _block_runs(where: str, block: dict, shared: dict) -> List[Run]:
    unknown = sorted(set(block) - set(MODEL_FIELDS) - set(TRAIN_FIELDS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; expected ModelConfig fields "
                         f"{list(MODEL_FIELDS)} or TrainConfig fields {list(TRAIN_FIELDS)}")
    if "model" not in block:
        raise ValueError(f"{where}: every grid block needs a model key")
    keys = list(block)
    runs = []
    for values in itertools.product(*(_as_list(where, k, block[k]) for k in keys)):
        cell = dict(zip(keys, values))
        m = {k: v for k, v in cell.items() if k in MODEL_FIELDS}
        t = dict(shared, **{k: v for k, v in cell.items() if k in TRAIN_FIELDS})
        try:
            mc = validate_model_config(ModelConfig(**m))
            tc = validate_train_config(TrainConfig(**t))
        except (ValueError, TypeError) as e:
            raise ValueError(f"{where}: {e}") from None
        runs.append(Run(run_name(mc, tc) + option_suffix(mc), mc, tc))
    return runs


def load_plan(path: Union[str, Path]) -> Plan:
    """Read and check a plan file (see the module docstring for the format)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"plan: {path} is not a file")
    data = _load_toml(path)
    top = {"name", "description", "train", "grid", "evaluate"}
    unknown = sorted(set(data) - top)
    if unknown:
        raise ValueError(f"plan {path}: unknown top-level key(s) {unknown}; expected {sorted(top)}")
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"plan {path}: name must be a non-empty string without '/', got {name!r}")
    shared = data.get("train", {})
    if not isinstance(shared, dict):
        raise ValueError(f"plan {path}: [train] must be a table")
    bad = sorted(set(shared) - set(TRAIN_FIELDS))
    if bad:
        raise ValueError(f"plan {path}: [train] has unknown key(s) {bad}; expected {list(TRAIN_FIELDS)}")
    grid = data.get("grid")
    if not isinstance(grid, list) or not grid or not all(isinstance(b, dict) for b in grid):
        raise ValueError(f"plan {path}: expected at least one [[grid]] block")
    runs: Dict[str, Run] = {}
    for i, block in enumerate(grid):
        for run in _block_runs(f"plan {path}, grid block {i + 1}", block, shared):
            seen = runs.setdefault(run.name, run)
            if seen != run:                  # same folder name, another configuration
                raise ValueError(f"plan {path}, grid block {i + 1}: two runs would share the folder "
                                 f"{run.name!r} with different configurations; vary only model "
                                 "options, preset, amb, seed, d_model or n_layers inside a plan")
    evaluations = []
    for i, block in enumerate(data.get("evaluate", [])):
        where = f"plan {path}, evaluate block {i + 1}"
        if not isinstance(block, dict) or set(block) - {"preset", "gap"} or "preset" not in block:
            raise ValueError(f"{where}: expected the keys preset and (optional) gap, got {block!r}")
        for preset in _as_list(where, "preset", block["preset"]):
            for gap in _as_list(where, "gap", block.get("gap", 1)):
                if isinstance(gap, bool) or not isinstance(gap, int) or gap < 0:
                    raise ValueError(f"{where}: gap must be an integer >= 0, got {gap!r}")
                try:
                    presets.get_preset(preset)
                except ValueError as e:
                    raise ValueError(f"{where}: {e}") from None
                evaluations.append(Evaluation(preset, gap))
    return Plan(name=name, description=str(data.get("description", "")), runs=tuple(runs.values()),
                evaluations=tuple(evaluations), source=str(path))
