"""Every installed fast backend against the NumPy float64 loop, on the same matrix as the reference.

Parametrised over the backends that can run here: "numba" when Numba is installed (CI installs
it); without it these tests are skipped and tests/test_numba_backend.py checks the errors.
"""
import numpy as np
import pytest

from linrec_ref import backends, check, registry

FAST = [name for name, ok in (("numba", backends.numba_installed()),) if ok]
if not FAST:
    pytest.skip("no fast backend installed (pip install 'linrec_ref[numba]')", allow_module_level=True)


def _compiled_ops(backend):
    from linrec_ref.backends import numba as numba_backend
    return [op for op in registry.available() if numba_backend.accelerated(op)]


CASES = [(backend, op, variant, regime)
         for backend in FAST
         for op in _compiled_ops(backend)
         for variant in registry.spec(op).variants
         for regime in registry.spec(op).regimes]
IDS = [f"{b}-{op}-{variant}-{regime}" for b, op, variant, regime in CASES]


def _assert_rows(rows):
    assert rows, "no comparison was made"
    failed = [f"{r.check} [T={r.T}, C={r.chunk}]: {r.result}" for r in rows if not r.ok]
    assert not failed, "\n".join(failed)


@pytest.mark.parametrize("backend,op,variant,regime", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_forward_forms_and_steps_match_the_loop(backend, op, variant, regime, dtype):
    rows = []
    for T in (1, 2, 7, 64, 257):
        for h0 in (True, False):
            rows += check.check_forward(op, variant, regime, dtype, T, (3, 10**6), seed=T,
                                        initial_state=h0, backend=backend)
    assert any(f"[{backend}] vs recurrent" in r.check for r in rows) or dtype == np.float32
    _assert_rows(rows)


@pytest.mark.parametrize("backend,op,variant,regime", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("T", [1, 7, 33, 100])   # 100: several checkpoint blocks of the reverse walk
def test_backward_matches_the_loop(backend, op, variant, regime, dtype, T):
    rows = (check.check_backward(op, variant, regime, dtype, T, chunk_sizes=(3,), seed=T, backend=backend)
            + check.check_backward(op, variant, regime, dtype, T, chunk_sizes=(), seed=T + 1,
                                   initial_state=False, backend=backend))
    assert any(r.check.startswith("d") and f"recurrent_vjp[{backend}]" in r.check for r in rows)
    _assert_rows(rows)


@pytest.mark.parametrize("backend,op,variant,regime", CASES, ids=IDS)
def test_carried_state_and_varlen(backend, op, variant, regime):
    rows = [check.check_split_carry(op, variant, regime, np.float64, form="recurrent", backend=backend)]
    rows += check.check_varlen(op, variant, regime, np.float64, form="recurrent", backend=backend)
    rows += check.check_varlen(op, variant, regime, np.float32, lengths=(0, 3, 0, 40), form="recurrent",
                               backend=backend)
    _assert_rows(rows)
