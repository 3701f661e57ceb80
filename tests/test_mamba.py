"""mamba specifics: mamba_ssm's selective_scan_ref, the gla identity, optional inputs, the hidden
attention matrix, zero step sizes, and the op-specific validation errors."""
import numpy as np
import pytest

from linrec_ref import InputError, testing
from linrec_ref.ops import mamba

FORMS = ("recurrent", "parallel", "chunkwise")
OPTIONAL = ("D", "z", "delta_bias")


# ----------------------------------------------------------------------------- the peer, in NumPy
def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """A literal float64 transcription of mamba_ssm's ``selective_scan_ref`` (real A, variable B
    and C with one group), in its own layout: u, delta, z: [batch, dim, L]; A: [dim, dstate];
    B, C: [batch, dstate, L]; D, delta_bias: [dim]. Returns (out, last_state [batch, dim, dstate]).
    """
    if delta_bias is not None:
        delta = delta + delta_bias[..., None]
    if delta_softplus:  # torch.nn.functional.softplus(beta=1, threshold=20)
        delta = np.where(delta > 20, delta, np.log1p(np.exp(np.minimum(delta, 20))))
    batch, dim, dstate = u.shape[0], A.shape[0], A.shape[1]
    x = np.zeros((batch, dim, dstate))
    deltaA = np.exp(np.einsum("bdl,dn->bdln", delta, A))
    deltaB_u = np.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    ys = []
    for i in range(u.shape[2]):
        x = deltaA[:, :, i] * x + deltaB_u[:, :, i]
        ys.append(np.einsum("bdn,bn->bd", x, C[:, :, i]))
    y = np.stack(ys, axis=2)                                       # [batch, dim, L]
    out = y if D is None else y + u * D[:, None]
    if z is not None:
        out = out * (z / (1 + np.exp(-z)))                          # F.silu
    return out, x


def run_peer(x):
    """selective_scan_ref on the library's inputs: [B, T, .] -> [batch, ., L] and back."""
    tr = lambda a: None if a is None else np.swapaxes(a, 1, 2)
    out, last = selective_scan_ref(tr(x["u"]), tr(x["delta"]), x["A"], tr(x["Bm"]), tr(x["Cm"]),
                                   x.get("D"), tr(x.get("z")), x.get("delta_bias"),
                                   x.get("delta_softplus", False))
    return tr(out), last


def inputs(variant="default", regime="typical", T=13, drop=(), **kw):
    """make_inputs with some optional inputs removed."""
    x = testing.make_inputs("mamba", regime, T=T, variant=variant, **kw)
    for name in drop:
        x.pop(name, None)
    return x


# ----------------------------------------------------------------------------- against the peer
@pytest.mark.parametrize("variant", ["default", "plain"])
@pytest.mark.parametrize("regime", mamba.SPEC.regimes)
def test_recurrent_matches_selective_scan_ref(variant, regime):
    x = inputs(variant, regime, T=37, seed=3)
    y, h = mamba.recurrent(**x, output_final_state=True)
    testing.assert_close((y, h), run_peer(x), "float64", f"recurrent vs peer ({variant})")


# Optional-argument combinations beyond the two variants: each optional input alone, and the
# bias without softplus (delta + bias used as the step size) and softplus without the bias.
COMBOS = {
    "z only": dict(variant="plain", keep=("z",)),
    "D only": dict(variant="plain", keep=("D",)),
    "bias without softplus": dict(variant="plain", keep=("delta_bias",)),
    "softplus without bias": dict(variant="default", keep=("D", "z")),
}


def combo_inputs(name, T=11, **kw):
    c = COMBOS[name]
    full = inputs("default", T=T, **kw)                             # has D, z, delta_bias
    x = inputs(c["variant"], T=T, drop=OPTIONAL, **kw)
    x.update({k: full[k] for k in c["keep"]})
    if name == "bias without softplus":                              # keep delta + bias >= 0
        x["delta"] = x["delta"] - x["delta_bias"]
    return x


@pytest.mark.parametrize("name", COMBOS)
def test_optional_inputs_match_the_peer_and_every_form(name):
    x = combo_inputs(name, initial_state=True)
    x_peer = {k: v for k, v in x.items() if k != "initial_state"}
    testing.assert_close(mamba.recurrent(**x_peer, output_final_state=True), run_peer(x_peer),
                         "float64", f"{name}: recurrent vs selective_scan_ref")
    ref = testing.run("mamba", "recurrent", x)
    testing.assert_close(testing.run_steps("mamba", x), ref, "float64", f"{name}: step loop")
    for form in ("parallel", "chunkwise"):
        testing.assert_close(testing.run("mamba", form, x, chunk_size=4), ref, "float64", f"{name}: {form}")


@pytest.mark.parametrize("name", COMBOS)
def test_optional_inputs_gradients(name):
    x = combo_inputs(name, initial_state=True, seed=1)
    rng = np.random.default_rng(2)
    do, dht = testing.cotangents(*testing.run("mamba", "recurrent", x), rng=rng)
    ref = testing.vjp("mamba", "recurrent", x, do, dht)
    given = [n for n in mamba.SPEC.input_names if x.get(n) is not None] + ["initial_state"]
    assert [n for n in ref if ref[n] is not None] == given
    for form in ("parallel", "chunkwise"):
        got = testing.vjp("mamba", form, x, do, dht, chunk_size=4)
        testing.assert_close(got, ref, "float64", f"{form}_vjp")

    def loss(inp):
        o, h = testing.run("mamba", "recurrent", inp)
        return testing.inner(do, o) + testing.inner(dht, h)

    for n, res in testing.fd_check(loss, x, ref, given, rng=rng).items():
        assert res.ok, str(res)


def test_recurrent_vjp_over_several_checkpoint_blocks():
    """T = 150 crosses two boundaries of the reverse sweep's 64-step checkpoint blocks."""
    x = inputs("default", "slow_decay", T=150, initial_state=True, seed=4, B=1)
    rng = np.random.default_rng(5)
    do, dht = testing.cotangents(*testing.run("mamba", "recurrent", x), rng=rng)
    ref = testing.vjp("mamba", "recurrent", x, do, dht)

    def loss(inp):
        o, h = testing.run("mamba", "recurrent", inp)
        return testing.inner(do, o) + testing.inner(dht, h)

    for n, res in testing.fd_check(loss, x, ref, list(ref), rng=rng, n_entries=2).items():
        assert res.ok, str(res)
    testing.assert_close(testing.vjp("mamba", "chunkwise", x, do, dht, chunk_size=16), ref, "float64",
                         "chunkwise_vjp")


# ----------------------------------------------------------------------------- the gla identity
def gla_inputs(x):
    """recurrences.md section 4: mamba is gla with H = D heads, K = S, V = 1, q = Cm, k = Bm
    (broadcast over channels), v = dt u, g = dt A, scale 1 (plain variant: dt = delta)."""
    B, T, D = x["u"].shape
    S = x["A"].shape[1]
    dt = x["delta"]
    return {
        "q": np.ascontiguousarray(np.broadcast_to(x["Cm"][:, :, None], (B, T, D, S))),
        "k": np.ascontiguousarray(np.broadcast_to(x["Bm"][:, :, None], (B, T, D, S))),
        "v": (dt * x["u"])[..., None],                              # [B, T, D, 1]
        "g": dt[..., None] * x["A"],                                # [B, T, D, S]
        "initial_state": x["initial_state"][..., None],             # [B, D, S, 1]
        "scale": 1.0,
    }


def mamba_grads_from_gla(x, g):
    """Chain gla's gradients back through the mapping of ``gla_inputs``."""
    dt, u, A = x["delta"], x["u"], x["A"]
    dv = g["v"][..., 0]                                             # [B, T, D]
    return {"u": dv * dt, "delta": dv * u + np.sum(g["g"] * A, axis=-1),
            "A": np.sum(g["g"] * dt[..., None], axis=(0, 1)), "Bm": g["k"].sum(axis=2),
            "Cm": g["q"].sum(axis=2), "initial_state": g["initial_state"][..., 0]}


@pytest.mark.parametrize("form", FORMS)
def test_mamba_equals_gla_with_one_head_per_channel(form):
    from linrec_ref.ops import gla
    x = inputs("plain", "typical", T=19, initial_state=True, seed=6)
    xg = gla_inputs(x)
    kw = {"chunk_size": 5} if form == "chunkwise" else {}
    y, h = getattr(mamba, form)(**x, output_final_state=True, **kw)
    o, S = getattr(gla, form)(**xg, output_final_state=True, **kw)
    testing.assert_close((y, h), (o[..., 0], S[..., 0]), "float64", f"{form}: mamba vs gla")
    rng = np.random.default_rng(7)
    do, dht = rng.standard_normal(y.shape), rng.standard_normal(h.shape)
    got = getattr(mamba, form + "_vjp")(**x, do=do, dht=dht, **kw)
    via_gla = getattr(gla, form + "_vjp")(**xg, do=do[..., None], dht=dht[..., None], **kw)
    want = mamba_grads_from_gla(x, via_gla)
    testing.assert_close({n: got[n] for n in want}, want, "float64", f"{form}_vjp: mamba vs gla")


# ----------------------------------------------------------------------------- attention matrix
@pytest.mark.parametrize("variant", ["default", "plain"])
def test_attention_matrix_reproduces_the_output(variant):
    x = inputs(variant, "typical", T=17, seed=8)
    alpha = mamba.attention_matrix(x["delta"], x["A"], x["Bm"], x["Cm"], x.get("delta_bias"),
                                   delta_softplus=x["delta_softplus"])
    assert alpha.shape == (2, 3, 17, 17)
    assert np.all(np.triu(alpha, 1) == 0)
    y_ssm = np.moveaxis(alpha @ np.moveaxis(x["u"], 1, 2)[..., None], 1, 2)[..., 0]  # [B, T, D]
    if "D" in x:
        y_ssm = y_ssm + x["D"] * x["u"]
    z = x.get("z")
    expected = mamba.recurrent(**x)[0] if z is None else mamba.recurrent(**dict(x, z=None))[0]
    testing.assert_close(y_ssm, expected, "float64", "alpha @ u + D u")


# ----------------------------------------------------------------------------- edge cases
PER_TOKEN = ("u", "delta", "Bm", "Cm", "z")


def first(x, n):
    """The inputs of the first n tokens."""
    return {k: (v[:, :n] if k in PER_TOKEN else v) for k, v in x.items()}


@pytest.mark.parametrize("form", FORMS)
def test_zero_step_size_neither_writes_nor_decays(form):
    """dt = 0 at a step (delta = 0 without softplus, or softplus underflowing to 0.0): the state
    passes through that step unchanged, and every gradient stays finite."""
    plain = inputs("plain", "fast_forgetting", T=9, initial_state=True, drop=OPTIONAL)
    plain["delta"][:, 4] = 0.0
    soft = inputs("default", "fast_forgetting", T=9, initial_state=True, drop=OPTIONAL)
    soft["delta"][:, 4] = -800.0                                    # softplus(-800) == 0.0
    kw = {"chunk_size": 3} if form == "chunkwise" else {}
    fn, vjp = getattr(mamba, form), getattr(mamba, form + "_vjp")
    for x in (plain, soft):
        _, h4 = fn(**first(x, 4), output_final_state=True, **kw)
        _, h5 = fn(**first(x, 5), output_final_state=True, **kw)
        testing.assert_close(h5, h4, "float64", f"{form}: state across a dt = 0 step")
        g = vjp(**x, do=np.ones_like(x["u"]), dht=np.ones_like(x["initial_state"]), **kw)
        assert all(np.isfinite(v).all() for v in g.values() if v is not None)


def test_float32_stays_float32():
    x = inputs("default", "typical", T=6, dtype=np.float32, initial_state=True)
    for form in FORMS:
        y, h = getattr(mamba, form)(**x, output_final_state=True)
        assert y.dtype == np.float32 and h.dtype == np.float32, form
        g = getattr(mamba, form + "_vjp")(**x, do=np.ones_like(y))
        assert all(v.dtype == np.float32 for v in g.values() if v is not None), form


# ----------------------------------------------------------------------------- validation
def test_positive_A_is_rejected():
    x = inputs()
    A = x["A"].copy()
    A[1, 2] = 0.5
    for form in FORMS + ("recurrent_vjp",):
        extra = {"do": np.zeros_like(x["u"])} if form.endswith("vjp") else {}
        with pytest.raises(InputError, match=r"mamba: argument 'A' must be <= 0.*got 0\.5 at "
                                             r"index \(1, 2\)"):
            getattr(mamba, form)(**dict(x, A=A), **extra)
    token = {k: (v[:, 0] if k in PER_TOKEN else v) for k, v in dict(x, A=A).items()}
    with pytest.raises(InputError, match=r"argument 'A' must be <= 0"):
        mamba.step(**token)
    with pytest.raises(InputError, match=r"argument 'A' must be <= 0"):
        mamba.attention_matrix(x["delta"], A, x["Bm"], x["Cm"], delta_softplus=True)
    A[1, 2] = 0.0                                                   # A = 0 (no decay) is legal
    mamba.recurrent(**dict(x, A=A))


def test_negative_step_size_without_softplus_is_rejected():
    x = inputs("plain")
    delta = x["delta"].copy()
    delta[1, 3, 2] = -0.25
    with pytest.raises(InputError, match=r"delta_softplus=False the step size delta must be >= 0 "
                                         r"\(it is used as is\); got -0\.25 at index \(1, 3, 2\)"):
        mamba.chunkwise(**dict(x, delta=delta))
    bias = np.full(3, -10.0)                                        # delta + bias < 0
    with pytest.raises(InputError, match=r"step size delta \+ delta_bias must be >= 0"):
        mamba.parallel(**x, delta_bias=bias)
    mamba.recurrent(**dict(x, delta=delta), delta_bias=np.full(3, 0.25))   # delta + bias >= 0


def test_delta_softplus_must_be_a_bool():
    with pytest.raises(TypeError, match=r"mamba: option 'delta_softplus' must be True or False, "
                                        r"got 'yes' \(str\)"):
        mamba.recurrent(**dict(inputs("plain"), delta_softplus="yes"))


@pytest.mark.parametrize("name,shape,msg", [
    ("Bm", (2, 12, 4), r"argument 'Bm' has T=12 at axis 1, but T=13 from argument 'u'"),
    ("Cm", (2, 13, 5), r"argument 'Cm' has S=5 at axis 2, but S=4 from argument 'A'"),
    ("Bm", (1, 13, 4), r"argument 'Bm' has B=1 at axis 0, but B=2 from argument 'u'"),
    ("Cm", (2, 13, 3, 4), r"argument 'Cm' must have shape \[B, T, S\]"),
    ("D", (4,), r"argument 'D' has D=4 at axis 0, but D=3 from argument 'u'"),
])
def test_shape_mismatches_name_the_argument(name, shape, msg):
    x = inputs()
    with pytest.raises(InputError, match=msg):
        mamba.recurrent(**dict(x, **{name: np.zeros(shape)}))
