"""delta_product: n_h = 1 is gated_delta_rule (recurrences.md section 4), fla's interleaved layout
and its adapters, g = None as g = 0, grouped heads, stability for unit keys, the tokens x
sub-steps attention matrix, hard resets, n_h = 3, and the op-specific validation errors.

The generic suite (test_equivalence.py) compares every form and backward with the recurrent loop
and finite differences in every regime; this file covers what is specific to the op.
"""
import numpy as np
import pytest

from linrec_ref import InputError, testing
from linrec_ref.ops import delta_product as op
from linrec_ref.ops import gated_delta_rule as gdr

FORWARDS = ("recurrent", "parallel", "chunkwise")
VJPS = ("recurrent", "parallel", "chunkwise")
GRADS = ("q", "k", "v", "beta", "g", "initial_state")


DIMS = dict(T=11, B=2, NH=2, H=1, HV=2, K=5, V=4)
C = 4                                        # chunk size of the chunkwise forms


# ----------------------------------------------------------------------------- the recurrence
def test_recurrent_is_decay_then_householder_substeps_then_one_read():
    """One head, plain Python: S <- e^g S; for j: S <- S + b_j k_j (v_j - S^T k_j)^T; o = scale S^T q."""
    x = testing.make_inputs(op, regime="fast_forgetting", **dict(DIMS, T=6, B=1, NH=3, H=1, HV=1), initial_state=True)
    q, g = x["q"][0, :, 0], x["g"][0, :, 0]
    k, v, b = x["k"][0, :, :, 0], x["v"][0, :, :, 0], x["beta"][0, :, :, 0]
    S = x["initial_state"][0, 0].copy()
    outs = []
    for t in range(6):
        S = np.exp(g[t]) * S
        for j in range(3):
            S = S + b[t, j] * np.outer(k[t, j], v[t, j] - S.T @ k[t, j])
        outs.append(5 ** -0.5 * S.T @ q[t])
    ref = (np.array(outs)[None, :, None], S[None, None])
    for form in FORWARDS:
        testing.assert_close(testing.run(op, form, x, chunk_size=4), ref, name=form)
    testing.assert_close(testing.run_steps(op, x), ref, name="step")


# ----------------------------------------------------------------------------- n_h = 1
def _as_gated(x):
    """delta_product inputs with NH = 1 -> gated_delta_rule inputs (drop the sub-step axis)."""
    y = dict(x)
    y["k"], y["v"], y["beta"] = x["k"][:, :, 0], x["v"][:, :, 0], x["beta"][:, :, 0]
    return y


@pytest.mark.parametrize("variant", ["default", "l2norm_sigmoid"])
@pytest.mark.parametrize("regime", ["typical", "hard_reset", "beta_extremes"])
def test_one_householder_is_gated_delta_rule_forward(variant, regime):
    x = testing.make_inputs(op, regime=regime, **dict(DIMS, T=13, NH=1), variant=variant, initial_state=True)
    y = _as_gated(x)
    ref = testing.run(gdr, "recurrent", y)
    for form in FORWARDS:
        for C in (1, 3, 16):
            testing.assert_close(testing.run(op, form, x, chunk_size=C), ref, name=f"{form} C={C}")
    testing.assert_close(testing.run_steps(op, x), ref, name="step")
    opts = op.SPEC.variants[variant]
    M = op.attention_matrix(x["q"], x["k"], x["beta"], x["g"], **opts)
    testing.assert_close(M, gdr.attention_matrix(y["q"], y["k"], y["g"], y["beta"], **opts), name="M")


@pytest.mark.parametrize("variant", ["default", "l2norm_sigmoid"])
@pytest.mark.parametrize("regime", ["typical", "hard_reset"])
def test_one_householder_is_gated_delta_rule_gradients(variant, regime):
    x = testing.make_inputs(op, regime=regime, **dict(DIMS, T=13, NH=1), variant=variant, initial_state=True)
    y = _as_gated(x)
    do, dht = testing.cotangents(*testing.run(op, "recurrent", x))
    ref = testing.vjp(gdr, "recurrent", y, do, dht)
    for form in VJPS:
        got = testing.vjp(op, form, x, do, dht, chunk_size=3)
        got = {n: (got[n][:, :, 0] if n in ("k", "v", "beta") else got[n]) for n in GRADS}
        testing.assert_close(got, {n: ref[n] for n in GRADS}, name=f"{form}_vjp")


# ----------------------------------------------------------------------------- fla's layout
def test_interleaving_adapters_round_trip_and_follow_fla_positions():
    """Sub-step j of token t sits at position t*n_h + j of fla's [B, T*n_h, ...] layout."""
    rng = np.random.default_rng(0)
    B, T, NH, H, K = 2, 5, 3, 2, 4
    x = rng.standard_normal((B, T, NH, H, K))
    flat = op.to_interleaved(x)                                     # [B, T*NH, H, K]
    assert flat.shape == (B, T * NH, H, K)
    for t in range(T):
        for j in range(NH):
            assert np.array_equal(flat[:, t * NH + j], x[:, t, j])
    assert np.array_equal(op.from_interleaved(flat, NH), x)
    assert np.array_equal(op.to_interleaved(op.from_interleaved(flat, NH)), flat)
    beta = rng.uniform(size=(B, T * NH, H))                          # arrays without a feature axis
    assert np.array_equal(op.to_interleaved(op.from_interleaved(beta, NH)), beta)


@pytest.mark.parametrize("NH", [1, 2, 3])
def test_fla_layout_equals_gated_delta_rule_on_the_expanded_sequence(NH):
    """fla's own definition: q at the last sub-step, g at the first, gated delta rule over T*n_h
    sub-steps, read every n_h-th output. Built here by hand from the interleaved arrays and run
    through gated_delta_rule's recurrent loop; delta_product's own loop must agree."""
    rng = np.random.default_rng(NH)
    B, T, H, K, V = 2, 9, 2, 4, 3
    q = rng.standard_normal((B, T, H, K))
    k = rng.standard_normal((B, T * NH, H, K))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.standard_normal((B, T * NH, H, V))
    beta = rng.uniform(0, 2, (B, T * NH, H))
    g = np.log(rng.uniform(0.5, 0.99, (B, T, H)))
    h0 = rng.standard_normal((B, H, K, V))
    q_sub = np.zeros((B, T * NH, H, K))
    q_sub[:, NH - 1::NH] = q
    g_sub = np.zeros((B, T * NH, H))
    g_sub[:, ::NH] = g
    o_sub, h_ref = gdr.recurrent(q_sub, k, v, g_sub, beta, initial_state=h0, output_final_state=True)
    args = op.from_fla_layout(q, k, v, g, beta, num_householder=NH)
    for form in FORWARDS:
        testing.assert_close(testing.run(op, form, dict(args, initial_state=h0), chunk_size=2),
                             (o_sub[:, NH - 1::NH], h_ref), name=form)


def test_wrong_interleaving_is_an_input_error():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 4, 2, 3))
    k = rng.standard_normal((1, 8, 2, 3))
    v = rng.standard_normal((1, 8, 2, 5))
    beta = rng.uniform(size=(1, 8, 2))
    with pytest.raises(InputError, match=r"delta_product: argument 'k' has 8 sub-steps along axis 1, "
                                         r"which is not a multiple of num_householder=3"):
        op.from_interleaved(k, 3, name="k")
    for bad in (0, -2):
        with pytest.raises(InputError, match=rf"'num_householder' \(n_h, sub-steps per token\) must be >= 1, got {bad}"):
            op.from_interleaved(k, bad)
    with pytest.raises(TypeError, match=r"'num_householder' must be a positive integer, got float"):
        op.from_interleaved(k, 2.0)
    with pytest.raises(InputError, match=r"must have shape \[B, T, NH, \.\.\.\], got \(1, 8\)"):
        op.to_interleaved(beta[..., 0])
    with pytest.raises(InputError, match=r"argument 'v' must hold T\*n_h = 4\*2 = 8 sub-steps along axis 1 "
                                         r"\(T=4 from argument 'q', num_householder=2\), got 6"):
        op.from_fla_layout(q, k, v[:, :6], None, beta, 2)
    with pytest.raises(InputError, match=r"argument 'beta' must hold T\*n_h = 4\*2 = 8 sub-steps .* got 10"):
        op.from_fla_layout(q, k, v, None, np.concatenate([beta, beta[:, :2]], axis=1), 2)
    with pytest.raises(InputError, match=r"argument 'k' must hold T\*n_h = 4\*3 = 12 sub-steps .* got 8"):
        op.from_fla_layout(q, k, v, None, beta, 3)
    ok = op.from_fla_layout(q, k, v, None, beta, 2)                 # the consistent call passes
    assert ok["k"].shape == (1, 4, 2, 2, 3) and ok["beta"].shape == (1, 4, 2, 2) and ok["g"] is None


def test_mismatched_sub_step_counts_between_arguments():
    x = testing.make_inputs(op, **dict(DIMS, T=5, NH=2), initial_state=True)
    with pytest.raises(InputError, match=r"argument 'v' has NH=1 at axis 2, but NH=2 from argument 'k'"):
        op.recurrent(**dict(x, v=x["v"][:, :, :1]))


# ----------------------------------------------------------------------------- g = None
def test_no_gate_equals_zero_gate_in_every_form_and_gradient():
    x = testing.make_inputs(op, **dict(DIMS, T=10, NH=3), initial_state=True)
    x0 = dict(x, g=np.zeros_like(x["g"]))
    xn = dict(x, g=None)
    for form in FORWARDS:
        testing.assert_close(testing.run(op, form, xn, chunk_size=3),
                             testing.run(op, form, x0, chunk_size=3), name=form)
    testing.assert_close(testing.run_steps(op, xn),
                         testing.run_steps(op, x0), name="step")
    testing.assert_close(op.attention_matrix(x["q"], x["k"], x["beta"]),
                         op.attention_matrix(x["q"], x["k"], x["beta"], x0["g"]), name="M")
    do, dht = testing.cotangents(*testing.run(op, "recurrent", x))
    for form in VJPS:
        gn, g0 = testing.vjp(op, form, xn, do, dht, chunk_size=3), testing.vjp(op, form, x0, do, dht, chunk_size=3)
        assert gn["g"] is None
        names = ("q", "k", "v", "beta", "initial_state")
        testing.assert_close({n: gn[n] for n in names}, {n: g0[n] for n in names}, name=f"{form}_vjp")


# ----------------------------------------------------------------------------- grouped heads
def test_grouped_heads_equal_repeated_query_key_heads():
    """H = 1, HV = 2: both value heads read the one q/k head; gradients summed over the group."""
    x = testing.make_inputs(op, **dict(DIMS, T=9, NH=2, H=1, HV=2), initial_state=True)
    full = dict(x, q=np.repeat(x["q"], 2, axis=2), k=np.repeat(x["k"], 2, axis=3))
    do, dht = testing.cotangents(*testing.run(op, "recurrent", x))
    for form in FORWARDS:
        testing.assert_close(testing.run(op, form, x, chunk_size=2),
                             testing.run(op, form, full, chunk_size=2), name=form)
        g_grp = testing.vjp(op, form, x, do, dht, chunk_size=2)
        g_full = testing.vjp(op, form, full, do, dht, chunk_size=2)
        testing.assert_close(g_grp["q"], g_full["q"].reshape(2, 9, 1, 2, 5).sum(3), name=f"{form} dq")
        testing.assert_close(g_grp["k"], g_full["k"].reshape(2, 9, 2, 1, 2, 5).sum(4), name=f"{form} dk")
        testing.assert_close({n: g_grp[n] for n in ("v", "beta", "g", "initial_state")},
                             {n: g_full[n] for n in ("v", "beta", "g", "initial_state")}, name=form)
    testing.assert_close(testing.run_steps(op, x), testing.run(op, "recurrent", full), name="step")


# ----------------------------------------------------------------------------- stability
def test_state_never_grows_for_unit_keys_and_beta_in_0_2():
    """numerics.md hazard 8: with |k| = 1, beta in [0, 2], no writes (v = 0) and no decay, every
    sub-step is a contraction, so ||S||_F is non-increasing token after token (raw keys of norm 2
    with beta = 1 are not: that case grows, so the check can fail)."""
    x = testing.make_inputs(op, regime="beta_extremes", **dict(DIMS, T=200, NH=3, HV=1), seed=3, initial_state=True)
    x.update(v=np.zeros_like(x["v"]), g=None)
    x["beta"] = np.random.default_rng(4).uniform(0, 2, x["beta"].shape)
    norms = [np.linalg.norm(x["initial_state"])]
    state = x["initial_state"]
    for t in range(200):
        _, state = op.step(x["q"][:, t], x["k"][:, t], x["v"][:, t], x["beta"][:, t], state=state)
        norms.append(np.linalg.norm(state))
    assert np.all(np.diff(norms) <= 1e-12 * norms[0]), max(np.diff(norms))
    assert norms[-1] < norms[0]                                     # and it does contract
    _, bad = op.recurrent(x["q"][:, :20], 2 * x["k"][:, :20], x["v"][:, :20], np.ones_like(x["beta"][:, :20]),
                          initial_state=x["initial_state"], output_final_state=True)
    assert np.linalg.norm(bad) > 1e3 * norms[0]


def test_raw_keys_with_in_kernel_l2_norm_stay_bounded():
    x = testing.make_inputs(op, regime="slow_decay", **dict(DIMS, T=300, NH=2), variant="l2norm_sigmoid", seed=5,
                            initial_state=True)
    x["k"] = 10 * x["k"]
    o, ht = testing.run(op, "chunkwise", x, chunk_size=16)
    bound = np.linalg.norm(x["initial_state"]) + np.abs(x["v"]).sum(axis=(1, 2)).max()
    assert np.isfinite(o).all() and np.linalg.norm(ht) <= bound
    testing.assert_close((o, ht), testing.run(op, "recurrent", x), name="chunkwise vs recurrent")


# ----------------------------------------------------------------------------- resets, n_h = 3
def test_hard_reset_forgets_everything_before_the_token():
    """g_t = -inf: the state after token t is that of a fresh start at token t (exact)."""
    x = testing.make_inputs(op, regime="typical", **dict(DIMS, T=12, NH=2), initial_state=True)
    x["g"][:, 6] = -np.inf
    tail = {n: (x[n][:, 6:] if n in ("q", "k", "v", "beta", "g") else x[n]) for n in x}
    tail["initial_state"] = np.zeros_like(x["initial_state"])
    for form in FORWARDS:
        o, ht = testing.run(op, form, x, chunk_size=5)
        o_tail, ht_tail = testing.run(op, form, tail, chunk_size=5)
        testing.assert_close((o[:, 6:], ht), (o_tail, ht_tail), name=form)
        do, dht = testing.cotangents(*testing.run(op, "recurrent", x))
        do[:, :6] = 0                                               # only tokens >= 6 are read
        grads = testing.vjp(op, form, x, do, dht, chunk_size=5)
        assert all(np.isfinite(grads[n]).all() for n in GRADS)
        assert not np.any(grads["initial_state"]), form             # exactly cut by the reset
        for n in ("q", "k", "v", "beta", "g"):
            assert not np.any(grads[n][:, :6]), (form, n)
        assert np.any(grads["k"][:, 6:])


@pytest.mark.parametrize("regime", ["typical", "hard_reset", "beta_extremes"])
def test_three_householders_forms_gradients_and_finite_differences(regime):
    x = testing.make_inputs(op, regime=regime, **dict(DIMS, T=7, NH=3, H=1, HV=2), seed=7, initial_state=True)
    ref = testing.run(op, "recurrent", x)
    testing.assert_close(testing.run_steps(op, x), ref, name="step")
    for form, C in (("parallel", 4), ("chunkwise", 1), ("chunkwise", 3), ("chunkwise", 7)):
        testing.assert_close(testing.run(op, form, x, chunk_size=C), ref, name=f"{form} C={C}")
    do, dht = testing.cotangents(*ref)
    g_ref = testing.vjp(op, "recurrent", x, do, dht)
    for form, C in (("parallel", 4), ("chunkwise", 1), ("chunkwise", 3)):
        testing.assert_close(testing.vjp(op, form, x, do, dht, chunk_size=C), g_ref, name=f"{form}_vjp C={C}")

    def loss(inputs):
        o, ht = testing.run(op, "recurrent", inputs)
        return testing.inner(do, o) + testing.inner(dht, ht)
    for name, res in testing.fd_check(loss, x, g_ref, GRADS).items():
        assert res.ok, str(res)


# ----------------------------------------------------------------------------- attention matrix
def test_attention_matrix_maps_interleaved_values_to_outputs():
    """M: [B, HV, T, T*n_h] with o = M @ to_interleaved(v) (zero initial state); causal by token."""
    x = testing.make_inputs(op, regime="hard_reset", **dict(DIMS, T=8, NH=3), variant="l2norm_sigmoid",
                            initial_state=True)
    del x["initial_state"]
    o, _ = op.parallel(**x)
    opts = op.SPEC.variants["l2norm_sigmoid"]
    M = op.attention_matrix(x["q"], x["k"], x["beta"], x["g"], **opts)
    assert M.shape == (2, 2, 8, 24)
    v_sub = np.moveaxis(op.to_interleaved(x["v"]), 1, 2)           # [B, HV, T*NH, V]
    testing.assert_close(np.moveaxis(M @ v_sub, 2, 1), o, name="M v")
    token_of_column = np.arange(24) // 3
    assert np.all(M[..., token_of_column[None, :] > np.arange(8)[:, None]] == 0)


# ----------------------------------------------------------------------------- validation
def test_beta_range_and_option_errors_name_the_op():
    x = testing.make_inputs(op, **dict(DIMS, T=4), initial_state=True)
    beta = x["beta"].copy()
    beta[0, 1, 1, 0] = 2.5
    with pytest.raises(InputError, match=r"delta_product: argument 'beta' must lie in \[0, 2\] with "
                                         r"beta_activation='none'.* got \S*2\.5\S* at index \(0, 1, 1, 0\)"):
        op.chunkwise(**dict(x, beta=beta))
    with pytest.raises(InputError, match=r"delta_product: option 'beta_activation' must be one of"):
        op.recurrent(**x, beta_activation="softplus")
    with pytest.raises(TypeError, match=r"delta_product: option 'use_qk_l2norm_in_kernel' must be True or False"):
        op.parallel(**x, use_qk_l2norm_in_kernel="yes")
