"""Strings and samples of a grammar (selectivbench.md section 3), identical to the released generator.

For sample ``idx`` of a run with ``seed``: R = numpy.random.default_rng(seed * idx), then

    string:   s = starts[R.integers(n_start)]; while s != "#":
                  one successor  -> move without drawing
                  several        -> u = R.random(); s = succ[s][bisect_right(cumsum(probs), u)]
                  if the string is now longer than L_max: abort (empty string, no further draws)
              the string includes its final "#"
    accepted: redraw whole strings until L_min <= len <= L_max (at most max_tries = 10^4 strings)
    sample:   concatenate accepted strings until the length reaches L, truncate to exactly L

Index 0 gives R = default_rng(0) for every seed (the same sample in every run): presets.py starts
training indices at 1. Seed 0 makes every index give default_rng(0): ``sample_sequence`` refuses it.

Sampling walks precomputed per-state successor lists (grammar.py), one R.random() per step from
a state with several successors. ``bisect_right`` can return len(succ) only if the last cumulative
probability rounds below u < 1 (a ~1e-16 event where the released code would fail with an
IndexError); the index is clamped to the last successor.
"""
from __future__ import annotations

import weakref
from bisect import bisect_right
from typing import List, Tuple

import numpy as np

from .grammar import Grammar

MAX_STRING_TRIES = 10 ** 4


def _check_lengths(L_min: int, L_max: int) -> None:
    for name, value in (("L_min", L_min), ("L_max", L_max)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"sequences: {name} must be an integer >= 1, got {value!r}")
    if L_min > L_max:
        raise ValueError(f"sequences: L_min must be <= L_max, got L_min={L_min} > L_max={L_max}")


def _walk_tables(grammar: Grammar):
    """Per state: (successor list, cumulative probabilities or None when there is one successor).

    The last cumulative probability is replaced by +inf: bisect_right then never returns
    len(succ) for u < 1 (the clamp described in the module docstring), with no per-step check.
    """
    tables = _TABLES.get(grammar)
    if tables is None:
        cums = []
        for targets, cum in zip(grammar._succ_lists, grammar._cum_lists):
            cums.append(None if len(targets) <= 1 else cum[:-1] + [float("inf")])
        tables = (grammar._succ_lists, cums)
        _TABLES[grammar] = tables
    return tables


_TABLES: "weakref.WeakKeyDictionary[Grammar, tuple]" = weakref.WeakKeyDictionary()


def walk_string(grammar: Grammar, rng: np.random.Generator, L_max: int) -> List[int]:
    """One walk from a random start state to '#': the list of state indices, [] if aborted.

    Same draws as the scalar loop of the module docstring. For numpy's PCG64 (default_rng), the
    walk's doubles are drawn as one block ``rng.random(L_max)`` (a walk uses at most L_max: it
    aborts after L_max moves), then the generator is reset to just after the ``m`` values used
    (``advance(m)``, keeping the buffered 32-bit half that ``integers`` may have left): one
    block draw instead of m scalar calls. Other bit generators take the scalar path.
    """
    succ, cums = _walk_tables(grammar)
    end, starts = grammar.end_state, grammar.start_states
    s = int(starts[rng.integers(len(starts))])
    bg = rng.bit_generator
    block = type(bg) is np.random.PCG64
    if block:
        saved = bg.state
        u = rng.random(L_max).tolist()
    used = 0
    string = [s]
    moves_left = L_max - 1
    while s != end:
        cum = cums[s]
        if cum is None:
            s = succ[s][0]
        else:
            s = succ[s][bisect_right(cum, u[used] if block else rng.random())]
            used += 1
        string.append(s)
        if moves_left == 0:          # the string is now longer than L_max
            string = []
            break
        moves_left -= 1
    if block:
        bg.state = saved
        if used:
            bg.advance(used)
            state = bg.state
            state["has_uint32"], state["uinteger"] = saved["has_uint32"], saved["uinteger"]
            bg.state = state
    return string


def sample_string(grammar: Grammar, rng: np.random.Generator, L_min: int, L_max: int,
                  max_tries: int = MAX_STRING_TRIES) -> List[int]:
    """An accepted string (state indices, final '#' included): L_min <= len <= L_max."""
    _check_lengths(L_min, L_max)
    for _ in range(max_tries):
        string = walk_string(grammar, rng, L_max)
        if L_min <= len(string) <= L_max:
            return string
    raise ValueError(
        f"sample_string: no string with L_min={L_min} <= length <= L_max={L_max} in "
        f"{max_tries} tries; widen [L_min, L_max]")


def sample_states(grammar: Grammar, seed: int, idx: int, L: int, L_min: int, L_max: int) -> np.ndarray:
    """State indices [L] of sample ``idx``: accepted strings from default_rng(seed * idx), concatenated, truncated."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 1:
        raise ValueError(f"sample_sequence: seed must be an integer >= 1 (seed 0 gives default_rng(0) "
                         f"for every index), got {seed!r}")
    if isinstance(idx, bool) or not isinstance(idx, (int, np.integer)) or idx < 0:
        raise ValueError(f"sample_sequence: idx must be an integer >= 0, got {idx!r}")
    if isinstance(L, bool) or not isinstance(L, (int, np.integer)) or L < 1:
        raise ValueError(f"sample_sequence: L must be an integer >= 1, got {L!r}")
    _check_lengths(L_min, L_max)
    rng = np.random.default_rng(int(seed) * int(idx))
    states: List[int] = []
    while len(states) < L:
        states.extend(sample_string(grammar, rng, L_min, L_max))
    return np.array(states[:L], dtype=np.int64)


def sample_sequence(grammar: Grammar, seed: int, idx: int, L: int, L_min: int,
                    L_max: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample ``idx``: (letter_classes [L], hidden_labels [L], state_indices [L]), all int64."""
    states = sample_states(grammar, seed, idx, L, L_min, L_max)   # [L]
    return grammar.state_letter[states], grammar.state_label[states], states
