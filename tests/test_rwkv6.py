"""rwkv6-specific tests: the read-before-update convention, the bonus, the GLA shift identity,
split-and-carry with the bonus, and rwkv6's own validation errors.

The generic registry suite (test_equivalence.py) sweeps forms, regimes, dtypes and varlen; this
file covers what is particular to RWKV-6.
"""
import numpy as np
import pytest

from linrec_ref import testing
from linrec_ref._validation import InputError
from linrec_ref.ops import gla, rwkv6

REGIMES = rwkv6.SPEC.regimes
FORMS = rwkv6.SPEC.forms


def _definition(r, k, v, w, u, scale, S0):
    """A direct float64 transcription of the definition: one sequence, one head, one t at a time.

    o_t = scale * (S_{t-1}^T r_t + (r_t . (u * k_t)) v_t);  S_t = diag(exp(w_t)) S_{t-1} + k_t v_t^T
    """
    B, T, H, _ = r.shape
    o = np.zeros(v.shape)
    S_final = np.zeros(S0.shape)
    for b in range(B):
        for h in range(H):
            S = S0[b, h].copy()
            for t in range(T):
                o[b, t, h] = scale * (S.T @ r[b, t, h] + np.dot(r[b, t, h], u[h] * k[b, t, h]) * v[b, t, h])
                S = np.diag(np.exp(w[b, t, h])) @ S + np.outer(k[b, t, h], v[b, t, h])
            S_final[b, h] = S
    return o, S_final


@pytest.mark.parametrize("regime", REGIMES)
def test_recurrent_is_the_definition(regime):
    x = testing.make_inputs("rwkv6", regime, T=13, initial_state=True, seed=1)
    scale = x["r"].shape[-1] ** -0.5                      # scale=None means K^-1/2
    o, ht = testing.run(rwkv6, "recurrent", x)
    o_def, ht_def = _definition(x["r"], x["k"], x["v"], x["w"], x["u"], scale, x["initial_state"])
    testing.assert_close(o, o_def, name="o")
    testing.assert_close(ht, ht_def, name="final state")


def test_first_token_reads_only_the_initial_state_and_the_bonus():
    """Read before update: o_1 = scale (S_0^T r_1 + (r_1 . (u k_1)) v_1), whatever k_1 and w_1 do
    to the state. With S_0 = 0 and u = 0 the first output is exactly zero."""
    x = testing.make_inputs("rwkv6", "typical", T=5, initial_state=True, seed=2)
    scale = x["r"].shape[-1] ** -0.5
    r1, k1, v1, S0 = x["r"][:, 0], x["k"][:, 0], x["v"][:, 0], x["initial_state"]
    expected = scale * (np.einsum("bhk,bhkv->bhv", r1, S0)
                        + np.sum(r1 * x["u"] * k1, axis=-1)[..., None] * v1)
    o, _ = rwkv6.recurrent(**x)
    testing.assert_close(o[:, 0], expected, name="o_1")

    # without the bonus and the initial state, token 1 cannot see itself: o_1 == 0 exactly,
    # and token 2 sees only token 1 (S_1 = k_1 v_1^T).
    y = {**x, "u": np.zeros_like(x["u"]), "initial_state": None}
    o, _ = rwkv6.recurrent(**y)
    assert np.all(o[:, 0] == 0)
    expected_2 = scale * np.sum(x["r"][:, 1] * k1, axis=-1)[..., None] * v1
    testing.assert_close(o[:, 1], expected_2, name="o_2 with u = 0")


def test_step_decodes_like_the_recurrent_form():
    x = testing.make_inputs("rwkv6", "hard_reset", T=9, initial_state=True, seed=3)
    o, ht = testing.run(rwkv6, "recurrent", x)
    S = x["initial_state"]
    for t in range(9):
        o_t, S = rwkv6.step(*(x[n][:, t] for n in "rkvw"), x["u"], S)
        testing.assert_close(o_t, o[:, t], name=f"step {t}")
    testing.assert_close(S, ht, name="state after decoding")


def test_default_scale_is_inverse_sqrt_of_K():
    x = testing.make_inputs("rwkv6", "typical", T=6, seed=4)
    K = x["r"].shape[-1]
    o_default, _ = rwkv6.recurrent(**x)
    o_explicit, _ = rwkv6.recurrent(**x, scale=K ** -0.5)
    testing.assert_close(o_default, o_explicit)
    o_one, _ = rwkv6.recurrent(**x, scale=1.0)            # the paper's scale
    testing.assert_close(o_one * K ** -0.5, o_default)


def _shift(x):
    """x'_t = x_{t-1}, x'_1 = 0 along T."""
    return np.concatenate([np.zeros_like(x[:, :1]), x[:, :-1]], axis=1)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("regime", REGIMES)
def test_without_bonus_rwkv6_is_gla_read_one_step_earlier(form, regime):
    """u = 0: rwkv6's output is gla's (q = r) on inputs shifted by one token (k'_t = k_{t-1},
    v'_t = v_{t-1}, g'_t = w_{t-1}, zeros at t = 1); gla's final state is S_{T-1}, and one gla
    step with (k_T, v_T, w_T) from it gives rwkv6's final state S_T."""
    x = testing.make_inputs("rwkv6", regime, T=19, initial_state=True, seed=12)
    x["u"] = np.zeros_like(x["u"])
    o, ht = testing.run(rwkv6, form, x, chunk_size=5)
    o_gla, h_gla = gla.recurrent(x["r"], _shift(x["k"]), _shift(x["v"]), _shift(x["w"]),
                                 initial_state=x["initial_state"], output_final_state=True)
    testing.assert_close(o, o_gla, name="o vs gla on shifted inputs")
    _, h_before_last = testing.run(rwkv6, "recurrent",
                                   {n: (a[:, :-1] if n in "rkvw" else a) for n, a in x.items()})
    testing.assert_close(h_gla, h_before_last, name="gla final state = S_{T-1}")
    _, h_last = gla.step(x["r"][:, -1], x["k"][:, -1], x["v"][:, -1], x["w"][:, -1], state=h_gla)
    testing.assert_close(ht, h_last, name="S_T = one gla step from S_{T-1}")


def test_attention_matrix_is_strictly_causal_decay_plus_bonus_diagonal():
    x = testing.make_inputs("rwkv6", "hard_reset", T=12, seed=13)
    scale = x["r"].shape[-1] ** -0.5
    M = rwkv6.attention_matrix(x["r"], x["k"], x["w"], x["u"])           # [B, H, T, T]
    o, _ = rwkv6.recurrent(**x)
    testing.assert_close(np.einsum("bhts,bshv->bthv", M, x["v"]), o, name="o = M v")
    bonus = scale * np.einsum("bthk,hk,bthk->bht", x["r"], x["u"], x["k"])
    testing.assert_close(np.diagonal(M, axis1=-2, axis2=-1), bonus, name="diagonal = bonus")
    assert np.all(np.triu(M, 1) == 0)
    M0 = rwkv6.attention_matrix(x["r"], x["k"], x["w"], np.zeros_like(x["u"]))
    assert np.array_equal(np.tril(M0, -1), np.tril(M, -1))            # u only touches the diagonal
    # entry by entry from the definition: decay exp(w_{s+1} + .. + w_{t-1}) between s < t
    b, h, t, s = 1, 0, 9, 3
    decay = np.exp(x["w"][b, s + 1:t, h].sum(axis=0))                  # [K]
    testing.assert_close(M[b, h, t, s], scale * np.sum(x["r"][b, t, h] * x["k"][b, s, h] * decay))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("regime", REGIMES)
def test_split_and_carry_with_the_bonus(form, regime):
    """Two calls carrying the state equal one call; the bonus gradient du is the sum of the
    two halves' du (u is shared by all tokens), with the second half's dS_0 as the first's dht."""
    T, cut = 23, 10
    x = testing.make_inputs("rwkv6", regime, T=T, initial_state=True, seed=5)
    first = {n: (a[:, :cut] if n in "rkvw" else a) for n, a in x.items()}
    second = {n: (a[:, cut:] if n in "rkvw" else a) for n, a in x.items()}

    o, ht = testing.run(rwkv6, form, x, chunk_size=4)
    o1, h1 = testing.run(rwkv6, form, first, chunk_size=4)
    o2, h2 = testing.run(rwkv6, form, {**second, "initial_state": h1}, chunk_size=4)
    testing.assert_close(np.concatenate([o1, o2], axis=1), o, name="o")
    testing.assert_close(h2, ht, name="final state")

    do, dht = testing.cotangents(o, ht, seed=6)
    g = testing.vjp(rwkv6, form, x, do, dht, chunk_size=4)
    g2 = testing.vjp(rwkv6, form, {**second, "initial_state": h1}, do[:, cut:], dht, chunk_size=4)
    g1 = testing.vjp(rwkv6, form, first, do[:, :cut], g2["initial_state"], chunk_size=4)
    testing.assert_close(g1["u"] + g2["u"], g["u"], name="du")
    testing.assert_close(g1["initial_state"], g["initial_state"], name="d initial_state")
    for n in "rkvw":
        testing.assert_close(np.concatenate([g1[n], g2[n]], axis=1), g[n], name=f"d{n}")


@pytest.mark.parametrize("regime", REGIMES)
def test_recurrent_vjp_matches_finite_differences(regime):
    x = testing.make_inputs("rwkv6", regime, T=11, initial_state=True, seed=7)
    do, dht = testing.cotangents(*testing.run(rwkv6, "recurrent", x), seed=8)

    def loss(inputs):
        o, ht = testing.run(rwkv6, "recurrent", inputs)
        return testing.inner(do, o) + testing.inner(dht, ht)

    grads = testing.vjp(rwkv6, "recurrent", x, do, dht)
    for c in testing.fd_check(loss, x, grads, ["r", "k", "v", "w", "u", "initial_state"]).values():
        assert c.ok, str(c)


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("bad_shape", [(2, 9), (3, 8), (2, 2, 8), (1, 16, 2, 8)])
def test_u_must_be_one_vector_per_head(bad_shape):
    """u is [H, K]: not per token, not per batch element, K and H must match r."""
    x = testing.make_inputs("rwkv6", "typical", T=16, seed=9)     # H = 2, K = 8
    x["u"] = np.zeros(bad_shape)
    for form in FORMS:
        with pytest.raises(InputError, match=r"rwkv6: argument 'u'"):
            getattr(rwkv6, form)(**x)
    with pytest.raises(InputError, match=r"rwkv6: argument 'u'"):
        rwkv6.step(*(x[n][:, 0] for n in "rkvw"), x["u"])


def test_w_must_be_a_log_decay():
    x = testing.make_inputs("rwkv6", "typical", T=4, seed=10)
    x["w"][0, 2, 1, 3] = 0.25                                     # a decay > 1
    with pytest.raises(InputError, match=r"rwkv6: argument 'w' is a log decay and must be <= 0"):
        rwkv6.recurrent(**x)
    with pytest.raises(InputError, match=r"argument 'w'"):
        rwkv6.step(*(x[n][:, 2] for n in "rkvw"), x["u"])


def test_hard_reset_forgets_everything_before_it():
    """w = -inf at step t wipes S_{t-1} before k_t v_t^T is written: the outputs from t+1 on do
    not depend on the initial state or on tokens before t."""
    x = testing.make_inputs("rwkv6", "typical", T=8, initial_state=True, seed=11)
    x["w"][:, 4] = -np.inf
    o, ht = testing.run(rwkv6, "recurrent", x)
    y = {**x, "initial_state": 10 * x["initial_state"]}
    y["k"] = x["k"].copy()
    y["k"][:, :4] *= -3.0
    o_y, ht_y = testing.run(rwkv6, "recurrent", y)
    assert np.array_equal(o[:, 5:], o_y[:, 5:])
    assert np.array_equal(ht, ht_y)
    assert not np.allclose(o[:, 4], o_y[:, 4])          # step 4 still reads S_3 (before the reset)
