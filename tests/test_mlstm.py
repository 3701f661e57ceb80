"""mlstm: what the generic equivalence suite cannot check.

The stabiliser convention (m_0 = 0, final m_T in closed form), the normaliser floor (binding and
free, against the literal unstabilised recurrence), exponential input gates that overflow exp(),
the gradient w.r.t. the stabiliser state m_0 and along the argmax path of m_T, exact hard resets,
the identities of recurrences.md section 4, the scale's placement, and validation errors.
"""
import numpy as np
import pytest

from linrec_ref import testing
from linrec_ref._validation import InputError
from linrec_ref.ops import mlstm as M

REGIMES = M.SPEC.regimes


FORMS = ("recurrent", "parallel", "chunkwise")
CHUNK = 5  # chunk_size of the chunkwise form (testing.run / testing.vjp pass it to chunkwise only)


def _loss(x, do, dht):
    """<do, o> + <dht, final state> of the recurrent form, as a function of a dict of inputs."""
    def loss(inputs):
        o, ht = testing.run(M, "recurrent", {**x, **inputs})
        return testing.inner(do, o) + testing.inner(dht, ht)
    return loss


def _unstabilised(x, shift=0.0):
    """The literal recurrence in float64, no running max: C_t = e^f C + e^(i - shift) k v^T,
    h = C^T q^ / max(|n^T q^|, e^-shift). shift = 0 is the textbook formula; a constant shift
    (one number for the whole sequence) only rescales C and n, for inputs where e^i overflows."""
    q, k, v, i, f = (x[n].astype(np.float64) for n in "qkvif")
    B, T, H, K = q.shape
    q_hat = q * K ** -0.5
    if "initial_state" in x:
        C0, n0, m0 = (s.astype(np.float64) for s in x["initial_state"])
        C, n = C0 * np.exp(m0 - shift)[..., None, None], n0 * np.exp(m0 - shift)[..., None]
    else:
        C, n = np.zeros((B, H, K, v.shape[-1])), np.zeros((B, H, K))
    h = np.zeros(v.shape)
    with np.errstate(under="ignore"):
        floor = np.exp(-shift)
        for t in range(T):
            a, w = np.exp(f[:, t]), np.exp(i[:, t] - shift)               # [B, H]
            kv = k[:, t, :, :, None] * v[:, t, :, None, :]                  # [B, H, K, V]
            C = a[..., None, None] * C + w[..., None, None] * kv
            n = a[..., None] * n + w[..., None] * k[:, t]
            z = np.sum(q_hat[:, t] * n, axis=-1)                            # [B, H]
            num = np.einsum("bhk,bhkv->bhv", q_hat[:, t], C)               # [B, H, V]
            h[:, t] = num / np.maximum(np.abs(z), floor)[..., None]
    return h


def _true_normaliser(x, shift=0.0):
    """|n_t^T q^_t| of the literal recurrence (scaled by e^-shift): [B, T, H]."""
    q, k, i, f = (x[n].astype(np.float64) for n in "qkif")
    B, T, H, K = q.shape
    n, out = np.zeros((B, H, K)), np.zeros((B, T, H))
    for t in range(T):
        n = np.exp(f[:, t])[..., None] * n + np.exp(i[:, t] - shift)[..., None] * k[:, t]
        out[:, t] = np.abs(np.sum(K ** -0.5 * q[:, t] * n, axis=-1))
    return out


# ----------------------------------------------------------------------- identities (sec. 4)
@pytest.mark.parametrize("regime", REGIMES)
def test_chunk_size_one_is_recurrent_and_one_chunk_is_parallel(regime):
    x = testing.make_inputs("mlstm", regime, T=23, seed=3, initial_state=True)
    o_r, s_r = testing.run(M, "recurrent", x)
    o_p, s_p = testing.run(M, "parallel", x)
    do, dht = testing.cotangents(o_r, s_r)
    testing.assert_close(testing.run(M, "chunkwise", x, chunk_size=1), (o_r, s_r),
                         name="chunkwise C=1 vs recurrent")
    testing.assert_close(testing.run(M, "chunkwise", x, chunk_size=23), (o_p, s_p),
                         name="chunkwise C=T vs parallel")
    testing.assert_close(testing.run(M, "chunkwise", x, chunk_size=40), (o_p, s_p),
                         name="chunkwise C>T vs parallel")
    g_r = testing.vjp(M, "recurrent", x, do, dht)
    testing.assert_close(testing.vjp(M, "chunkwise", x, do, dht, chunk_size=1), g_r,
                         name="chunkwise_vjp C=1 vs recurrent_vjp")
    testing.assert_close(testing.vjp(M, "chunkwise", x, do, dht, chunk_size=23),
                         testing.vjp(M, "parallel", x, do, dht),
                         name="chunkwise_vjp C=T vs parallel_vjp")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("split", [1, 8, 20])
def test_split_and_carry_the_state_equals_one_call(form, split):
    """Forward: carry (C~, n~, m). Backward: the second half's initial-state gradient, fed as the
    first half's final-state cotangent, reproduces the one-call gradient (m included)."""
    x = testing.make_inputs("mlstm", "hard_reset", T=21, seed=4, initial_state=True)
    o, s = testing.run(M, form, x, chunk_size=CHUNK)
    first = {n: (a[:, :split] if n in "qkvif" else a) for n, a in x.items()}
    second = {n: a[:, split:] for n, a in x.items() if n in "qkvif"}
    o1, s1 = testing.run(M, form, first, chunk_size=CHUNK)
    o2, s2 = testing.run(M, form, dict(second, initial_state=s1), chunk_size=CHUNK)
    testing.assert_close((np.concatenate([o1, o2], axis=1), s2), (o, s),
                         name=f"{form} split at {split}")
    do, dht = testing.cotangents(o, s)
    g = testing.vjp(M, form, x, do, dht, chunk_size=CHUNK)
    g2 = testing.vjp(M, form, dict(second, initial_state=s1), do[:, split:], dht, chunk_size=CHUNK)
    g1 = testing.vjp(M, form, first, do[:, :split], g2["initial_state"], chunk_size=CHUNK)
    for n in "qkvif":
        testing.assert_close(np.concatenate([g1[n], g2[n]], axis=1), g[n], name=f"d{n} split")
    testing.assert_close(g1["initial_state"], g["initial_state"], name="d initial_state split")


@pytest.mark.parametrize("regime", REGIMES)
def test_step_by_step_decoding_equals_recurrent(regime):
    x = testing.make_inputs("mlstm", regime, T=12, seed=5, initial_state=True)
    o, s = testing.run(M, "recurrent", x)
    state, outs = x["initial_state"], []
    for t in range(12):
        h, state = M.step(*(x[n][:, t] for n in "qkvif"), state=state)
        outs.append(h)
    testing.assert_close((np.stack(outs, axis=1), state), (o, s), name="step loop vs recurrent")


def test_step_without_state_starts_from_m0_zero():
    x = testing.make_inputs("mlstm", T=1, seed=6)
    h, state = M.step(*(x[n][:, 0] for n in "qkvif"))
    o, s = testing.run(M, "recurrent", x)
    testing.assert_close((h, state), (o[:, 0], s), name="step from None")
    testing.assert_close(state[2], np.maximum(x["f"][:, 0], x["i"][:, 0]),
                         name="m_1 = max(f_1 + 0, i_1)")


# ----------------------------------------------------------------------- stabiliser convention
@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("with_state", [False, True])
def test_final_m_is_the_closed_form_max_in_every_form(regime, with_state):
    """m_T = max(F_T + m_0, max_s (f_{s+1} + .. + f_T + i_s)), m_0 = 0 without initial state."""
    x = testing.make_inputs("mlstm", regime, T=30, seed=7, initial_state=with_state)
    i, f = x["i"], x["f"]
    m0 = x["initial_state"][2] if with_state else np.zeros((2, 2))
    candidates = [f.sum(axis=1) + m0] + [f[:, s + 1:].sum(axis=1) + i[:, s] for s in range(30)]
    m_T = np.max(np.stack(candidates), axis=0)                            # [B, H]
    for name in FORMS:
        testing.assert_close(testing.run(M, name, x, chunk_size=CHUNK)[1][2], m_T, name=f"{name} m_T")


def test_output_is_independent_of_the_initial_stabiliser_representation():
    """(C~ e^d, n~ e^d, m - d) is the same true state: every form gives the same output."""
    x = testing.make_inputs("mlstm", "slow_decay", T=17, seed=8, initial_state=True)
    C0, n0, m0 = x["initial_state"]
    d = np.array([[0.7, -1.3], [2.0, 0.1]])
    y = {**x, "initial_state": (C0 * np.exp(d)[..., None, None], n0 * np.exp(d)[..., None], m0 - d)}
    for name in FORMS:
        testing.assert_close(testing.run(M, name, y, chunk_size=CHUNK)[0],
                             testing.run(M, name, x, chunk_size=CHUNK)[0], name=f"{name} output")


# ----------------------------------------------------------------------- normaliser floor
def _floor_case(binds, T=16, seed=9):
    rng = np.random.default_rng(seed)
    x = testing.make_inputs("mlstm", "typical", T=T, seed=seed)
    if binds:   # small keys and input gates: |n^T q^| < 1 at every token
        x["k"], x["i"] = 0.05 * x["k"], 0.5 * rng.standard_normal(x["i"].shape)
    else:       # large input gates: |n^T q^| > 1 at every token
        x["i"] = 4.0 + 0.5 * rng.standard_normal(x["i"].shape)
    return x


@pytest.mark.parametrize("binds", [True, False], ids=["floor_binds", "floor_free"])
def test_normaliser_floor_against_the_unstabilised_formula(binds):
    x = _floor_case(binds)
    z = _true_normaliser(x)
    if binds:
        assert z.max() < 0.5, f"setup: floor should bind everywhere, max |n^T q^| = {z.max():.3g}"
    else:
        assert z.min() > 1.1, f"setup: floor should be free, min |n^T q^| = {z.min():.3g}"
    h = _unstabilised(x)
    for name in FORMS:
        testing.assert_close(testing.run(M, name, x, chunk_size=CHUNK)[0], h, name=f"{name} vs unstabilised")
    A = M.attention_matrix(x["q"], x["k"], x["i"], x["f"])              # [B, H, T, T]
    testing.assert_close(np.einsum("bhts,bshv->bthv", A, x["v"]), h,
                         name="attention_matrix @ v vs unstabilised")


@pytest.mark.parametrize("binds", [True, False], ids=["floor_binds", "floor_free"])
def test_normaliser_floor_gradients_against_finite_differences(binds):
    """Away from the kink |n^T q^| = 1 (checked in the setup): d|x| = sign(x) where the floor is
    free, 0 where it binds."""
    x = _floor_case(binds, T=9, seed=10)
    z = _true_normaliser(x)
    assert (z.max() < 0.5) if binds else (z.min() > 1.1), "setup: away from the kink"
    o, s = testing.run(M, "recurrent", x)
    do, dht = testing.cotangents(o, s)
    g = testing.vjp(M, "recurrent", x, do, dht)
    for name, c in testing.fd_check(_loss(x, do, dht), x, g, "qkvif").items():
        assert c.ok, str(c)
    for name in ("parallel", "chunkwise"):
        testing.assert_close(testing.vjp(M, name, x, do, dht, chunk_size=CHUNK), g, name=f"{name}_vjp")


def test_make_inputs_mixes_binding_and_free_tokens_away_from_the_kink():
    for regime in REGIMES:
        x = testing.make_inputs("mlstm", regime, T=64, seed=11)
        z = _true_normaliser(x)
        assert np.abs(np.log(z)).min() >= M.KINK_MARGIN * 0.999, regime
        assert (z < 1).any() and (z > 1).any(), f"{regime}: floor should bind at some tokens only"


# ----------------------------------------------------------------------- exponential input gate
def test_input_gate_overflowing_exp_in_float64():
    """i in [750, 800]: exp(i) is inf in float64; every form stays finite, agrees, and matches the
    literal recurrence run with one global shift e^-800 (not the running max)."""
    rng = np.random.default_rng(12)
    x = testing.make_inputs("mlstm", "typical", T=33, seed=12)
    x["i"] = rng.uniform(750.0, 800.0, size=x["i"].shape)
    with np.errstate(over="ignore"):
        assert np.isinf(np.exp(x["i"])).all()
    h = _unstabilised(x, shift=800.0)
    o_r, s_r = testing.run(M, "recurrent", x)
    testing.assert_close(o_r, h, name="recurrent vs shifted literal recurrence")
    for name in ("parallel", "chunkwise"):
        testing.assert_close(testing.run(M, name, x, chunk_size=CHUNK), (o_r, s_r), name=name)
    assert np.all(s_r[2] > 700)
    do, dht = testing.cotangents(o_r, s_r)
    g = testing.vjp(M, "recurrent", x, do, dht)
    assert all(np.isfinite(a).all() for _, a in testing.leaves(g))
    for name in ("parallel", "chunkwise"):
        testing.assert_close(testing.vjp(M, name, x, do, dht, chunk_size=CHUNK), g, name=f"{name}_vjp")
    # the output is invariant to a common shift of i when the floor is free: compare with i - 745
    y = {**x, "i": x["i"] - 745.0}
    assert _true_normaliser(y).min() > 1.0
    testing.assert_close(M.recurrent(**y)[0], o_r, name="shift invariance")


def test_large_input_gates_gradients_against_finite_differences():
    """i = c + 2 N(0, 1) with c ~ U(100, 500) per (batch, head): exp(i) overflows float32 and
    the unstabilised state would reach e^500 in float64."""
    rng = np.random.default_rng(13)
    x = testing.make_inputs("mlstm", "typical", T=10, seed=13)
    x["i"] = rng.uniform(100.0, 500.0, size=(2, 1, 2)) + 2.0 * rng.standard_normal(x["i"].shape)
    o, s = testing.run(M, "recurrent", x)
    do, dht = testing.cotangents(o, s)
    g = testing.vjp(M, "recurrent", x, do, dht)
    for c in testing.fd_check(_loss(x, do, dht), x, g, "qkvif").values():
        assert c.ok, str(c)
    for name in ("parallel", "chunkwise"):
        testing.assert_close(testing.run(M, name, x, chunk_size=CHUNK), (o, s), name=name)
        testing.assert_close(testing.vjp(M, name, x, do, dht, chunk_size=CHUNK), g, name=f"{name}_vjp")


def test_input_gate_overflowing_exp_in_float32():
    """i ~ 100 + N(0, 1) in float32 (exp(i) = inf): finite, and within the float32 tier of float64.

    Exponents near 100 keep only ~4e-6 relative accuracy in float32 (ulp(100) = 7.6e-6), which a
    cancelling normaliser amplifies; so this case keeps n^T q^ free of cancellation: fast
    forgetting (few live writes) and q = k + 0.3 N(0, 1) (the current write dominates)."""
    rng = np.random.default_rng(14)
    x32 = testing.make_inputs("mlstm", "fast_forgetting", T=40, seed=14, dtype=np.float32)
    x32["q"] = (x32["k"] + 0.3 * rng.standard_normal(x32["k"].shape)).astype(np.float32)
    x32["i"] = (100.0 + rng.standard_normal(x32["i"].shape)).astype(np.float32)
    with np.errstate(over="ignore"):
        assert np.isinf(np.exp(x32["i"])).all()
    x64 = testing.as_float64(x32)
    o64, s64 = testing.run(M, "recurrent", x64)
    do, dht = testing.cotangents(o64, s64)
    g64 = testing.vjp(M, "recurrent", x64, do, dht)
    do32, dht32 = do.astype(np.float32), tuple(d.astype(np.float32) for d in dht)
    for name in FORMS:
        o, s = testing.run(M, name, x32, chunk_size=CHUNK)
        assert o.dtype == np.float32 and all(a.dtype == np.float32 for a in s)
        testing.assert_close((o, s), (o64, s64), tier="float32", name=f"{name} float32")
        g = testing.vjp(M, name, x32, do32, dht32, chunk_size=CHUNK)
        assert all(a.dtype == np.float32 for _, a in testing.leaves(g))
        testing.assert_close(g, g64, tier="float32", name=f"{name}_vjp float32")


# ----------------------------------------------------------------------- initial state, m path
@pytest.mark.parametrize("form", FORMS)
def test_initial_state_gradient_including_m0(form):
    x = testing.make_inputs("mlstm", "slow_decay", T=9, seed=15, initial_state=True)
    o, s = testing.run(M, "recurrent", x)
    do, dht = testing.cotangents(o, s)
    g = testing.vjp(M, form, x, do, dht, chunk_size=CHUNK)
    assert np.all(g["initial_state"][2] != 0.0), "dm_0 is generally nonzero"
    c = testing.fd_check(_loss(x, do, dht), x, g, ["initial_state"], n_entries=8)["initial_state"]
    assert c.ok, str(c)
    # outputs only: moving along the representation (C~ e^d, n~ e^d, m - d) changes nothing,
    # so dm_0 = <dC~_0, C~_0> + <dn~_0, n~_0>
    dC0, dn0, dm0 = testing.vjp(M, form, x, do, chunk_size=CHUNK)["initial_state"]
    C0, n0, _ = x["initial_state"]
    testing.assert_close(np.sum(dC0 * C0, axis=(-2, -1)) + np.sum(dn0 * n0, axis=-1), dm0,
                         name="dm_0 along the invariance direction")


@pytest.mark.parametrize("form", FORMS)
def test_final_m_gradient_follows_the_argmax_path(form):
    """Loss = m_T only: di is one-hot at the maximising s*, df is 1 on (s*, T], dm_0 is 0; with a
    dominant m_0 the whole path goes to m_0 (df = 1 everywhere, di = 0, dm_0 = 1)."""
    x = testing.make_inputs("mlstm", "typical", T=14, seed=16, initial_state=True)
    o, s = testing.run(M, "recurrent", x)
    dht = (np.zeros_like(s[0]), np.zeros_like(s[1]), np.ones_like(s[2]))
    g = testing.vjp(M, form, x, np.zeros_like(o), dht, chunk_size=CHUNK)
    i, f = x["i"], x["f"]
    for b in range(2):
        for h in range(2):
            cand = [f[b, s_ + 1:, h].sum() + i[b, s_, h] for s_ in range(14)]
            star = int(np.argmax(cand))
            assert max(cand) > f[b, :, h].sum() + x["initial_state"][2][b, h]
            want_i, want_f = np.zeros(14), np.zeros(14)
            want_i[star], want_f[star + 1:] = 1.0, 1.0
            np.testing.assert_array_equal(g["i"][b, :, h], want_i)
            np.testing.assert_array_equal(g["f"][b, :, h], want_f)
    np.testing.assert_array_equal(g["initial_state"][2], 0.0)
    C0, n0, m0 = x["initial_state"]
    g = testing.vjp(M, form, {**x, "initial_state": (C0, n0, m0 + 50.0)}, np.zeros_like(o), dht,
                    chunk_size=CHUNK)
    np.testing.assert_array_equal(g["i"], 0.0)
    np.testing.assert_array_equal(g["f"], 1.0)
    np.testing.assert_array_equal(g["initial_state"][2], 1.0)


# ----------------------------------------------------------------------- hard reset
@pytest.mark.parametrize("form", FORMS)
def test_hard_reset_forgets_everything_before_it_exactly(form):
    x = testing.make_inputs("mlstm", "typical", T=20, seed=17, initial_state=True)
    r = 8
    x["f"][:, r] = -np.inf
    o, s = testing.run(M, form, x, chunk_size=CHUNK)
    suffix = {n: x[n][:, r:] for n in "qkvif"}
    o_s, s_s = testing.run(M, form, suffix, chunk_size=CHUNK)           # no initial state: m_0 = 0
    testing.assert_close((o[:, r:], s), (o_s, s_s), name="after the reset")
    do, dht = testing.cotangents(o, s)
    do[:, :r] = 0.0
    g = testing.vjp(M, form, x, do, dht, chunk_size=CHUNK)
    for n in "qkvi":
        assert np.all(g[n][:, :r] == 0.0), n
    assert np.all(g["f"][:, :r + 1] == 0.0)
    assert all(np.all(a == 0.0) for a in g["initial_state"])


# ----------------------------------------------------------------------- attention matrix, scale
def test_attention_matrix_is_causal_and_maps_v_to_h():
    x = testing.make_inputs("mlstm", "fast_forgetting", T=15, seed=18)
    A = M.attention_matrix(x["q"], x["k"], x["i"], x["f"])
    assert A.shape == (2, 2, 15, 15)
    assert np.all(np.triu(A, 1) == 0.0)
    testing.assert_close(np.einsum("bhts,bshv->bthv", A, x["v"]), M.parallel(**x)[0], name="M v")


def test_scale_multiplies_q_before_numerator_and_normaliser():
    x = testing.make_inputs("mlstm", "typical", T=11, seed=19)
    o_default, s_default = testing.run(M, "recurrent", x)
    testing.assert_close(testing.run(M, "recurrent", x, scale=8 ** -0.5),
                         (o_default, s_default), name="scale=None is K^-1/2")
    o_q, _ = M.recurrent(**{**x, "q": 0.3 * x["q"]}, scale=1.0)
    testing.assert_close(M.recurrent(**x, scale=0.3)[0], o_q, name="scale on q")
    o_k, _ = M.recurrent(**{**x, "k": 0.3 * x["k"]}, scale=1.0)         # the paper scales k
    testing.assert_close(o_k, o_q, name="scaling k gives the same output")


# ----------------------------------------------------------------------- validation
def test_forget_gate_must_be_a_log_gate():
    x = testing.make_inputs("mlstm", T=5)
    x["f"] = 1.0 / (1.0 + np.exp(-x["f"]))                              # a probability, not a log
    with pytest.raises(InputError, match="'f' is a log decay"):
        M.recurrent(**x)


def test_input_gate_must_be_finite():
    x = testing.make_inputs("mlstm", T=5)
    x["i"][0, 2, 1] = np.inf
    with pytest.raises(InputError, match="'i' contains Inf"):
        M.parallel(**x)


def test_initial_state_must_be_the_three_part_tuple():
    x = testing.make_inputs("mlstm", T=5, initial_state=True)
    C0, n0, m0 = x.pop("initial_state")
    with pytest.raises(TypeError, match="must be a tuple"):
        M.chunkwise(**x, initial_state=C0)
    with pytest.raises(InputError, match="initial_state.m"):
        M.chunkwise(**x, initial_state=(C0, n0, m0[..., None]))
