"""Reference lines for SelectivBench: n-gram lookups and the Bayes-optimal causal filter.

Both work on the un-expanded element sequences (letters [N, L] -> hidden-state ids [N, L]).
Time expansion only inserts steps that carry the previous element's label, so a predictor that
outputs one label per element scores the same under the paper's pooled accuracy
(metrics.pooled_accuracy: summing one-hot outputs over an element's steps gives the same argmax)
as its per-element accuracy computed here (tested). Blanks and noise are drawn independently of
the hidden state and carry no information about it. Distractor letters (tasks 3, t3-small) are
drawn from the letters that cannot follow the current state, so they carry a little; the filter
below ignores them (as a model that "ignores the distractors" would), so on distractor tasks its
value is the ceiling of such a model, and an exact ceiling could be marginally higher.

n-gram lookup (``NGramModel``, n = 1..4)
    Context of element t: the last n letters x_{t-n+1..t} (the current letter included);
    positions before the start of a sequence read as a beginning-of-sequence symbol (so
    contexts near the start are shorter and tell the position). Fit: for every context seen in
    the training sequences, the most frequent label (ties: the smallest id). Predict: the label
    of the longest seen suffix of the context (back off n -> n-1 -> ... -> 1); a letter never
    seen at all gets the most frequent training label.

Bayes-optimal causal filter (``bayes_filter``)
    The posterior over the automaton state given the letters so far, under the generator of
    selectivbench.md sections 2-3: a sequence is a concatenation of strings, each starting at one of the K
    start states (uniform) and walking by the grammar's successor probabilities to "#", kept
    only when L_min <= len <= L_max, truncated to L. Strings are independent, so the filter
    restarts after every "#". Inside a string, a state and the next letter fix the next state,
    so the posterior lives on at most K paths (one per start state), each with weight
    w = P(start) * prod of transition probabilities. The length condition multiplies a path
    ending in state j after m letters by acc(j, m) = P(L_min <= m + R_j <= L_max), with R_j the
    number of letters still to come from j up to and including "#" (its law f_r(j) = P(R_j = r)
    by the recursion f_0 = [j = #], f_r(j) = sum_k P(j -> k) f_{r-1}(k)). Prediction:
    argmax over labels of sum_{paths with that label} w * acc. Its accuracy is the ceiling any
    causal model can reach on average. It falls below 1 only when two start states share a
    letter (the first letters of a string can then be ambiguous): measured 0.9948 for task 1b,
    seed 1 (the paper's ~0.995), 1.0 for seeds 2 and 4.

``report(config, seed, n_train, n_test)`` fits the n-grams on the task's training split and
scores every line on its test split (the sample indices of presets.dataset), for
``linrec selectivbench describe``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

MAX_NGRAM = 4


# ----------------------------------------------------------------------------------------------
# shared helpers

def _check_sequences(fn: str, letters: np.ndarray, labels: Optional[np.ndarray] = None) -> np.ndarray:
    letters = np.asarray(letters)
    if letters.ndim != 2:
        raise ValueError(f"{fn}: letters must have shape [N, L], got shape {letters.shape}")
    if not np.issubdtype(letters.dtype, np.integer):
        raise ValueError(f"{fn}: letters must be an integer array of letter classes, got dtype {letters.dtype}")
    if letters.size and letters.min() < 0:
        raise ValueError(f"{fn}: letters must be >= 0 (letter classes), got min {letters.min()}")
    if labels is not None and np.shape(labels) != letters.shape:
        raise ValueError(f"{fn}: labels must have shape [N, L] = {letters.shape}, got {np.shape(labels)}")
    return letters.astype(np.int64)


def element_accuracy(predicted: np.ndarray, labels: np.ndarray) -> float:
    """Mean of predicted == labels over all elements; both [N, L]."""
    predicted, labels = np.asarray(predicted), np.asarray(labels)
    if predicted.shape != labels.shape:
        raise ValueError(f"element_accuracy: predicted has shape {predicted.shape}, labels {labels.shape}; they must match")
    return float(np.mean(predicted == labels)) if labels.size else float("nan")


# ----------------------------------------------------------------------------------------------
# n-gram lookup

def _context_codes(letters: np.ndarray, order: int, bos: int) -> np.ndarray:
    """Integer code of the context x_{t-order+1..t} at every position.

    letters [N, L] in [0, bos); positions before 0 read as ``bos``. Returns [N, L] int64:
    code = sum_{j=0}^{order-1} sym_{t-j} * base^j with base = bos + 1 (fits int64 for order <= 4
    and up to 52 letters: 54^4 < 2^63).
    """
    N, L = letters.shape
    padded = np.concatenate([np.full((N, order - 1), bos, np.int64), letters], axis=1)  # [N, L+order-1]
    code = np.zeros((N, L), np.int64)
    for j in range(order):                                          # j = how far back
        start = order - 1 - j
        code = code * (bos + 1) + padded[:, start:start + L]        # oldest symbol most significant
    return code


def _best_label_per_context(codes: np.ndarray, labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """For each distinct context code, its most frequent label (ties: the smallest label).

    codes, labels [M] int64 >= 0. Returns (contexts [U] sorted, best [U]).
    """
    n_labels = int(labels.max()) + 1
    pairs, counts = np.unique(codes * n_labels + labels, return_counts=True)   # [P] one key per (context, label)
    context, label = pairs // n_labels, pairs % n_labels                        # [P], [P] sorted by context, label
    order = np.lexsort((label, -counts, context))                               # by context, count desc, label asc
    context, label = context[order], label[order]
    first = np.r_[True, context[1:] != context[:-1]]                            # first row of each context
    return context[first], label[first]


@dataclass
class NGramModel:
    """Lookup tables for orders 1..n: ``contexts[k-1]`` [U_k] sorted codes, ``best[k-1]`` [U_k]."""

    n: int
    bos: int
    contexts: List[np.ndarray]
    best: List[np.ndarray]
    default_label: int

    def predict(self, letters: np.ndarray) -> np.ndarray:
        """letters [N, L] -> predicted labels [N, L] (longest seen context, backing off)."""
        letters = _check_sequences("NGramModel.predict", letters)
        if letters.size and letters.max() >= self.bos:
            raise ValueError(f"NGramModel.predict: letters must be < {self.bos} (input classes), got max {letters.max()}")
        predicted = np.full(letters.shape, self.default_label, np.int64)  # [N, L]
        for order in range(1, self.n + 1):                          # longer contexts overwrite shorter
            table, best = self.contexts[order - 1], self.best[order - 1]
            if table.size == 0:
                continue
            code = _context_codes(letters, order, self.bos)         # [N, L]
            pos = np.minimum(np.searchsorted(table, code), table.size - 1)
            seen = table[pos] == code                               # [N, L]
            predicted[seen] = best[pos[seen]]
        return predicted


def fit_ngram(letters: np.ndarray, labels: np.ndarray, n: int, n_input_classes: int) -> NGramModel:
    """Fits the n-gram lookup (orders 1..n, for back-off) on training sequences.

    letters [N, L] int in [0, n_input_classes); labels [N, L] int hidden-state ids.
    """
    letters = _check_sequences("fit_ngram", letters, labels)
    labels = np.asarray(labels).astype(np.int64)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= MAX_NGRAM:
        raise ValueError(f"fit_ngram: n must be an integer in 1..{MAX_NGRAM}, got {n!r}")
    if letters.size == 0:
        raise ValueError("fit_ngram: needs at least one training element, got letters of shape " f"{letters.shape}")
    if letters.max() >= n_input_classes:
        raise ValueError(f"fit_ngram: letters must be < n_input_classes = {n_input_classes}, got max {letters.max()}")
    bos = int(n_input_classes)
    contexts, best = [], []
    for order in range(1, n + 1):
        ctx, lab = _best_label_per_context(_context_codes(letters, order, bos).ravel(), labels.ravel())
        contexts.append(ctx)
        best.append(lab)
    values, counts = np.unique(labels, return_counts=True)
    return NGramModel(n=n, bos=bos, contexts=contexts, best=best, default_label=int(values[np.argmax(counts)]))


# ----------------------------------------------------------------------------------------------
# Bayes-optimal causal filter

@dataclass
class TransitionTable:
    """Dense per-(state, letter) successor table of a grammar.

    next_state [n_states, C] int64 (-1: no successor with that letter); next_prob [n_states, C]
    float64 (the transition probability, 0 where none); start_states [K]; state_letter,
    state_label [n_states]; end_state int.
    """

    next_state: np.ndarray
    next_prob: np.ndarray
    start_states: np.ndarray
    state_letter: np.ndarray
    state_label: np.ndarray
    end_state: int


def _successor_lists(grammar) -> List[Tuple[np.ndarray, np.ndarray]]:
    """Per state (successor indices, probabilities), from list-of-arrays or -1-padded arrays."""
    succ, prob = grammar.succ, grammar.succ_prob
    n_states = len(grammar.state_letter)
    out = []
    for i in range(n_states):
        s = np.asarray(succ[i]).astype(np.int64).ravel()
        p = np.asarray(prob[i], dtype=np.float64).ravel()
        if s.shape != p.shape:
            raise ValueError(f"bayes_filter: grammar.succ[{i}] and succ_prob[{i}] differ in shape: {s.shape} vs {p.shape}")
        keep = s >= 0                                               # drop padding
        out.append((s[keep], p[keep]))
    return out


def transition_table(grammar) -> TransitionTable:
    """Builds the (state, letter) -> next state table; checks one successor per letter."""
    state_letter = np.asarray(grammar.state_letter).astype(np.int64)  # [n_states]
    n_states, C = state_letter.size, int(grammar.n_input_classes)
    next_state = np.full((n_states, C), -1, np.int64)               # [n_states, C]
    next_prob = np.zeros((n_states, C), np.float64)                 # [n_states, C]
    for i, (succ, prob) in enumerate(_successor_lists(grammar)):
        letters = state_letter[succ]
        if np.unique(letters).size != letters.size:
            raise ValueError(f"bayes_filter: state {i} has two successors with the same letter; "
                             "the grammar must have at most one successor per letter")
        next_state[i, letters] = succ
        next_prob[i, letters] = prob
    return TransitionTable(next_state=next_state, next_prob=next_prob,
                           start_states=np.asarray(grammar.start_states).astype(np.int64),
                           state_letter=state_letter,
                           state_label=np.asarray(grammar.state_label).astype(np.int64),
                           end_state=int(grammar.end_state))


def remaining_length_law(table: TransitionTable, r_max: int) -> np.ndarray:
    """f [n_states, r_max + 1]: f[j, r] = P(exactly r more letters from state j up to "#" included).

    f[:, 0] = [j = #]; f[j, r] = sum_k P(j -> k) f[k, r - 1] ("#" has no successors).
    """
    n_states, C = table.next_state.shape
    f = np.zeros((n_states, r_max + 1))                             # [n_states, r_max + 1]
    f[table.end_state, 0] = 1.0
    succ = np.where(table.next_state >= 0, table.next_state, 0)     # [n_states, C] safe gather
    for r in range(1, r_max + 1):
        f[:, r] = (table.next_prob * f[succ, r - 1]).sum(axis=1)
    return f


def acceptance_table(table: TransitionTable, L_min: int, L_max: int) -> np.ndarray:
    """acc [n_states, L_max + 1]: acc[j, m] = P(L_min <= m + R_j <= L_max), m letters so far."""
    f = remaining_length_law(table, L_max)                          # [n_states, L_max + 1]
    cum = np.concatenate([np.zeros((f.shape[0], 1)), np.cumsum(f, axis=1)], axis=1)  # cum[:, r] = P(R < r)
    m = np.arange(L_max + 1)
    lo = np.clip(L_min - m, 0, L_max + 1)                           # [L_max + 1]
    hi = np.clip(L_max - m + 1, 0, L_max + 1)                       # exclusive
    return np.maximum(cum[:, hi] - cum[:, lo], 0.0)                 # [n_states, L_max + 1]


@dataclass
class FilterResult:
    """predicted [N, L] labels (-1 where the letters are impossible under the grammar);
    confidence [N, L] posterior probability of the predicted label; n_impossible: count of
    elements whose letters have zero probability (a sampler fallback or foreign data)."""

    predicted: np.ndarray
    confidence: np.ndarray
    n_impossible: int


def bayes_filter(grammar, letters: np.ndarray, L_min: int, L_max: int, use_length_prior: bool = True) -> FilterResult:
    """The Bayes-optimal causal predictions of the hidden-state id (module docstring).

    letters [N, L] int letter classes ("#" = 0). ``use_length_prior=False`` drops the factor
    acc(j, m) (the filter then ignores the L_min/L_max acceptance of strings).
    Cost: O(N L K^2) with K start states, vectorised over N; no Python loop over samples.
    """
    letters = _check_sequences("bayes_filter", letters)
    if not (isinstance(L_min, (int, np.integer)) and isinstance(L_max, (int, np.integer)) and 1 <= L_min <= L_max):
        raise ValueError(f"bayes_filter: need integers 1 <= L_min <= L_max, got L_min={L_min!r}, L_max={L_max!r}")
    table = transition_table(grammar)
    n_states, C = table.next_state.shape
    if letters.size and letters.max() >= C:
        raise ValueError(f"bayes_filter: letters must be < n_input_classes = {C}, got max {letters.max()}")
    acc = acceptance_table(table, int(L_min), int(L_max)) if use_length_prior else np.ones((n_states, L_max + 1))
    N, L = letters.shape
    starts = table.start_states                                     # [K]
    K = starts.size
    rows = np.arange(N)
    state = np.zeros((N, K), np.int64)                              # [N, K] one path per start state
    weight = np.zeros((N, K))                                       # [N, K] P(path prefix), renormalised
    pos = np.zeros(N, np.int64)                                     # [N] letters of the current string so far
    predicted = np.full((N, L), -1, np.int64)
    confidence = np.zeros((N, L))
    for t in range(L):
        x = letters[:, t]                                           # [N]
        restart = np.ones(N, bool) if t == 0 else letters[:, t - 1] == 0   # previous letter was "#"
        moved = table.next_state[state, x[:, None]]                 # [N, K]
        moved_w = weight * table.next_prob[state, x[:, None]]       # [N, K]
        start_w = (table.state_letter[starts][None, :] == x[:, None]) / K  # [N, K]
        state = np.where(restart[:, None], starts[None, :], moved)
        weight = np.where(restart[:, None], start_w, moved_w)
        pos = np.where(restart, 1, pos + 1)
        dead = state < 0
        state[dead], weight[dead] = table.end_state, 0.0            # dead paths: weight 0
        total = weight.sum(axis=1, keepdims=True)                   # [N, 1]
        weight = np.divide(weight, total, out=np.zeros_like(weight), where=total > 0)
        post = weight * acc[state, np.minimum(pos, L_max)[:, None]] # [N, K]
        label = table.state_label[state]                            # [N, K]
        score = ((label[:, :, None] == label[:, None, :]) * post[:, None, :]).sum(axis=2)  # [N, K] per-label mass
        norm = post.sum(axis=1)                                     # [N]
        best = score.argmax(axis=1)                                 # [N]
        ok = norm > 0
        predicted[:, t] = np.where(ok, label[rows, best], -1)
        confidence[:, t] = np.divide(score[rows, best], norm, out=np.zeros(N), where=ok)
    return FilterResult(predicted=predicted, confidence=confidence, n_impossible=int((predicted < 0).sum()))


# ----------------------------------------------------------------------------------------------
# per-task report

def element_data(config, split: str, n: int, seed: int = 1, overlap_compat: bool = False,
                 progress: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """The un-expanded sequences of ``split``: (letters [n, L], labels [n, L]), int64.

    Same sample indices as presets.dataset(config, split, n, seed, overlap_compat=...).
    """
    from . import presets, sequences

    config = presets.get_preset(config)
    grammar = config.grammar(seed)
    indices = presets.sample_indices(config, split, n, overlap_compat)
    letters = np.zeros((n, config.L), np.int64)                     # [n, L]
    labels = np.zeros((n, config.L), np.int64)                      # [n, L]
    for i, idx in enumerate(indices):
        letters[i], labels[i], _ = sequences.sample_sequence(grammar, seed, int(idx), config.L,
                                                             config.L_min, config.L_max)
        if progress and (i + 1 == n or (i + 1) % max(1, n // 20) == 0):
            _progress(f"baselines: {split} sequences", i + 1, n)
    return letters, labels


def _progress(what: str, done: int, total: int) -> None:
    import sys

    end = "\n" if done == total else ""
    print(f"\r{what} {done}/{total}", end=end, file=sys.stderr, flush=True)


def report(config, seed: int = 1, n_train: int = 2000, n_test: int = 500, overlap_compat: bool = False,
           progress: bool = False) -> Dict[str, object]:
    """Accuracies of the reference lines on a task's test split.

    config: a preset name or presets.TaskConfig; seed: the run seed (it draws the grammar and
    the samples; >= 1, as in presets.dataset). The n-grams are fitted on ``n_train`` training
    sequences and all lines are scored on ``n_test`` test sequences by per-element accuracy
    (= pooled accuracy, module docstring). Returns {"1-gram": acc, ..., "4-gram": acc,
    "bayes": acc, "bayes_impossible": elements the grammar cannot produce (0 for generated
    data), "n_train", "n_test", "n_test_elements", "seed"}.
    """
    from . import presets

    config = presets.get_preset(config)
    for name, value in (("n_train", n_train), ("n_test", n_test)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"report: {name} must be an integer >= 1, got {value!r}")
    grammar = config.grammar(seed)
    train = element_data(config, "train", n_train, seed, overlap_compat, progress)
    letters, labels = element_data(config, "test", n_test, seed, overlap_compat, progress)
    out: Dict[str, object] = {}
    for n in range(1, MAX_NGRAM + 1):
        model = fit_ngram(*train, n, grammar.n_input_classes)
        out[f"{n}-gram"] = element_accuracy(model.predict(letters), labels)
    bayes = bayes_filter(grammar, letters, config.L_min, config.L_max)
    out["bayes"] = element_accuracy(bayes.predicted, labels)
    out.update(bayes_impossible=bayes.n_impossible, n_train=int(n_train), n_test=int(n_test),
               n_test_elements=int(labels.size), seed=int(seed))
    return out
