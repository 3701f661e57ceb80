"""SelectivBench grammar and sequences (selectivbench.md sections 2-3) against a literal, slow reference.

The reference below follows selectivbench.md step by step with Python lists and the numpy calls it
names (G.permutation(len(cand))[0], G.random(), G.choice(array(states), 4, replace=False),
R.integers(4), R.random(), bisect_right(cumsum(probs), u)); the fast implementation (precomputed
successor arrays, skipped no-op permutations) must reproduce it exactly.
"""
import random
from bisect import bisect_right

import numpy as np
import pytest

from linrec_ref.tasks import grammar as gm
from linrec_ref.tasks import sequences as sq


# ----------------------------------------------------------------------------------------------
# literal reference of selectivbench.md sections 2-3
# ----------------------------------------------------------------------------------------------

def ref_grammar(A, n_amb, Dp, seed, tau=None, n_start=4, max_tries=100000):
    """Spec 2, step by step. Returns (states, transitions [(src, tgt, prob)], start names, ambiguous)."""
    tau = 0.4 / Dp if tau is None else tau
    G = np.random.default_rng(seed)
    py = random.Random()
    py.seed(int(G.integers(0, 100)))                                     # step 1
    letters = list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"[:A])  # step 2
    for _ in range(max_tries):                                           # step 3
        ambiguous = py.sample(letters, n_amb)                            # 3a
        states = list(letters)                                           # 3b
        state_letter = list(letters)
        for a in ambiguous:
            pos = states.index(a)
            del states[pos]
            del state_letter[pos]
            for j in range(Dp):
                states.append(a + str(j))
                state_letter.append(a)
        states.append("#")
        state_letter.append("#")
        alphabet = letters + ["#"]
        edges = []                                                       # 3c
        for i in range(len(states)):
            for a in alphabet:
                cand = [j for j in range(len(states)) if state_letter[j] == a]
                pick = cand[G.permutation(len(cand))[0]]
                if G.random() < len(cand) * tau:
                    edges.append((i, pick))
        end = states.index("#")                                          # 3d
        edges = [(i, j) for (i, j) in edges if i != end]
        starts = list(G.choice(np.array(states), n_start, replace=False))  # 3e
        reach = {end}                                                    # 3f
        changed = True
        while changed:
            changed = False
            for (i, j) in edges:
                if j in reach and i not in reach:
                    reach.add(i)
                    changed = True
        if len(reach) == len(states) and "#" not in starts:
            edges.sort()                                                 # step 4: source, then target
            out_deg = {i: sum(1 for (s, _) in edges if s == i) for i in range(len(states))}
            transitions = [(states[i], states[j], 1.0 / out_deg[i]) for (i, j) in edges]
            return states, transitions, [str(s) for s in starts], ambiguous
    raise RuntimeError("no valid grammar")


def ref_sample(states, transitions, starts, seed, idx, L, L_min, L_max):
    """Spec 3, step by step: the state names of sample idx."""
    R = np.random.default_rng(seed * idx)

    def one_string():
        string = [starts[R.integers(4)]]
        while string[-1] != "#":
            allowed = [t for t in transitions if t[0] == string[-1]]
            if len(allowed) == 1:
                string.append(allowed[0][1])
            else:
                cum = np.cumsum([t[2] for t in allowed])
                string.append(allowed[bisect_right(cum, R.random())][1])
            if len(string) > L_max:
                return []
        return string

    seq = []
    while len(seq) < L:
        for _ in range(10 ** 4):
            s = one_string()
            if L_min <= len(s) <= L_max:
                break
        seq += s
    return seq[:L]


def ref_labels(letters, ambiguous, Dp):
    """Hidden-state id of every state name: letters in class order, copies consecutive, '#' = 0."""
    ids, nxt = {"#": 0}, 1
    for a in letters:
        if a in ambiguous:
            for j in range(Dp):
                ids[a + str(j)] = nxt
                nxt += 1
        else:
            ids[a] = nxt
            nxt += 1
    return ids


CONFIGS = [  # (A, n_amb, Dp, seed, tau)
    (5, 2, 3, 1, None),
    (6, 6, 6, 2, None),
    (4, 0, 1, 3, 0.5),
    (8, 3, 2, 4, None),
    (7, 7, 7, 1, None),
    (10, 4, 3, 7, 0.25),
    (12, 12, 12, 1, None),   # t1-small / t2-small grammar size
]


@pytest.mark.parametrize("A,n_amb,Dp,seed,tau", CONFIGS)
def test_grammar_matches_literal_reference(A, n_amb, Dp, seed, tau):
    states, transitions, starts, ambiguous = ref_grammar(A, n_amb, Dp, seed, tau)
    g = gm.make_grammar(A, n_amb, Dp, seed, tau=tau)
    assert g.states == states
    assert g.ambiguous == ambiguous
    assert [g.states[s] for s in g.start_states] == starts
    assert [(g.states[i], g.states[j]) for i, j in g.transitions] == [(t[0], t[1]) for t in transitions]
    for i in range(g.n_states):
        mine = [(g.states[j], p) for j, p in zip(g.succ[i], g.succ_prob[i])]
        assert mine == [(t[1], t[2]) for t in transitions if t[0] == g.states[i]]
    ids = ref_labels(list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"[:A]), ambiguous, Dp)
    assert [ids[s] for s in g.states] == g.state_label.tolist()
    assert g.n_classes == n_amb * Dp + (A - n_amb) + 1
    assert g.n_input_classes == A + 1


@pytest.mark.parametrize("A,n_amb,Dp,seed,tau", CONFIGS)
def test_first_samples_match_literal_reference(A, n_amb, Dp, seed, tau):
    states, transitions, starts, ambiguous = ref_grammar(A, n_amb, Dp, seed, tau)
    g = gm.make_grammar(A, n_amb, Dp, seed, tau=tau)
    ids = ref_labels(g.letters[:-1], ambiguous, Dp)
    for idx in (1, 2, 3, 5):
        for (L, L_min, L_max) in ((30, 1, 30), (25, 3, 8)):
            ref = ref_sample(states, transitions, starts, seed, idx, L, L_min, L_max)
            letters, labels, st = sq.sample_sequence(g, seed, idx, L, L_min, L_max)
            assert [g.states[s] for s in st] == ref
            assert labels.tolist() == [ids[s] for s in ref]
            assert letters.tolist() == [gm.letter_class(s[0]) for s in ref]


def test_pinned_tiny_grammar():
    """A=5, n_amb=2, Dp=3, seed=1: values printed by the literal reference above (section 2)."""
    g = gm.make_grammar(5, 2, 3, 1)
    assert g.ambiguous == PINNED_AMBIGUOUS
    assert g.states == PINNED_STATES
    assert [g.states[s] for s in g.start_states] == PINNED_STARTS
    assert [(g.states[i], g.states[j]) for i, j in g.transitions] == PINNED_EDGES
    letters, labels, _ = sq.sample_sequence(g, 1, 1, 12, 1, 12)
    assert letters.tolist() == PINNED_LETTERS_IDX1
    assert labels.tolist() == PINNED_LABELS_IDX1


def test_state_order_and_labels_by_hand():
    """Spec 2.3b and the class ids, checked on the state names alone (independent of the draws)."""
    g = gm.make_grammar(5, 2, 3, 1)
    amb = g.ambiguous
    plain = [a for a in "ABCDE" if a not in amb]
    assert g.states == plain + [f"{amb[0]}{j}" for j in range(3)] + [f"{amb[1]}{j}" for j in range(3)] + ["#"]
    assert g.letters == list("ABCDE") + ["#"]
    assert g.state_letter[-1] == 0 and g.state_label[-1] == 0
    # letter classes: 'A' = 1 ... 'Z' = 26, 'a' = 27 ... 'z' = 52
    assert [gm.letter_class(c) for c in "AZaz#"] == [1, 26, 27, 52, 0]
    # labels are a bijection onto 0..S-1 and copies of one letter are consecutive
    assert sorted(g.state_label.tolist()) == list(range(g.n_classes))
    for a in amb:
        ids = [g.state_label[g.states.index(f"{a}{j}")] for j in range(3)]
        assert ids == list(range(ids[0], ids[0] + 3))


def test_successor_table_and_legality():
    g = gm.make_grammar(8, 3, 2, 4)
    for i, j in g.transitions:
        assert g.successor(i, g.state_letter[j]) == j
        assert g.legal_next[i, g.state_letter[j]]
    n_legal = int(g.legal_next[:-1].sum())
    assert n_legal == g.n_edges                      # one successor per (state, letter)
    assert g.legal_next[g.end_state].tolist() == [c in set(g.state_letter[g.start_states].tolist())
                                                  for c in range(g.n_input_classes)]
    assert all(len(g.succ[i]) >= 1 for i in range(g.n_states - 1))   # every state reaches '#'
    assert len(g.succ[g.end_state]) == 0


def test_sequence_structure():
    g = gm.make_grammar(6, 6, 6, 2)
    letters, labels, st = sq.sample_sequence(g, 2, 9, 200, 1, 200)
    assert letters.shape == labels.shape == st.shape == (200,)
    # every consecutive pair is an edge of the grammar, or '#' followed by a start state
    for a, b in zip(st[:-1], st[1:]):
        if a == g.end_state:
            assert b in g.start_states
        else:
            assert g.successor(a, g.state_letter[b]) == b
    # sample idx is a pure function of (seed, idx)
    again = sq.sample_sequence(g, 2, 9, 200, 1, 200)
    assert all(np.array_equal(u, v) for u, v in zip((letters, labels, st), again))


@pytest.mark.parametrize("kwargs,name", [
    (dict(n_letters=5, n_amb=6, depth=2), "n_amb"),
    (dict(n_letters=5, n_amb=2, depth=0), "depth"),
    (dict(n_letters=53, n_amb=2, depth=2), "n_letters"),
    (dict(n_letters=0, n_amb=0, depth=2), "n_letters"),
    (dict(n_letters=3, n_amb=0, depth=1, n_start=4), "n_start"),
    (dict(n_letters=5, n_amb=2, depth=2, tau=-0.1), "tau"),
])
def test_bad_grammar_parameters(kwargs, name):
    with pytest.raises(ValueError, match=name):
        gm.make_grammar(seed=1, **kwargs)


def test_try_limit():
    # tau tiny: almost no edges, so no state reaches '#'; the try limit must end the search
    with pytest.raises(ValueError, match="max_tries"):
        gm.make_grammar(5, 2, 2, seed=1, tau=1e-9, max_tries=3)


def test_bad_lengths():
    g = gm.make_grammar(5, 2, 3, 1)
    with pytest.raises(ValueError, match="L_min"):
        sq.sample_sequence(g, 1, 1, 10, 12, 10)
    with pytest.raises(ValueError, match="seed"):
        sq.sample_sequence(g, 0, 1, 10, 1, 10)
    with pytest.raises(ValueError, match="L_min"):
        # no string of this grammar is shorter than 2 states (a start state, then at least '#')
        sq.sample_string(g, np.random.default_rng(0), 1, 1, max_tries=50)


# values printed by ref_grammar / ref_sample (the literal reference above) for A=5, n_amb=2, Dp=3, seed=1
PINNED_AMBIGUOUS = ['C', 'D']
PINNED_STATES = ['A', 'B', 'E', 'C0', 'C1', 'C2', 'D0', 'D1', 'D2', '#']
PINNED_STARTS = ['D2', 'B', 'C2', 'C0']
PINNED_EDGES = [('A', 'D1'), ('B', 'B'), ('B', 'E'), ('B', 'C2'), ('E', 'B'), ('E', 'E'), ('E', 'C1'),
                ('C0', 'E'), ('C0', 'D1'), ('C1', 'D0'), ('C2', '#'), ('D0', 'C0'), ('D0', '#'),
                ('D1', 'A'), ('D1', 'C0'), ('D1', 'D0'), ('D1', '#'), ('D2', 'A'), ('D2', 'B'), ('D2', 'D0')]
# sample idx 1 (L = L_max = 12): states B C2 # C2 # D2 D0 C0 E C1 D0 C0; labels by hand: A=1, B=2,
# C0..C2=3..5, D0..D2=6..8, E=9, '#'=0
PINNED_LETTERS_IDX1 = [2, 3, 0, 3, 0, 4, 4, 3, 5, 3, 4, 3]
PINNED_LABELS_IDX1 = [2, 5, 0, 5, 0, 8, 6, 3, 9, 4, 6, 3]


def test_block_walk_leaves_generator_as_scalar_walk():
    """walk_string draws its doubles as a block and rewinds: the generator must end exactly where
    the scalar loop of section 3 leaves it, including the buffered 32-bit half of integers()."""
    g = gm.make_grammar(6, 3, 3, 2)
    cum = [np.cumsum(p) for p in g.succ_prob]
    fast, slow = np.random.default_rng(77), np.random.default_rng(77)
    for _ in range(300):
        got = sq.walk_string(g, fast, 6)
        s = int(g.start_states[slow.integers(4)])
        want = [s]
        while s != g.end_state:
            if len(g.succ[s]) == 1:
                s = int(g.succ[s][0])
            else:
                s = int(g.succ[s][bisect_right(cum[s], slow.random())])
            want.append(s)
            if len(want) > 6:
                want = []
                break
        assert got == want
        assert fast.bit_generator.state == slow.bit_generator.state
