"""delta_rule: options, grouped heads, stability, validation and the UT/WY intermediates.

The generic suite (test_equivalence.py) compares every form and backward with the recurrent loop
and finite differences; this file covers what is specific to the delta rule.
"""
import numpy as np
import pytest

from linrec_ref import InputError, testing
from linrec_ref.ops import delta_rule as op
from linrec_ref.ops import gated_delta_rule

FORWARDS = ("recurrent", "parallel", "chunkwise")


DIMS = dict(T=13, B=2, H=1, HV=2, K=5, V=4)
C = 4                                        # chunk size of the chunkwise forms


# ----------------------------------------------------------------------------- the recurrence
def test_recurrent_is_the_delta_rule_written_out():
    """One head, plain Python: S_t = S + beta k (v - S^T k)^T, o_t = scale S_t^T q_t."""
    x = testing.make_inputs(op, **dict(DIMS, T=6, B=1, H=1, HV=1), initial_state=True)
    q, k, v, b = (x[n][0, :, 0] for n in ("q", "k", "v", "beta"))
    S = x["initial_state"][0, 0].copy()
    outs = []
    for t in range(6):
        S = S + b[t] * np.outer(k[t], v[t] - S.T @ k[t])
        outs.append(5 ** -0.5 * S.T @ q[t])
    o, ht = testing.run(op, "recurrent", x)
    testing.assert_close((o[0, :, 0], ht[0, 0]), (np.array(outs), S))


def test_step_loop_equals_recurrent():
    x = testing.make_inputs(op, **dict(DIMS, T=9), initial_state=True)
    ref = testing.run(op, "recurrent", x)
    state, outs = x["initial_state"], []
    for t in range(9):
        o_t, state = op.step(x["q"][:, t], x["k"][:, t], x["v"][:, t], x["beta"][:, t], state)
        outs.append(o_t)
    testing.assert_close((np.stack(outs, 1), state), ref)


# ----------------------------------------------------------------------------- options
@pytest.mark.parametrize("form", FORWARDS)
def test_l2norm_option_equals_normalising_outside(form):
    x = testing.make_inputs(op, **DIMS, variant="l2norm_sigmoid", initial_state=True)
    outside = dict(x, q=gated_delta_rule.l2norm(x["q"]), k=gated_delta_rule.l2norm(x["k"]),
                   use_qk_l2norm_in_kernel=False)
    testing.assert_close(testing.run(op, form, x, chunk_size=C),
                         testing.run(op, form, outside, chunk_size=C), name=form)


@pytest.mark.parametrize("form", FORWARDS)
def test_sigmoid_option_equals_passing_the_activated_beta(form):
    x = testing.make_inputs(op, **DIMS, variant="l2norm_sigmoid", initial_state=True)
    outside = dict(x, beta=1 / (1 + np.exp(-x["beta"])), beta_activation="none")
    testing.assert_close(testing.run(op, form, x, chunk_size=C),
                         testing.run(op, form, outside, chunk_size=C), name=form)


def test_option_gradients_agree_with_finite_differences():
    x = testing.make_inputs(op, **dict(DIMS, T=7), variant="l2norm_sigmoid", initial_state=True)
    do, dht = testing.cotangents(*testing.run(op, "recurrent", x))
    grads = testing.vjp(op, "chunkwise", x, do, dht, chunk_size=C)

    def loss(inputs):
        o, ht = testing.run(op, "recurrent", inputs)
        return testing.inner(do, o) + testing.inner(dht, ht)

    names = ("q", "k", "v", "beta", "initial_state")
    for name, res in testing.fd_check(loss, x, grads, names).items():
        assert res.ok, str(res)


# ----------------------------------------------------------------------------- grouped heads
def test_grouped_heads_equal_repeating_q_and_k():
    x = testing.make_inputs(op, **dict(DIMS, H=2, HV=4), initial_state=True)
    rep = dict(x, q=np.repeat(x["q"], 2, axis=2), k=np.repeat(x["k"], 2, axis=2))
    do, dht = testing.cotangents(*testing.run(op, "recurrent", x))
    for form in FORWARDS:
        testing.assert_close(testing.run(op, form, x, chunk_size=C),
                             testing.run(op, form, rep, chunk_size=C), name=form)
        got, ref = testing.vjp(op, form, x, do, dht, chunk_size=C), testing.vjp(op, form, rep, do, dht, chunk_size=C)
        for n in ("q", "k"):
            testing.assert_close(got[n], ref[n].reshape(got[n].shape[:2] + (2, 2, -1)).sum(3), name=f"d{n}")
        for n in ("v", "beta", "initial_state"):
            testing.assert_close(got[n], ref[n], name=f"d{n}")


# ----------------------------------------------------------------------------- stability
def _state_norms(x):
    """Spectral norm of the state entering every step (chunk size 1 gives every S_{t-1})."""
    inter = op.chunk_intermediates(x["q"], x["k"], x["v"], x["beta"], chunk_size=1,
                                   initial_state=x["initial_state"])
    return np.linalg.norm(inter["S_in"][0, 0], ord=2, axis=(-2, -1))    # [T]


def test_state_stays_bounded_for_unit_keys_and_beta_in_0_2():
    """numerics.md hazard 8: I - beta k k^T is a contraction for |k| = 1 and beta in [0, 2]."""
    rng = np.random.default_rng(3)
    T, K, V = 2000, 8, 4
    k = rng.standard_normal((1, T, 1, K))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    x = {"q": rng.standard_normal((1, T, 1, K)), "k": k, "v": rng.standard_normal((1, T, 1, V)),
         "beta": rng.uniform(0.05, 1.95, (1, T, 1)), "initial_state": np.zeros((1, 1, K, V))}
    norms = _state_norms(x)
    bound = 2 * np.sqrt(K * V) * np.abs(x["v"]).max()
    assert norms.max() < bound, (norms.max(), bound)
    assert norms[T // 2:].max() < 1.5 * norms[:T // 2].max() + 1e-12
    # the guard matters: the same keys with norm 1.5 (eigenvalue 1 - 1.95 * 2.25 < -1) explode
    assert _state_norms(dict(x, k=1.5 * k))[:400].max() > 1e4 * bound


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("bad", [-0.1, 2.5])
def test_beta_outside_0_2_is_rejected_without_activation(bad):
    x = testing.make_inputs(op, **DIMS, initial_state=True)
    beta = x["beta"].copy()
    beta[0, 3, 1] = bad
    for form in FORWARDS:
        with pytest.raises(InputError, match=r"delta_rule: argument 'beta' must lie in \[0, 2\] with "
                                             r"beta_activation='none'.*got .* at index \(0, 3, 1\)"):
            testing.run(op, form, dict(x, beta=beta), chunk_size=C)
    testing.run(op, "recurrent", dict(x, beta=beta, beta_activation="sigmoid"))   # raw logits: any real


def test_bad_option_values_are_rejected():
    x = testing.make_inputs(op, **DIMS, initial_state=True)
    with pytest.raises(InputError, match=r"delta_rule: option 'beta_activation' must be one of "
                                         r"\('none', 'sigmoid'\).*got 'relu'"):
        testing.run(op, "chunkwise", dict(x, beta_activation="relu"), chunk_size=C)
    with pytest.raises(TypeError, match=r"delta_rule: option 'use_qk_l2norm_in_kernel' must be True "
                                        r"or False, got 'yes'"):
        testing.run(op, "parallel", dict(x, use_qk_l2norm_in_kernel="yes"))


def test_value_heads_must_be_a_multiple_of_key_heads():
    x = testing.make_inputs(op, **dict(DIMS, H=2, HV=4), initial_state=True)
    bad = dict(x, v=x["v"][:, :, :3], beta=x["beta"][:, :, :3], initial_state=x["initial_state"][:, :3])
    with pytest.raises(InputError, match=r"grouped heads need HV \(value heads, 3 from argument 'v'\)"):
        testing.run(op, "recurrent", bad)


# ----------------------------------------------------------------------------- intermediates
def test_intermediates_match_the_recurrence():
    """S_in are the recurrent states at chunk starts, v_new the values written, and the WY form
    I - K^T w is the product of the chunk's transitions (I - beta k k^T)."""
    C, T = 4, 11
    x = testing.make_inputs(op, **dict(DIMS, T=T, B=1, H=1, HV=1), initial_state=True)
    inter = op.chunk_intermediates(x["q"], x["k"], x["v"], x["beta"], chunk_size=C,
                                   initial_state=x["initial_state"])
    k, v, b = (x[n][0, :, 0] for n in ("k", "v", "beta"))
    S, states, written = x["initial_state"][0, 0], [], []
    for t in range(T):
        states.append(S)
        written.append(b[t] * (v[t] - S.T @ k[t]))
        S = S + np.outer(k[t], written[-1])
    testing.assert_close(inter["S_in"][0, 0], np.stack(states[::C]), name="S_in")
    testing.assert_close(inter["final_state"][0, 0], S, name="final_state")
    v_new = inter["v_new"][0, 0].reshape(-1, v.shape[-1])[:T]
    testing.assert_close(v_new, np.stack(written), name="v_new")
    for n in range(3):
        kc, bc = k[n * C:(n + 1) * C], b[n * C:(n + 1) * C]
        m = len(bc)
        prod = np.eye(k.shape[1])
        for t in range(m):
            prod = (np.eye(k.shape[1]) - bc[t] * np.outer(kc[t], kc[t])) @ prod
        w = inter["w"][0, 0, n, :m]
        testing.assert_close(np.eye(k.shape[1]) - kc.T @ w, prod, name="WY product")
        A = np.eye(m) + np.tril(bc[:, None] * (kc @ kc.T), -1)          # definition of A
        testing.assert_close(A @ inter["T_mat"][0, 0, n, :m, :m], np.diag(bc), name="A T_mat")
        testing.assert_close(inter["u"][0, 0, n, :m], inter["T_mat"][0, 0, n, :m, :m] @ v[n * C:n * C + m],
                             name="u")


def test_attention_matrix_maps_v_to_o():
    x = testing.make_inputs(op, **dict(DIMS, T=10), initial_state=True)
    x0 = dict(x, initial_state=np.zeros_like(x["initial_state"]))
    M = op.attention_matrix(x["q"], x["k"], x["beta"])                  # [B, HV, T, T]
    o = np.moveaxis(M @ np.moveaxis(x["v"], 1, 2), 2, 1)
    testing.assert_close(o, testing.run(op, "recurrent", x0)[0])
    assert np.all(np.triu(M, 1) == 0)


def test_float32_stays_float32():
    x = testing.make_inputs(op, **DIMS, dtype=np.float32, initial_state=True)
    for form in FORWARDS:
        o, ht = testing.run(op, form, x, chunk_size=C)
        assert o.dtype == np.float32 and ht.dtype == np.float32, form
    do, dht = (c.astype(np.float32) for c in testing.cotangents(*testing.run(op, "recurrent", x)))
    for n, g in testing.vjp(op, "chunkwise", x, do, dht, chunk_size=C).items():
        assert g.dtype == np.float32, n
