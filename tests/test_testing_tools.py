"""The testing tools must be able to fail: they are what every other test relies on."""
import numpy as np
import pytest

from linrec_ref import testing
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


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("side", ["actual", "reference"])
def test_compare_reports_nonfinite_entries_and_the_finite_statistics(bad, side):
    """A NaN / inf on either side fails, is counted with its first place, and the statistics
    stay those of the finite entries (they used to read 0 or inf)."""
    ref = np.array([[1.0, -2.0], [4.0, 3.0]])
    got = ref + np.array([[0.0, 1e-3], [0.0, 0.0]])
    poisoned = got.copy() if side == "actual" else ref.copy()
    poisoned[1, 1] = bad
    c = testing.compare(*((poisoned, ref) if side == "actual" else (got, poisoned)), "float32", name="o")
    assert not c.ok
    counted = c.actual_nonfinite if side == "actual" else c.reference_nonfinite
    other = c.reference_nonfinite if side == "actual" else c.actual_nonfinite
    assert counted == testing.NonFinite(1, "o[1, 1]") and other.count == 0
    assert c.max_abs == pytest.approx(1e-3) and c.max_ref == 4.0 and c.max_rel == pytest.approx(2.5e-4)
    assert c.rms_ratio == pytest.approx(np.sqrt(1e-6 / 3) / np.sqrt(21 / 3))
    assert f"{side} 1 (first at o[1, 1])" in str(c) and str(c).endswith("FAIL")


def test_compare_passes_the_same_nonfinite_value_at_the_same_place_only():
    ref = {"g": np.array([-np.inf, -0.5, np.nan]), "o": np.array([np.inf, 2.0])}
    assert testing.compare({"g": ref["g"].copy(), "o": ref["o"].copy()}, ref).ok
    c = testing.compare({"g": np.array([-np.inf, -0.5, np.nan]), "o": np.array([-np.inf, 2.0])}, ref)
    assert not c.ok and c.actual_nonfinite == testing.NonFinite(3, "value.g[0]")  # +inf vs -inf
    assert not testing.compare({"g": np.array([-0.5, -np.inf, np.nan]), "o": ref["o"]}, ref).ok  # moved
    z = np.array([1 + 1j, complex(np.inf, 0.0)])
    assert testing.compare(z.copy(), z).ok
    assert not testing.compare(np.array([1 + 1j, complex(np.inf, 1.0)]), z).ok
    # a mismatch in one leaf is not hidden by the other leaf being fine
    assert not testing.compare({"g": ref["g"], "o": np.array([np.nan, 2.0])}, ref).ok


def test_an_unknown_tier_names_the_valid_tiers():
    with pytest.raises(ValueError, match=r"unknown tolerance tier 'float16'; expected one of "
                                         r"'float64', 'float32', 'fd'"):
        testing.compare(np.zeros(2), np.zeros(2), "float16")
    with pytest.raises(ValueError, match="unknown tolerance tier"):
        testing.assert_close(np.zeros(2), np.zeros(2), tier="f32")
    assert testing.compare(np.zeros(2), np.zeros(2), testing.Tolerance(0.0, 0.0, "exact")).ok


def test_rms_ratio_matches_definition():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal(100)
    got = ref + 1e-3 * rng.standard_normal(100)
    c = testing.compare(got, ref, "float32")
    assert c.rms_ratio == pytest.approx(np.sqrt(np.mean((got - ref) ** 2)) / np.sqrt(np.mean(ref ** 2)))


def test_fd_check_catches_a_wrong_gradient():
    x = testing.make_inputs("simple_gla", "typical", T=6, initial_state=True)
    o, ht = testing.run("simple_gla", "recurrent", x)
    rng = np.random.default_rng(0)
    do, dht = testing.cotangents(o, ht, rng=rng)
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
