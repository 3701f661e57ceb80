"""Edge sizes that every op accepts in every form, backward, step loop and attention_matrix:

* T = 0: an empty output, the initial state (zeros when none is given) returned as the final
  state; in the vjp, dht passed through as the initial state's gradient, empty gradients for
  per-token inputs and zero gradients for the others. Also with cu_seqlens whose segments are
  all empty.
* T = 1: the forms agree with the recurrent loop.
* chunk_size far above T: the effective chunk is min(chunk_size, T) (per segment with
  cu_seqlens); nothing is padded up to chunk_size, so memory stays small.
"""
import inspect
import tracemalloc

import numpy as np
import pytest

from linrec_ref import check, registry, testing
from linrec_ref._forms import tree_map

OPS = registry.available()
CASES = [(op, variant) for op in OPS for variant in registry.spec(op).variants]
HUGE_CHUNK = 10**6
CHUNK = 16  # chunk_size of the chunkwise form (testing.run / testing.vjp pass it to chunkwise only)


def _assert_identical(actual, expected):
    """Same structure, shapes, dtypes and values (a state passed through is not recomputed)."""
    a, e = list(testing.leaves(actual)), list(testing.leaves(expected))
    assert [n for n, _ in a] == [n for n, _ in e]
    for (name, x), (_, y) in zip(a, e):
        assert x.shape == y.shape and x.dtype == y.dtype, (name, x.shape, x.dtype, y.shape, y.dtype)
        assert np.array_equal(x, y), name


def _zero_state(op, variant, **dims):
    """The zeros state a call without initial_state starts from (an empty cache for a growing axis)."""
    spec = registry.spec(op)
    sizes = testing.default_dims(op, **dims)
    if spec.growing_axis:
        sizes[spec.growing_axis] = 0
    return tree_map(np.zeros_like, testing.random_state(op, sizes, options=spec.variants[variant]))


def _output_layout(op, variant):
    """(shape, dtype) of the output at T = 1, whose T axis a T = 0 call must shrink to 0."""
    o, _ = testing.run(op, "recurrent", testing.make_inputs(op, variant=variant, T=1))
    return o.shape[:1] + (0,) + o.shape[2:], o.dtype


def _assert_vjp_of_empty_call(op, x, grads, dht, with_state):
    spec = registry.spec(op)
    for name in spec.differentiable:
        if x.get(name) is None:
            assert grads[name] is None, name
            continue
        assert grads[name].shape == x[name].shape and grads[name].dtype == x[name].dtype, name
        assert not np.any(grads[name]), f"d{name} must be zero: no token reads {name}"
    if with_state:
        _assert_identical(grads["initial_state"], dht)
    else:
        assert grads["initial_state"] is None


# ----------------------------------------------------------------------------- T = 0
@pytest.mark.parametrize("with_state", [False, True], ids=["zeros", "initial_state"])
@pytest.mark.parametrize("op,variant", CASES)
def test_zero_length_forms_and_step_loop_pass_the_state_through(op, variant, with_state):
    x = testing.make_inputs(op, variant=variant, T=0, initial_state=with_state)
    shape, dtype = _output_layout(op, variant)
    state = x["initial_state"] if with_state else _zero_state(op, variant)
    for form in registry.spec(op).forms:
        o, ht = testing.run(op, form, x, chunk_size=CHUNK)
        assert o.shape == shape and o.dtype == dtype, (form, o.shape, o.dtype)
        _assert_identical(ht, state)
    o, ht = testing.run_steps(op, x)
    assert o.shape == shape and o.dtype == dtype
    _assert_identical(ht, state)


@pytest.mark.parametrize("with_state", [False, True], ids=["zeros", "initial_state"])
@pytest.mark.parametrize("op,variant", CASES)
def test_zero_length_vjp_passes_dht_through(op, variant, with_state):
    x = testing.make_inputs(op, variant=variant, T=0, initial_state=with_state)
    o, ht = testing.run(op, "recurrent", x)
    do, dht = testing.cotangents(o, ht, seed=0)
    for form in registry.spec(op).forms:
        grads = testing.vjp(op, form, x, do, dht, chunk_size=CHUNK)
        _assert_vjp_of_empty_call(op, x, grads, dht, with_state)


@pytest.mark.parametrize("op,variant", CASES)
def test_varlen_with_only_empty_segments(op, variant):
    spec = registry.spec(op)
    cu = np.array([0, 0, 0], dtype=np.int64)                       # two empty sequences
    x = testing.make_inputs(op, variant=variant, T=0, B=1)
    h0 = testing.random_state(op, dict(testing.default_dims(op, T=0, B=1), N=2),
                              options=spec.variants[variant])
    x = dict(x, initial_state=h0, cu_seqlens=cu)
    shape, dtype = _output_layout(op, variant)
    for form in spec.forms:
        o, ht = testing.run(op, form, x, chunk_size=CHUNK)
        assert o.shape == (1,) + shape[1:] and o.dtype == dtype, form
        _assert_identical(ht, h0)
        _, dht = testing.cotangents(o, ht, seed=1)
        grads = testing.vjp(op, form, x, np.zeros(o.shape, o.dtype), dht, chunk_size=CHUNK)
        _assert_vjp_of_empty_call(op, x, grads, dht, with_state=True)


def _attention_matrix(op, x):
    fn = registry.form(op, "attention_matrix")
    params = inspect.signature(fn).parameters
    return fn(**{k: v for k, v in x.items() if k in params})


@pytest.mark.parametrize("op,variant", [c for c in CASES if registry.spec(c[0]).has_attention_matrix])
def test_zero_length_attention_matrix_has_zero_time_axes(op, variant):
    # the axes that grow with T are those that differ between T = 2 and T = 3
    M2, M3 = (_attention_matrix(op, testing.make_inputs(op, variant=variant, T=T)) for T in (2, 3))
    expected = tuple(0 if a != b else a for a, b in zip(M2.shape, M3.shape))
    M0 = _attention_matrix(op, testing.make_inputs(op, variant=variant, T=0))
    assert M0.shape == expected and M0.dtype == M2.dtype


# ----------------------------------------------------------------------------- T = 1
@pytest.mark.parametrize("with_state", [False, True], ids=["zeros", "initial_state"])
@pytest.mark.parametrize("op,variant", CASES)
def test_single_token_forms_and_vjps_agree_with_the_recurrent_loop(op, variant, with_state):
    rows = check.check_forward(op, variant, "typical", T=1, initial_state=with_state)
    rows += check.check_backward(op, variant, "typical", T=1, fd=False, initial_state=with_state)
    failed = [f"{r.check} (C={r.chunk}): {r.result}" for r in rows if not r.ok]
    assert not failed, "\n".join(failed)


# ----------------------------------------------------------------------------- chunk_size > T
@pytest.mark.parametrize("op", OPS)
def test_chunk_size_far_above_T_is_one_chunk_of_T(op):
    x = testing.make_inputs(op, T=16, initial_state=True)
    ref = testing.run(op, "recurrent", x)
    do, dht = testing.cotangents(*ref, seed=0)
    ref_grads = testing.vjp(op, "recurrent", x, do, dht)
    tracemalloc.start()
    try:
        out = testing.run(op, "chunkwise", x, chunk_size=HUGE_CHUNK)
        grads = testing.vjp(op, "chunkwise", x, do, dht, chunk_size=HUGE_CHUNK)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 100 * 2**20, f"chunkwise at T=16, chunk_size=10**6 traced {peak / 2**20:.0f} MiB"
    testing.assert_close(out, ref, name="o, ht")
    for name, g in ref_grads.items():
        testing.assert_close(grads[name], g, name=f"d{name}")
    # the effective chunk is T: bit for bit the call with chunk_size = T
    _assert_identical(out, testing.run(op, "chunkwise", x, chunk_size=16))
    _assert_identical(grads, testing.vjp(op, "chunkwise", x, do, dht, chunk_size=16))


@pytest.mark.parametrize("op", OPS)
def test_chunk_size_far_above_every_segment(op):
    tracemalloc.start()
    try:
        rows = check.check_varlen(op, lengths=(5, 0, 9, 2), chunk_size=HUGE_CHUNK)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 100 * 2**20, f"varlen chunkwise with chunk_size=10**6 traced {peak / 2**20:.0f} MiB"
    failed = [f"{r.check}: {r.result}" for r in rows if not r.ok]
    assert not failed, "\n".join(failed)
