"""Batching of SelectivBench samples: right-padding to the longest sample, plus masks.

A sample (``expand.Sample``) is one time-expanded sequence of T' steps:

| field | shape | meaning |
|---|---|---|
| ``x`` | [T', C] float32 | input at every step (one-hot letter, zeros for a blank, + noise) |
| ``y`` | [T'] int | hidden-state id of the most recent real letter (the target) |
| ``element`` | [T'] int | index n of the element (real letter) each step belongs to |
| ``is_token`` | [T'] bool | the step is the letter's own token step (not an inserted step) |
| ``after_distractor`` | [T'] bool | the step is flagged by the expander as coming right after a distractor |

``collate`` stacks B samples into a :class:`Batch` padded on the right to T = max T'. Every
step of a sample is a real step (token, blank or distractor step); ``mask`` marks them, and it
is the loss-side mask of selectivbench.md section 5 (mean cross-entropy over all real steps). Padding gets
x = 0, y = -1, element = -1, is_token = after_distractor = False.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, List, Sequence

import numpy as np

PAD_LABEL = -1
PAD_ELEMENT = -1


@dataclass(frozen=True)
class Batch:
    """B right-padded samples.

    x [B, T, C] float32; y [B, T] int64 (-1 on padding); mask [B, T] bool (real steps);
    element [B, T] int64 (-1 on padding); is_token [B, T] bool; after_distractor [B, T] bool;
    lengths [B] int64 (real steps per sample, T = lengths.max()).
    """

    x: np.ndarray
    y: np.ndarray
    mask: np.ndarray
    element: np.ndarray
    is_token: np.ndarray
    after_distractor: np.ndarray
    lengths: np.ndarray

    @property
    def batch_size(self) -> int:
        return int(self.x.shape[0])

    @property
    def n_steps(self) -> int:
        return int(self.x.shape[1])

    @property
    def n_input_classes(self) -> int:
        return int(self.x.shape[2])


def _field(sample, name: str, index: int) -> np.ndarray:
    if not hasattr(sample, name):
        raise ValueError(f"collate: samples[{index}] has no field '{name}' (expected an expand.Sample)")
    return np.asarray(getattr(sample, name))


def _check_sample(sample, index: int, n_input_classes: int) -> int:
    """Checks one sample's field shapes; returns its length T'."""
    x = _field(sample, "x", index)
    if x.ndim != 2:
        raise ValueError(f"collate: samples[{index}].x must have shape [T', C], got shape {x.shape}")
    if x.shape[1] != n_input_classes:
        raise ValueError(
            f"collate: samples[{index}].x has C={x.shape[1]} input classes, but samples[0] has "
            f"C={n_input_classes}"
        )
    n_steps = x.shape[0]
    for name in ("y", "element", "is_token", "after_distractor"):
        field = _field(sample, name, index)
        if field.shape != (n_steps,):
            raise ValueError(
                f"collate: samples[{index}].{name} must have shape [T'] = ({n_steps},), got {field.shape}"
            )
    return n_steps


def collate(samples: Sequence) -> Batch:
    """Stacks samples into a right-padded :class:`Batch` (shapes in the module docstring)."""
    samples = list(samples)
    if not samples:
        raise ValueError("collate: samples must be a non-empty sequence of samples, got an empty one")
    n_input_classes = _field(samples[0], "x", 0).shape[-1]
    lengths = np.array([_check_sample(s, i, n_input_classes) for i, s in enumerate(samples)], dtype=np.int64)
    B, T, C = len(samples), int(lengths.max()), int(n_input_classes)
    x = np.zeros((B, T, C), dtype=np.float32)                       # [B, T, C]
    y = np.full((B, T), PAD_LABEL, dtype=np.int64)                  # [B, T]
    element = np.full((B, T), PAD_ELEMENT, dtype=np.int64)          # [B, T]
    is_token = np.zeros((B, T), dtype=bool)                         # [B, T]
    after_distractor = np.zeros((B, T), dtype=bool)                 # [B, T]
    for b, (sample, n) in enumerate(zip(samples, lengths)):
        x[b, :n] = sample.x
        y[b, :n] = sample.y
        element[b, :n] = sample.element
        is_token[b, :n] = sample.is_token
        after_distractor[b, :n] = sample.after_distractor
    mask = np.arange(T)[None, :] < lengths[:, None]                 # [B, T]
    return Batch(x=x, y=y, mask=mask, element=element, is_token=is_token,
                 after_distractor=after_distractor, lengths=lengths)


def iterate_batches(dataset: Iterable, batch_size: int, drop_last: bool = False) -> Iterator[Batch]:
    """Yields collated batches of ``batch_size`` consecutive samples of ``dataset``.

    The last batch is smaller when the dataset does not divide evenly (dropped with
    ``drop_last=True``). Samples are consumed lazily, so a generator of fresh samples works.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"iterate_batches: batch_size must be an integer >= 1, got {batch_size!r}")
    pending: List = []
    for sample in dataset:
        pending.append(sample)
        if len(pending) == batch_size:
            yield collate(pending)
            pending = []
    if pending and not drop_last:
        yield collate(pending)
