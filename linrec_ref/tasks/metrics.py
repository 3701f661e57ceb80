"""Loss and accuracies of SelectivBench (selectivbench.md section 5).

Notation: logits z [B, T, S] (S = number of hidden-state classes), targets y [B, T], real-step
mask m [B, T] (``batching.Batch.mask``), softmax p_{b,t} = softmax(z_{b,t}).

- ``cross_entropy``: the training loss, mean over real steps of -log p_{b,t}[y_{b,t}]
  = (1 / sum m) * sum_{b,t} m_{b,t} * (logsumexp(z_{b,t}) - z_{b,t,y_{b,t}}).
- ``pooled_accuracy``: the paper's metric. For each element n of sample b (its token step and
  the steps inserted after it, ``batch.element == n``), P_{b,n} = sum_{t in n} p_{b,t}; the
  element is right when argmax_s P_{b,n}[s] equals its hidden-state id; averaged over all
  elements of the batch.
- ``step_accuracy``: un-pooled, argmax_s z_{b,t} == y_{b,t} averaged over real steps.
- ``after_distractor_accuracy``: the same over the steps flagged ``batch.after_distractor``
  (NaN when there are none).
- ``after_reset_accuracy``: the pooled accuracy over the elements 1..w after each end marker
  ``#`` (hidden-state id 0) inside a sample: how fast a model forgets the previous string.
- ``offset_accuracy``: un-pooled accuracy by the offset j of a step inside its element (j = 0 the
  token step, j >= 1 the j-th inserted step): how recall decays across a gap.

Every accuracy takes ``return_counts=True`` to return ``(n_correct, n_total)`` instead of the
ratio, so that results over several batches can be summed exactly. Ties in an argmax go to the
smallest class id (NumPy's argmax).
"""
from __future__ import annotations

from typing import Tuple, Union

import numpy as np

Accuracy = Union[float, Tuple[int, int]]


def _check_logits(fn: str, logits: np.ndarray, y: np.ndarray, mask: np.ndarray) -> None:
    if logits.ndim != 3:
        raise ValueError(f"{fn}: logits must have shape [B, T, S], got shape {logits.shape}")
    if not np.issubdtype(logits.dtype, np.floating):
        raise ValueError(f"{fn}: logits must be a float array, got dtype {logits.dtype}")
    if y.shape != logits.shape[:2]:
        raise ValueError(f"{fn}: y must have shape [B, T] = {logits.shape[:2]}, got {y.shape}")
    if mask.shape != logits.shape[:2]:
        raise ValueError(f"{fn}: mask must have shape [B, T] = {logits.shape[:2]}, got {mask.shape}")
    if mask.dtype != np.bool_:
        raise ValueError(f"{fn}: mask must be a bool array, got dtype {mask.dtype}")
    labels = y[mask]
    if labels.size and (labels.min() < 0 or labels.max() >= logits.shape[2]):
        raise ValueError(
            f"{fn}: y on real steps must lie in [0, S) = [0, {logits.shape[2]}), got values in "
            f"[{labels.min()}, {labels.max()}]"
        )


def _batch_arrays(fn: str, logits, batch):
    logits = np.asarray(logits)
    y, mask = np.asarray(batch.y), np.asarray(batch.mask)
    _check_logits(fn, logits, y, mask)
    return logits, y, mask


def _ratio(n_correct: int, n_total: int, return_counts: bool) -> Accuracy:
    if return_counts:
        return int(n_correct), int(n_total)
    return float(n_correct) / n_total if n_total else float("nan")


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log softmax over the last axis, stable: z - max(z) - log(sum(exp(z - max(z))))."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def softmax(logits: np.ndarray) -> np.ndarray:
    """softmax over the last axis, stable (the max is subtracted first)."""
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def cross_entropy(logits: np.ndarray, y: np.ndarray, mask: np.ndarray) -> float:
    """Mean cross-entropy over real steps (the training loss of selectivbench.md section 5).

    logits [B, T, S] float; y [B, T] int (ignored where mask is False, e.g. -1 on padding);
    mask [B, T] bool. Returns (1 / sum m) * sum_{m_{b,t}} -log softmax(z_{b,t})[y_{b,t}], a float.
    """
    logits, y, mask = np.asarray(logits), np.asarray(y), np.asarray(mask)
    _check_logits("cross_entropy", logits, y, mask)
    n_real = int(mask.sum())
    if n_real == 0:
        raise ValueError("cross_entropy: mask has no real step (sum(mask) = 0)")
    z = logits[mask]                                                # [N, S] real steps only
    logp = log_softmax(z)                                           # [N, S]
    nll = -np.take_along_axis(logp, y[mask][:, None], axis=1)[:, 0] # [N]
    return float(nll.sum(dtype=np.float64) / n_real)


def step_accuracy(logits: np.ndarray, batch, return_counts: bool = False) -> Accuracy:
    """Un-pooled accuracy: argmax_s z_{b,t} == y_{b,t} averaged over real steps.

    logits [B, T, S]; batch with y [B, T] and mask [B, T] (``batching.Batch``).
    """
    logits, y, mask = _batch_arrays("step_accuracy", logits, batch)
    hit = (logits.argmax(axis=-1) == y) & mask                      # [B, T]
    return _ratio(int(hit.sum()), int(mask.sum()), return_counts)


def after_distractor_accuracy(logits: np.ndarray, batch, return_counts: bool = False) -> Accuracy:
    """Un-pooled accuracy over the real steps flagged ``after_distractor`` (NaN if none).

    logits [B, T, S]; batch with y, mask, after_distractor [B, T].
    """
    logits, y, mask = _batch_arrays("after_distractor_accuracy", logits, batch)
    flagged = np.asarray(batch.after_distractor)
    if flagged.shape != mask.shape:
        raise ValueError(
            f"after_distractor_accuracy: batch.after_distractor must have shape [B, T] = "
            f"{mask.shape}, got {flagged.shape}"
        )
    where = flagged.astype(bool) & mask                             # [B, T]
    hit = (logits.argmax(axis=-1) == y) & where                     # [B, T]
    return _ratio(int(hit.sum()), int(where.sum()), return_counts)


def element_groups(batch) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The real steps of a batch grouped by (sample, element).

    Returns (b, t, starts): b [N], t [N] the real steps sorted by (sample, element, time), and
    starts [E] the offset of each element's first step in that order (E elements in all).
    """
    element, mask = np.asarray(batch.element), np.asarray(batch.mask)
    if element.shape != mask.shape:
        raise ValueError(f"pooled_accuracy: batch.element must have shape [B, T] = {mask.shape}, got {element.shape}")
    if mask.any() and element[mask].min() < 0:
        raise ValueError("pooled_accuracy: batch.element must be >= 0 on every real step (mask True)")
    b, t = np.nonzero(mask)                                         # [N], [N] in (b, t) order
    key = b * (int(element.max(initial=0)) + 1) + element[b, t]     # [N] one key per (b, n)
    order = np.argsort(key, kind="stable")                          # time order kept inside a group
    b, t, key = b[order], t[order], key[order]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]]) if key.size else np.zeros(0, np.int64)
    return b, t, starts


def pooled_accuracy(logits: np.ndarray, batch, return_counts: bool = False) -> Accuracy:
    """The paper's accuracy: softmax outputs summed over each element's steps, then argmax.

    logits [B, T, S]; batch with y, mask, element [B, T]. For element n of sample b,
    P_{b,n} = sum_{t: element[b,t] = n, mask[b,t]} softmax(z_{b,t}); right iff
    argmax P_{b,n} == y (every step of an element carries the same label; checked).
    Averaged over elements (all samples of the batch together).
    """
    logits, y, _ = _batch_arrays("pooled_accuracy", logits, batch)
    b, t, starts = element_groups(batch)
    if starts.size == 0:
        return _ratio(0, 0, return_counts)
    probs = softmax(logits[b, t])                                   # [N, S] in the logits' dtype
    pooled = np.add.reduceat(probs, starts, axis=0, dtype=np.float64)  # [E, S] summed in float64
    labels = y[b, t]                                                # [N]
    lo, hi = np.minimum.reduceat(labels, starts), np.maximum.reduceat(labels, starts)  # [E]
    if np.any(lo != hi):
        bad = int(np.flatnonzero(lo != hi)[0])
        raise ValueError(
            f"pooled_accuracy: the steps of one element carry different labels (sample "
            f"{b[starts[bad]]}, element {int(batch.element[b[starts[bad]], t[starts[bad]]])}: "
            f"labels {lo[bad]}..{hi[bad]})"
        )
    hit = pooled.argmax(axis=-1) == lo                              # [E]
    return _ratio(int(hit.sum()), int(hit.size), return_counts)


RESET_ID = 0          # the hidden-state id of the end marker "#" (selectivbench.md section 2)


def _element_labels(logits, batch, fn):
    """Per element: sample b [E], element index n [E], label [E], pooled hit [E] (bool)."""
    logits, y, _ = _batch_arrays(fn, logits, batch)
    b, t, starts = element_groups(batch)
    if starts.size == 0:
        z = np.zeros(0, np.int64)
        return z, z, z, np.zeros(0, bool)
    probs = softmax(logits[b, t])                                   # [N, S]
    pooled = np.add.reduceat(probs, starts, axis=0, dtype=np.float64)  # [E, S]
    label = y[b[starts], t[starts]]                                 # [E]
    n = np.asarray(batch.element)[b[starts], t[starts]]             # [E]
    return b[starts], n, label, pooled.argmax(axis=-1) == label


def after_reset_accuracy(logits: np.ndarray, batch, window: int = 5,
                         return_counts: bool = False) -> Accuracy:
    """Pooled accuracy over the elements 1..window after each ``#`` of a sample (NaN if none).

    logits [B, T, S]; batch with y, mask, element [B, T]. An element n of sample b counts when
    some element n - j, 1 <= j <= window, of the same sample is ``#`` (label RESET_ID); the
    sample's first string (before any ``#``) does not count.
    """
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise ValueError(f"after_reset_accuracy: window must be an integer >= 1, got {window!r}")
    b, n, label, hit = _element_labels(logits, batch, "after_reset_accuracy")
    # elements come sorted by (sample, element index): the last reset at or before each element
    is_reset = label == RESET_ID                                    # [E]
    pos = np.arange(b.size)
    last = np.maximum.accumulate(np.where(is_reset, pos, -1)) if b.size else pos
    prev = np.r_[-1, last[:-1]] if b.size else pos                  # last reset strictly before
    safe = np.maximum(prev, 0)
    counted = (prev >= 0) & (b == b[safe]) & (n - n[safe] <= window)
    return _ratio(int((hit & counted).sum()), int(counted.sum()), return_counts)


def offset_accuracy(logits: np.ndarray, batch) -> Tuple[np.ndarray, np.ndarray]:
    """Un-pooled step accuracy by offset inside the element: (n_correct [J], n_total [J]) for
    offsets j = 0 .. J-1 (j = 0 the token step, j >= 1 the j-th inserted blank or distractor)."""
    logits, y, _ = _batch_arrays("offset_accuracy", logits, batch)
    b, t, starts = element_groups(batch)
    if starts.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    group = np.repeat(np.arange(starts.size), np.diff(np.r_[starts, b.size]))   # [N]
    offset = np.arange(b.size) - starts[group]                      # [N]
    hit = logits[b, t].argmax(axis=-1) == y[b, t]                   # [N]
    total = np.bincount(offset)
    return np.bincount(offset, weights=hit, minlength=total.size).astype(np.int64), total
