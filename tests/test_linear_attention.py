"""linear_attention: what the generic equivalence suite does not cover.

- identity of recurrences.md section 4: simple_gla with g = 0 equals linear_attention;
- the normaliser (normalize=True) against a direct float64 formula from the definition, its
  split-and-carry with the state (S, z), its gradients (z_0 included), the scale cancelling;
- validation errors of the normalize option and of the tuple state.
"""
import numpy as np
import pytest

from linrec_ref import InputError, testing
from linrec_ref.ops import linear_attention as la
from linrec_ref.ops import simple_gla
from linrec_ref.testing import assert_close, fd_check, inner

FORMS = ("recurrent", "parallel", "chunkwise")


def _normalized_inputs(T, initial_state=True, **dims):
    """make_inputs of the "normalized" variant, with z_0 >= 0 (abs of the drawn z_0), which keeps
    q_t . z_t > 0 for positive q, k."""
    x = testing.make_inputs("linear_attention", variant="normalized", T=T, initial_state=initial_state,
                            **dims)
    if initial_state:
        S0, z0 = x["initial_state"]
        x["initial_state"] = (S0, np.abs(z0))
    return x


def _direct_normalized(q, k, v, S0, z0):
    """o_t = (q_t^T S_0 + sum_{s<=t} (q_t . k_s) v_s) / (q_t . (z_0 + sum_{s<=t} k_s)), float64."""
    B, T, H, _ = q.shape
    o = np.empty(v.shape)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                qt = q[b, t, h]
                num = qt @ S0[b, h] + sum((qt @ k[b, s, h]) * v[b, s, h] for s in range(t + 1))
                den = qt @ (z0[b, h] + k[b, :t + 1, h].sum(axis=0))
                o[b, t, h] = num / den
    S_T = S0 + np.einsum("bthk,bthv->bhkv", k, v)
    return o, (S_T, z0 + k.sum(axis=1))


@pytest.mark.parametrize("form", FORMS)
def test_simple_gla_with_zero_gate_equals_linear_attention(form):
    x = testing.make_inputs("linear_attention", T=29, initial_state=True)
    g = np.zeros(x["q"].shape[:3])
    o, ht = testing.run(la, form, x, chunk_size=8)
    do, dht = testing.cotangents(o, ht, seed=3)
    grads = testing.vjp(la, form, x, do, dht, chunk_size=8)
    o_s, ht_s = testing.run(simple_gla, form, dict(x, g=g), chunk_size=8)
    grads_s = testing.vjp(simple_gla, form, dict(x, g=g), do, dht, chunk_size=8)
    assert_close((o, ht), (o_s, ht_s), name=f"{form} forward")
    for name in ("q", "k", "v", "initial_state"):
        assert_close(grads[name], grads_s[name], name=f"{form} d{name}")
    if form == "recurrent":
        assert_close(la.attention_matrix(x["q"], x["k"]),
                     simple_gla.attention_matrix(x["q"], x["k"], g), name="attention matrix")
        o_t, _ = la.step(x["q"][:, 0], x["k"][:, 0], x["v"][:, 0], state=x["initial_state"])
        o_st, _ = simple_gla.step(x["q"][:, 0], x["k"][:, 0], x["v"][:, 0], g[:, 0],
                                  state=x["initial_state"])
        assert_close(o_t, o_st, name="step")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("with_state", [False, True])
def test_normalized_matches_direct_formula(form, with_state):
    x = _normalized_inputs(T=13, initial_state=with_state)
    B, _, H, K = x["q"].shape
    S0, z0 = x.get("initial_state", (np.zeros((B, H, K, x["v"].shape[-1])), np.zeros((B, H, K))))
    o, ht = testing.run(la, form, x, chunk_size=4)
    o_ref, ht_ref = _direct_normalized(x["q"], x["k"], x["v"], S0, z0)
    assert_close(o, o_ref, name=f"{form} normalized o")
    assert_close(ht, ht_ref, name=f"{form} final (S, z)")


def test_normalized_step_and_attention_matrix():
    x = _normalized_inputs(T=9, initial_state=False)
    o_ref, _ = la.recurrent(**x)
    M = la.attention_matrix(x["q"], x["k"], normalize=True)          # [B, H, T, T]
    assert_close(M.sum(axis=-1), np.ones(M.shape[:-1]), name="rows of M sum to 1")
    assert_close(np.moveaxis(M @ np.moveaxis(x["v"], 1, 2), 2, 1), o_ref, name="M V")
    B, _, H, K = x["q"].shape
    state = (np.zeros((B, H, K, x["v"].shape[-1])), np.zeros((B, H, K)))
    for t in range(x["q"].shape[1]):
        o_t, state = la.step(x["q"][:, t], x["k"][:, t], x["v"][:, t], state=state, normalize=True)
        assert_close(o_t, o_ref[:, t], name=f"step {t}")


@pytest.mark.parametrize("form", FORMS)
def test_normalized_split_and_carry(form):
    """(S, z) carried across a split equals one call; carrying S alone (z reset) does not."""
    x = _normalized_inputs(T=20)
    o_full, ht_full = testing.run(la, form, x, chunk_size=3)
    first = {n: (a[:, :7] if n in "qkv" else a) for n, a in x.items()}
    rest = {n: (a[:, 7:] if n in "qkv" else a) for n, a in x.items()}
    o1, h1 = testing.run(la, form, first, chunk_size=3)
    o2, h2 = testing.run(la, form, dict(rest, initial_state=h1), chunk_size=3)
    assert_close(np.concatenate([o1, o2], axis=1), o_full, name=f"{form} split o")
    assert_close(h2, ht_full, name=f"{form} split final state")
    # fla's normaliser uses the keys of the current call only: that is z reset to 0 at the split
    o2_fla, _ = testing.run(la, form, dict(rest, initial_state=(h1[0], np.zeros_like(h1[1]))), chunk_size=3)
    assert not testing.compare(o2_fla, o_full[:, 7:]).ok


def test_normalized_agrees_with_fla_convention_without_state():
    """With z_0 = 0 and one call, o = (scale S_t^T q_t) / (scale q_t . cumsum(k)_t) (fla's math)."""
    x = _normalized_inputs(T=15, initial_state=False)
    scale = 0.37
    o, _ = la.chunkwise(**x, scale=scale, chunk_size=4)
    o_plain, _ = la.recurrent(x["q"], x["k"], x["v"], scale=scale)       # scale S_t^T q_t
    den = scale * np.sum(x["q"] * np.cumsum(x["k"], axis=1), axis=-1)      # [B, T, H]
    assert_close(o, o_plain / den[..., None], name="fla normalize convention")


def test_scale_cancels_when_normalized():
    x = _normalized_inputs(T=11)
    o1, h1 = testing.run(la, "parallel", x)
    o2, h2 = testing.run(la, "parallel", x, scale=3.0)
    assert_close((o1, h1), (o2, h2), name="normalize=True ignores scale")


def test_first_token_without_state_is_v():
    """z_0 = 0, S_0 = 0: o_1 = v_1 (q_1 . k_1) / (q_1 . k_1) = v_1 for any positive q, k."""
    x = _normalized_inputs(T=6, initial_state=False)
    for form in FORMS:
        o, _ = testing.run(la, form, x)
        assert_close(o[:, 0], x["v"][:, 0], name=f"{form} o_1")


def test_normalized_gradients_finite_differences():
    x = _normalized_inputs(T=10, B=1, H=1)
    do, dht = testing.cotangents(*testing.run(la, "recurrent", x), seed=11)

    def loss(inp):
        o, ht = testing.run(la, "recurrent", inp)
        return inner(do, o) + inner(dht, ht)

    grads = testing.vjp(la, "recurrent", x, do, dht)
    for name, c in fd_check(loss, x, grads, ("q", "k", "v", "initial_state")).items():
        assert c.ok, str(c)
    for form in ("parallel", "chunkwise"):
        assert_close(testing.vjp(la, form, x, do, dht), grads, name=f"{form}_vjp")


def test_normalize_must_be_bool():
    x = testing.make_inputs("linear_attention", T=23)
    with pytest.raises(TypeError, match=r"linear_attention: option 'normalize' must be True or False"):
        la.recurrent(**x, normalize="yes")
    with pytest.raises(TypeError, match=r"linear_attention: option 'normalize' must be True or False"):
        la.attention_matrix(x["q"], x["k"], normalize=1)


def test_normalized_state_is_a_tuple():
    x = _normalized_inputs(T=5)
    S0, z0 = x["initial_state"]
    with pytest.raises(TypeError, match=r"linear_attention: argument 'initial_state' must be a tuple of 2 arrays \(S: \[N, H, K, V\], z: \[N, H, K\]\), got a ndarray"):
        la.chunkwise(**dict(x, initial_state=S0))
    with pytest.raises(InputError, match=r"linear_attention: argument 'initial_state.z' must have shape \[N, H, K\]"):
        la.parallel(**dict(x, initial_state=(S0, z0[..., None])))
    with pytest.raises(TypeError, match=r"linear_attention: argument 'dht' must be a tuple"):
        la.recurrent_vjp(**x, do=np.zeros(x["v"].shape), dht=S0)


@pytest.mark.parametrize("form", FORMS + ("step",))
def test_zero_denominator_is_an_error(form):
    """No eps: an exactly zero q_t . z_t raises instead of returning Inf/NaN."""
    x = _normalized_inputs(T=6, initial_state=False)
    x["q"][0, 2, 1] = 0.0
    with pytest.raises(InputError, match=r"linear_attention: normalize=True divides by q_t \. z_t, which is exactly 0"):
        if form == "step":
            B, _, H, K = x["q"].shape
            state = (np.zeros((B, H, K, x["v"].shape[-1])), np.zeros((B, H, K)))
            la.step(x["q"][:, 2], x["k"][:, 2], x["v"][:, 2], state=state, normalize=True)
        else:
            testing.run(la, form, x)
    if form != "step":
        with pytest.raises(InputError, match=r"exactly 0"):
            testing.vjp(la, form, x, np.ones(x["v"].shape))
