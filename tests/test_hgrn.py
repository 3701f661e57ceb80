"""hgrn-specific tests: exact hard resets in every form and backward, the gate identity, the
per-channel attention matrix, the identity with simple_gla, the two chunkwise paths (factored
and exact, chosen per one-channel chunk), and hgrn's validation errors.

The generic sweep (forms vs recurrent, vjps vs recurrent and finite differences, regimes, dtypes,
chunk sizes, varlen) is tests/test_equivalence.py.
"""
import numpy as np
import pytest

from linrec_ref import InputError, _decay, testing
from linrec_ref._scan import reverse_cumsum
from linrec_ref.ops import hgrn, simple_gla
from linrec_ref.testing import assert_close

FORMS = ("recurrent", "parallel", "chunkwise")
CHUNK_SIZES = {"recurrent": (None,), "parallel": (None,), "chunkwise": (1, 5, 16, 64)}
CASES = [(f, C) for f in FORMS for C in CHUNK_SIZES[f]]


def _reset_inputs(T=37, seed=0):
    """hard_reset inputs with an initial state; r = T // 2 is always a reset step (g_r = -inf)."""
    x = testing.make_inputs("hgrn", "hard_reset", T=T, seed=seed, initial_state=True)
    r = T // 2
    assert np.all(np.isneginf(x["g"][:, r]))
    return x, r


def _with_other_past(x, r, seed=1):
    """The same inputs with a different past: new x before r and a new initial state."""
    rng = np.random.default_rng(seed)
    y = dict(x)
    y["x"] = x["x"].copy()
    y["x"][:, :r] = rng.standard_normal(y["x"][:, :r].shape)
    y["initial_state"] = rng.standard_normal(x["initial_state"].shape)
    return y


# ------------------------------------------------------------------------------ hard reset
@pytest.mark.parametrize("form,C", CASES)
def test_hard_reset_forgets_the_past_exactly(form, C):
    """After a reset the output depends only on later x: bitwise, in every form (no NaN)."""
    x, r = _reset_inputs()
    o1, h1 = testing.run(hgrn, form, x, chunk_size=C)
    o2, h2 = testing.run(hgrn, form, _with_other_past(x, r), chunk_size=C)
    assert np.all(np.isfinite(o1))
    assert np.array_equal(o1[:, r:], o2[:, r:]) and np.array_equal(h1, h2)
    assert not np.array_equal(o1[:, :r], o2[:, :r])  # the perturbation did change the past
    # at the reset step the state is exactly the input
    assert np.array_equal(o1[:, r], x["x"][:, r])


@pytest.mark.parametrize("form,C", CASES)
def test_hard_reset_equals_a_fresh_start(form, C):
    """The suffix from a reset, run alone from any initial state, gives the same outputs."""
    x, r = _reset_inputs()
    o, hT = testing.run(hgrn, form, x, chunk_size=C)
    suffix = {"x": x["x"][:, r:], "g": x["g"][:, r:]}
    o_s, hT_s = testing.run(hgrn, form, suffix, chunk_size=C)  # zero initial state
    assert_close((o_s, hT_s), (o[:, r:], hT), name=f"{form} suffix after reset")


@pytest.mark.parametrize("form,C", CASES)
def test_hard_reset_gradients_are_exact(form, C):
    """Cotangents only after the reset give exactly zero gradient before it (dx, dg, dh0), and
    dg is exactly zero at every reset step whatever the cotangent."""
    x, r = _reset_inputs()
    do, dht = testing.cotangents(*testing.run(hgrn, "recurrent", x), seed=3)
    grads = testing.vjp(hgrn, form, x, do, dht, chunk_size=C)
    assert all(np.all(np.isfinite(v)) for v in grads.values())
    assert np.all(grads["g"][np.isneginf(x["g"])] == 0)

    do_late = do.copy()
    do_late[:, :r] = 0
    late = testing.vjp(hgrn, form, x, do_late, dht, chunk_size=C)
    assert np.all(late["x"][:, :r] == 0)
    assert np.all(late["g"][:, :r + 1] == 0)
    assert np.all(late["initial_state"] == 0)
    # ... and after the reset they equal the gradients of the suffix alone
    suffix = {"x": x["x"][:, r:], "g": x["g"][:, r:]}
    g_s = testing.vjp(hgrn, form, suffix, do[:, r:], dht, chunk_size=C)
    assert_close({"x": late["x"][:, r:], "g": late["g"][:, r + 1:]},
                 {"x": g_s["x"], "g": g_s["g"][:, 1:]}, name=f"{form}_vjp suffix after reset")


# ------------------------------------------------------------------------------ gate identity
@pytest.mark.parametrize("regime", ["slow_decay", "typical", "fast_forgetting"])
def test_gate_identity(regime):
    """dg_t = sum_{u>=t} (o_u do_u - x_u dx_u) + h_T dht: the identity chunked kernels use,
    checked against the recurrent (direct-formula) backward."""
    x = testing.make_inputs("hgrn", regime, T=50, seed=4, initial_state=True)
    o, hT = testing.run(hgrn, "recurrent", x)
    do, dht = testing.cotangents(o, hT, seed=5)
    grads = testing.vjp(hgrn, "recurrent", x, do, dht)
    dG = o * do - x["x"] * grads["x"]                               # [B, T, D]
    dG[:, -1] += hT * dht
    assert_close(reverse_cumsum(dG, axis=1), grads["g"], name="gate identity")


# ------------------------------------------------------------------------------ attention matrix
@pytest.mark.parametrize("regime", ["typical", "hard_reset"])
def test_attention_matrix_is_the_parallel_form(regime):
    x = testing.make_inputs("hgrn", regime, T=23, seed=6)
    M = hgrn.attention_matrix(x["g"])                               # [B, D, T, T]
    B, T, D = x["x"].shape
    assert M.shape == (B, D, T, T)
    assert np.all(np.triu(M, 1) == 0) and np.all(np.diagonal(M, axis1=-2, axis2=-1) == 1)
    o_M = np.einsum("bdts,bsd->btd", M, x["x"])
    assert_close(o_M, hgrn.recurrent(**x)[0], name="M x vs recurrent")


def test_equals_simple_gla_with_one_head_per_channel():
    """hgrn is simple_gla with H = D heads, K = V = 1, q = k = 1, v = x, scale 1."""
    x = testing.make_inputs("hgrn", "typical", T=29, seed=7, initial_state=True)
    B, T, D = x["x"].shape
    ones = np.ones((B, T, D, 1))
    o_s, h_s = simple_gla.recurrent(ones, ones, x["x"][..., None], x["g"], scale=1.0,
                                    initial_state=x["initial_state"][..., None, None],
                                    output_final_state=True)
    o, h = testing.run(hgrn, "chunkwise", x, chunk_size=8)
    assert_close((o, h), (o_s[..., 0], h_s[..., 0, 0]), name="hgrn vs simple_gla")


# ------------------------------------------------------------------------------ chunkwise paths
@pytest.mark.parametrize("regime", hgrn.SPEC.regimes)
@pytest.mark.parametrize("path", ["fast", "exact", "auto"])
def test_both_chunkwise_paths_agree_with_recurrent(regime, path):
    """fast_bound=inf factors every chunk without a -inf gate, 0 makes every chunk exact."""
    bound = {"fast": np.inf, "exact": 0.0, "auto": None}[path]
    x = testing.make_inputs("hgrn", regime, T=45, initial_state=True, seed=11)
    want = testing.run(hgrn, "recurrent", x)
    do, dht = testing.cotangents(*want, seed=12)
    want_grads = testing.vjp(hgrn, "recurrent", x, do, dht)
    for C in (1, 4, 16, 45):
        got = hgrn.chunked_forward(**x, chunk_size=C, fast_bound=bound)
        assert_close(got, want, "float64", f"{path} forward C={C}")
        grads = hgrn.chunked_vjp(**x, do=do, dht=dht, chunk_size=C, fast_bound=bound)
        assert_close(grads, want_grads, "float64", f"{path} vjp C={C}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_path_is_chosen_per_channel_chunk(dtype):
    """A channel that forgets fast, or resets, sends only its own chunks to the exact path;
    the result matches the float64 recurrence either way."""
    C = 64
    x = testing.make_inputs("hgrn", "typical", B=1, T=4 * C, D=6, initial_state=True, seed=13)
    x["g"][:, :, 2] = -10.0                                         # range 640 > FAST_BOUND: exact
    x["g"][0, C + 6, 4] = -np.inf                                   # channel 4, chunk 1: a reset
    fast = _decay.chunk_decay(hgrn._channel_chunks(x["g"].astype(dtype), C)).fast  # [B, D, N]
    want_fast = np.ones((1, 6, 4), dtype=bool)
    want_fast[0, 2, :] = want_fast[0, 4, 1] = False
    assert np.array_equal(fast, want_fast)                          # typical: range ~ 64 * 0.27
    want = testing.run(hgrn, "recurrent", x)
    do, dht = testing.cotangents(*want, seed=12)
    want_grads = testing.vjp(hgrn, "recurrent", x, do, dht)
    xd = {k: v.astype(dtype) for k, v in x.items()}
    tier = testing.tier_for(dtype)
    got = hgrn.chunked_forward(**xd, chunk_size=C)
    assert_close(got, want, tier, "forward")
    grads = hgrn.chunked_vjp(**xd, do=do.astype(dtype), dht=dht.astype(dtype), chunk_size=C)
    assert_close(grads, want_grads, tier, "vjp")
    assert np.all(grads["g"][0, C + 6, 4] == 0)                      # exact 0 at the reset


def test_float32_factored_path_at_the_bound():
    """Chunks just inside FAST_BOUND (the largest exp(-G) the factored path uses, exp(~60) in
    float32) stay within the float32 tier of the float64 recurrence, forward and backward."""
    C = 64
    bound = _decay.FAST_BOUND[np.dtype(np.float32)]
    rng = np.random.default_rng(14)
    x = testing.make_inputs("hgrn", "typical", B=2, T=3 * C, D=8, initial_state=True, seed=14)
    x["g"] = -rng.uniform(0.85, 0.93, x["g"].shape)                  # chunk range 54 .. 59.5
    x32 = {k: v.astype(np.float32) for k, v in x.items()}
    d = _decay.chunk_decay(hgrn._channel_chunks(x32["g"], C))
    assert d.fast.all() and np.max(-np.log(d.total)) > 0.9 * bound
    want = testing.run(hgrn, "recurrent", x)
    do, dht = testing.cotangents(*want, seed=12)
    assert_close(hgrn.chunked_forward(**x32, chunk_size=C), want, "float32", "forward")
    assert_close(hgrn.chunked_vjp(**x32, do=do.astype(np.float32), dht=dht.astype(np.float32),
                                  chunk_size=C),
                 testing.vjp(hgrn, "recurrent", x, do, dht), "float32", "vjp")


# ------------------------------------------------------------------------------ validation
def test_rejects_a_probability_gate():
    x = testing.make_inputs("hgrn", "typical", T=5)
    with pytest.raises(InputError, match=r"hgrn: argument 'g' is a log decay"):
        hgrn.recurrent(x["x"], np.exp(x["g"]) + 0.01)


def test_takes_no_scale():
    x = testing.make_inputs("hgrn", "typical", T=5)
    with pytest.raises(TypeError, match="hgrn: .*scale"):
        hgrn.parallel(**x, scale=1.0)


def test_rejects_mismatched_channels_and_state():
    x = testing.make_inputs("hgrn", "typical", T=5, D=4)
    with pytest.raises(InputError, match=r"hgrn: argument 'g' has D=3"):
        hgrn.recurrent(x["x"], x["g"][..., :3])
    with pytest.raises(InputError, match=r"hgrn: argument 'initial_state'"):
        hgrn.chunkwise(**x, initial_state=np.zeros((x["x"].shape[0], 5)))
    with pytest.raises(InputError, match=r"hgrn: argument 'state'"):
        hgrn.step(x["x"][:, 0], x["g"][:, 0], np.zeros((x["x"].shape[0], 4, 1)))


def test_rejects_complex_input():
    x = testing.make_inputs("hgrn", "typical", T=5)
    with pytest.raises(InputError, match=r"hgrn: argument 'x' has dtype complex128"):
        hgrn.recurrent(x["x"].astype(np.complex128), x["g"])
