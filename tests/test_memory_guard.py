"""Forms whose memory grows with T^2 (parallel, its vjp, attention_matrix) estimate it before
allocating and refuse above the memory limit with a MemoryLimitError that names the estimate,
the limit, how to raise it and the cheaper form. The limit: set_memory_limit, else the
environment variable LINREC_MEMORY_LIMIT, else half the physical memory."""
import inspect
import tracemalloc

import numpy as np
import pytest

import linrec_ref
from linrec_ref import InputError, MemoryLimitError, registry, testing
from linrec_ref._forms import estimate_quadratic_memory

OPS = registry.available()


@pytest.fixture(autouse=True)
def default_limit(monkeypatch):
    """Every test starts and ends with the default limit."""
    monkeypatch.delenv("LINREC_MEMORY_LIMIT", raising=False)
    linrec_ref.set_memory_limit(None)
    yield
    linrec_ref.set_memory_limit(None)


def _attention_matrix(op, x):
    fn = registry.form(op, "attention_matrix")
    params = inspect.signature(fn).parameters
    return fn(**{k: v for k, v in x.items() if k in params})


def _traced_peak(call):
    """(what call raised or returned, the peak of memory traced during it)."""
    tracemalloc.start()
    try:
        try:
            result = call()
        except Exception as e:  # noqa: BLE001 - returned for the caller to judge
            result = e
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_mamba_parallel_at_issue_sizes_is_refused_before_allocating():
    # B=1, T=2048, D=512, S=16: the decay masks [B, D, S, T, T] alone are 256 GiB in float64
    x = testing.make_inputs("mamba", B=1, T=2048, D=512, S=16)
    do = np.zeros_like(x["u"])                                     # o: [B, T, D] like u
    calls = {"parallel": lambda: linrec_ref.mamba(**x, form="parallel"),
             "parallel_vjp": lambda: linrec_ref.mamba.vjp(**x, do=do, form="parallel")}
    for form, call in calls.items():
        err, peak = _traced_peak(call)
        assert isinstance(err, MemoryLimitError), err
        assert isinstance(err, MemoryError) and isinstance(err, InputError)
        # refused before allocating: far below one [1, 512, 16, 2048, 2048] array
        assert peak < 32 * 2**20, f"{form} traced {peak / 2**20:.0f} MiB before refusing"
        msg = str(err)
        for part in (f"mamba.{form} needs an estimated", "TiB",
                     "[B, D, S, T, T] = [1, 512, 16, 2048, 2048] float64, 256.0 GiB each",
                     "above the memory limit of", "Use form='chunkwise' or 'recurrent'",
                     "linrec_ref.set_memory_limit(n_bytes)", "LINREC_MEMORY_LIMIT"):
            assert part in msg, (part, msg)


def test_attention_matrix_refusal_suggests_a_shorter_T():
    x = testing.make_inputs("gla", T=16)
    linrec_ref.set_memory_limit(1024)
    with pytest.raises(MemoryLimitError, match=r"gla.attention_matrix needs an estimated .* "
                                               r"above the memory limit of 1.0 KiB\. It is a T x T "
                                               r"matrix: compute it for a shorter T"):
        _attention_matrix("gla", x)


@pytest.mark.parametrize("op", OPS)
def test_every_quadratic_form_obeys_the_limit_and_the_others_do_not(op):
    spec = registry.spec(op)
    x = testing.make_inputs(op, T=8, initial_state=True)
    o, ht = testing.run(op, "parallel", x)                            # runs at the default limit
    testing.assert_close((o, ht), testing.run(op, "recurrent", x))
    do, dht = testing.cotangents(o, ht, rng=np.random.default_rng(0))
    linrec_ref.set_memory_limit(1)
    with pytest.raises(MemoryLimitError, match=rf"{op}.parallel needs an estimated"):
        testing.run(op, "parallel", x)
    with pytest.raises(MemoryLimitError, match=rf"{op}.parallel_vjp needs an estimated"):
        testing.vjp(op, "parallel", x, do, dht)
    if spec.has_attention_matrix:
        with pytest.raises(MemoryLimitError, match=rf"{op}.attention_matrix needs an estimated"):
            _attention_matrix(op, x)
    # memory linear in T: no limit applies
    testing.run(op, "recurrent", x)
    testing.run(op, "chunkwise", x, chunk_size=4)
    testing.vjp(op, "chunkwise", x, do, dht, chunk_size=4)


@pytest.mark.parametrize("op", OPS)
def test_estimate_is_not_below_the_measured_peak(op):
    """At T = 128 the T^2 arrays dominate: the traced peak of each quadratic form stays within
    twice its estimate (an op whose largest intermediate is missing from OpSpec.quadratic, e.g.
    a per-channel [B, H, K, T, T] mask, would exceed it K-fold)."""
    spec = registry.spec(op)
    dims = testing.default_dims(op, T=128)
    if "K" in dims:
        dims["K"] = 16
    x = testing.make_inputs(op, initial_state=True, **dims)
    o, ht = testing.run(op, "recurrent", x)
    do, dht = testing.cotangents(o, ht, rng=np.random.default_rng(0))
    calls = {"parallel": lambda: testing.run(op, "parallel", x),
             "parallel_vjp": lambda: testing.vjp(op, "parallel", x, do, dht)}
    if spec.has_attention_matrix:
        calls["attention_matrix"] = lambda: _attention_matrix(op, x)
    for form, call in calls.items():
        result, peak = _traced_peak(call)
        assert not isinstance(result, Exception), result
        estimate = estimate_quadratic_memory(spec, dims, np.float64, form).total
        assert peak <= 2 * estimate, (f"{op}.{form}: traced {peak / 2**20:.1f} MiB, "
                                      f"estimated {estimate / 2**20:.1f} MiB")


def test_varlen_estimate_uses_the_longest_segment():
    # 4 segments of 4 tokens: one core call sees T = 4, not the packed T = 16
    x = testing.make_inputs("gla", T=16, B=1)
    cu = np.array([0, 4, 8, 12, 16])
    dims = testing.default_dims("gla", B=1, T=4)
    segment = estimate_quadratic_memory(registry.spec("gla"), dims, np.float64, "parallel").total
    linrec_ref.set_memory_limit(segment)
    linrec_ref.gla(**x, cu_seqlens=cu, form="parallel")
    with pytest.raises(MemoryLimitError):
        linrec_ref.gla(**x, form="parallel")


def test_limit_from_the_environment_and_from_set_memory_limit(monkeypatch):
    x = testing.make_inputs("simple_gla", T=16)
    monkeypatch.setenv("LINREC_MEMORY_LIMIT", "1KiB")
    assert linrec_ref.memory_limit() == 1024
    with pytest.raises(MemoryLimitError, match=r"above the memory limit of 1.0 KiB"):
        linrec_ref.simple_gla(**x, form="parallel")
    linrec_ref.set_memory_limit("64GiB")                           # the function wins
    assert linrec_ref.memory_limit() == 64 * 2**30
    linrec_ref.simple_gla(**x, form="parallel")
    linrec_ref.set_memory_limit(None)                              # back to the environment
    assert linrec_ref.memory_limit() == 1024
    monkeypatch.setenv("LINREC_MEMORY_LIMIT", "lots")
    with pytest.raises(InputError, match=r"environment variable LINREC_MEMORY_LIMIT must be a "
                                         r"positive number of bytes.*got 'lots'"):
        linrec_ref.simple_gla(**x, form="parallel")
    monkeypatch.delenv("LINREC_MEMORY_LIMIT")
    assert linrec_ref.memory_limit() > 0                           # the default


@pytest.mark.parametrize("value,exc,msg", [
    (0, InputError, r"'n_bytes' must be >= 1, got 0"),
    (2.5e9, TypeError, r"'n_bytes' must be an int, a string such as '64GiB', or None .*got float"),
    (True, TypeError, r"got bool"),
    ("-5GiB", InputError, r"must be a positive number of bytes.*got '-5GiB'"),
])
def test_set_memory_limit_rejects_bad_values(value, exc, msg):
    with pytest.raises(exc, match=msg):
        linrec_ref.set_memory_limit(value)
