"""The testing tools must be able to fail: they are what every other test relies on."""
import numpy as np
import pytest

from linrec_ref import check, testing
from linrec_ref.ops import simple_gla


def test_compare_reports_the_numbers_and_fails_outside_the_tier():
    ref = np.array([1.0, -2.0, 4.0])
    c = testing.compare(ref + np.array([0.0, 0.0, 4e-9]), ref, "float64")
    assert not c.ok
    assert c.max_abs == pytest.approx(4e-9) and c.max_ref == 4.0 and c.max_rel == pytest.approx(1e-9)
    assert testing.compare(ref * (1 + 1e-12), ref, "float64").ok
    with pytest.raises(AssertionError, match=r"max_abs=4.000e-09 .* FAIL"):
        testing.assert_close(ref + np.array([0.0, 0.0, 4e-9]), ref)


def test_compare_rejects_broadcasting_and_nan():
    with pytest.raises(ValueError, match=r"shape \(3,\) differs from the reference's \(1, 3\)"):
        testing.compare(np.zeros(3), np.zeros((1, 3)))
    assert not testing.compare(np.array([np.nan, 1.0]), np.array([0.0, 1.0])).ok


def test_rms_ratio_matches_definition():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal(100)
    got = ref + 1e-3 * rng.standard_normal(100)
    c = testing.compare(got, ref, "float32")
    assert c.rms_ratio == pytest.approx(np.sqrt(np.mean((got - ref) ** 2)) / np.sqrt(np.mean(ref ** 2)))


def test_fd_check_catches_a_wrong_gradient():
    x = testing.make_inputs("simple_gla", "typical", T=6, initial_state=True)
    o, ht = check.run_form("simple_gla", "recurrent", x)
    rng = np.random.default_rng(0)
    do, dht = check.cotangents("simple_gla", o, ht, rng)
    grads = simple_gla.recurrent_vjp(**x, do=do, dht=dht)
    loss = lambda inp: testing.inner(do, simple_gla.recurrent(**inp, output_final_state=True)[0]) + \
        testing.inner(dht, simple_gla.recurrent(**inp, output_final_state=True)[1])
    good = testing.fd_check(loss, x, grads, ["g", "k"])
    assert all(c.ok for c in good.values())
    wrong = dict(grads, g=grads["g"] * (1 + 1e-4))
    assert not testing.fd_check(loss, x, wrong, ["g"])["g"].ok


@pytest.mark.parametrize("regime", sorted(testing.DECAY_REGIMES))
def test_regimes_produce_what_they_promise(regime):
    rng = np.random.default_rng(0)
    g = testing.log_decay(rng, (3, 200, 4), regime, np.float64)
    a = np.exp(g)
    assert (g <= 0).all()
    if regime == "slow_decay":
        assert a.min() >= 0.999
    elif regime == "fast_forgetting":
        assert a.max() <= 0.3 and a.min() >= 0.05
    elif regime == "typical":
        assert 0.5 <= a.min() and a.max() <= 0.99
    else:
        assert np.isneginf(g).any() and not np.isneginf(g[:, 0]).any()
        assert np.isneginf(g[:, 100]).all()  # T // 2 always resets, for every batch row and head


def test_make_inputs_is_reproducible_and_signed():
    a = testing.make_inputs("simple_gla", "typical", seed=3, T=50)
    b = testing.make_inputs("simple_gla", "typical", seed=3, T=50)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert (a["q"] < 0).any() and (a["q"] > 0).any()
    with pytest.raises(ValueError, match="regime 'bogus' does not apply"):
        testing.make_inputs("simple_gla", "bogus")


def test_an_all_zero_leaf_is_judged_against_the_other_leaves():
    ref = {"dq": np.array([0.0, 0.0]), "dk": np.array([2.0, -3.0])}
    noise = {"dq": np.array([1e-16, -2e-16]), "dk": np.array([2.0, -3.0])}
    assert testing.compare(noise, ref, "float64").ok
    assert not testing.compare({"dq": np.array([1e-9, 0.0]), "dk": ref["dk"]}, ref, "float64").ok
    assert not testing.compare(np.array([1e-16]), np.array([0.0]), "float64").ok  # nothing else to go by
    # a leaf that is rounding noise on the joint scale is judged at the joint floor
    noisy_ref = {"dq": np.array([1e-16, -1e-16]), "dk": np.array([2.0, -3.0])}
    assert testing.compare({"dq": np.array([-1e-16, 2e-16]), "dk": ref["dk"]}, noisy_ref).ok
    assert testing.compare(np.array([2e-16]), np.array([1e-16]), zero_scale=3.0).ok
    assert not testing.compare(np.array([2e-11]), np.array([1e-16]), zero_scale=3.0).ok
