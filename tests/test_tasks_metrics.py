"""SelectivBench batching and metrics (linrec_ref.tasks.batching, linrec_ref.tasks.metrics)."""
from dataclasses import dataclass

import numpy as np
import pytest

from linrec_ref.tasks import batching, metrics


@dataclass
class FakeSample:
    """The fields of expand.Sample that batching reads."""

    x: np.ndarray
    y: np.ndarray
    element: np.ndarray
    is_token: np.ndarray
    after_distractor: np.ndarray


def make_sample(elements, labels, C=4, distractor_after=()):
    """elements: number of steps of each element (1 = token only); labels: one per element."""
    element = np.repeat(np.arange(len(elements)), elements)
    y = np.repeat(np.asarray(labels), elements)
    first = np.r_[True, element[1:] != element[:-1]]
    x = np.zeros((element.size, C), np.float32)
    x[np.flatnonzero(first), np.asarray(labels) % C] = 1.0
    after = np.zeros(element.size, bool)
    after[list(distractor_after)] = True
    return FakeSample(x=x, y=y, element=element, is_token=first, after_distractor=after)


def logits_from_probs(probs):
    """Logits whose softmax is exactly-ish the given rows (log of the probabilities)."""
    return np.log(np.asarray(probs, dtype=np.float64))


# ---------------------------------------------------------------------------------------------
# batching

def test_collate_right_pads_with_masks():
    a = make_sample([2, 1], [1, 2])                     # 3 steps
    b = make_sample([1, 3, 1], [0, 3, 2])              # 5 steps
    batch = batching.collate([a, b])
    assert batch.x.shape == (2, 5, 4) and batch.x.dtype == np.float32
    np.testing.assert_array_equal(batch.lengths, [3, 5])
    np.testing.assert_array_equal(batch.mask, [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(batch.y[0], [1, 1, 2, -1, -1])
    np.testing.assert_array_equal(batch.element[0], [0, 0, 1, -1, -1])
    np.testing.assert_array_equal(batch.is_token[0], [1, 0, 1, 0, 0])
    np.testing.assert_array_equal(batch.x[0, 3:], 0.0)
    np.testing.assert_array_equal(batch.x[1], b.x)
    np.testing.assert_array_equal(batch.element[1], b.element)


def test_collate_rejects_mismatched_samples():
    a = make_sample([1, 1], [0, 1], C=4)
    with pytest.raises(ValueError, match="C=5"):
        batching.collate([a, make_sample([1], [0], C=5)])
    bad = make_sample([1, 1], [0, 1])
    bad.y = bad.y[:1]
    with pytest.raises(ValueError, match=r"samples\[1\]\.y"):
        batching.collate([a, bad])
    with pytest.raises(ValueError, match="non-empty"):
        batching.collate([])


def test_iterate_batches_sizes_and_drop_last():
    samples = (make_sample([1] * (i + 1), [0] * (i + 1)) for i in range(7))
    sizes = [b.batch_size for b in batching.iterate_batches(samples, 3)]
    assert sizes == [3, 3, 1]
    samples = [make_sample([1], [0])] * 7
    assert [b.batch_size for b in batching.iterate_batches(samples, 3, drop_last=True)] == [3, 3]
    with pytest.raises(ValueError, match="batch_size"):
        list(batching.iterate_batches(samples, 0))


# ---------------------------------------------------------------------------------------------
# metrics on hand-built logits

def hand_built_batch():
    """Sample 0: element 0 (token + 1 blank, label 0), element 1 (token + 2 blanks, label 1).
    Sample 1: element 0 (token + 2 inserted steps, label 1), padded to the same length.

    Softmax rows (S = 3):
      s0 e0: [0.8, 0.1, 0.1] right, [0.3, 0.2, 0.5] wrong        -> pooled [1.1, .3, .6]  right
      s0 e1: [0, 0.1, 0.9] wrong, [0, .6, .4] x2 right           -> pooled [0, 1.3, 1.7] wrong
      s1 e0: [0.45, 0.55, 0] x2 right, [0.99, 0.01, 0] wrong      -> pooled [1.89, 1.11, 0] wrong
    step accuracy 5 / 8, pooled accuracy 1 / 3 (a majority vote would get s0 e1 and s1 e0 right).
    """
    s0 = make_sample([2, 3], [0, 1], C=3)
    s1 = make_sample([3], [1], C=3)
    batch = batching.collate([s0, s1])
    eps = 1e-12
    probs = np.full((2, 5, 3), 1.0 / 3.0)
    probs[0] = [[0.8, 0.1, 0.1], [0.3, 0.2, 0.5], [eps, 0.1, 0.9], [eps, 0.6, 0.4], [eps, 0.6, 0.4]]
    probs[1, :3] = [[0.45, 0.55, eps], [0.45, 0.55, eps], [0.99, 0.01, eps]]
    return batch, logits_from_probs(probs)


def test_pooled_and_step_accuracy_differ_as_derived():
    batch, logits = hand_built_batch()
    assert metrics.step_accuracy(logits, batch, return_counts=True) == (5, 8)
    assert metrics.pooled_accuracy(logits, batch, return_counts=True) == (1, 3)
    assert metrics.pooled_accuracy(logits, batch) == pytest.approx(1 / 3)
    assert metrics.step_accuracy(logits, batch) == pytest.approx(5 / 8)


def test_masks_ignore_padding_even_nan():
    batch, logits = hand_built_batch()
    ce = metrics.cross_entropy(logits, batch.y, batch.mask)
    poisoned = logits.copy()
    poisoned[1, 3:] = np.nan                            # padding steps of sample 1
    assert metrics.cross_entropy(poisoned, batch.y, batch.mask) == ce
    assert metrics.step_accuracy(poisoned, batch, return_counts=True) == (5, 8)
    assert metrics.pooled_accuracy(poisoned, batch, return_counts=True) == (1, 3)
    # padding logits that would score as "right" for label 0 must not count either
    right_on_pad = logits.copy()
    right_on_pad[1, 3:] = [50.0, 0.0, 0.0]
    assert metrics.step_accuracy(right_on_pad, batch, return_counts=True) == (5, 8)


def test_cross_entropy_is_mean_nll_over_real_steps_and_stable():
    rng = np.random.default_rng(0)
    batch = batching.collate([make_sample([2, 1, 3], [0, 2, 1], C=3), make_sample([1, 1], [1, 1], C=3)])
    logits = rng.standard_normal((2, batch.n_steps, 5))
    expected = []
    for b in range(2):
        for t in range(batch.n_steps):
            if batch.mask[b, t]:
                z = logits[b, t]
                expected.append(np.log(np.sum(np.exp(z))) - z[batch.y[b, t]])
    assert metrics.cross_entropy(logits, batch.y, batch.mask) == pytest.approx(np.mean(expected), rel=1e-12)
    # a huge common offset changes nothing (log-softmax subtracts the max first)
    big = metrics.cross_entropy(logits + 1e4, batch.y, batch.mask)
    assert np.isfinite(big) and big == pytest.approx(np.mean(expected), rel=1e-9)
    # a confidently right step costs ~0, not NaN
    sharp = np.zeros((1, 1, 3)); sharp[0, 0, 2] = 1e3
    assert metrics.cross_entropy(sharp, np.array([[2]]), np.array([[True]])) == 0.0


def random_batch(rng, n_samples, max_elements, max_steps, n_labels):
    """A collated batch of random samples (1..max_elements elements of 1..max_steps steps, labels
    in [0, n_labels), C = n_labels input classes) and random logits [B, T, n_labels]."""
    samples = []
    for _ in range(n_samples):
        n_el = int(rng.integers(1, max_elements + 1))
        samples.append(make_sample(rng.integers(1, max_steps + 1, n_el), rng.integers(0, n_labels, n_el),
                                   C=n_labels))
    batch = batching.collate(samples)
    return batch, 2.0 * rng.standard_normal((n_samples, batch.n_steps, n_labels))


def pooled_accuracy_slow(logits, batch):
    """selectivbench.md section 5, literally: per sample, per element, sum softmax over its steps, argmax vs label."""
    right = total = 0
    for b in range(logits.shape[0]):
        for n in np.unique(batch.element[b][batch.mask[b]]):
            steps = np.flatnonzero((batch.element[b] == n) & batch.mask[b])
            z = logits[b, steps]
            p = np.exp(z - z.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            right += int(np.argmax(p.sum(axis=0)) == batch.y[b, steps[0]])
            total += 1
    return right, total


def test_pooled_accuracy_matches_literal_definition_on_random_batches():
    rng = np.random.default_rng(1)
    for _ in range(5):
        batch, logits = random_batch(rng, n_samples=4, max_elements=7, max_steps=3, n_labels=6)
        assert metrics.pooled_accuracy(logits, batch, return_counts=True) == pooled_accuracy_slow(logits, batch)


def test_after_distractor_accuracy_counts_only_flagged_steps():
    sample = make_sample([2, 2, 1], [0, 1, 2], C=3, distractor_after=(1, 3))
    batch = batching.collate([sample])
    probs = np.full((1, 5, 3), 0.1)
    probs[0, :, 0] = 0.8                                # predicts label 0 everywhere
    logits = logits_from_probs(probs)
    assert metrics.after_distractor_accuracy(logits, batch, return_counts=True) == (1, 2)   # steps 1 (y=0), 3 (y=1)
    assert metrics.step_accuracy(logits, batch, return_counts=True) == (2, 5)
    none = batching.collate([make_sample([1, 1], [0, 1], C=3)])
    assert np.isnan(metrics.after_distractor_accuracy(np.zeros((1, 2, 3)), none))


def test_shape_errors_name_the_argument():
    batch, logits = hand_built_batch()
    with pytest.raises(ValueError, match=r"logits must have shape \[B, T, S\]"):
        metrics.pooled_accuracy(logits[0], batch)
    with pytest.raises(ValueError, match=r"y must have shape \[B, T\]"):
        metrics.step_accuracy(logits[:, :4], batch)
    with pytest.raises(ValueError, match=r"mask must have shape"):
        metrics.cross_entropy(logits, batch.y, batch.mask[:, :4])
    with pytest.raises(ValueError, match=r"y on real steps must lie in \[0, S\)"):
        metrics.cross_entropy(logits[..., :1], batch.y, batch.mask)
    inconsistent = batching.collate([make_sample([2], [0], C=3)])
    object.__setattr__(inconsistent, "y", np.array([[0, 1]]))
    with pytest.raises(ValueError, match="different labels"):
        metrics.pooled_accuracy(np.zeros((1, 2, 3)), inconsistent)


def test_metrics_on_real_expanded_samples():
    """Oracle logits (one-hot of y) score 1 everywhere; a label shift on inserted steps only hurts
    the per-step accuracy, not the pooled one when the token step is confident enough."""
    from linrec_ref.tasks import presets
    config = presets.get_preset("t2-small", amb=6, L=24)
    batch = batching.collate(list(presets.dataset(config, "train", 4, seed=1)))
    S = int(batch.y.max()) + 2
    oracle = np.zeros((*batch.y.shape, S))
    b, t = np.nonzero(batch.mask)
    oracle[b, t, batch.y[b, t]] = 20.0
    assert metrics.pooled_accuracy(oracle, batch) == 1.0 and metrics.step_accuracy(oracle, batch) == 1.0
    assert metrics.cross_entropy(oracle, batch.y, batch.mask) < 1e-6
    shifted = oracle.copy()
    inserted = batch.mask & ~batch.is_token
    bi, ti = np.nonzero(inserted)
    shifted[bi, ti] = 0.0
    shifted[bi, ti, S - 1] = 1.0                  # inserted steps lean (weakly) to a wrong class
    n_real, n_inserted = int(batch.mask.sum()), int(inserted.sum())
    assert n_inserted > 0
    assert metrics.step_accuracy(shifted, batch, return_counts=True) == (n_real - n_inserted, n_real)
    assert metrics.pooled_accuracy(shifted, batch) == 1.0


def after_reset_slow(logits, batch, window):
    """Literally: per sample, walk the elements; count those 1..window elements after a '#'."""
    right = total = 0
    for b in range(logits.shape[0]):
        last_reset = None
        for n in np.unique(batch.element[b][batch.mask[b]]):
            steps = np.flatnonzero((batch.element[b] == n) & batch.mask[b])
            z = logits[b, steps]
            p = np.exp(z - z.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            label = batch.y[b, steps[0]]
            if last_reset is not None and 1 <= n - last_reset <= window:
                total += 1
                right += int(np.argmax(p.sum(axis=0)) == label)
            if label == metrics.RESET_ID:
                last_reset = n
    return right, total


def test_after_reset_accuracy_matches_literal_definition():
    rng = np.random.default_rng(3)
    counted = 0
    for window in (1, 2, 5):
        for _ in range(5):
            batch, logits = random_batch(rng, n_samples=3, max_elements=13, max_steps=2, n_labels=4)
            got = metrics.after_reset_accuracy(logits, batch, window, return_counts=True)
            assert got == after_reset_slow(logits, batch, window)
            counted += got[1]
    assert counted > 0                                  # the random batches did contain resets
    # no '#' in any sample: nothing counts
    batch = batching.collate([make_sample([1, 1, 1], [1, 2, 3], C=4)])
    assert np.isnan(metrics.after_reset_accuracy(np.zeros((1, 3, 4)), batch))
    with pytest.raises(ValueError, match="window must be an integer >= 1"):
        metrics.after_reset_accuracy(np.zeros((1, 3, 4)), batch, 0)


def test_after_reset_accuracy_does_not_cross_samples():
    """A '#' at the end of sample 0 says nothing about the first elements of sample 1."""
    batch = batching.collate([make_sample([1, 1], [1, 0], C=3), make_sample([1, 1], [1, 2], C=3)])
    assert np.isnan(metrics.after_reset_accuracy(np.zeros((2, 2, 3)), batch))
    batch = batching.collate([make_sample([1, 1, 1, 1], [0, 1, 2, 1], C=3)])
    probs = np.full((1, 4, 3), 0.1)
    probs[0, :, 1] = 0.8                                # predicts 1 everywhere
    assert metrics.after_reset_accuracy(logits_from_probs(probs), batch, 2, return_counts=True) == (1, 2)


def test_offset_accuracy_by_position_inside_elements():
    # elements of 3, 1 and 2 steps: offsets 0 1 2 | 0 | 0 1
    batch = batching.collate([make_sample([3, 1, 2], [0, 1, 2], C=3)])
    probs = np.full((1, 6, 3), 0.1)
    probs[0, :, 0] = 0.8                                # right on element 0 only
    right, total = metrics.offset_accuracy(logits_from_probs(probs), batch)
    assert total.tolist() == [3, 2, 1] and right.tolist() == [1, 1, 1]
    # summed over offsets it is the step accuracy
    assert (right.sum(), total.sum()) == metrics.step_accuracy(logits_from_probs(probs), batch, return_counts=True)
