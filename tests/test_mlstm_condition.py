"""testing.mlstm_condition: the per-token condition number of mlstm's output.

It must equal the direct O(T^2) sums over the window it reads exactly, bound them from above
beyond it, predict the float32 error of a correct evaluation within a modest factor (so that a
kernel writer can tell rounding on an ill-posed input from a bug), and it backs the redraw check
of the mlstm input generator.
"""
import numpy as np
import pytest

import linrec_ref
from linrec_ref import InputError, testing
from linrec_ref.ops import mlstm

NAMES = ("q", "k", "v", "i", "f")
F32_UNIT_ROUNDOFF = float(np.finfo(np.float32).eps) / 2


def _arrays(x: dict) -> dict:
    return {n: x[n] for n in NAMES + ("initial_state",) if n in x}


def _direct_sums(q, k, v, i, f, scale, initial_state=None):
    """The measure written out: for every token the unstabilised terms of the normaliser
    z_t = sum_s w_ts q^_t . k_s (+ the initial state's term) and of the numerator, summed plainly.
    Only for gates whose exp stays in range (float64)."""
    B, T, H, K = q.shape
    normaliser, numerator, log_z = (np.empty((B, T, H)) for _ in range(3))
    for b in range(B):
        for h in range(H):
            if initial_state is None:
                C0, n0, m0 = np.zeros((K, v.shape[-1])), np.zeros(K), 0.0
            else:
                C0, n0, m0 = (s[b, h] for s in initial_state)
            for t in range(T):
                q_hat = scale * q[b, t, h]
                # log weights as direct sums of the gates (a hard reset f = -inf gives w = 0)
                w = np.exp([f[b, s + 1:t + 1, h].sum() + i[b, s, h] for s in range(t + 1)])
                w0 = np.exp(f[b, :t + 1, h].sum() + m0)                          # initial state
                z_terms = w * (k[b, :t + 1, h] @ q_hat)                          # [t + 1]
                num_terms = z_terms[:, None] * v[b, :t + 1, h]                   # [t + 1, V]
                z = z_terms.sum() + w0 * (n0 @ q_hat)
                z_abs = np.abs(z_terms).sum() + w0 * abs(n0 @ q_hat)
                num = num_terms.sum(0) + w0 * (q_hat @ C0)
                num_abs = np.abs(num_terms).sum(0) + w0 * np.abs(q_hat @ C0)
                normaliser[b, t, h] = z_abs / max(abs(z), 1.0)
                numerator[b, t, h] = num_abs.max() / np.abs(num).max()
                log_z[b, t, h] = np.log(abs(z))
    return normaliser, numerator, log_z


def _ill_conditioned(seed=1, T=256, qk=1e3, decay=0.999, input_gate_std=3.0, B=1, H=2, K=16, V=16):
    """Slow decay, large input gates and large |q|, |k|: the normaliser cancels (float64)."""
    rng = np.random.default_rng(seed)
    return {"q": qk * rng.standard_normal((B, T, H, K)), "k": qk * rng.standard_normal((B, T, H, K)),
            "v": rng.standard_normal((B, T, H, V)), "i": input_gate_std * rng.standard_normal((B, T, H)),
            "f": np.full((B, T, H), np.log(decay))}


def _token_error(o, ref):
    """max_j |o_tj - ref_tj| / max_j |ref_tj| per token and head: [B, T, H]."""
    return np.abs(o.astype(np.float64) - ref).max(-1) / np.abs(ref).max(-1)


@pytest.mark.parametrize("regime", ["typical", "slow_decay", "fast_forgetting", "hard_reset"])
@pytest.mark.parametrize("with_state", [False, True])
def test_equals_the_direct_sums_within_its_window(regime, with_state):
    x = _arrays(testing.make_inputs("mlstm", regime, T=40, initial_state=with_state, seed=2))
    ref = _direct_sums(**x, scale=x["q"].shape[-1] ** -0.5)
    got = testing.mlstm_condition(**x, block=20)                  # T <= 2 block: exact
    for name, r in zip(got._fields, ref):
        testing.assert_close(getattr(got, name), r, name=name)


@pytest.mark.parametrize("regime", ["typical", "slow_decay", "fast_forgetting"])
def test_beyond_two_blocks_it_bounds_the_direct_sums_from_above(regime):
    x = _arrays(testing.make_inputs("mlstm", regime, T=150, initial_state=True, seed=3))
    normaliser, numerator, log_z = _direct_sums(**x, scale=x["q"].shape[-1] ** -0.5)
    got = testing.mlstm_condition(**x, block=16)
    testing.assert_close(got.log_normaliser, log_z, name="log_normaliser")  # the sums themselves: exact
    for name, exact in (("normaliser", normaliser), ("numerator", numerator)):
        ratio = getattr(got, name) / exact
        assert ratio.min() >= 1 - 1e-12, (name, ratio.min())
        assert ratio.max() <= 4, (name, ratio.max())              # "a few times" at most
    first_window = slice(0, 32)                                   # tokens of blocks 0 and 1
    testing.assert_close(got.normaliser[:, first_window], normaliser[:, first_window])


def test_float32_error_of_a_correct_evaluation_is_predicted_and_a_bug_is_not():
    """A float32 chunkwise or parallel evaluation errs by at most ~50 u kappa_t at every token
    (u the float32 unit roundoff; 100 is the test's bound) on inputs whose kappa reaches several
    hundred, where float32 rounding alone costs up to 3e-4; an off-by-one in the input gate errs
    by 1e6 u kappa_t and more at the median token."""
    for seed, decay, std in ((1, 0.999, 3.0), (2, 0.9999, 5.0), (3, 0.99, 2.0)):
        x = _ill_conditioned(seed=seed, decay=decay, input_gate_std=std)
        kappa = testing.mlstm_condition(**x).output                                 # [B, T, H]
        assert kappa.max() > 300, kappa.max()                     # the inputs are ill-conditioned
        ref, _ = linrec_ref.mlstm(**x, form="recurrent")
        x32 = {n: a.astype(np.float32) for n, a in x.items()}
        for form in ("chunkwise", "parallel"):
            o, _ = linrec_ref.mlstm(**x32, form=form)
            ratio = _token_error(o, ref) / (F32_UNIT_ROUNDOFF * kappa)
            assert ratio.max() <= 100, (seed, form, ratio.max())
        shifted_i = dict(x32, i=np.roll(x32["i"], 1, axis=1))    # the bug: i_{t-1} in place of i_t
        o_bug, _ = linrec_ref.mlstm(**shifted_i, form="chunkwise")
        ratio = _token_error(o_bug, ref) / (F32_UNIT_ROUNDOFF * kappa)
        assert np.median(ratio) > 1000, (seed, np.median(ratio))


def test_well_conditioned_inputs_measure_small():
    x = _arrays(testing.make_inputs("mlstm", "fast_forgetting", T=64, seed=4))
    c = testing.mlstm_condition(**x)
    # sum |terms| >= |sum terms|: the numerator's measure is >= 1; the normaliser's is >= 1 or
    # |z_t| where the floor max(|z_t|, 1) binds
    assert c.numerator.min() >= 1 - 1e-12
    assert np.all(c.normaliser >= np.minimum(np.exp(c.log_normaliser), 1) * (1 - 1e-12))
    assert c.output.max() < 2 * mlstm.MAX_CANCELLATION


@pytest.mark.parametrize("regime", ["typical", "slow_decay"])
def test_make_inputs_keeps_every_token_conditioned_and_off_the_kink(regime):
    """Beyond 2 CHECK_BLOCK tokens the generator checks the upper bound, so the exact measure of
    every token it did not rescale is within MAX_CANCELLATION; a rescaled token has
    |n_t . q^_t| = 1/2 exactly. Every token is KINK_MARGIN away from the floor's kink."""
    x = _arrays(testing.make_inputs("mlstm", regime, T=3 * mlstm.CHECK_BLOCK + 5, seed=5))
    exact = testing.mlstm_condition(**x, block=x["q"].shape[1])
    rescaled = np.isclose(exact.log_normaliser, np.log(0.5), rtol=0, atol=1e-9)
    assert np.all(np.abs(exact.log_normaliser) >= mlstm.KINK_MARGIN * 0.999)
    assert np.all((exact.normaliser <= mlstm.MAX_CANCELLATION) | rescaled)


def test_validation_and_edge_sizes():
    x = _arrays(testing.make_inputs("mlstm", T=5, initial_state=True))
    with pytest.raises(InputError, match=r"mlstm: argument 'k' has T=3 at axis 1"):
        testing.mlstm_condition(**dict(x, k=x["k"][:, :3]))
    with pytest.raises(InputError, match=r"mlstm: argument 'f' is a log decay and must be <= 0"):
        testing.mlstm_condition(**dict(x, f=1 - x["f"]))
    with pytest.raises(TypeError, match=r"argument 'block' must be an integer >= 1, got 0"):
        testing.mlstm_condition(**x, block=0)
    empty = testing.mlstm_condition(**{n: (a[:, :0] if n in NAMES else a) for n, a in x.items()})
    assert all(a.shape == (2, 0, 2) for a in empty)
    one = testing.mlstm_condition(**{n: (a[:, :1] if n in NAMES else a) for n, a in x.items()})
    testing.assert_close(tuple(one), _direct_sums(**{n: (a[:, :1] if n in NAMES else a)
                                                     for n, a in x.items()}, scale=8 ** -0.5))
    scaled = testing.mlstm_condition(**x, scale=0.25)
    testing.assert_close(tuple(scaled), _direct_sums(**x, scale=0.25))
