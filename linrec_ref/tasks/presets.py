"""The SelectivBench tasks by name (selectivbench.md sections 6-7), every parameter overridable.

| preset | grammar (A = n_amb = Dp) | L | train insertion | test insertion | noise |
|---|---|---|---|---|---|
| 1a | amb = 40 (sweep 20, 24, 26, 30, 34, 38, 40) | 200 | 1 blank per token | same | 0 |
| 1b | amb = 40 | 200 | 1 blank per token | same | 0 |
| 2 | amb = 40 | 200 | 1..10 blanks per token, d ~ U(0.1, 1.0) | 10 blanks per token | U[0, 0.2) |
| 3 | amb = 40 | 200 | from token 50, p = 0.1, 1 distractor | same | 0 |
| 4 | amb = 40 | 200 | as task 2 (task-2 models) | 10 blanks per token (sweep 10, 20, 50, 100) | U[0, 0.2) |
| t1-small | amb = 12 (sweep 6, 8, 10, 12, 16) | 64 | 1 blank per token | same | 0 |
| t2-small | amb = 12 | 64 | 1..4 blanks, d ~ U(0.1, 0.4) | 4 blanks per token | U[0, 0.2) |
| t3-small | amb = 12 | 64 | from token 16, p = 0.1, 1 distractor | same | 0 |
| t4-small | amb = 12 | 64 | as t2-small | 4 blanks per token (sweep 4, 8, 20, 40) | U[0, 0.2) |

String lengths. selectivbench.md section 3 fixes L = L_max (200, or 64 for the CPU presets) and gives no L_min:
the presets use L_min = 1, i.e. no lower bound (every string has at least 2 states, a start state
and '#'). "1 blank / 1 distractor" is the fixed gap k = 1 (``gap_fixed=1``: no length draw).

Sample indices (sequences.py: sample idx uses default_rng(seed * idx)):
  * train: idx = 1..n. Index 0 is skipped: default_rng(0) would make it the same sample for every
    seed.
  * test: idx = test_offset + 1 .. test_offset + n (test_offset = 10^9), disjoint from training as
    long as n_train <= test_offset.
  * ``overlap_compat=True`` reproduces the released code: train and test both use idx = 0..n-1,
    so the test set repeats the first training samples.
Expansion (gaps, distractors, noise) is drawn from ``expand.expansion_rng(seed, idx, epoch)``.

Overrides (``get_preset(name, **overrides)``): any TaskConfig field (``n_letters=...``, ``L=...``;
an ``L`` override also sets ``L_max`` unless ``L_max`` is given, since L = L_max), ``amb=N`` (sets
n_letters = n_amb = depth = N), ``test_gap=K`` (the fixed test gap), and regime fields prefixed by
the split (``train_gap_prob=0.2``, ``test_mode="distractor"``, ...).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, Iterator, Optional, Tuple, Union

import numpy as np

from .expand import Sample, check_regime, expand, expansion_rng
from .grammar import MAX_LETTERS, Grammar, make_grammar, validate_grammar_params
from .sequences import sample_sequence

TEST_OFFSET = 10 ** 9
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Regime:
    """An insertion regime (expand.expand's arguments except the noise, which is per task)."""

    mode: str = "blank"              # "blank" | "distractor" | "none"
    gap_start: int = 0               # first element that may get a gap
    gap_prob: float = 1.0            # probability of a gap after an element
    gap_min: float = 0.1             # training: d ~ U(gap_min, gap_max), k = ceil(round(d, 1) / 0.1)
    gap_max: float = 0.1
    gap_fixed: Optional[int] = None  # fixed k (test regime; also "1 blank" in training)


@dataclass(frozen=True)
class TaskConfig:
    """A task: grammar, lengths, insertion regimes, noise, split indices."""

    name: str
    n_letters: int
    n_amb: int
    depth: int
    L: int
    L_min: int
    L_max: int
    train: Regime
    test: Regime
    noise: float = 0.0
    tau: Optional[float] = None
    n_start: int = 4
    max_tries: int = 100000
    test_offset: int = TEST_OFFSET
    test_gaps: Tuple[int, ...] = ()     # the test gaps a sweep evaluates (tasks 4, t4-small)
    amb_values: Tuple[int, ...] = ()    # the grammar sizes a sweep uses (tasks 1a, t1-small)

    @property
    def amb(self) -> Optional[int]:
        """A = n_amb = Dp when the grammar is of the paper's kind, else None."""
        return self.n_amb if self.n_letters == self.n_amb == self.depth else None

    def regime(self, split: str) -> Regime:
        _check_split(split)
        return self.train if split == "train" else self.test

    def grammar(self, seed: int) -> Grammar:
        """The task's grammar for ``seed`` (cached)."""
        return _cached_grammar(self.n_letters, self.n_amb, self.depth, int(seed), self.tau,
                               self.n_start, self.max_tries)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "TaskConfig":
        d = dict(d)
        d["train"], d["test"] = Regime(**d["train"]), Regime(**d["test"])
        d["test_gaps"], d["amb_values"] = tuple(d.get("test_gaps", ())), tuple(d.get("amb_values", ()))
        return validate_config(TaskConfig(**d))


@lru_cache(maxsize=16)
def _cached_grammar(n_letters, n_amb, depth, seed, tau, n_start, max_tries) -> Grammar:
    return make_grammar(n_letters, n_amb, depth, seed, tau=tau, n_start=n_start, max_tries=max_tries)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"selectivbench: split must be one of {SPLITS}, got {split!r}")


def check_int(where: str, name: str, value, low: int) -> None:
    """ValueError ``where: name must be an integer >= low, got value`` unless value is such an integer."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{where}: {name} must be an integer >= {low}, got {value!r}")


def check_seed(where: str, seed) -> None:
    """A run seed is an integer >= 1: sample idx draws from default_rng(seed * idx), so seed 0
    would give every sample the same generator."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 1:
        raise ValueError(f"{where}: seed must be an integer >= 1 (seed 0 gives default_rng(0) for every "
                         f"sample), got {seed!r}")


def validate_config(c: TaskConfig) -> TaskConfig:
    """Checks every field (ValueError naming it); returns the config."""
    validate_grammar_params(c.n_letters, c.n_amb, c.depth, c.tau, c.n_start, c.max_tries)
    for name in ("L", "L_min", "L_max", "test_offset"):
        v = getattr(c, name)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"TaskConfig {c.name}: {name} must be an integer >= 1, got {v!r}")
    if c.L_min > c.L_max:
        raise ValueError(f"TaskConfig {c.name}: L_min must be <= L_max, got L_min={c.L_min} > L_max={c.L_max}")
    for split in SPLITS:
        r = c.regime(split)
        try:
            check_regime(r.mode, r.gap_start, r.gap_prob, r.gap_min, r.gap_max, r.gap_fixed, c.noise)
        except ValueError as err:
            raise ValueError(f"TaskConfig {c.name}, {split} regime: {err}") from None
    return c


def _paper(name, amb=40, **kw) -> TaskConfig:
    base = dict(name=name, n_letters=amb, n_amb=amb, depth=amb, L=200, L_min=1, L_max=200,
                train=Regime(gap_fixed=1), test=Regime(gap_fixed=1))
    base.update(kw)
    return TaskConfig(**base)


def _small(name, amb=12, **kw) -> TaskConfig:
    return _paper(name, amb=amb, L=64, L_max=64, **kw)


_TASK2_TRAIN = Regime(gap_min=0.1, gap_max=1.0)
_T2_TRAIN = Regime(gap_min=0.1, gap_max=0.4)

PRESETS: Dict[str, TaskConfig] = {
    "1a": _paper("1a", amb_values=(20, 24, 26, 30, 34, 38, 40)),
    "1b": _paper("1b"),
    "2": _paper("2", train=_TASK2_TRAIN, test=Regime(gap_fixed=10), noise=0.2),
    "3": _paper("3", train=Regime(mode="distractor", gap_start=50, gap_prob=0.1, gap_fixed=1),
                test=Regime(mode="distractor", gap_start=50, gap_prob=0.1, gap_fixed=1)),
    "4": _paper("4", train=_TASK2_TRAIN, test=Regime(gap_fixed=10), noise=0.2, test_gaps=(10, 20, 50, 100)),
    "t1-small": _small("t1-small", amb_values=(6, 8, 10, 12, 16)),
    "t2-small": _small("t2-small", train=_T2_TRAIN, test=Regime(gap_fixed=4), noise=0.2),
    "t3-small": _small("t3-small", train=Regime(mode="distractor", gap_start=16, gap_prob=0.1, gap_fixed=1),
                       test=Regime(mode="distractor", gap_start=16, gap_prob=0.1, gap_fixed=1)),
    "t4-small": _small("t4-small", train=_T2_TRAIN, test=Regime(gap_fixed=4), noise=0.2,
                       test_gaps=(4, 8, 20, 40)),
}

_REGIME_FIELDS = tuple(f.name for f in dataclasses.fields(Regime))
_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(TaskConfig))


def get_preset(name: Union[str, TaskConfig], **overrides) -> TaskConfig:
    """The preset ``name`` (or a TaskConfig) with ``overrides`` applied and validated."""
    if isinstance(name, TaskConfig):
        config = name
    elif name in PRESETS:
        config = PRESETS[name]
    else:
        raise ValueError(f"get_preset: unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    fields, regimes = {}, {"train": {}, "test": {}}
    for key, value in overrides.items():
        if key == "amb":
            _check_amb(config, value, overrides.get("n_start", config.n_start))
            fields.update(n_letters=value, n_amb=value, depth=value)
        elif key == "test_gap":
            regimes["test"]["gap_fixed"] = value
        elif key.startswith(("train_", "test_")) and key.split("_", 1)[1] in _REGIME_FIELDS:
            split, attr = key.split("_", 1)
            regimes[split][attr] = value
        elif key in _CONFIG_FIELDS:
            fields[key] = value
        else:
            valid = sorted(set(_CONFIG_FIELDS) | {"amb", "test_gap"} |
                           {f"{s}_{f}" for s in SPLITS for f in _REGIME_FIELDS})
            raise ValueError(f"get_preset({config.name!r}): unknown parameter {key!r}; expected one of {valid}")
    if "L" in fields and "L_max" not in fields:
        fields["L_max"] = fields["L"]
    for split in SPLITS:
        if regimes[split]:
            fields[split] = dataclasses.replace(fields.get(split, getattr(config, split)), **regimes[split])
    return validate_config(dataclasses.replace(config, **fields))


def _check_amb(config: TaskConfig, amb, n_start) -> None:
    """``amb=N`` sets n_letters = n_amb = depth = N: N * N states besides '#', which must hold the
    n_start start states. Errors name ``amb``, the argument the caller set."""
    where = f"get_preset({config.name!r})"
    check_int(where, "amb", amb, 1)
    if amb > MAX_LETTERS:
        raise ValueError(f"{where}: amb must be <= {MAX_LETTERS} (letters A-Z, a-z), got {amb}")
    if isinstance(n_start, (int, np.integer)) and not isinstance(n_start, bool) and amb * amb < n_start:
        smallest = int(np.ceil(np.sqrt(n_start)))
        raise ValueError(f"{where}: amb={amb} gives {amb * amb} state(s) besides '#', fewer than the "
                         f"{n_start} start states; use amb >= {smallest} (or lower n_start to <= {amb * amb})")


def max_items(config: TaskConfig, split: str, overlap_compat: bool = False) -> int:
    """One past the last valid item of ``split``: training items stay below test_offset (so the
    splits stay disjoint); every index must fit an int64."""
    if overlap_compat:
        return np.iinfo(np.int64).max
    if split == "train":
        return config.test_offset
    return np.iinfo(np.int64).max - config.test_offset


def sample_indices(config: TaskConfig, split: str, n: int, overlap_compat: bool = False,
                   start: int = 0) -> np.ndarray:
    """The sample indices of items start..start+n-1 of ``split`` (see the module docstring)."""
    _check_split(split)
    check_int("sample_indices", "n", n, 0)
    check_int("sample_indices", "start", start, 0)
    if start + n > max_items(config, split, overlap_compat):
        if split == "train" and not overlap_compat:
            raise ValueError(f"sample_indices: training items must stay below test_offset = "
                             f"{config.test_offset} to keep the splits disjoint, got start + n = {start + n}")
        raise ValueError(f"sample_indices: start + n = {start + n} overflows the int64 sample indices")
    items = np.arange(start, start + n, dtype=np.int64)              # [n]
    if overlap_compat:
        return items                                   # released code: idx 0..n-1 in both splits
    if split == "train":
        return items + 1
    return items + config.test_offset + 1


def sample_index(config: TaskConfig, split: str, item: int, overlap_compat: bool = False) -> int:
    """The sample index of item ``item`` of ``split``: ``sample_indices(config, split, 1,
    overlap_compat, start=item)[0]`` without building any array, with the range checked first."""
    _check_split(split)
    check_int("sample_index", "item", item, 0)
    limit = max_items(config, split, overlap_compat)
    if item >= limit:
        raise ValueError(f"sample_index: item must be < {limit} for the {split} split"
                         + (" (training items stay below test_offset)" if split == "train" and not overlap_compat
                            else "") + f", got {item}")
    if overlap_compat:
        return int(item)
    return int(item) + 1 + (0 if split == "train" else config.test_offset)


def make_sample(config: TaskConfig, seed: int, idx: int, split: str = "train", epoch: int = 0,
                grammar: Optional[Grammar] = None) -> Sample:
    """Sample ``idx`` of ``split``, expanded with the split's regime in ``epoch``."""
    grammar = config.grammar(seed) if grammar is None else grammar
    letters, labels, _ = sample_sequence(grammar, seed, int(idx), config.L, config.L_min, config.L_max)
    r = config.regime(split)
    return expand(letters, labels, grammar, expansion_rng(seed, int(idx), epoch), mode=r.mode,
                  gap_start=r.gap_start, gap_prob=r.gap_prob, gap_min=r.gap_min, gap_max=r.gap_max,
                  gap_fixed=r.gap_fixed, noise=config.noise)


def dataset(preset: Union[str, TaskConfig], split: str = "train", n: int = 1000, seed: int = 1,
            epoch: int = 0, overlap_compat: bool = False, start: int = 0) -> Iterator[Sample]:
    """The ``n`` samples of ``split`` (items start..start+n-1), generated lazily as iterated.

    Arguments are checked (and the grammar built) at the call, not at the first sample.
    """
    config = get_preset(preset)
    check_seed("dataset", seed)
    check_int("dataset", "epoch", epoch, 0)
    indices = sample_indices(config, split, n, overlap_compat, start)
    grammar = config.grammar(seed)

    def samples() -> Iterator[Sample]:
        for idx in indices:
            yield make_sample(config, seed, int(idx), split, epoch, grammar)

    return samples()
