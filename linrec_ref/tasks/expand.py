"""Time expansion of a sample (selectivbench.md section 4): blank gaps, distractor letters, noise, labels.

A sample of n elements (letters c_n with hidden labels s_n) becomes T' = sum_n (1 + k_n) steps:
element n emits its token step (one-hot of c_n), then k_n inserted steps:

    k_n = 0                                   if n < gap_start or the coin fails (P = 1 - gap_prob)
    k_n = ceil(round(d_n, 1) / 0.1),  d_n ~ U(gap_min, gap_max)      training regime (gap_fixed=None)
    k_n = gap_fixed                                                  test regime
    blank mode:       the k_n steps are all-zero (distinct from '#', which is class 0's one-hot)
    distractor mode:  one-hot letters drawn uniformly from the classes that cannot legally follow
                      s_n's state (grammar.legal_next; after '#', the start letters are legal);
                      k_n = 0 when every class is legal
    noise a > 0:      x += e, e ~ U[0, a) on every entry of every step (one-sided; float32, so a
                      one-hot entry 1 + e is rounded to float32 once)
    labels:           every step of element n (token and inserted) carries s_n

The definition leaves the random calls of the expansion open; this module fixes them. With ``rng`` the
sample's Generator (``expansion_rng(seed, idx, epoch)``: a SeedSequence of (tag, seed, idx,
epoch), so every (seed, index, epoch) gets its own stream and the global RNG is never touched),
the calls are, in this order and only when needed:

    1. coins:       u = rng.random(n - gap_start)           element n gets a gap iff u[n - gap_start] < gap_prob
                    (skipped in mode "none" or when gap_start >= n)
    2. gap lengths: d = rng.uniform(gap_min, gap_max, n_gaps)  one per element with a gap, in element order
                    (skipped when gap_fixed is given)
    3. distractors: j = rng.integers(0, n_illegal[state of each distractor step])  one per step, in
                    time order; the letter is the j-th illegal class of the state (class order)
    4. noise:       e = rng.random((T', C), dtype=float32) * float32(a), capped just below a

Fields of the result (a :class:`Sample`):

| field | shape | meaning |
|---|---|---|
| x | [T', C] float32 | the inputs (C = A + 1 input classes) |
| y | [T'] int64 | hidden-state id of the element each step belongs to |
| element | [T'] int64 | index n of that element (the pooling mask of selectivbench.md section 5) |
| is_token | [T'] bool | the step is a token step |
| after_distractor | [T'] bool | the first non-distractor step after a run of distractor steps (always the next element's token step) |
| step_class | [T'] int64 | input class of the step's one-hot, -1 for a blank step |
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .grammar import Grammar

MODES = ("blank", "distractor", "none")
EXPAND_TAG = 0x5E1EC7  # first word of the expansion SeedSequence, keeps it apart from default_rng(seed * idx)


@dataclass(frozen=True, eq=False)
class Sample:
    """One time-expanded sample; shapes in the module docstring."""

    x: np.ndarray
    y: np.ndarray
    element: np.ndarray
    is_token: np.ndarray
    after_distractor: np.ndarray
    step_class: np.ndarray

    @property
    def n_steps(self) -> int:
        """T': the number of time steps."""
        return int(self.y.shape[0])

    @property
    def n_elements(self) -> int:
        """n: the number of elements (token steps)."""
        return int(self.is_token.sum())

    @property
    def is_distractor(self) -> np.ndarray:
        """[T'] bool: inserted steps that carry a letter."""
        return ~self.is_token & (self.step_class >= 0)

    @property
    def letters(self) -> np.ndarray:
        """[n] int: the letter class of every element."""
        return self.step_class[self.is_token]

    @property
    def labels(self) -> np.ndarray:
        """[n] int: the hidden-state id of every element."""
        return self.y[self.is_token]


def expansion_rng(seed: int, idx: int, epoch: int = 0) -> np.random.Generator:
    """The Generator that expands sample ``idx`` of run ``seed`` in ``epoch``."""
    for name, value in (("seed", seed), ("idx", idx), ("epoch", epoch)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"expansion_rng: {name} must be an integer >= 0, got {value!r}")
    return np.random.default_rng(np.random.SeedSequence([EXPAND_TAG, int(seed), int(idx), int(epoch)]))


_ILLEGAL_CACHE: "weakref.WeakKeyDictionary[Grammar, tuple]" = weakref.WeakKeyDictionary()


def illegal_table(grammar: Grammar):
    """(n_illegal [n_states], table [n_states, C]): per state, the illegal classes in class order, padded."""
    cached = _ILLEGAL_CACHE.get(grammar)
    if cached is None:
        illegal = ~grammar.legal_next                                        # [n_states, C]
        n_illegal = illegal.sum(axis=1)                                      # [n_states]
        order = np.argsort(~illegal, axis=1, kind="stable")                  # illegal classes first
        cached = (n_illegal, order)
        _ILLEGAL_CACHE[grammar] = cached
    return cached


def _number(name, value, low=0.0, high=None, integer=False):
    ok = not isinstance(value, bool) and isinstance(value, (int, np.integer) if integer else (int, float, np.integer, np.floating))
    if not ok or not np.isfinite(value) or value < low or (high is not None and value > high):
        kind = "an integer" if integer else "a number"
        rng_txt = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"expand: {name} must be {kind} {rng_txt}, got {value!r}")


def check_regime(mode, gap_start, gap_prob, gap_min, gap_max, gap_fixed, noise) -> None:
    """ValueError naming the parameter for a bad insertion regime (e.g. a negative gap or noise)."""
    if mode not in MODES:
        raise ValueError(f"expand: mode must be one of {MODES}, got {mode!r}")
    _number("gap_start", gap_start, integer=True)
    _number("gap_prob", gap_prob, 0.0, 1.0)
    _number("gap_min", gap_min)
    _number("gap_max", gap_max)
    if gap_max < gap_min:
        raise ValueError(f"expand: gap_max must be >= gap_min = {gap_min}, got {gap_max}")
    if gap_fixed is not None:
        _number("gap_fixed", gap_fixed, integer=True)
    _number("noise", noise)


def _gap_lengths(n, rng, mode, gap_start, gap_prob, gap_min, gap_max, gap_fixed) -> np.ndarray:
    """k [n]: inserted steps after every element (calls 1 and 2)."""
    k = np.zeros(n, dtype=np.int64)
    if mode == "none" or gap_start >= n:
        return k
    coins = rng.random(n - gap_start)                                        # [n - gap_start]
    hit = np.flatnonzero(coins < gap_prob) + gap_start                       # elements with a gap
    if gap_fixed is None:
        d = np.round(rng.uniform(gap_min, gap_max, size=hit.size), 1)       # [n_gaps]
        k[hit] = np.ceil(d / 0.1).astype(np.int64)
    else:
        k[hit] = int(gap_fixed)
    return k


def _noise(rng, shape, amplitude) -> np.ndarray:
    """U[0, a) in float32 (call 4); capped at the largest float32 below a."""
    cap = np.float32(amplitude)
    while float(cap) >= amplitude:
        cap = np.nextafter(cap, np.float32(0))
    return np.minimum(rng.random(shape, dtype=np.float32) * np.float32(amplitude), cap)


def expand(letter_classes, labels, grammar: Grammar, rng: np.random.Generator, mode: str = "blank",
           gap_start: int = 0, gap_prob: float = 1.0, gap_min: float = 0.1, gap_max: float = 0.1,
           gap_fixed: Optional[int] = None, noise: float = 0.0) -> Sample:
    """Expands one sample (letter_classes [n], labels [n]) in time; see the module docstring."""
    check_regime(mode, gap_start, gap_prob, gap_min, gap_max, gap_fixed, noise)
    letter_classes = np.asarray(letter_classes, dtype=np.int64)              # [n]
    labels = np.asarray(labels, dtype=np.int64)                              # [n]
    if letter_classes.ndim != 1 or labels.shape != letter_classes.shape:
        raise ValueError(f"expand: letter_classes and labels must be 1-D of equal length, got shapes "
                         f"{letter_classes.shape} and {labels.shape}")
    n, C = letter_classes.shape[0], grammar.n_input_classes
    k = _gap_lengths(n, rng, mode, gap_start, gap_prob, gap_min, gap_max, gap_fixed)  # [n]
    if mode == "distractor":
        n_illegal, order = illegal_table(grammar)
        states = grammar.label_state[labels]                                 # [n]
        k[n_illegal[states] == 0] = 0
    lengths = 1 + k                                                          # [n]
    T = int(lengths.sum())
    element = np.repeat(np.arange(n, dtype=np.int64), lengths)               # [T']
    token_pos = np.cumsum(lengths) - lengths                                 # [n]
    is_token = np.zeros(T, dtype=bool)                                       # [T']
    is_token[token_pos] = True
    step_class = np.full(T, -1, dtype=np.int64)                              # [T']
    step_class[token_pos] = letter_classes
    after_distractor = np.zeros(T, dtype=bool)                               # [T']
    if mode == "distractor" and T > n:
        gap_steps = np.flatnonzero(~is_token)                                # [T' - n]
        st = states[element[gap_steps]]                                      # [T' - n]
        j = rng.integers(0, n_illegal[st])                                   # call 3
        step_class[gap_steps] = order[st, j]
        is_distractor = ~is_token
        after_distractor[1:] = is_distractor[:-1] & ~is_distractor[1:]
    x = np.zeros((T, C), dtype=np.float32)                                   # [T', C]
    lit = np.flatnonzero(step_class >= 0)
    x[lit, step_class[lit]] = 1.0
    if noise > 0:
        x += _noise(rng, (T, C), noise)
    return Sample(x=x, y=labels[element], element=element, is_token=is_token,
                  after_distractor=after_distractor, step_class=step_class)
