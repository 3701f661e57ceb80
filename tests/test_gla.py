"""gla specifics: the simple_gla identity, both chunkwise paths of ``_decay``, the value gate,
the read-before-update core reused by rwkv6, exact resets, and gla's own validation errors."""
import numpy as np
import pytest

from linrec_ref import _decay, testing
from linrec_ref._scan import to_chunks
from linrec_ref._validation import InputError
from linrec_ref.ops import gla, simple_gla

REGIMES = tuple(testing.DECAY_REGIMES)
FORMS = ("recurrent", "parallel", "chunkwise")


def _core_inputs(x):
    """Inputs of gla's dense cores (initial state materialised, scale resolved)."""
    B, _, H, K = x["q"].shape
    h0 = x.get("initial_state")
    h0 = np.zeros((B, H, K, x["v"].shape[-1]), x["q"].dtype) if h0 is None else h0
    return dict(q=x["q"], k=x["k"], v=x["v"], g=x["g"], gv=x.get("gv"),
                scale=K ** -0.5, initial_state=h0)


# ------------------------------------------------------------------------------ gla vs simple_gla
@pytest.mark.parametrize("regime", REGIMES)
def test_gate_constant_over_k_is_simple_gla(regime):
    """recurrences.md section 4: gla with g[b, t, h, :] = g_s[b, t, h] equals simple_gla, in all
    forms, the step and every backward; dg summed over K equals simple_gla's dg."""
    xs = testing.make_inputs("simple_gla", regime, T=37, initial_state=True, seed=3)
    K = xs["q"].shape[-1]
    xg = dict(xs, g=np.repeat(xs["g"][..., None], K, axis=-1))
    do, dht = testing.cotangents(*testing.run(simple_gla, "recurrent", xs))
    for form in FORMS:
        want = testing.run(simple_gla, form, xs, chunk_size=8)
        testing.assert_close(testing.run(gla, form, xg, chunk_size=8), want, "float64", form)
        gs = testing.vjp(simple_gla, form, xs, do, dht, chunk_size=8)
        gg = testing.vjp(gla, form, xg, do, dht, chunk_size=8)
        assert gg["gv"] is None
        for name in ("q", "k", "v", "initial_state"):
            testing.assert_close(gg[name], gs[name], "float64", f"{form} d{name}")
        testing.assert_close(gg["g"].sum(-1), gs["g"], "float64", f"{form} dg summed over K")
    S_s = S_g = xs["initial_state"]
    for t in range(xs["q"].shape[1]):
        o_s, S_s = simple_gla.step(*(xs[n][:, t] for n in ("q", "k", "v", "g")), state=S_s)
        o_g, S_g = gla.step(*(xg[n][:, t] for n in ("q", "k", "v", "g")), state=S_g)
        testing.assert_close((o_g, S_g), (o_s, S_s), "float64", f"step {t}")
    M = gla.attention_matrix(xg["q"], xg["k"], xg["g"])
    testing.assert_close(M, simple_gla.attention_matrix(xs["q"], xs["k"], xs["g"]), "float64", "M")


@pytest.mark.parametrize("regime", ["typical", "hard_reset"])
def test_scalar_key_and_value_gates_combine_into_simple_gla(regime):
    """g constant over K and gv constant over V: S_t = e^{g_t + gv_t} S_{t-1} + k v^T, so gla
    equals simple_gla with the summed gate, and both dg (over K) and dgv (over V) sum to its dg."""
    xs = testing.make_inputs("simple_gla", regime, T=29, initial_state=True, seed=5)
    split = np.random.default_rng(0).uniform(0.2, 0.8, xs["g"].shape)
    g_k, g_v = split * xs["g"], (1 - split) * xs["g"]                 # g_k + g_v = g
    g_k[np.isneginf(xs["g"])] = -np.inf                                # a reset on the key side only
    K, V = xs["q"].shape[-1], xs["v"].shape[-1]
    xg = dict(xs, g=np.repeat(g_k[..., None], K, -1), gv=np.repeat(g_v[..., None], V, -1))
    do, dht = testing.cotangents(*testing.run(simple_gla, "recurrent", xs))
    for form in FORMS:
        testing.assert_close(testing.run(gla, form, xg, chunk_size=6),
                             testing.run(simple_gla, form, xs, chunk_size=6), "float64", form)
        gs = testing.vjp(simple_gla, form, xs, do, dht, chunk_size=6)
        gg = testing.vjp(gla, form, xg, do, dht, chunk_size=6)
        finite = ~np.isneginf(xs["g"])                                 # d/dg is 0 at a reset
        testing.assert_close(np.where(finite, gg["g"].sum(-1), 0), np.where(finite, gs["g"], 0),
                             "float64", f"{form} dg")
        testing.assert_close(np.where(finite, gg["gv"].sum(-1), 0), np.where(finite, gs["g"], 0),
                             "float64", f"{form} dgv")


@pytest.mark.parametrize("form", FORMS)
def test_zero_value_gate_equals_no_value_gate(form):
    x = testing.make_inputs("gla", "typical", T=21, variant="value_gate", initial_state=True)
    x0 = dict(x, gv=np.zeros_like(x["gv"]))
    x_none = {k: v for k, v in x.items() if k != "gv"}
    o_none = testing.run(gla, form, x_none, chunk_size=5)
    testing.assert_close(testing.run(gla, form, x0, chunk_size=5), o_none)
    do, dht = testing.cotangents(*o_none)
    g0 = testing.vjp(gla, form, x0, do, dht, chunk_size=5)
    gn = testing.vjp(gla, form, x_none, do, dht, chunk_size=5)
    assert gn["gv"] is None and g0["gv"].shape == x["gv"].shape
    testing.assert_close({k: g0[k] for k in ("q", "k", "v", "g", "initial_state")},
                         {k: gn[k] for k in ("q", "k", "v", "g", "initial_state")}, "float64", form)


def test_value_gate_step_decoding_equals_recurrent():
    x = testing.make_inputs("gla", "hard_reset", T=17, variant="value_gate", initial_state=True)
    o_ref, S_ref = testing.run(gla, "recurrent", x)
    S = x["initial_state"]
    for t in range(17):
        o_t, S = gla.step(*(x[n][:, t] for n in ("q", "k", "v", "g", "gv")), state=S)
        testing.assert_close(o_t, o_ref[:, t], "float64", f"o_{t}")
    testing.assert_close(S, S_ref, "float64", "final state")


# ------------------------------------------------------------------------------ the two chunkwise paths
@pytest.mark.parametrize("variant", ["default", "value_gate"])
@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("path", ["fast", "exact", "auto"])
def test_both_chunkwise_paths_agree_with_recurrent(regime, variant, path):
    """fast_bound=inf factors every chunk without a -inf gate, 0 makes every chunk exact."""
    bound = {"fast": np.inf, "exact": 0.0, "auto": None}[path]
    x = testing.make_inputs("gla", regime, T=45, variant=variant, initial_state=True, seed=11)
    want = testing.run(gla, "recurrent", x)
    do, dht = testing.cotangents(*want)
    want_grads = testing.vjp(gla, "recurrent", x, do, dht)
    cx = _core_inputs(x)
    for C in (1, 4, 16, 45):
        got = gla.chunked_forward(**cx, chunk_size=C, fast_bound=bound)
        testing.assert_close(got, want, "float64", f"forward C={C}")
        grads = gla.chunked_vjp(**cx, do=do, dht=dht, chunk_size=C, fast_bound=bound)
        testing.assert_close(grads, want_grads, "float64", f"vjp C={C}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_fast_path_is_chosen_by_the_chunk_decay_range(dtype):
    dims = dict(B=1, T=256, H=2, K=16, V=4)
    gate = lambda regime: to_chunks(testing.make_inputs("gla", regime, dtype=dtype, **dims)["g"], 64)
    assert _decay.chunk_decay(gate("typical")).fast.all()            # range ~ 64 * 0.36 = 23
    ff = _decay.chunk_decay(gate("fast_forgetting")).fast            # range ~ 64 * 1.9 = 120
    assert (not ff.any()) if dtype == np.float32 else ff.all()       # bound 60 / 600
    g = gate("hard_reset")
    hr = _decay.chunk_decay(g).fast
    assert np.array_equal(hr, ~np.isneginf(g).any(axis=(-2, -1)))     # -inf chunks go exact


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fast_path_at_its_bound_matches_the_float64_reference(dtype):
    """A chunk whose decay range is just below the bound (exp(-G) ~ e^59 / e^599) still factors
    accurately; the exact path gives the same result."""
    C = 32
    bound = _decay.FAST_BOUND[np.dtype(dtype)]
    x = testing.make_inputs("gla", "typical", T=96, K=8, V=4, initial_state=True, seed=2)
    x["g"][..., 0] = -(bound - 1) / C                                # channel 0 spans the range
    want = testing.run(gla, "recurrent", x)
    xd = {k: v.astype(dtype) for k, v in x.items()}
    assert _decay.chunk_decay(to_chunks(xd["g"], C)).fast.all()
    for fb in (None, 0.0):
        got = gla.chunked_forward(**_core_inputs(xd), chunk_size=C, fast_bound=fb)
        testing.assert_close(got, want, testing.tier_for(dtype), f"fast_bound={fb}")


@pytest.mark.parametrize("strict", [False, True])
def test_decay_products_match_their_definition(strict):
    """_decay's three products, both paths, against the definition with explicit loops."""
    rng = np.random.default_rng(0)
    M, C, D = 5, 7, 3
    g = np.log(rng.uniform(0.05, 0.99, (M, C, D)))
    g[1, 3, 0] = g[2, 0, :] = g[4, 6, 2] = -np.inf
    x, y, z = (rng.standard_normal((M, C, D)) for _ in range(3))
    W = rng.standard_normal((M, C, C))
    E = np.zeros((M, C, C, D))                                         # exp(Gq_t - G_s) on the mask
    for t in range(C):
        for s in range(t if strict else t + 1):
            E[:, t, s] = np.exp(g[:, s + 1:t + (0 if strict else 1)].sum(axis=1))
    want_scores = np.einsum("mtd,msd,mtsd->mts", x, y, E)
    want_mix = np.einsum("mts,msd,mtsd->mtd", W, z, E)
    want_mix_t = np.einsum("mts,mtd,mtsd->msd", W, z, E)
    for bound in (0.0, np.inf, None):
        d = _decay.chunk_decay(g, strict=strict, fast_bound=bound)
        assert d.fast.sum() == (0 if bound == 0.0 else 2)             # chunks 0 and 3 have no -inf
        testing.assert_close(_decay.decayed_scores(x, y, d), want_scores, "float64", "scores")
        testing.assert_close(_decay.decayed_mix(W, z, d), want_mix, "float64", "mix")
        testing.assert_close(_decay.decayed_mix_t(W, z, d), want_mix_t, "float64", "mix_t")
        to_end = np.exp(np.stack([g[:, s + 1:].sum(axis=1) for s in range(C)], axis=1))
        testing.assert_close(d.to_end, to_end, "float64", "to_end")
        testing.assert_close(d.total, np.exp(g.sum(axis=1)), "float64", "total")
        assert not any(np.isnan(a).any() for a in (d.exp_Gq, d.exp_neg_G, d.to_end))


def test_exact_path_is_processed_in_bounded_blocks(monkeypatch):
    monkeypatch.setattr(_decay, "EXACT_BLOCK", 2 * 5 * 5 * 3)        # two chunks per block
    rng = np.random.default_rng(1)
    g = np.log(rng.uniform(0.05, 0.3, (2, 3, 5, 3)))
    x, y = rng.standard_normal((2, 3, 5, 3)), rng.standard_normal((2, 3, 5, 3))
    d = _decay.chunk_decay(g, fast_bound=0.0)
    blocks = list(_decay._exact_blocks(d))
    assert [E.shape[0] for _, E in blocks] == [2, 2, 2]
    d_fast = _decay.chunk_decay(g, fast_bound=np.inf)
    testing.assert_close(_decay.decayed_scores(x, y, d), _decay.decayed_scores(x, y, d_fast))


# ------------------------------------------------------------------------------ read before update
def _read_before_update_loop(q, k, v, g, gv, scale, initial_state):
    """o_t = scale S_{t-1}^T q_t; S_t = diag(e^{g_t}) S_{t-1} diag(e^{gv_t}) + k_t v_t^T."""
    S = initial_state
    o = np.empty_like(v)
    for t in range(q.shape[1]):
        o[:, t] = scale * np.einsum("bhk,bhkv->bhv", q[:, t], S)
        S = np.exp(g[:, t])[..., None] * S
        if gv is not None:
            S = S * np.exp(gv[:, t])[..., None, :]
        S = S + k[:, t, :, :, None] * v[:, t, :, None, :]
    return o, S


@pytest.mark.parametrize("variant", ["default", "value_gate"])
@pytest.mark.parametrize("regime", ["typical", "hard_reset"])
def test_strict_core_reads_before_the_update(regime, variant):
    """chunked_forward(strict=True) (reused by rwkv6) against its loop, both paths; its vjp
    against central finite differences of the forward."""
    x = testing.make_inputs("gla", regime, T=19, variant=variant, initial_state=True, seed=4)
    cx = _core_inputs(x)
    want = _read_before_update_loop(**cx)
    do, dht = testing.cotangents(*want)
    for C in (1, 5, 19):
        for bound in (None, 0.0):
            got = gla.chunked_forward(**cx, chunk_size=C, strict=True, fast_bound=bound)
            testing.assert_close(got, want, "float64", f"strict C={C} bound={bound}")
    grads = gla.chunked_vjp(**cx, do=do, dht=dht, chunk_size=5, strict=True)
    exact = gla.chunked_vjp(**cx, do=do, dht=dht, chunk_size=5, strict=True, fast_bound=0.0)
    testing.assert_close(grads, exact, "float64", "strict vjp fast vs exact")

    def loss(inp):
        o, S = gla.chunked_forward(**inp, chunk_size=5, strict=True)
        return testing.inner(do, o) + testing.inner(dht, S)

    names = [n for n in ("q", "k", "v", "g", "gv", "initial_state") if cx[n] is not None]
    for name, c in testing.fd_check(loss, cx, grads, names).items():
        assert c.ok, str(c)


# ------------------------------------------------------------------------------ resets, matrix
@pytest.mark.parametrize("form", FORMS)
def test_per_channel_hard_reset_forgets_only_that_channel(form):
    """g[:, r, :, c] = -inf zeroes row c of the state exactly: whatever came before r in
    channel c has no effect on the outputs from r on, and gets an exact zero gradient from them."""
    x = testing.make_inputs("gla", "typical", T=20, initial_state=True)
    r, c = 9, 3
    x["g"][:, r, :, c] = -np.inf
    x["q"][:, r:, :, :c] = x["q"][:, r:, :, c + 1:] = 0      # later reads use channel c only
    o, _ = testing.run(gla, form, x, chunk_size=4)
    y = {k: v.copy() for k, v in x.items()}
    y["k"][:, :r, :, c] = 7.0                                   # channel c's past writes: anything
    y["initial_state"][:, :, c] *= 100
    o2, _ = testing.run(gla, form, y, chunk_size=4)
    testing.assert_close(o2[:, r:], o[:, r:], "float64", "outputs after the reset")
    do = np.zeros_like(o)
    do[:, r:] = 1
    grads = testing.vjp(gla, form, x, do, chunk_size=4)
    assert all(np.isfinite(v).all() for v in grads.values() if v is not None)
    assert np.all(grads["k"][:, :r, :, c] == 0) and np.all(grads["initial_state"][:, :, c] == 0)
    assert np.all(grads["g"][:, :r + 1, :, c] == 0)            # incl. the -inf entry itself


def test_attention_matrix_maps_v_to_o_and_takes_no_value_gate():
    x = testing.make_inputs("gla", "hard_reset", T=15)
    M = gla.attention_matrix(x["q"], x["k"], x["g"])
    assert M.shape == (2, 2, 15, 15) and np.all(np.triu(M, 1) == 0)
    o = np.moveaxis(M @ np.moveaxis(x["v"], 1, 2), 2, 1)
    testing.assert_close(o, gla.parallel(**x)[0], "float64", "M @ v")
    with pytest.raises(TypeError, match="gv"):
        gla.attention_matrix(x["q"], x["k"], x["g"], gv=np.zeros_like(x["v"]))


def test_float32_chunkwise_matches_the_float64_reference_on_both_paths():
    x = testing.make_inputs("gla", "fast_forgetting", T=130, variant="value_gate",
                            dtype=np.float32, initial_state=True, seed=9)
    want = testing.run(gla, "recurrent", testing.as_float64(x))
    for C in (16, 64):                                          # range ~30 (fast), ~120 (exact)
        got = testing.run(gla, "chunkwise", x, chunk_size=C)
        assert got[0].dtype == np.float32 and got[1].dtype == np.float32
        testing.assert_close(got, want, "float32", f"C={C}")


# ------------------------------------------------------------------------------ validation
def test_value_gate_with_the_wrong_value_size_is_rejected():
    x = testing.make_inputs("gla", "typical", T=6, variant="value_gate")
    with pytest.raises(InputError, match=r"'gv'.*V=5.*V=6"):
        gla.chunkwise(**dict(x, gv=x["gv"][..., :5]))


def test_value_gate_given_on_the_key_size_is_rejected():
    x = testing.make_inputs("gla", "typical", T=6, variant="value_gate")
    bad = np.zeros(x["q"].shape)                                 # [B, T, H, K] with K = 8 != V = 6
    with pytest.raises(InputError, match="'gv'"):
        gla.recurrent(**dict(x, gv=bad))


def test_positive_value_gate_is_rejected_as_not_a_log_decay():
    x = testing.make_inputs("gla", "typical", T=6, variant="value_gate")
    gv = x["gv"].copy()
    gv[0, 2, 1, 3] = 0.5
    with pytest.raises(InputError, match=r"'gv' is a log decay.*index \(0, 2, 1, 3\)"):
        gla.parallel(**dict(x, gv=gv))


def test_scalar_gate_passed_to_gla_is_rejected():
    x = testing.make_inputs("gla", "typical", T=6, variant="value_gate")
    with pytest.raises(InputError, match=r"'g' must have shape \[B, T, H, K\]"):
        gla.recurrent(**dict(x, g=x["g"][..., 0]))


def test_value_gate_dtype_must_match():
    x = testing.make_inputs("gla", "typical", T=6, variant="value_gate")
    with pytest.raises(InputError, match=r"'gv' has dtype float32"):
        gla.chunkwise_vjp(**dict(x, gv=x["gv"].astype(np.float32)), do=np.ones_like(x["v"]))


def test_value_gate_step_with_a_time_axis_is_rejected():
    x = testing.make_inputs("gla", "typical", T=6, variant="value_gate")
    token = {n: x[n][:, 0] for n in ("q", "k", "v", "g")}
    with pytest.raises(InputError, match="'gv'"):
        gla.step(**token, gv=x["gv"])                           # [B, T, H, V] instead of [B, H, V]
