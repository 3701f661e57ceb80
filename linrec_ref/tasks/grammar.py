"""The SelectivBench grammar: a seeded random automaton with ambiguous letters (selectivbench.md section 2).

A grammar over A letters ("A".."Z", "a".."z", in that order) plus the end marker ``#``. ``n_amb``
of the letters are *ambiguous*: each has ``depth`` (Dp) hidden copies "X0".."X{Dp-1}", distinct
states that emit the same letter. The model sees letters and must name the hidden state.

Construction (exactly the released generator's random-number call order, selectivbench.md section 2):

    G = numpy.random.default_rng(seed)
    py = random.Random(int(G.integers(0, 100)))            # a private Python RNG, never the global one
    letters = "ABC...Zabc...z"[:A]
    repeat (at most max_tries times):
        ambiguous = py.sample(letters, n_amb)               # drawn anew every try
        states    = letters, each ambiguous letter (sampled order) removed and its copies appended, + "#"
        for i in states, for a in letters + ["#"]:          # two G calls per (i, a), in this order
            cand = [states whose letter is a];  pick = cand[G.permutation(len(cand))[0]]
            if G.random() < len(cand) * tau:  add edge i -> pick
        drop the out-edges of "#";  successors of a state are equally likely
        starts = G.choice(states, n_start, replace=False)
        valid iff every state reaches "#" and "#" is not a start state

Transitions are listed by source, then target, in state order; that order fixes the cumulative
probabilities used when sampling (sequences.py). A state has at most one successor per letter, so
(state, next letter) determines the next state: ``Grammar.next_state[s, c]``.

Class ids. Input (letter) class: ``#`` = 0, "A".."Z" = 1..26, "a".."z" = 27..52. Hidden-state
id (the label): letters in class order, an ambiguous letter's copies 0..Dp-1 take consecutive
ids, ``#`` = 0; S = n_amb * Dp + (A - n_amb) + 1 classes (1601 at A = n_amb = Dp = 40).

Successors of ``#``. The grammar gives ``#`` none (a string ends there); in a concatenated
sequence the next string's start state follows it. ``legal_next[end_state]`` therefore marks the
start states' letters (used by the distractor rule of expand.py); ``next_state[end_state]`` and
``succ[end_state]`` stay empty.
"""
from __future__ import annotations

import random
import time
import warnings
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np

ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
END = "#"
MAX_LETTERS = len(ALPHABET)  # 52
DEFAULT_DENSITY = 0.4        # tau = DEFAULT_DENSITY / depth


def letter_class(symbol: str) -> int:
    """Input class id of a letter: '#' -> 0, 'A'..'Z' -> 1..26, 'a'..'z' -> 27..52."""
    if symbol == END:
        return 0
    return ALPHABET.index(symbol) + 1


@dataclass(frozen=True, eq=False)
class Grammar:
    """A constructed grammar; all arrays are read-only views of the construction.

    n_states = len(states); the last state is "#" (``end_state``).

    | field | shape / type | meaning |
    |---|---|---|
    | letters | list[str], A + 1 | the alphabet in class order, "#" last |
    | ambiguous | list[str], n_amb | the ambiguous letters, in the sampled order |
    | states | list[str], n_states | state names ("A", "B0", ..., "#"), order of selectivbench.md section 2 |
    | state_letter | int [n_states] | input class id of each state's letter |
    | state_label | int [n_states] | hidden-state class id (the training label) |
    | label_state | int [S] | inverse of state_label (label -> state index) |
    | start_states | int [n_start] | start state indices, in the order G.choice returned them |
    | transitions | int [n_edges, 2] | (source, target), by source then target in state order |
    | succ, succ_prob, succ_cum | tuple of n_states arrays | successors in transition order, their probabilities 1/n and np.cumsum of those |
    | next_state | int [n_states, A + 1] | successor for a next letter class, -1 if none |
    | legal_next | bool [n_states, A + 1] | letter classes that may follow the state ("#": the start letters) |
    """

    n_letters: int
    n_amb: int
    depth: int
    tau: float
    seed: int
    n_start: int
    n_tries: int
    letters: List[str]
    ambiguous: List[str]
    states: List[str]
    state_letter: np.ndarray
    state_label: np.ndarray
    label_state: np.ndarray
    start_states: np.ndarray
    transitions: np.ndarray
    succ: Tuple[np.ndarray, ...]
    succ_prob: Tuple[np.ndarray, ...]
    succ_cum: Tuple[np.ndarray, ...]
    next_state: np.ndarray
    legal_next: np.ndarray
    # plain-Python copies of succ / succ_cum for the per-step sampling loop (sequences.py)
    _succ_lists: Tuple[List[int], ...] = field(repr=False, default=())
    _cum_lists: Tuple[List[float], ...] = field(repr=False, default=())

    @property
    def n_states(self) -> int:
        return len(self.states)

    @property
    def end_state(self) -> int:
        """Index of the end marker "#" (the last state)."""
        return len(self.states) - 1

    @property
    def n_classes(self) -> int:
        """S: the number of hidden-state classes (labels 0..S-1)."""
        return int(self.state_label.max()) + 1

    @property
    def n_input_classes(self) -> int:
        """A + 1: the number of input letter classes (one-hot width)."""
        return self.n_letters + 1

    @property
    def n_edges(self) -> int:
        return int(self.transitions.shape[0])

    def successor(self, state: int, letter_class: int) -> int:
        """The state reached from ``state`` by reading ``letter_class``; -1 if that is illegal."""
        return int(self.next_state[state, letter_class])

    def describe(self) -> dict:
        """Counts for a reader: letters, ambiguous letters, states, classes, edges, starts."""
        return {
            "letters": self.n_letters, "ambiguous": self.n_amb, "depth": self.depth,
            "tau": self.tau, "states": self.n_states, "classes": self.n_classes,
            "input_classes": self.n_input_classes, "edges": self.n_edges,
            "start_states": [self.states[s] for s in self.start_states],
            "mean_out_degree": self.n_edges / max(self.n_states - 1, 1), "tries": self.n_tries,
        }


def validate_grammar_params(n_letters, n_amb, depth, tau, n_start, max_tries) -> None:
    """ValueError naming the parameter, the expected range and the value given."""
    def _int(name, value, low):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"make_grammar: {name} must be an integer >= {low}, got {value!r}")
    _int("n_letters", n_letters, 1)
    if n_letters > MAX_LETTERS:
        raise ValueError(f"make_grammar: n_letters must be <= {MAX_LETTERS} (letters A-Z, a-z), got {n_letters}")
    _int("n_amb", n_amb, 0)
    if n_amb > n_letters:
        raise ValueError(f"make_grammar: n_amb (ambiguous letters) must be <= n_letters = {n_letters}, got {n_amb}")
    _int("depth", depth, 1)
    _int("n_start", n_start, 1)
    n_states = n_letters - n_amb + n_amb * depth + 1
    if n_start > n_states - 1:
        raise ValueError(f"make_grammar: n_start must be <= the {n_states - 1} states other than '#', got {n_start}")
    _int("max_tries", max_tries, 1)
    if tau is not None and not (np.isfinite(tau) and tau > 0):
        raise ValueError(f"make_grammar: tau (edge density) must be a finite number > 0 or None, got {tau!r}")
    _check_density(n_letters, n_amb, depth, tau, max_tries)


# A search whose chance of finding a valid grammar is provably below this is refused up front.
HOPELESS = 1e-9


def log10_valid_chance(n_letters: int, n_amb: int, depth: int, tau: float) -> float:
    """log10 of an upper bound on the chance that one construction try gives a valid grammar.

    A valid grammar needs every state besides '#' to reach '#', so at least one out-edge each.
    Source i gets an edge for symbol a with probability min(1, |cand_a| tau), independently per
    (i, a); |cand_a| is depth for an ambiguous letter and 1 for a plain letter or '#'. So

        P(state i has no out-edge) = (1 - min(1, tau))^(n_letters - n_amb + 1) (1 - min(1, depth tau))^n_amb
        P(valid) <= (1 - P(no out-edge))^(n_states - 1)
    """
    log_none = ((n_letters - n_amb + 1) * np.log1p(-min(1.0, tau))
                + n_amb * np.log1p(-min(1.0, depth * tau)))
    with np.errstate(divide="ignore"):
        log_some = np.log(-np.expm1(log_none))                  # log P(state i has an out-edge)
    n_states = n_letters - n_amb + n_amb * depth + 1
    return float((n_states - 1) * log_some / np.log(10))


def _check_density(n_letters, n_amb, depth, tau, max_tries) -> None:
    """Refuses a tau too small for any of max_tries tries to succeed (a search that would otherwise
    run for minutes before failing)."""
    tau = DEFAULT_DENSITY / depth if tau is None else float(tau)
    log10_try = log10_valid_chance(n_letters, n_amb, depth, tau)
    log10_all = log10_try + np.log10(max_tries)                 # union bound over the tries
    if log10_all < np.log10(HOPELESS):
        log10_try, log10_all = max(log10_try, -1e9), max(log10_all, -1e9)   # printable if -inf
        raise ValueError(
            f"make_grammar: tau={tau:.4g} is too small for n_letters={n_letters}, n_amb={n_amb}, "
            f"depth={depth}: every state needs an out-edge, which one try achieves with probability "
            f"<= 1e{log10_try:.0f} (<= 1e{log10_all:.0f} in max_tries={max_tries} tries); "
            f"raise tau (the default is {DEFAULT_DENSITY} / depth = {DEFAULT_DENSITY / depth:.4g})")


def _state_names(letters: List[str], ambiguous: List[str], depth: int) -> List[str]:
    """Spec 2.3b: the letters, each ambiguous one (sampled order) replaced by copies at the end; '#'."""
    states = list(letters)
    for a in ambiguous:
        states.remove(a)
        states.extend(f"{a}{j}" for j in range(depth))
    return states + [END]


def _draw_edges(G: np.random.Generator, cands: List[np.ndarray], n_states: int, tau: float) -> List[List[int]]:
    """Spec 2.3c: per (source i, symbol a) one permutation pick and one coin; out-edge targets per source.

    ``cands[a]`` lists the states whose letter is symbol a (alphabet order, '#' last).
    ``G.permutation(1)`` draws nothing (checked against the literal reference in the tests), so a
    single candidate is picked without calling it.
    """
    thresholds = [len(c) * tau for c in cands]
    cand_lists = [c.tolist() for c in cands]
    out: List[List[int]] = []
    for _ in range(n_states):
        targets = []
        for cand, thr in zip(cand_lists, thresholds):
            pick = cand[G.permutation(len(cand))[0]] if len(cand) > 1 else cand[0]
            if G.random() < thr:
                targets.append(pick)
        out.append(targets)
    return out


def _all_reach_end(out: List[List[int]], end: int) -> bool:
    """Whether every state has a path to ``end`` (reverse breadth-first search)."""
    n = len(out)
    preds: List[List[int]] = [[] for _ in range(n)]
    for i, targets in enumerate(out):
        for t in targets:
            preds[t].append(i)
    seen = np.zeros(n, dtype=bool)
    seen[end] = True
    stack = [end]
    while stack:
        for p in preds[stack.pop()]:
            if not seen[p]:
                seen[p] = True
                stack.append(p)
    return bool(seen.all())


def _labels(letters: List[str], states: List[str], ambiguous: List[str], depth: int) -> np.ndarray:
    """Hidden-state ids: letters in class order, copies 0..Dp-1 consecutive, '#' = 0."""
    first_id, next_id = {}, 1
    for a in letters[:-1]:
        first_id[a] = next_id
        next_id += depth if a in ambiguous else 1
    label = np.zeros(len(states), dtype=np.int64)
    for s, name in enumerate(states[:-1]):
        label[s] = first_id[name[0]] + (int(name[1:]) if len(name) > 1 else 0)
    return label


def make_grammar(n_letters: int, n_amb: int, depth: int, seed: int, tau: Optional[float] = None,
                 n_start: int = 4, max_tries: int = 100000) -> Grammar:
    """Builds the grammar of selectivbench.md section 2 for ``seed`` (identical to the released generator).

    n_letters: A (the vocabulary is A + 1 with '#'); n_amb: ambiguous letters; depth: Dp copies per
    ambiguous letter; tau: edge density (default 0.4 / depth); n_start: start states; max_tries:
    the limit on construction attempts (ValueError when no valid grammar was found).
    """
    validate_grammar_params(n_letters, n_amb, depth, tau, n_start, max_tries)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"make_grammar: seed must be an integer >= 0, got {seed!r}")
    tau = DEFAULT_DENSITY / depth if tau is None else float(tau)
    G = np.random.default_rng(int(seed))
    py = random.Random(int(G.integers(0, 100)))
    letters = list(ALPHABET[:n_letters])
    started, warned = time.perf_counter(), False
    for attempt in range(1, max_tries + 1):
        if not warned and time.perf_counter() - started > SLOW_SEARCH_S:
            warned = True
            _warn_slow_search(attempt - 1, max_tries, time.perf_counter() - started, tau, depth)
        ambiguous = py.sample(letters, n_amb)
        states = _state_names(letters, ambiguous, depth)
        alphabet = letters + [END]
        state_letter_sym = [name[0] for name in states]
        cands = [np.flatnonzero(np.array(state_letter_sym) == a) for a in alphabet]
        out = _draw_edges(G, cands, len(states), tau)
        end = len(states) - 1
        out[end] = []
        starts = G.choice(len(states), n_start, replace=False)
        if end not in starts and _all_reach_end(out, end):
            return _assemble(n_letters, n_amb, depth, tau, int(seed), n_start, attempt,
                             alphabet, ambiguous, states, out, starts)
    raise ValueError(
        f"make_grammar: no valid grammar (every state reaching '#', '#' not a start state) within "
        f"max_tries = {max_tries} tries for n_letters={n_letters}, n_amb={n_amb}, depth={depth}, "
        f"tau={tau}, seed={seed}; raise max_tries or tau")


SLOW_SEARCH_S = 10.0   # a search still running after this long says so (once), with an estimate


def _warn_slow_search(tries: int, max_tries: int, elapsed: float, tau: float, depth: int) -> None:
    remaining = elapsed / max(tries, 1) * (max_tries - tries)
    warnings.warn(
        f"make_grammar: no valid grammar in {tries} of max_tries={max_tries} tries ({elapsed:.0f} s); "
        f"up to {remaining:.0f} s more before giving up. tau={tau:.4g} is sparse (the default is "
        f"{DEFAULT_DENSITY} / depth = {DEFAULT_DENSITY / depth:.4g}): raise tau or lower max_tries",
        RuntimeWarning, stacklevel=3)


def _assemble(n_letters, n_amb, depth, tau, seed, n_start, n_tries, alphabet, ambiguous, states,
              out, starts) -> Grammar:
    """Derived tables: sorted transitions, successor arrays, next-state and legality tables."""
    n_states, C = len(states), n_letters + 1
    state_letter = np.array([letter_class(name[0]) for name in states], dtype=np.int64)
    state_label = _labels(alphabet, states, ambiguous, depth)
    label_state = np.full(int(state_label.max()) + 1, -1, dtype=np.int64)
    label_state[state_label] = np.arange(n_states)
    succ = tuple(np.array(sorted(set(t)), dtype=np.int64) for t in out)          # target order
    succ_prob = tuple(np.full(len(s), 1.0 / len(s)) if len(s) else np.zeros(0) for s in succ)
    succ_cum = tuple(np.cumsum(p) for p in succ_prob)
    edges = [(i, t) for i, s in enumerate(succ) for t in s]
    transitions = np.array(edges, dtype=np.int64).reshape(-1, 2)                 # [n_edges, 2]
    next_state = np.full((n_states, C), -1, dtype=np.int64)                      # [n_states, C]
    if len(edges):
        next_state[transitions[:, 0], state_letter[transitions[:, 1]]] = transitions[:, 1]
    legal_next = next_state >= 0                                                 # [n_states, C]
    legal_next[n_states - 1, state_letter[np.asarray(starts)]] = True            # '#' -> next string's start
    arrays = [state_letter, state_label, label_state, next_state, legal_next, transitions]
    for a in arrays + list(succ) + list(succ_prob) + list(succ_cum):
        a.setflags(write=False)
    starts = np.asarray(starts, dtype=np.int64)
    starts.setflags(write=False)
    return Grammar(n_letters=n_letters, n_amb=n_amb, depth=depth, tau=tau, seed=seed, n_start=n_start,
                   n_tries=n_tries, letters=list(alphabet), ambiguous=list(ambiguous), states=states,
                   state_letter=state_letter, state_label=state_label, label_state=label_state,
                   start_states=starts, transitions=transitions, succ=succ, succ_prob=succ_prob,
                   succ_cum=succ_cum, next_state=next_state, legal_next=legal_next,
                   _succ_lists=tuple(s.tolist() for s in succ),
                   _cum_lists=tuple(c.tolist() for c in succ_cum))
