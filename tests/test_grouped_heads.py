"""Grouped value heads (HV a multiple of H), handled by the form wrappers for every op that
declares "HV" dimensions: q/k are repeated over the group, their gradients summed back."""
import numpy as np
import pytest

from linrec_ref import InputError, testing
from linrec_ref._forms import forward_form, step_form, vjp_form
from linrec_ref._spec import Arg, OpSpec
from linrec_ref.ops import simple_gla

GROUPED = OpSpec(
    name="grouped_simple_gla", family="test", transition="scalar decay", math="",
    inputs=(Arg("q", "B T H K"), Arg("k", "B T H K"), Arg("v", "B T HV V"),
            Arg("g", "B T HV", log_gate=True)),
    output="B T HV V", state=(Arg("state", "N HV K V"),),
    default_scale=lambda d: d["K"] ** -0.5, peers=(), regimes=(), default_dims={},
)
recurrent = forward_form(GROUPED)(simple_gla.recurrent.core)
chunkwise = forward_form(GROUPED, chunked=True)(simple_gla.chunkwise.core)
chunkwise_vjp = vjp_form(GROUPED, chunked=True)(simple_gla.chunkwise_vjp.core)
step = step_form(GROUPED)(simple_gla.step.core)


def _grouped_inputs(H=2, G=3, T=11, B=1, seed=0):
    """Inputs of the unregistered GROUPED spec (HV = G H value heads), which testing.make_inputs
    cannot draw: q, k [B, T, H, 4]; v [B, T, HV, 5]; g [B, T, HV]; initial_state [B, HV, 4, 5]."""
    rng = np.random.default_rng(seed)
    HV = H * G
    return {"q": rng.standard_normal((B, T, H, 4)), "k": rng.standard_normal((B, T, H, 4)),
            "v": rng.standard_normal((B, T, HV, 5)),
            "g": testing.log_decay(rng, (B, T, HV), "typical", np.float64),
            "initial_state": rng.standard_normal((B, HV, 4, 5))}


def _repeated(x, G):
    return dict(x, q=np.repeat(x["q"], G, axis=2), k=np.repeat(x["k"], G, axis=2))


def test_value_head_j_reads_query_head_j_over_g():
    x = _grouped_inputs()
    ref = testing.run(simple_gla, "recurrent", _repeated(x, 3))
    testing.assert_close(recurrent(**x, output_final_state=True), ref)
    testing.assert_close(chunkwise(**x, output_final_state=True, chunk_size=4), ref)
    # head 4 of v is served by head 4 // 3 = 1 of q and k
    alone = simple_gla.recurrent(x["q"][:, :, 1:2], x["k"][:, :, 1:2], x["v"][:, :, 4:5], x["g"][:, :, 4:5],
                                 initial_state=x["initial_state"][:, 4:5])[0]
    testing.assert_close(recurrent(**x)[0][:, :, 4:5], alone)


def test_gradients_of_shared_heads_are_summed_over_the_group():
    x = _grouped_inputs(B=1)
    do = np.random.default_rng(5).standard_normal((1, 11, 6, 5))
    got = chunkwise_vjp(**x, do=do, chunk_size=4)
    ref = testing.vjp(simple_gla, "chunkwise", _repeated(x, 3), do, chunk_size=4)
    for name in ("q", "k"):
        assert got[name].shape == x[name].shape
        testing.assert_close(got[name], ref[name].reshape(1, 11, 2, 3, 4).sum(3), name=name)
    for name in ("v", "g", "initial_state"):
        testing.assert_close(got[name], ref[name], name=name)


def test_grouped_heads_with_varlen_and_step():
    x = _grouped_inputs(B=1, T=9)
    cu = np.array([0, 4, 4, 9])
    h0 = np.random.default_rng(2).standard_normal((3, 6, 4, 5))
    packed = chunkwise(**dict(x, initial_state=h0), cu_seqlens=cu, chunk_size=2, output_final_state=True)
    ref = testing.run(simple_gla, "chunkwise", dict(_repeated(dict(x, initial_state=h0), 3), cu_seqlens=cu),
                      chunk_size=2)
    testing.assert_close(packed, ref)
    o, S = step(x["q"][:, 0], x["k"][:, 0], x["v"][:, 0], x["g"][:, 0], x["initial_state"])
    o_ref, S_ref = simple_gla.step(**{k: v[:, 0] for k, v in _repeated(x, 3).items() if k != "initial_state"},
                                   state=x["initial_state"])
    testing.assert_close((o, S), (o_ref, S_ref))


def test_value_heads_must_be_a_multiple_of_query_heads():
    x = _grouped_inputs(H=4, G=1)
    bad = dict(x, v=x["v"][:, :, :3], g=x["g"][:, :, :3], initial_state=x["initial_state"][:, :3])
    with pytest.raises(InputError, match=r"grouped heads need HV \(value heads, 3 from argument 'v'\) "
                                         r"to be a multiple of H \(query/key heads, 4 from argument 'q'\)"):
        recurrent(**bad)
    with pytest.raises(InputError, match=r"argument 'g' has HV=2 at axis 2, but HV=4 from argument 'v'"):
        recurrent(**dict(x, g=x["g"][:, :, :2]))
