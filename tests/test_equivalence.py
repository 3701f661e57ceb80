"""The equivalence matrix for every op in the registry (numerics.md regimes, lengths, chunks).

Each case asserts the tier's pass rule on every comparison; a failure message carries the
measured errors and the tolerance.
"""
import numpy as np
import pytest

from linrec_ref import check, registry, testing

CASES = [(op, variant, regime)
         for op in registry.available()
         for variant in registry.spec(op).variants
         for regime in registry.spec(op).regimes]
IDS = [f"{op}-{variant}-{regime}" for op, variant, regime in CASES]


def _assert_rows(rows):
    assert rows, "no comparison was made"
    failed = [f"{r.check} [T={r.T}, C={r.chunk}]: {r.result}" for r in rows if not r.ok]
    assert not failed, "\n".join(failed)


@pytest.mark.parametrize("op,variant,regime", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("initial_state", [True, False], ids=["h0", "no_h0"])
def test_forms_agree_with_recurrent(op, variant, regime, dtype, initial_state):
    rows = []
    for T in check.FULL_LENGTHS:
        rows += check.check_forward(op, variant, regime, dtype, T, check.FULL_CHUNKS, seed=T,
                                    initial_state=initial_state)
    _assert_rows(rows)


@pytest.mark.parametrize("op,variant,regime", CASES, ids=IDS)
@pytest.mark.parametrize("T", [1, 7, 33])
@pytest.mark.parametrize("initial_state", [True, False], ids=["h0", "no_h0"])
def test_backward_against_recurrent_and_finite_differences(op, variant, regime, T, initial_state):
    rows = check.check_backward(op, variant, regime, np.float64, T, chunk_sizes=(1, 3, 16, 10**6), seed=T,
                                initial_state=initial_state)
    assert any("finite differences" in r.check for r in rows)
    _assert_rows(rows)


@pytest.mark.parametrize("op,variant,regime", CASES, ids=IDS)
@pytest.mark.parametrize("T", [20, 33])
def test_backward_float32(op, variant, regime, T):
    # T = 33 in one chunk: the gate identity's cancellation in float32 (mamba's dA once failed here)
    _assert_rows(check.check_backward(op, variant, regime, np.float32, T, chunk_sizes=(3, 16, 10**6), seed=3)
                 + check.check_backward(op, variant, regime, np.float32, T, chunk_sizes=(10**6,), seed=0,
                                        initial_state=False))


@pytest.mark.parametrize("op,variant,regime", CASES, ids=IDS)
@pytest.mark.parametrize("form", ["recurrent", "parallel", "chunkwise"])
def test_split_and_carry_equals_one_call(op, variant, regime, form):
    rows = [check.check_split_carry(op, variant, regime, np.float64, T=23, form=form, chunk_size=4),
            check.check_split_carry(op, variant, regime, np.float64, T=23, split=1, form=form, chunk_size=5)]
    _assert_rows(rows)


@pytest.mark.parametrize("op,variant,regime", CASES, ids=IDS)
@pytest.mark.parametrize("form", ["recurrent", "parallel", "chunkwise"])
def test_varlen_equals_separate_calls(op, variant, regime, form):
    rows = check.check_varlen(op, variant, regime, np.float64, lengths=(5, 0, 9, 1, 0), form=form, chunk_size=4)
    _assert_rows(rows)


@pytest.mark.parametrize("op", registry.available())
def test_chunk_size_one_is_recurrent_and_large_is_parallel(op):
    """recurrences.md section 4: chunkwise with C = 1 equals recurrent; C >= T equals parallel."""
    x = testing.make_inputs(op, registry.spec(op).regimes[0], T=19, initial_state=True, seed=5)
    rec = testing.run(op, "recurrent", x)
    par = testing.run(op, "parallel", x)
    testing.assert_close(testing.run(op, "chunkwise", x, chunk_size=1), rec, "float64", "chunk 1 vs recurrent")
    testing.assert_close(testing.run(op, "chunkwise", x, chunk_size=19), par, "float64", "chunk T vs parallel")
    testing.assert_close(testing.run(op, "chunkwise", x, chunk_size=1000), par, "float64", "chunk >T vs parallel")
