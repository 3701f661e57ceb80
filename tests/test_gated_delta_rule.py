"""gated_delta_rule: the identities of recurrences.md section 4 (beta = 0 is pure decay, g = 0 is
delta_rule), decay-first update order, hard resets, grouped heads, stability, validation and the
UT/WY intermediates with decay.

The generic suite (test_equivalence.py) compares every form and backward with the recurrent loop
and finite differences in every regime; this file covers what is specific to the op.
"""
import numpy as np
import pytest

from linrec_ref import InputError, testing
from linrec_ref.ops import delta_rule
from linrec_ref.ops import gated_delta_rule as op

FORWARDS = ("recurrent", "parallel", "chunkwise")
GRADS = ("q", "k", "v", "g", "beta", "initial_state")


DIMS = dict(T=13, B=2, H=1, HV=2, K=5, V=4)
C = 4                                        # chunk size of the chunkwise forms


# ----------------------------------------------------------------------------- the recurrence
def test_recurrent_decays_first_then_corrects():
    """One head, plain Python: S' = e^g S; S_t = S' + beta k (v - S'^T k)^T (not S_{t-1}^T k)."""
    x = testing.make_inputs(op, regime="fast_forgetting", **dict(DIMS, T=6, B=1, H=1, HV=1), initial_state=True)
    q, k, v, g, b = (x[n][0, :, 0] for n in ("q", "k", "v", "g", "beta"))
    S = x["initial_state"][0, 0].copy()
    outs = []
    for t in range(6):
        S = np.exp(g[t]) * S
        S = S + b[t] * np.outer(k[t], v[t] - S.T @ k[t])
        outs.append(5 ** -0.5 * S.T @ q[t])
    testing.assert_close(testing.run(op, "recurrent", x), (np.array(outs)[None, :, None], S[None, None]))


# ----------------------------------------------------------------------------- identities
@pytest.mark.parametrize("form", FORWARDS + ("step",))
def test_beta_zero_is_pure_decay(form):
    """beta = 0: S_t = exp(g_1 + .. + g_t) S_0 and o_t = scale S_t^T q_t, in every form."""
    x = testing.make_inputs(op, regime="hard_reset", **DIMS, initial_state=True)
    x["beta"] = np.zeros_like(x["beta"])
    G = np.cumsum(x["g"], axis=1)                                   # [B, T, HV]
    S = np.exp(G)[..., None, None] * x["initial_state"][:, None]    # [B, T, HV, K, V]
    q = np.repeat(x["q"], 2, axis=2)                                # grouped heads
    o_ref = 5 ** -0.5 * np.einsum("bthk,bthkv->bthv", q, S)
    if form == "step":
        state, outs = x["initial_state"], []
        for t in range(13):
            o_t, state = op.step(*(x[n][:, t] for n in ("q", "k", "v", "g", "beta")), state)
            outs.append(o_t)
        got = (np.stack(outs, 1), state)
    else:
        got = testing.run(op, form, x, chunk_size=C)
    testing.assert_close(got, (o_ref, S[:, -1]), name=form)


def test_beta_zero_gradients_agree_across_forms_and_with_finite_differences():
    x = testing.make_inputs(op, **dict(DIMS, T=9), initial_state=True)
    x["beta"] = np.zeros_like(x["beta"])
    do, dht = testing.cotangents(*testing.run(op, "recurrent", x))
    ref = testing.vjp(op, "recurrent", x, do, dht)
    for form in ("parallel", "chunkwise"):
        got = testing.vjp(op, form, x, do, dht, chunk_size=C)
        testing.assert_close({n: got[n] for n in GRADS}, {n: ref[n] for n in GRADS},
                             name=form)

    def loss(inputs):
        o, ht = testing.run(op, "recurrent", inputs)
        return testing.inner(do, o) + testing.inner(dht, ht)

    # beta itself is not perturbed: beta = 0 - h is outside [0, 2]
    for name, res in testing.fd_check(loss, x, ref, ("q", "k", "v", "g", "initial_state")).items():
        assert res.ok, str(res)


@pytest.mark.parametrize("form", FORWARDS)
def test_zero_gate_is_delta_rule(form):
    x = testing.make_inputs(op, **DIMS, variant="l2norm_sigmoid", initial_state=True)
    x["g"] = np.zeros_like(x["g"])
    plain = {n: v for n, v in x.items() if n != "g"}
    testing.assert_close(testing.run(op, form, x, chunk_size=C),
                         testing.run(delta_rule, form, plain, chunk_size=C), name=form)
    do, dht = testing.cotangents(*testing.run(op, "recurrent", x))
    got = testing.vjp(op, form, x, do, dht, chunk_size=C)
    ref = testing.vjp(delta_rule, form, plain, do, dht, chunk_size=C)
    testing.assert_close({n: got[n] for n in ref}, ref, name=f"{form}_vjp")


def test_zero_gate_is_delta_rule_for_step_and_attention_matrix():
    x = testing.make_inputs(op, **DIMS, initial_state=True)
    x["g"] = np.zeros_like(x["g"])
    token = [x[n][:, 3] for n in ("q", "k", "v", "g", "beta")]
    testing.assert_close(op.step(*token, x["initial_state"]),
                         delta_rule.step(*token[:3], token[4], x["initial_state"]))
    testing.assert_close(op.attention_matrix(x["q"], x["k"], x["g"], x["beta"]),
                         delta_rule.attention_matrix(x["q"], x["k"], x["beta"]))


def test_hard_reset_forgets_everything_before_it():
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
    do, dht = testing.cotangents(*testing.run(op, "recurrent", x))
    do[:, :6] = 0                                                   # only reads after the reset
    for form in FORWARDS:
        grads = testing.vjp(op, form, x, do, dht, chunk_size=C)
        assert all(np.isfinite(grads[n]).all() for n in GRADS), form
        assert np.all(grads["initial_state"] == 0), form     # exact: nothing reaches S_0
        # d exp(g)/dg = exp(g) = 0: exact in the loop; a sum of cancelling terms elsewhere
        dg_reset = testing.compare(grads["g"][:, 6], np.zeros_like(grads["g"][:, 6]), "float64",
                                   zero_scale=np.abs(grads["g"]).max())
        assert dg_reset.ok and (form != "recurrent" or np.all(grads["g"][:, 6] == 0)), (form, dg_reset)


# ----------------------------------------------------------------------------- grouped heads
def test_grouped_heads_equal_repeating_q_and_k():
    x = testing.make_inputs(op, regime="fast_forgetting", **dict(DIMS, H=2, HV=4), initial_state=True)
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
def test_state_stays_bounded_with_decay_for_unit_keys():
    rng = np.random.default_rng(4)
    T, K, V = 2000, 8, 4
    k = rng.standard_normal((1, T, 1, K))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    x = dict(q=rng.standard_normal((1, T, 1, K)), k=k, v=rng.standard_normal((1, T, 1, V)),
             g=np.log(rng.uniform(0.9, 1.0, (1, T, 1))), beta=rng.uniform(0.05, 1.95, (1, T, 1)))
    S_in = op.chunk_intermediates(**x, chunk_size=1)["S_in"][0, 0]   # every S_{t-1}: [T, K, V]
    norms = np.linalg.norm(S_in, ord=2, axis=(-2, -1))
    bound = 2 * np.sqrt(K * V) * np.abs(x["v"]).max()
    assert norms.max() < bound, (norms.max(), bound)
    # keys of norm 1.5 (eigenvalue a (1 - beta 2.25) < -1 for large beta) explode despite the decay
    S_raw = op.chunk_intermediates(**dict(x, k=1.5 * k), chunk_size=1)["S_in"][0, 0, :400]
    assert np.linalg.norm(S_raw, ord=2, axis=(-2, -1)).max() > 1e4 * bound


# ----------------------------------------------------------------------------- validation
def test_beta_outside_0_2_is_rejected_without_activation():
    x = testing.make_inputs(op, **DIMS, initial_state=True)
    beta = x["beta"].copy()
    beta[1, 2, 0] = 2.01
    for form in FORWARDS:
        with pytest.raises(InputError, match=r"gated_delta_rule: argument 'beta' must lie in \[0, 2\].*"
                                             r"got .*2\.01.* at index \(1, 2, 0\)"):
            testing.run(op, form, dict(x, beta=beta), chunk_size=C)
    with pytest.raises(InputError, match=r"argument 'beta' must lie in \[0, 2\]"):
        op.recurrent_vjp(**dict(x, beta=-beta), do=np.zeros((2, 13, 2, 4)))


def test_bad_option_values_are_rejected():
    x = testing.make_inputs(op, **DIMS, initial_state=True)
    with pytest.raises(InputError, match=r"gated_delta_rule: option 'beta_activation' must be one of "
                                         r"\('none', 'sigmoid'\).*got 'softplus'"):
        testing.run(op, "recurrent", dict(x, beta_activation="softplus"))
    with pytest.raises(TypeError, match=r"option 'use_qk_l2norm_in_kernel' must be True or False, got 1"):
        testing.run(op, "chunkwise", dict(x, use_qk_l2norm_in_kernel=1), chunk_size=C)


def test_value_heads_must_be_a_multiple_of_key_heads():
    x = testing.make_inputs(op, **dict(DIMS, H=2, HV=4), initial_state=True)
    bad = dict(x, v=x["v"][:, :, :3], g=x["g"][:, :, :3], beta=x["beta"][:, :, :3],
               initial_state=x["initial_state"][:, :3])
    with pytest.raises(InputError, match=r"grouped heads need HV \(value heads, 3 from argument 'v'\)"):
        testing.run(op, "parallel", bad)


def test_positive_log_gate_is_rejected():
    x = testing.make_inputs(op, **DIMS, initial_state=True)
    g = x["g"].copy()
    g[0, 0, 0] = 0.1
    with pytest.raises(InputError, match=r"argument 'g' is a log decay and must be <= 0"):
        testing.run(op, "chunkwise", dict(x, g=g), chunk_size=C)


# ----------------------------------------------------------------------------- intermediates
def test_intermediates_match_the_recurrence_with_decay():
    """S_in are the recurrent states at chunk starts, v_new the new values written, and
    Gamma_C I - K_end^T w is the product of the chunk's transitions a_t (I - beta k k^T)."""
    C, T, K = 4, 11, 5
    x = testing.make_inputs(op, regime="fast_forgetting", **dict(DIMS, T=T, B=1, H=1, HV=1), initial_state=True)
    x["g"][0, 5, 0] = -np.inf                                       # a reset inside chunk 1
    inter = op.chunk_intermediates(x["q"], x["k"], x["v"], x["g"], x["beta"], chunk_size=C,
                                   initial_state=x["initial_state"])
    k, v, g, b = (x[n][0, :, 0] for n in ("k", "v", "g", "beta"))
    S, states, written = x["initial_state"][0, 0], [], []
    for t in range(T):
        states.append(S)
        S = np.exp(g[t]) * S
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
            prod = np.exp(gc[t]) * (np.eye(K) - bc[t] * np.outer(kc[t], kc[t])) @ prod
        G = np.cumsum(gc)
        decay_to_end = np.array([np.exp(np.sum(gc[s + 1:])) for s in range(m)])
        w = inter["w"][0, 0, n, :m]
        testing.assert_close(np.exp(G[-1]) * np.eye(K) - (kc * decay_to_end[:, None]).T @ w, prod, name="WY")
        D = np.array([[np.exp(np.sum(gc[s + 1:t + 1])) if s <= t else 0.0 for s in range(m)] for t in range(m)])
        A = np.eye(m) + np.tril(bc[:, None] * (kc @ kc.T) * D, -1)
        T_mat = inter["T_mat"][0, 0, n, :m, :m]
        testing.assert_close(A @ T_mat, np.diag(bc), name="A T_mat")
        testing.assert_close(w, T_mat @ (np.exp(G)[:, None] * kc), name="w")
        testing.assert_close(inter["u"][0, 0, n, :m], T_mat @ v[sl], name="u")


def test_attention_matrix_maps_v_to_o_with_decay_and_resets():
    x = testing.make_inputs(op, regime="hard_reset", **dict(DIMS, T=10), variant="l2norm_sigmoid", initial_state=True)
    x0 = dict(x, initial_state=np.zeros_like(x["initial_state"]))
    M = op.attention_matrix(x["q"], x["k"], x["g"], x["beta"], use_qk_l2norm_in_kernel=True,
                            beta_activation="sigmoid")                   # [B, HV, T, T]
    o = np.moveaxis(M @ np.moveaxis(x["v"], 1, 2), 2, 1)                 # [B, T, HV, V]
    testing.assert_close(o, testing.run(op, "recurrent", x0)[0])
    assert np.all(np.triu(M, 1) == 0)
    assert np.all(M[:, :, 5:, :5] == 0)                                  # g = -inf at t = 5 (T // 2)
