"""kda: a gate constant over K is gated_delta_rule (recurrences.md section 4), decay-first update
order with per-channel decays, the fast (factored) and exact intra-chunk decay paths, per-channel
hard resets, grouped heads, stability, validation and the UT/WY intermediates.

The generic suite (test_equivalence.py) compares every form and backward with the recurrent loop
and finite differences in every regime; this file covers what is specific to the op.
"""
import numpy as np
import pytest

from linrec_ref import InputError, _decay, _delta, testing
from linrec_ref.ops import gated_delta_rule
from linrec_ref.ops import kda as op

FORWARDS = ("recurrent", "parallel", "chunkwise")
GRADS = ("q", "k", "v", "g", "beta", "initial_state")


DIMS = dict(T=13, B=2, H=1, HV=2, K=5, V=4)
C = 4                                        # chunk size of the chunkwise forms


# ----------------------------------------------------------------------------- the recurrence
def test_recurrent_decays_each_channel_first_then_corrects():
    """One head, plain Python: S' = diag(e^g) S; S_t = S' + beta k (v - S'^T k)^T."""
    x = testing.make_inputs(op, regime="fast_forgetting", **dict(DIMS, T=6, B=1, H=1, HV=1), initial_state=True)
    q, k, v, g, b = (x[n][0, :, 0] for n in ("q", "k", "v", "g", "beta"))
    S = x["initial_state"][0, 0].copy()
    outs = []
    for t in range(6):
        S = np.diag(np.exp(g[t])) @ S
        S = S + b[t] * np.outer(k[t], v[t] - S.T @ k[t])
        outs.append(5 ** -0.5 * S.T @ q[t])
    ref = (np.array(outs)[None, :, None], S[None, None])
    for form in FORWARDS:
        testing.assert_close(testing.run(op, form, x, chunk_size=C), ref, name=form)
    testing.assert_close(testing.run_steps(op, x), ref, name="step")


# ----------------------------------------------------------------------------- identity with gated_delta_rule
def _constant_gate_pair(regime, variant, T=13):
    """(kda inputs with g constant over K, the same inputs for gated_delta_rule)."""
    x = testing.make_inputs(gated_delta_rule, regime, **dict(DIMS, T=T), seed=3, variant=variant)
    x["initial_state"] = np.random.default_rng(4).standard_normal((2, 2, 5, 4))   # its own generator
    return dict(x, g=np.repeat(x["g"][..., None], 5, axis=-1)), x


@pytest.mark.parametrize("variant", ["default", "l2norm_sigmoid"])
@pytest.mark.parametrize("regime", ["typical", "fast_forgetting", "hard_reset"])
def test_constant_gate_over_K_is_gated_delta_rule(regime, variant):
    xk, xg = _constant_gate_pair(regime, variant)
    do, dht = testing.cotangents(*testing.run(op, "recurrent", xk))
    for form in FORWARDS:
        testing.assert_close(testing.run(op, form, xk, chunk_size=C),
                             testing.run(gated_delta_rule, form, xg, chunk_size=C), name=form)
        got = testing.vjp(op, form, xk, do, dht, chunk_size=C)
        ref = testing.vjp(gated_delta_rule, form, xg, do, dht, chunk_size=C)
        got = dict(got, g=got["g"].sum(-1))                         # dg(gated) = sum_k dg(kda)
        testing.assert_close({n: got[n] for n in GRADS}, {n: ref[n] for n in GRADS}, name=f"{form}_vjp")
    testing.assert_close(testing.run_steps(op, xk), testing.run_steps(gated_delta_rule, xg), name="step")
    opts = op.SPEC.variants[variant]
    testing.assert_close(op.attention_matrix(xk["q"], xk["k"], xk["g"], xk["beta"], **opts),
                         gated_delta_rule.attention_matrix(xg["q"], xg["k"], xg["g"], xg["beta"], **opts),
                         name="attention_matrix")


def test_constant_gate_intermediates_equal_gated_delta_rule():
    xk, xg = _constant_gate_pair("hard_reset", "default", T=11)
    xk, xg = ({n: x[n][:, :, :1] if n in ("v", "g", "beta") else x[n] for n in x} for x in (xk, xg))
    h0 = xk["initial_state"][:, :1]
    args = ("q", "k", "v", "g", "beta")
    got = op.chunk_intermediates(*(xk[n] for n in args), initial_state=h0, chunk_size=4)
    ref = gated_delta_rule.chunk_intermediates(*(xg[n] for n in args), initial_state=h0, chunk_size=4)
    for n in ("S_in", "T_mat", "A_inv", "w", "u", "v_new", "final_state"):
        testing.assert_close(got[n], ref[n], name=n)
    testing.assert_close(got["gamma"], np.repeat(ref["gamma"][..., None], 5, axis=-1), name="gamma")


# ----------------------------------------------------------------------------- fast and exact paths
@pytest.mark.parametrize("path", ["fast", "exact"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_fast_and_exact_intra_chunk_paths_agree_with_recurrent(monkeypatch, path, dtype):
    """Force the factored path (bound inf: every chunk without a -inf gate) or the exact segment
    sums (bound 0) of ``_decay`` and compare every UT/WY form and backward with the loop."""
    seen = []

    def spy(g, strict=False, fast_bound=None):
        d = _decay.chunk_decay(g, strict, fast_bound)
        seen.append(d.fast)
        return d

    monkeypatch.setitem(_decay.FAST_BOUND, np.dtype(dtype), np.inf if path == "fast" else 0.0)
    monkeypatch.setattr(_delta, "chunk_decay", spy)
    tier = testing.tier_for(dtype)
    x = testing.make_inputs(op, regime="typical", **dict(DIMS, T=23), variant="l2norm_sigmoid", dtype=dtype,
                            initial_state=True)
    x64 = testing.as_float64(x)
    ref = testing.run(op, "recurrent", x64)
    do, dht = testing.cotangents(*ref)
    gref = testing.vjp(op, "recurrent", x64, do, dht)
    for form, C in (("parallel", None), ("chunkwise", 1), ("chunkwise", 8), ("chunkwise", 23)):
        seen.clear()
        testing.assert_close(testing.run(op, form, x, chunk_size=C), ref, tier, name=f"{form} C={C}")
        got = testing.vjp(op, form, x, do.astype(dtype), dht.astype(dtype), chunk_size=C)
        testing.assert_close({n: got[n] for n in GRADS}, {n: gref[n] for n in GRADS}, tier,
                             name=f"{form}_vjp C={C}")
        assert seen and all(f.all() if path == "fast" else not f.any() for f in seen), (form, C)


def test_default_bound_takes_both_paths_in_one_call():
    """Fast forgetting in float32 with chunks of 64: ranges above 60 go exact, short chunks fast."""
    x = testing.make_inputs(op, regime="fast_forgetting", **dict(DIMS, T=128), dtype=np.float32, initial_state=True)
    x["g"][:, :64] *= 0.1                                           # a slow first chunk
    d = _delta._chunk_decays(x["g"], x["k"], 64, None)
    assert d.fast.any() and not d.fast.all()
    ref = testing.run(op, "recurrent", testing.as_float64(x))
    testing.assert_close(testing.run(op, "chunkwise", x, chunk_size=64), ref, "float32")


# ----------------------------------------------------------------------------- resets
def test_whole_step_reset_forgets_everything_before_it():
    x = testing.make_inputs(op, regime="typical", **dict(DIMS, T=12), initial_state=True)
    x["g"][:, 6] = -np.inf
    other = dict(x, initial_state=-x["initial_state"], v=x["v"].copy(), k=x["k"].copy())
    other["v"][:, :6] *= -3.0
    other["k"][:, :6] = x["k"][:, 5::-1]
    for form in FORWARDS:
        o1, h1 = testing.run(op, form, x, chunk_size=C)
        o2, h2 = testing.run(op, form, other, chunk_size=C)
        testing.assert_close((o1[:, 6:], h1), (o2[:, 6:], h2), name=form)
        assert not testing.compare(o1[:, :6], o2[:, :6]).ok             # the change is visible before


def test_single_channel_reset_zeroes_that_row_and_its_gradient():
    """g[t, c] = -inf zeroes row c of the decayed state S'_t; d/dg there is exactly 0 in the loop
    (d exp(g)/dg = 0) and a cancelling sum elsewhere; nothing is NaN."""
    x = testing.make_inputs(op, regime="typical", **dict(DIMS, T=10, B=1, HV=2), initial_state=True)
    x["g"][0, 4, 0, 2] = -np.inf
    x["g"][0, 7, 1, [0, 3]] = -np.inf
    inter = op.chunk_intermediates(*(x[n][:, :, :1] for n in ("q", "k", "v", "g", "beta")),
                                   initial_state=x["initial_state"][:, :1], chunk_size=1)
    S3, S4 = inter["S_in"][0, 0, 4], inter["S_in"][0, 0, 5]        # states after t = 3 and t = 4
    k4, v4, b4 = x["k"][0, 4, 0], x["v"][0, 4, 0], x["beta"][0, 4, 0]
    S_dec = np.exp(x["g"][0, 4, 0])[:, None] * S3
    assert np.all(S_dec[2] == 0)
    testing.assert_close(S4, S_dec + b4 * np.outer(k4, v4 - S_dec.T @ k4))
    do, dht = testing.cotangents(*testing.run(op, "recurrent", x))
    zero_scale = np.abs(testing.vjp(op, "recurrent", x, do, dht)["g"]).max()
    for form in FORWARDS:
        grads = testing.vjp(op, form, x, do, dht, chunk_size=C)
        assert all(np.isfinite(grads[n]).all() for n in GRADS), form
        at_resets = np.array([grads["g"][0, 4, 0, 2], *grads["g"][0, 7, 1, [0, 3]]])
        if form == "recurrent":
            assert np.all(at_resets == 0)
        else:
            assert testing.compare(at_resets, np.zeros(3), zero_scale=zero_scale).ok, form


@pytest.mark.parametrize("form", FORWARDS + ("step",))
def test_beta_zero_is_pure_per_channel_decay(form):
    x = testing.make_inputs(op, regime="hard_reset", **DIMS, initial_state=True)
    x["beta"] = np.zeros_like(x["beta"])
    G = np.cumsum(x["g"], axis=1)                                   # [B, T, HV, K]
    S = np.exp(G)[..., None] * x["initial_state"][:, None]          # [B, T, HV, K, V]
    q = np.repeat(x["q"], 2, axis=2)                                # grouped heads
    o_ref = 5 ** -0.5 * np.einsum("bthk,bthkv->bthv", q, S)
    got = testing.run_steps(op, x) if form == "step" else testing.run(op, form, x, chunk_size=C)
    testing.assert_close(got, (o_ref, S[:, -1]), name=form)


# ----------------------------------------------------------------------------- grouped heads
def test_grouped_heads_equal_repeating_q_and_k():
    x = testing.make_inputs(op, regime="hard_reset", **dict(DIMS, H=2, HV=4), initial_state=True)
    rep = dict(x, q=np.repeat(x["q"], 2, axis=2), k=np.repeat(x["k"], 2, axis=2))
    do, dht = testing.cotangents(*testing.run(op, "recurrent", x))
    for form in FORWARDS:
        testing.assert_close(testing.run(op, form, x, chunk_size=C),
                             testing.run(op, form, rep, chunk_size=C), name=form)
        got, ref = testing.vjp(op, form, x, do, dht, chunk_size=C), testing.vjp(op, form, rep, do, dht, chunk_size=C)
        for n in ("q", "k"):
            testing.assert_close(got[n], ref[n].reshape(got[n].shape[:2] + (2, 2, -1)).sum(3), name=f"d{n}")
        for n in ("v", "g", "beta", "initial_state"):
            testing.assert_close(got[n], ref[n], name=f"d{n}")


# ----------------------------------------------------------------------------- stability
def test_state_stays_bounded_for_unit_keys():
    rng = np.random.default_rng(4)
    T, K, V = 2000, 8, 4
    k = rng.standard_normal((1, T, 1, K))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    x = dict(q=rng.standard_normal((1, T, 1, K)), k=k, v=rng.standard_normal((1, T, 1, V)),
             g=np.log(rng.uniform(0.9, 1.0, (1, T, 1, K))), beta=rng.uniform(0.05, 1.95, (1, T, 1)))
    S_in = op.chunk_intermediates(**x, chunk_size=1)["S_in"][0, 0]   # every S_{t-1}: [T, K, V]
    norms = np.linalg.norm(S_in, ord=2, axis=(-2, -1))
    bound = 2 * np.sqrt(K * V) * np.abs(x["v"]).max()
    assert norms.max() < bound, (norms.max(), bound)
    # keys of norm 1.5 (eigenvalue 1 - beta 2.25 < -1 for large beta) explode despite the decay
    S_raw = op.chunk_intermediates(**dict(x, k=1.5 * k), chunk_size=1)["S_in"][0, 0, :400]
    assert np.linalg.norm(S_raw, ord=2, axis=(-2, -1)).max() > 1e4 * bound


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("form", FORWARDS)
def test_gate_with_the_wrong_key_size_is_rejected(form):
    x = testing.make_inputs(op, **DIMS, initial_state=True)
    with pytest.raises(InputError, match=r"kda: argument 'g' has K=4 at axis 3, but K=5 from argument 'q'"):
        testing.run(op, form, dict(x, g=x["g"][..., :4]), chunk_size=C)
    with pytest.raises(InputError, match=r"kda: argument 'g' must have shape \[B, T, HV, K\].*rank 4.*rank 3"):
        testing.run(op, form, dict(x, g=x["g"][..., 0]), chunk_size=C)     # a scalar gate is gated_delta_rule's


def test_positive_log_gate_is_rejected():
    x = testing.make_inputs(op, **DIMS, initial_state=True)
    g = x["g"].copy()
    g[1, 3, 0, 2] = 0.25
    with pytest.raises(InputError, match=r"kda: argument 'g' is a log decay and must be <= 0.*"
                                         r"0\.25.* at index \(1, 3, 0, 2\)"):
        testing.run(op, "chunkwise", dict(x, g=g), chunk_size=C)
    with pytest.raises(InputError, match=r"argument 'g' is a log decay"):
        op.recurrent_vjp(**dict(x, g=g), do=np.zeros((2, 13, 2, 4)))


def test_beta_outside_0_2_and_bad_options_are_rejected():
    x = testing.make_inputs(op, **DIMS, initial_state=True)
    beta = x["beta"].copy()
    beta[1, 2, 0] = 2.01
    with pytest.raises(InputError, match=r"kda: argument 'beta' must lie in \[0, 2\].*at index \(1, 2, 0\)"):
        testing.run(op, "parallel", dict(x, beta=beta))
    with pytest.raises(InputError, match=r"kda: option 'beta_activation' must be one of"):
        testing.run(op, "recurrent", dict(x, beta_activation="softplus"))


# ----------------------------------------------------------------------------- intermediates
def test_intermediates_match_the_recurrence_with_per_channel_decay():
    """S_in are the loop's states at chunk starts, v_new the new values written, and
    diag(Gamma_C) - K_end^T w is the chunk's product of transitions (I - b k k^T) diag(a_t)."""
    C, T, K = 4, 11, 5
    x = testing.make_inputs(op, regime="fast_forgetting", **dict(DIMS, T=T, B=1, H=1, HV=1), initial_state=True)
    x["g"][0, 5, 0, [1, 4]] = -np.inf                               # a partial reset inside chunk 1
    inter = op.chunk_intermediates(x["q"], x["k"], x["v"], x["g"], x["beta"], chunk_size=C,
                                   initial_state=x["initial_state"])
    k, v, g, b = (x[n][0, :, 0] for n in ("k", "v", "g", "beta"))
    S, states, written = x["initial_state"][0, 0], [], []
    for t in range(T):
        states.append(S)
        S = np.exp(g[t])[:, None] * S
        written.append(b[t] * (v[t] - S.T @ k[t]))
        S = S + np.outer(k[t], written[-1])
    testing.assert_close(inter["S_in"][0, 0], np.stack(states[::C]), name="S_in")
    testing.assert_close(inter["final_state"][0, 0], S, name="final_state")
    testing.assert_close(inter["v_new"][0, 0].reshape(-1, v.shape[-1])[:T], np.stack(written), name="v_new")
    for n in range(3):
        sl = slice(n * C, min((n + 1) * C, T))
        kc, gc, bc = k[sl], g[sl], b[sl]
        m = len(bc)
        prod = np.eye(K)
        for t in range(m):
            prod = (np.eye(K) - bc[t] * np.outer(kc[t], kc[t])) @ np.diag(np.exp(gc[t])) @ prod
        to_end = np.array([np.exp(np.sum(gc[s + 1:], axis=0)) for s in range(m)])      # [m, K]
        w = inter["w"][0, 0, n, :m]
        testing.assert_close(np.diag(np.exp(np.sum(gc, axis=0))) - (kc * to_end).T @ w, prod, name="WY")
        KKD = np.array([[np.sum(kc[t] * kc[s] * np.exp(np.sum(gc[s + 1:t + 1], axis=0))) if s < t else 0.0
                         for s in range(m)] for t in range(m)])
        A = np.eye(m) + bc[:, None] * KKD
        T_mat = inter["T_mat"][0, 0, n, :m, :m]
        testing.assert_close(A @ T_mat, np.diag(bc), name="A T_mat")
        gamma = np.exp(np.cumsum(gc, axis=0))                       # [m, K]
        testing.assert_close(inter["gamma"][0, 0, n, :m], gamma, name="gamma")
        testing.assert_close(w, T_mat @ (gamma * kc), name="w")
        testing.assert_close(inter["u"][0, 0, n, :m], T_mat @ v[sl], name="u")


def test_attention_matrix_maps_v_to_o_with_per_channel_decay_and_resets():
    x = testing.make_inputs(op, regime="hard_reset", **dict(DIMS, T=10), variant="l2norm_sigmoid", initial_state=True)
    x0 = dict(x, initial_state=np.zeros_like(x["initial_state"]))
    M = op.attention_matrix(x["q"], x["k"], x["g"], x["beta"], use_qk_l2norm_in_kernel=True,
                            beta_activation="sigmoid")                   # [B, HV, T, T]
    o = np.moveaxis(M @ np.moveaxis(x["v"], 1, 2), 2, 1)                 # [B, T, HV, V]
    testing.assert_close(o, testing.run(op, "recurrent", x0)[0])
    assert np.all(np.triu(M, 1) == 0)
    assert np.all(M[:, :, 5:, :5] == 0)                                  # g = -inf at t = 5 (T // 2)
