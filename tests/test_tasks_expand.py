"""SelectivBench time expansion and presets (selectivbench.md sections 4, 6-7):
statistics and exact structure."""
import math

import numpy as np
import pytest

from linrec_ref.tasks import expand as ex
from linrec_ref.tasks import grammar as gm
from linrec_ref.tasks import presets as P
from linrec_ref.tasks import sequences as sq


@pytest.fixture(scope="module")
def g12():
    return gm.make_grammar(12, 12, 12, 1)


def _seq(g, idx, L=64):
    letters, labels, states = sq.sample_sequence(g, 1, idx, L, 1, L)
    return letters, labels, states


def test_labels_elements_and_tokens(g12):
    letters, labels, _ = _seq(g12, 3)
    s = ex.expand(letters, labels, g12, np.random.default_rng(0), gap_min=0.1, gap_max=0.4)
    T = s.n_steps
    assert s.x.shape == (T, 13) and s.x.dtype == np.float32
    assert s.is_token.sum() == 64
    assert np.array_equal(s.letters, letters) and np.array_equal(s.labels, labels)
    assert np.array_equal(s.y, labels[s.element])                  # every step carries its element's label
    assert np.all(np.diff(s.element) >= 0) and s.element[0] == 0 and s.element[-1] == 63
    assert np.array_equal(np.flatnonzero(s.is_token), np.flatnonzero(np.diff(np.r_[-1, s.element])))
    counts = np.bincount(s.element)                                # 1 token + k in 1..4 blanks
    assert counts.min() >= 2 and counts.max() <= 5
    blank = ~s.is_token
    assert np.all(s.x[blank] == 0) and np.all(s.step_class[blank] == -1)
    assert np.array_equal(s.x[s.is_token].argmax(1), letters) and np.all(s.x[s.is_token].sum(1) == 1)


def test_training_gap_length_distribution(g12):
    """k = ceil(round(U(0.1, 1.0), 1) / 0.1): P(1) = P(10) = 0.05/0.9, P(2..9) = 0.1/0.9."""
    letters, labels, _ = _seq(g12, 5, L=64)
    rng = np.random.default_rng(123)
    ks = np.concatenate([np.bincount(ex.expand(letters, labels, g12, rng, gap_min=0.1, gap_max=1.0).element) - 1
                         for _ in range(300)])                      # 19200 gaps
    freq = np.bincount(ks, minlength=11)[1:] / ks.size
    expected = np.array([0.5] + [1.0] * 8 + [0.5]) / 9
    assert ks.min() == 1 and ks.max() == 10
    se = np.sqrt(expected * (1 - expected) / ks.size)
    assert np.all(np.abs(freq - expected) < 5 * se), (freq, expected)


def test_gap_coin_and_start(g12):
    letters, labels, _ = _seq(g12, 7)
    rng = np.random.default_rng(4)
    samples = [ex.expand(letters, labels, g12, rng, gap_start=16, gap_prob=0.3, gap_fixed=2) for _ in range(300)]
    k = np.stack([np.bincount(s.element) - 1 for s in samples])   # [300, 64]
    assert np.all(k[:, :16] == 0)
    assert set(np.unique(k[:, 16:])) == {0, 2}
    rate = (k[:, 16:] == 2).mean()
    assert abs(rate - 0.3) < 5 * math.sqrt(0.3 * 0.7 / k[:, 16:].size)


def test_distractor_legality(g12):
    letters, labels, states = _seq(g12, 11)
    rng = np.random.default_rng(5)
    seen = 0
    for _ in range(100):
        s = ex.expand(letters, labels, g12, rng, mode="distractor", gap_start=0, gap_prob=0.5, gap_fixed=3)
        d = s.is_distractor
        assert np.array_equal(d, ~s.is_token)
        st = states[s.element[d]]
        assert not np.any(g12.legal_next[st, s.step_class[d]])      # never a letter that may follow
        assert np.array_equal(s.x[d].argmax(1), s.step_class[d]) and np.all(s.x[d].sum(1) == 1)
        # after_distractor: the token step right after a run of distractor steps
        prev = np.r_[False, d[:-1]]
        assert np.array_equal(s.after_distractor, prev & s.is_token)
        seen += d.sum()
    assert seen > 1000
    # distractors use every illegal class of a state (uniform draw over that set)
    s0 = int(states[0])
    illegal = set(np.flatnonzero(~g12.legal_next[s0]).tolist())
    lab = np.array([labels[0]] * 40)
    draws = ex.expand(np.full(40, letters[0]), lab, g12, rng, mode="distractor", gap_fixed=30).step_class
    drawn = set(draws[draws >= 0].tolist()) - {int(letters[0])}
    assert drawn <= illegal and len(drawn) == len(illegal - {int(letters[0])})


def test_noise_range(g12):
    letters, labels, _ = _seq(g12, 2)
    a = 0.2
    s = ex.expand(letters, labels, g12, np.random.default_rng(1), gap_fixed=4, noise=a)
    one_hot = np.zeros_like(s.x)
    lit = s.step_class >= 0
    one_hot[np.flatnonzero(lit), s.step_class[lit]] = 1
    zero_entries = s.x[one_hot == 0]
    assert zero_entries.min() >= 0 and zero_entries.max() < a
    assert zero_entries.max() > 0.9 * a and abs(zero_entries.mean() - a / 2) < 0.01
    ones = s.x[one_hot == 1].astype(np.float64)
    assert ones.min() >= 1 and ones.max() <= 1 + a + 2 ** -23


def test_reproducible_per_seed_index_epoch():
    c = P.get_preset("t2-small")
    a = P.make_sample(c, 1, 5, epoch=0)
    b = P.make_sample(c, 1, 5, epoch=0)
    e = P.make_sample(c, 1, 5, epoch=1)
    assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)
    assert np.array_equal(a.labels, e.labels)                     # same sequence ...
    assert a.n_steps != e.n_steps or not np.array_equal(a.x, e.x)  # ... fresh expansion


def test_splits_disjoint_and_compat():
    c = P.get_preset("t1-small")
    tr = P.sample_indices(c, "train", 1000)
    te = P.sample_indices(c, "test", 1000)
    assert tr[0] == 1 and not set(tr.tolist()) & set(te.tolist())
    train = {tuple(s.labels) for s in P.dataset("t1-small", "train", 40, seed=2)}
    test = {tuple(s.labels) for s in P.dataset("t1-small", "test", 40, seed=2)}
    assert not train & test
    ctr = [s.labels for s in P.dataset("t1-small", "train", 5, seed=2, overlap_compat=True)]
    cte = [s.labels for s in P.dataset("t1-small", "test", 5, seed=2, overlap_compat=True)]
    assert all(np.array_equal(u, v) for u, v in zip(ctr, cte))   # the released code's overlap
    assert P.sample_indices(c, "test", 3, overlap_compat=True).tolist() == [0, 1, 2]


def test_presets_match_spec_tables():
    for name in ("1a", "1b", "2", "3", "4"):
        c = P.get_preset(name)
        assert (c.L, c.L_max, c.amb) == (200, 200, 40)
    for name in ("t1-small", "t2-small", "t3-small", "t4-small"):
        c = P.get_preset(name)
        assert (c.L, c.L_max, c.amb) == (64, 64, 12)
    assert P.get_preset("1a", amb=20).amb == 20 and P.get_preset("t1-small").amb_values == (6, 8, 10, 12, 16)
    assert P.get_preset("2").test.gap_fixed == 10 and P.get_preset("2").noise == 0.2
    assert P.get_preset("2").train.gap_max == 1.0 and P.get_preset("t2-small").train.gap_max == 0.4
    assert P.get_preset("4").test_gaps == (10, 20, 50, 100) and P.get_preset("4", test_gap=50).test.gap_fixed == 50
    assert P.get_preset("t4-small").test_gaps == (4, 8, 20, 40)
    r3 = P.get_preset("3").train
    assert (r3.mode, r3.gap_start, r3.gap_prob, r3.gap_fixed) == ("distractor", 50, 0.1, 1)
    assert P.get_preset("t3-small").train.gap_start == 16
    assert P.get_preset("t1-small", L=32).L_max == 32
    assert P.get_preset("t1-small", train_gap_prob=0.5).train.gap_prob == 0.5


@pytest.mark.parametrize("kwargs,name", [
    (dict(noise=-0.1), "noise"),
    (dict(train_gap_min=-1.0), "gap_min"),
    (dict(test_gap=-2), "gap_fixed"),
    (dict(L_min=70), "L_min"),
    (dict(train_mode="loud"), "mode"),
    (dict(bogus=1), "bogus"),
    (dict(n_amb=13), "n_amb"),
])
def test_bad_presets(kwargs, name):
    with pytest.raises(ValueError, match=name):
        P.get_preset("t1-small", **kwargs)


def test_unknown_preset_and_bad_expand(g12):
    with pytest.raises(ValueError, match="unknown preset"):
        P.get_preset("5")
    with pytest.raises(ValueError, match="noise"):
        ex.expand([1], [1], g12, np.random.default_rng(0), noise=-1)
    with pytest.raises(ValueError, match="gap_max"):
        ex.expand([1], [1], g12, np.random.default_rng(0), gap_min=0.5, gap_max=0.2)
