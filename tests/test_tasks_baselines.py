"""SelectivBench reference lines (linrec_ref.tasks.baselines): n-gram lookups and the Bayes filter."""
from collections import defaultdict

import numpy as np
import pytest

from linrec_ref.tasks import baselines


class TinyGrammar:
    """A hand-built grammar with the fields baselines reads (same meaning as grammar.Grammar).

    Letters A (class 1, ambiguous: copies A0, A1) and B (class 2); states in grammar order
    [B, A0, A1, #]; labels: A0 = 1, A1 = 2, B = 3, # = 0. Edges (one successor per letter):
      B  -> A0 (p .3), #  (p .7)
      A0 -> B (.5), A1 (.25), # (.25)
      A1 -> A0 (.6), # (.4)
    Start states B, A0, A1: the first letter "A" of a string is ambiguous between A0 and A1.
    """

    state_letter = np.array([2, 1, 1, 0])
    state_label = np.array([3, 1, 2, 0])
    start_states = np.array([0, 1, 2])
    succ = (np.array([1, 3]), np.array([0, 2, 3]), np.array([1, 3]), np.array([], int))
    succ_prob = (np.array([.3, .7]), np.array([.5, .25, .25]), np.array([.6, .4]), np.array([]))
    end_state = 3
    n_input_classes = 3


def accepted_strings(g, L_min, L_max):
    """All strings (state paths from a start state to '#') with L_min <= len <= L_max and their
    probability P(start) * prod P(transitions), renormalised by the acceptance probability."""
    out = []

    def walk(path, p):
        if len(path) > L_max:
            return
        if path[-1] == g.end_state:
            if len(path) >= L_min:
                out.append((tuple(path), p))
            return
        for s, q in zip(g.succ[path[-1]], g.succ_prob[path[-1]]):
            walk(path + [int(s)], p * q)

    for s in g.start_states:
        walk([int(s)], 1.0 / len(g.start_states))
    z = sum(p for _, p in out)
    return [(path, p / z) for path, p in out]


def sequences_brute_force(g, L, L_min, L_max):
    """Every length-L sequence (concatenated accepted strings, truncated) with its probability."""
    strings = accepted_strings(g, L_min, L_max)
    out = []

    def extend(path, p):
        if len(path) >= L:
            out.append((tuple(path[:L]), p))
            return
        for s, q in strings:
            extend(path + list(s), p * q)

    extend([], 1.0)
    return out


def brute_force_posteriors(g, L, L_min, L_max):
    """{letter prefix (tuple): {label of its last element: P(label | prefix)}}."""
    joint = defaultdict(lambda: defaultdict(float))
    for path, p in sequences_brute_force(g, L, L_min, L_max):
        letters = tuple(int(g.state_letter[s]) for s in path)
        for t in range(L):
            joint[letters[:t + 1]][int(g.state_label[path[t]])] += p
    post = {}
    for prefix, by_label in joint.items():
        z = sum(by_label.values())
        post[prefix] = {lab: v / z for lab, v in by_label.items()}
    return post


@pytest.mark.parametrize("L_min, L_max", [(1, 4), (3, 4), (2, 3)])
def test_bayes_filter_matches_brute_force_enumeration(L_min, L_max):
    g, L = TinyGrammar(), 7
    post = brute_force_posteriors(g, L, L_min, L_max)
    full = sorted(prefix for prefix in post if len(prefix) == L)
    assert len(full) > 20
    letters = np.array(full)
    result = baselines.bayes_filter(g, letters, L_min=L_min, L_max=L_max)
    assert result.n_impossible == 0
    for i, seq in enumerate(full):
        for t in range(L):
            p = post[seq[:t + 1]]
            best = max(p.values())
            assert result.confidence[i, t] == pytest.approx(best, abs=1e-12)
            assert p[int(result.predicted[i, t])] == pytest.approx(best, abs=1e-12)


def test_length_prior_changes_the_posterior():
    """With L_min = 3 the string "A #" is impossible, so after "A" the posterior between A0 and
    A1 depends on their continuations; dropping the length factor must give a different answer."""
    g = TinyGrammar()
    letters = np.array([[1, 2, 0, 1, 1, 1, 0]])
    with_prior = baselines.bayes_filter(g, letters, L_min=3, L_max=4)
    without = baselines.bayes_filter(g, letters, L_min=3, L_max=4, use_length_prior=False)
    assert not np.allclose(with_prior.confidence, without.confidence)


def test_bayes_filter_flags_impossible_letters():
    g = TinyGrammar()
    letters = np.array([[2, 2, 0, 1]])              # B -> B is not an edge
    result = baselines.bayes_filter(g, letters, L_min=1, L_max=4)
    np.testing.assert_array_equal(result.predicted[0, :1], [3])
    assert result.predicted[0, 1] == -1 and result.n_impossible == 2   # B and the "#" after it
    assert result.predicted[0, 3] in (1, 2)                             # restarts after "#"


def test_acceptance_table_is_a_probability_of_the_remaining_length():
    g = TinyGrammar()
    table = baselines.transition_table(g)
    f = baselines.remaining_length_law(table, 60)
    np.testing.assert_allclose(f.sum(axis=1), 1.0, atol=1e-9)          # every state reaches "#"
    assert f[1, 1] == pytest.approx(0.25)                               # A0 -> # directly
    assert f[1, 2] == pytest.approx(0.5 * 0.7 + 0.25 * 0.4)             # A0 -> B -> #, A0 -> A1 -> #
    acc = baselines.acceptance_table(table, 3, 4)
    assert acc[1, 1] == pytest.approx(f[1, 2] + f[1, 3])                # total length 3 or 4
    assert acc[3, 3] == 1.0 and acc[3, 2] == 0.0                        # "#" after 3 / 2 letters


# ---------------------------------------------------------------------------------------------
# n-gram lookup on a tiny deterministic example

def test_ngram_lookup_and_back_off():
    """Letter 1's label is fixed by the previous letter (start -> 7, after 2 -> 5, after 3 -> 6);
    letters 2 and 3 always have labels 8 and 9."""
    letters = np.array([[1, 2, 1, 3, 1]])
    labels = np.array([[7, 8, 5, 9, 6]])
    one = baselines.fit_ngram(letters, labels, 1, n_input_classes=5)
    two = baselines.fit_ngram(letters, labels, 2, n_input_classes=5)
    # 1-gram: letter 1 saw labels 7, 5, 6 once each -> the smallest, 5
    np.testing.assert_array_equal(one.predict(letters), [[5, 8, 5, 9, 5]])
    np.testing.assert_array_equal(two.predict(letters), labels)
    # unseen 2-gram contexts back off: (start, 3) -> 1-gram of 3 = 9; (3, 1) seen -> 6;
    # (1, 1) unseen -> 1-gram of 1 = 5; letter 4 never seen -> most frequent label (tie -> 5)
    np.testing.assert_array_equal(two.predict(np.array([[3, 1, 1, 4]])), [[9, 6, 5, 5]])
    assert baselines.element_accuracy(one.predict(letters), labels) == pytest.approx(3 / 5)


def test_ngram_majority_label_and_errors():
    letters = np.array([[1, 1, 1], [1, 2, 2]])
    labels = np.array([[4, 3, 3], [4, 6, 6]])
    model = baselines.fit_ngram(letters, labels, 1, n_input_classes=3)
    np.testing.assert_array_equal(model.predict(np.array([[1, 2]])), [[3, 6]])   # 3 twice vs 4 twice -> 3; then 6
    with pytest.raises(ValueError, match="n must be an integer in 1..4"):
        baselines.fit_ngram(letters, labels, 5, n_input_classes=3)
    with pytest.raises(ValueError, match="labels must have shape"):
        baselines.fit_ngram(letters, labels[:, :2], 1, n_input_classes=3)
    with pytest.raises(ValueError, match="n_input_classes"):
        baselines.fit_ngram(letters, labels, 1, n_input_classes=2)


# ---------------------------------------------------------------------------------------------
# on sampled data of a real (small) grammar

def sampled_elements(g, seed, indices, L, L_min, L_max):
    from linrec_ref.tasks import sequences
    out = [sequences.sample_sequence(g, seed, int(i), L, L_min, L_max) for i in indices]
    return np.stack([o[0] for o in out]), np.stack([o[1] for o in out])


def test_baselines_are_ordered_on_a_small_grammar():
    """1-gram <= 2-gram <= 3-gram <= 4-gram <= Bayes (held-out sequences, seeded; the gaps are
    several percent, far above the sampling noise of 100 x 48 test elements)."""
    from linrec_ref.tasks import grammar
    g = grammar.make_grammar(6, 6, 6, seed=3)
    L, L_min, L_max = 48, 1, 48
    train = sampled_elements(g, 3, range(1, 401), L, L_min, L_max)
    letters, labels = sampled_elements(g, 3, range(10_001, 10_101), L, L_min, L_max)
    acc = [baselines.element_accuracy(baselines.fit_ngram(*train, n, g.n_input_classes).predict(letters), labels)
           for n in range(1, 5)]
    bayes = baselines.bayes_filter(g, letters, L_min, L_max)
    assert bayes.n_impossible == 0
    acc.append(baselines.element_accuracy(bayes.predicted, labels))
    assert all(a < b for a, b in zip(acc, acc[1:-1])), acc
    assert acc[-2] <= acc[-1], acc
    assert acc[0] < 0.6 and acc[-1] > 0.95, acc


def test_element_data_matches_the_datasets_samples():
    from linrec_ref.tasks import presets
    config = presets.get_preset("t3-small", amb=6, L=24)
    for split in ("train", "test"):
        letters, labels = baselines.element_data(config, split, 3, seed=2)
        samples = list(presets.dataset(config, split, 3, seed=2))
        np.testing.assert_array_equal(letters, np.stack([s.letters for s in samples]))
        np.testing.assert_array_equal(labels, np.stack([s.labels for s in samples]))


def test_per_element_accuracy_equals_pooled_accuracy_of_a_constant_per_element_predictor():
    """The module docstring's claim: a predictor giving one label per element scores the same
    under the paper's pooled metric on the expanded samples (here with distractor steps)."""
    from linrec_ref.tasks import batching, metrics, presets
    config = presets.get_preset("t3-small", amb=6, L=40, train_gap_start=2, train_gap_prob=0.5)
    train = baselines.element_data(config, "train", 50, seed=2)
    samples = list(presets.dataset(config, "train", 20, seed=2, start=50))
    letters = np.stack([s.letters for s in samples])
    labels = np.stack([s.labels for s in samples])
    predicted = baselines.fit_ngram(*train, 2, 7).predict(letters)           # [N, L]
    batch = batching.collate(samples)
    assert (~batch.is_token & batch.mask).sum() > 50                         # inserted steps exist
    S = int(max(labels.max(), predicted.max())) + 1
    logits = np.zeros((*batch.y.shape, S))
    b, t = np.nonzero(batch.mask)
    logits[b, t, predicted[b, batch.element[b, t]]] = 5.0
    expected = baselines.element_accuracy(predicted, labels)
    assert 0.3 < expected < 0.99
    assert metrics.pooled_accuracy(logits, batch) == pytest.approx(expected, abs=1e-15)


def test_report_keys_and_ordering():
    from linrec_ref.tasks import presets
    r = baselines.report(presets.get_preset("t1-small", amb=6, L=32), seed=1, n_train=200, n_test=50)
    assert set(r) >= {"1-gram", "2-gram", "3-gram", "4-gram", "bayes", "n_train", "n_test"}
    values = [r[k] for k in ("1-gram", "2-gram", "3-gram", "4-gram", "bayes")]
    assert values == sorted(values) and r["bayes_impossible"] == 0 and r["n_test_elements"] == 50 * 32
    with pytest.raises(ValueError, match="n_train"):
        baselines.report("t1-small", n_train=0)
