"""retnet: what the generic equivalence suite does not cover.

- identity of recurrences.md section 4: retnet equals simple_gla with g broadcast to [B, T, H]
  (outputs, final states, gradients; retnet's dg is simple_gla's dg summed over B and T);
- RetNet's default decays (g=None);
- a head with g = -inf (gamma = 0) has no memory at all, exactly, in every form and backward;
- validation errors for the per-head gate.
"""
import numpy as np
import pytest

from linrec_ref import InputError, testing
from linrec_ref.ops import retnet, simple_gla
from linrec_ref.testing import assert_close

FORMS = ("recurrent", "parallel", "chunkwise")


COTANGENT_SEED = 100  # seed of testing.cotangents (the inputs use make_inputs' seed 0)


def _broadcast_gate(x):
    """retnet inputs -> simple_gla inputs: g [H] -> [B, T, H]."""
    B, T, H = x["q"].shape[:3]
    return dict(x, g=np.ascontiguousarray(np.broadcast_to(x["g"], (B, T, H))))


@pytest.mark.parametrize("regime", ["slow_decay", "typical", "fast_forgetting", "hard_reset"])
@pytest.mark.parametrize("form", FORMS)
def test_equals_simple_gla_with_constant_gate(regime, form):
    x = testing.make_inputs("retnet", regime, T=37, initial_state=True)
    o, ht = testing.run(retnet, form, x, chunk_size=8)
    do, dht = testing.cotangents(o, ht, seed=COTANGENT_SEED)
    grads = testing.vjp(retnet, form, x, do, dht, chunk_size=8)
    o_s, ht_s = testing.run(simple_gla, form, _broadcast_gate(x), chunk_size=8)
    grads_s = testing.vjp(simple_gla, form, _broadcast_gate(x), do, dht, chunk_size=8)
    assert_close(o, o_s, name=f"{form} o")
    assert_close(ht, ht_s, name=f"{form} final state")
    for name in ("q", "k", "v", "initial_state"):
        assert_close(grads[name], grads_s[name], name=f"{form} d{name}")
    assert_close(grads["g"], grads_s["g"].sum(axis=(0, 1)), name=f"{form} dg")


def test_step_and_attention_matrix_equal_simple_gla():
    x = testing.make_inputs("retnet", "typical", T=9, initial_state=True)
    xs = _broadcast_gate(x)
    assert_close(retnet.attention_matrix(x["q"], x["k"], x["g"]),
                 simple_gla.attention_matrix(xs["q"], xs["k"], xs["g"]), name="attention matrix")
    S, S_s = x["initial_state"], x["initial_state"]
    for t in range(x["q"].shape[1]):
        o_t, S = retnet.step(x["q"][:, t], x["k"][:, t], x["v"][:, t], x["g"], state=S)
        o_s, S_s = simple_gla.step(xs["q"][:, t], xs["k"][:, t], xs["v"][:, t], xs["g"][:, t], state=S_s)
        assert_close(o_t, o_s, name=f"step o[{t}]")
    assert_close(S, S_s, name="step state")


def test_default_decays_are_retnets():
    g = retnet.default_log_decay(4)
    gamma = np.array([1 - 1 / 32, 1 - 1 / 64, 1 - 1 / 128, 1 - 1 / 256])
    assert_close(np.exp(g), gamma, name="gamma_h = 1 - 2^(-5-h)")
    assert retnet.default_log_decay(3, np.float32).dtype == np.float32


@pytest.mark.parametrize("form", FORMS)
def test_g_none_uses_default_decays(form):
    x = testing.make_inputs("retnet", T=19, H=3, initial_state=True)
    given = dict(x, g=retnet.default_log_decay(3))
    default = {n: a for n, a in x.items() if n != "g"}
    o_d, ht_d = testing.run(retnet, form, default)
    do, dht = testing.cotangents(o_d, ht_d, seed=COTANGENT_SEED)
    grads_d = testing.vjp(retnet, form, default, do, dht)
    o_g, ht_g = testing.run(retnet, form, given)
    grads_g = testing.vjp(retnet, form, given, do, dht)
    assert_close((o_d, ht_d), (o_g, ht_g), name=f"{form} with g=None")
    assert grads_d["g"] is None  # no gate given: no gradient for it
    for name in ("q", "k", "v", "initial_state"):
        assert_close(grads_d[name], grads_g[name], name=f"{form} d{name} with g=None")
    o_m = retnet.attention_matrix(x["q"], x["k"])
    assert_close(o_m, retnet.attention_matrix(x["q"], x["k"], given["g"]), name="matrix, g=None")


@pytest.mark.parametrize("form", FORMS)
def test_zero_decay_head_has_no_memory(form):
    """g_h = -inf: o_t = scale (q_t . k_t) v_t exactly; S_0 and dg of that head are 0, no NaN."""
    x = testing.make_inputs("retnet", "typical", T=21, H=2, initial_state=True)
    x["g"] = np.array([np.log(0.9), -np.inf])
    o, ht = testing.run(retnet, form, x, chunk_size=4)
    do, dht = testing.cotangents(o, ht, seed=COTANGENT_SEED)
    grads = testing.vjp(retnet, form, x, do, dht, chunk_size=4)
    scale = x["q"].shape[-1] ** -0.5
    qk = np.sum(x["q"][:, :, 1] * x["k"][:, :, 1], axis=-1)          # [B, T]
    assert_close(o[:, :, 1], scale * qk[..., None] * x["v"][:, :, 1], name="memoryless head o")
    last = x["k"][:, -1, 1, :, None] * x["v"][:, -1, 1, None, :]    # [B, K, V]
    assert_close(ht[:, 1], last, name="memoryless head final state")
    assert np.all(grads["initial_state"][:, 1] == 0)
    assert grads["g"][1] == 0 and np.isfinite(grads["g"]).all()
    assert all(np.isfinite(grads[n]).all() for n in ("q", "k", "v"))


def test_dg_sums_over_varlen_segments():
    """g is shared by the packed sequences: its gradient is the sum of the per-segment ones."""
    x = testing.make_inputs("retnet", "typical", B=1, T=30, seed=4)
    cu = np.array([0, 11, 11, 30])
    rng = np.random.default_rng(7)
    do = rng.standard_normal(x["v"].shape)
    packed = testing.vjp(retnet, "chunkwise", dict(x, cu_seqlens=cu), do, chunk_size=4)
    total = np.zeros_like(x["g"])
    for lo, hi in ((0, 11), (11, 30)):
        part = {n: (a[:, lo:hi] if n != "g" else a) for n, a in x.items()}
        total += testing.vjp(retnet, "recurrent", part, do[:, lo:hi])["g"]
    assert_close(packed["g"], total, name="dg with cu_seqlens")


def test_gate_must_be_a_log_decay():
    x = testing.make_inputs("retnet", "typical", T=5)
    with pytest.raises(InputError, match=r"retnet: argument 'g' is a log decay.*Pass log\(a\)"):
        retnet.recurrent(**dict(x, g=np.array([0.9, 0.5])))


def test_gate_is_per_head_not_per_token():
    x = testing.make_inputs("retnet", "typical", T=5)
    per_token = np.zeros(x["q"].shape[:3])
    with pytest.raises(InputError, match=r"retnet: argument 'g' must have shape \[H\] = \[2\]"):
        retnet.chunkwise(**dict(x, g=per_token))
    with pytest.raises(InputError, match=r"retnet: argument 'g' has H=3 at axis 0, but H=2"):
        retnet.parallel(**dict(x, g=np.full(3, -0.1)))


def test_gate_dtype_and_nan():
    x = testing.make_inputs("retnet", "typical", T=5)
    with pytest.raises(InputError, match=r"retnet: argument 'g' has dtype float32"):
        retnet.recurrent(**dict(x, g=x["g"].astype(np.float32)))
    with pytest.raises(InputError, match=r"retnet: argument 'g' contains NaN"):
        retnet.step(x["q"][:, 0], x["k"][:, 0], x["v"][:, 0], np.array([np.nan, -0.1]))
