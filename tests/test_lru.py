"""lru-specific tests: the peers (scipy.signal.lfilter per pole, FFT convolution with the
kernel), the output conventions ("re" vs "2re" over conjugate pairs), the real 2x2 rotation-block
form (numerics.md hazard 6), and lru's validation errors.

The generic sweep (forms vs recurrent, vjps vs recurrent and finite differences, regimes, dtypes,
chunk sizes, varlen) is tests/test_equivalence.py.
"""
import numpy as np
import pytest

from linrec_ref import InputError, registry, testing
from linrec_ref.ops import lru
from linrec_ref.testing import assert_close

REGIMES = lru.SPEC.regimes
FORMS = ("recurrent", "parallel", "chunkwise")


CHUNK = 7  # chunk_size of the chunkwise form in these tests


# ------------------------------------------------------------------------------ peers
@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("output", ["re", "2re"])
@pytest.mark.parametrize("form", FORMS)
def test_lfilter_per_pole(regime, output, form):
    """P = Q = 1: y = sum_s c Re(C_s lfilter([B_s], [1, -lambda_s], x)) + D x, with the initial
    state as lfilter's zi = lambda h_0 (its filter state after the step before t = 0)."""
    signal = pytest.importorskip("scipy.signal")
    x = testing.make_inputs("lru", regime, T=64, B=2, P=1, Q=1, S=3, seed=1, initial_state=True)
    lam = np.exp(x["log_lam"])
    c = {"re": 1, "2re": 2}[output]
    y_ref = x["x"] @ x["Dm"].T                                     # [B, T, 1]
    h_ref = np.zeros_like(x["initial_state"])                      # [B, S]
    for b in range(2):
        for s in range(3):
            zi = [lam[s] * x["initial_state"][b, s]]
            h, zf = signal.lfilter([x["Bm"][s, 0]], [1, -lam[s]], x["x"][b, :, 0], zi=zi)
            y_ref[b, :, 0] += c * np.real(x["Cm"][0, s] * h)
            h_ref[b, s] = zf[0] / lam[s]                           # zf = lambda h_T
    y, hT = testing.run(lru, form, x, chunk_size=CHUNK, output=output)
    assert_close((y, hT), (y_ref, h_ref), name=f"{form} vs lfilter")


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("form", FORMS)
def test_fft_convolution_with_the_kernel(regime, form):
    """y_q = sum_p (K_qp * x_p) + D x, the causal convolution computed with numpy.fft."""
    x = testing.make_inputs("lru", regime, T=100, seed=2)
    T = x["x"].shape[1]
    K = lru.kernel(x["log_lam"], x["Bm"], x["Cm"], T)               # [T, Q, P]
    n = 2 * T                                                      # no wrap-around
    Xf = np.fft.rfft(x["x"], n=n, axis=1)                          # [B, F, P]
    Kf = np.fft.rfft(K, n=n, axis=0)                               # [F, Q, P]
    y_ref = np.fft.irfft(np.einsum("fqp,bfp->bfq", Kf, Xf), n=n, axis=1)[:, :T] + x["x"] @ x["Dm"].T
    assert_close(testing.run(lru, form, x, chunk_size=CHUNK)[0], y_ref, name=f"{form} vs FFT convolution")


def test_kernel_is_the_impulse_response():
    """K_l[:, p] is the response to a unit impulse on input p at t = 0 (Dm = 0)."""
    x = testing.make_inputs("lru", "typical", T=9, seed=3)
    P = x["x"].shape[2]
    impulses = np.zeros((P, 9, P))
    impulses[np.arange(P), 0, np.arange(P)] = 1.0
    y, _ = lru.recurrent(impulses, x["log_lam"], x["Bm"], x["Cm"], output="2re")   # [P, T, Q]
    K = lru.kernel(x["log_lam"], x["Bm"], x["Cm"], 9, output="2re")               # [T, Q, P]
    assert_close(np.moveaxis(y, 0, -1), K, name="impulse response vs kernel")


# ------------------------------------------------------------------------------ conventions
@pytest.mark.parametrize("form", FORMS)
def test_2re_is_twice_re(form):
    x = testing.make_inputs("lru", "typical", T=30, seed=4, initial_state=True)
    skip = x["x"] @ x["Dm"].T
    y1, h1 = testing.run(lru, form, x, chunk_size=CHUNK, output="re")
    y2, h2 = testing.run(lru, form, x, chunk_size=CHUNK, output="2re")
    assert_close(y2 - skip, 2 * (y1 - skip), name="2re vs 2 * re")
    assert np.array_equal(h1, h2)  # the state does not depend on the read-out convention


@pytest.mark.parametrize("form", FORMS)
def test_2re_over_half_the_pairs_equals_re_over_all(form):
    """S4D's convention: keeping one member of each conjugate pair with output="2re" equals
    output="re" over the full, conjugate-symmetric system (whose output is then real)."""
    x = testing.make_inputs("lru", "typical", T=30, seed=5, initial_state=True)
    full = dict(x,
                log_lam=np.concatenate([x["log_lam"], x["log_lam"].conj()]),
                Bm=np.concatenate([x["Bm"], x["Bm"].conj()], axis=0),
                Cm=np.concatenate([x["Cm"], x["Cm"].conj()], axis=1),
                initial_state=np.concatenate([x["initial_state"], x["initial_state"].conj()], axis=1))
    assert_close(testing.run(lru, form, full, chunk_size=CHUNK, output="re")[0],
                 testing.run(lru, form, x, chunk_size=CHUNK, output="2re")[0],
                 name="2re (half) vs re (conjugate pairs)")


def _rotation_block_recurrence(x, log_lam, Bm, Cm, Dm, h0):
    """The same system as a real recurrence: state z [B, 2S] with one 2x2 block per mode,
    r [[cos theta, -sin theta], [sin theta, cos theta]] acting on (Re h, Im h)."""
    S = log_lam.shape[0]
    r, theta = np.exp(log_lam.real), log_lam.imag
    A = np.zeros((2 * S, 2 * S))                                   # block diagonal
    for s in range(S):
        A[2 * s:2 * s + 2, 2 * s:2 * s + 2] = r[s] * np.array(
            [[np.cos(theta[s]), -np.sin(theta[s])], [np.sin(theta[s]), np.cos(theta[s])]])
    Breal = np.stack([Bm.real, Bm.imag], axis=1).reshape(2 * S, -1)      # [2S, P]
    Creal = np.stack([Cm.real, -Cm.imag], axis=2).reshape(Cm.shape[0], 2 * S)   # [Q, 2S]
    z = np.stack([h0.real, h0.imag], axis=2).reshape(h0.shape[0], 2 * S)        # [B, 2S]
    ys = []
    for t in range(x.shape[1]):
        z = z @ A.T + x[:, t] @ Breal.T
        ys.append(z @ Creal.T + x[:, t] @ Dm.T)
    return np.stack(ys, axis=1), z[:, 0::2] + 1j * z[:, 1::2]


@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("form", FORMS)
def test_real_rotation_block_form(regime, form):
    """numerics.md hazard 6: the complex recurrence equals the explicit real 2x2-block one."""
    x = testing.make_inputs("lru", regime, T=40, seed=6, initial_state=True)
    y_ref, h_ref = _rotation_block_recurrence(x["x"], x["log_lam"], x["Bm"], x["Cm"], x["Dm"],
                                              x["initial_state"])
    y, hT = testing.run(lru, form, x, chunk_size=CHUNK, output="re")
    assert_close((y, hT), (y_ref, h_ref), name=f"{form} vs real rotation blocks")


def test_no_attention_matrix():
    assert not lru.SPEC.has_attention_matrix
    with pytest.raises(KeyError):
        registry.form("lru", "attention_matrix")


# ------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("name", ["recurrent", "parallel", "chunkwise", "recurrent_vjp",
                                  "parallel_vjp", "chunkwise_vjp", "step", "kernel"])
@pytest.mark.parametrize("bad", ["Re", "3re", "real", None])
def test_rejects_an_unknown_output_convention(name, bad):
    x = testing.make_inputs("lru", "typical", T=4)
    if name == "kernel":
        call = lambda: lru.kernel(x["log_lam"], x["Bm"], x["Cm"], 4, output=bad)
    elif name == "step":
        call = lambda: lru.step(x["x"][:, 0], x["log_lam"], x["Bm"], x["Cm"], x["Dm"], output=bad)
    else:
        extra = {"do": np.zeros((2, 4, x["Cm"].shape[0]))} if name.endswith("_vjp") else {}
        call = lambda: getattr(lru, name)(**x, **extra, output=bad)
    with pytest.raises(InputError, match=r"lru: option 'output' must be 're' .* or '2re'"):
        call()


def test_rejects_growing_lambda():
    x = testing.make_inputs("lru", "typical", T=4)
    x["log_lam"] = x["log_lam"].copy()
    x["log_lam"][1] = 0.01 + 1j
    with pytest.raises(InputError, match=r"lru: argument 'log_lam' .* real part <= 0"):
        lru.recurrent(**x)
    with pytest.raises(InputError, match=r"lru: argument 'log_lam' .* real part <= 0"):
        lru.kernel(x["log_lam"], x["Bm"], x["Cm"], 4)


def test_rejects_real_where_complex_expected():
    x = testing.make_inputs("lru", "typical", T=4)
    expected = r"lru: argument 'Bm' has dtype float64; expected complex64 or complex128"
    with pytest.raises(InputError, match=expected):
        lru.parallel(**dict(x, Bm=x["Bm"].real.copy()))
    with pytest.raises(InputError, match=r"lru: argument 'log_lam' has dtype float64"):
        lru.chunkwise(**dict(x, log_lam=x["log_lam"].real.copy()))


def test_rejects_mixed_precision_and_complex_skip():
    x = testing.make_inputs("lru", "typical", T=4)
    with pytest.raises(InputError, match=r"lru: argument 'Cm' has dtype complex64.*complex128"):
        lru.recurrent(**dict(x, Cm=x["Cm"].astype(np.complex64)))
    with pytest.raises(InputError, match=r"lru: argument 'Dm' has dtype complex128"):
        lru.recurrent(**dict(x, Dm=x["Dm"].astype(np.complex128)))
    with pytest.raises(InputError, match=r"lru: argument 'initial_state' has dtype float64"):
        lru.recurrent(**x, initial_state=np.zeros((2, x["log_lam"].shape[0])))


def test_kernel_rejects_a_bad_length():
    x = testing.make_inputs("lru", "typical", T=4)
    for bad in (-1, 2.5, True):
        with pytest.raises(InputError, match=r"lru: argument 'T' of kernel"):
            lru.kernel(x["log_lam"], x["Bm"], x["Cm"], bad)
    Q, P = x["Cm"].shape[0], x["Bm"].shape[1]
    assert lru.kernel(x["log_lam"], x["Bm"], x["Cm"], 0).shape == (0, Q, P)
