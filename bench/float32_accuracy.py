"""How accurate float32 is: the drift of the float32 loop, and mlstm's ill-conditioned inputs.

    OPENBLAS_NUM_THREADS=1 python bench/float32_accuracy.py [--T 65536] [--quick]

Not a timing: the figures quoted in docs/forms.md and docs/testing.md come from this script.

1. Drift. For gla, simple_gla, retnet, hgrn, gated_delta_rule and mamba at B=1, H=2 (K=V=64,
   mamba D=64, S=16), in the slow_decay and typical regimes: the max relative error
   max|a - ref| / max|ref| and the RMS ratio of the float32 recurrent and chunkwise forms against
   the float64 recurrent loop, and the float64 chunkwise form against it. The float32 loop
   rounds the state once per token, and in a slow decay those roundings add up over ~1/(1-a)
   tokens; the chunkwise form sums a chunk's writes by matrix products and carries the state
   only across chunks.
2. mlstm. For inputs with slow decay, large input gates and |q|, |k| ~ 1e3 (and, for scale, the
   generator's own inputs), the condition number kappa_t of testing.mlstm_condition, and per
   form the per-token relative error against the float64 recurrent loop, as a number and as a
   multiple of u kappa_t (u the unit roundoff of the dtype).
Results also go to bench/results/float32_accuracy.json.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import _harness  # pins BLAS threads before NumPy loads
import numpy as np

import linrec_ref
from linrec_ref import testing

DRIFT_OPS = ("simple_gla", "gla", "retnet", "hgrn", "gated_delta_rule", "mamba")
UNIT_ROUNDOFF = {np.float32: float(np.finfo(np.float32).eps) / 2,
                 np.float64: float(np.finfo(np.float64).eps) / 2}


def _dims(op: str, T: int) -> dict:
    spec = linrec_ref.registry.spec(op)
    dims = {"T": T, "B": 1}
    for name, size in {"H": 2, "HV": 2, "K": 64, "V": 64, "D": 64, "S": 16}.items():
        if name in spec.default_dims:
            dims[name] = size
    return dims


def drift(T: int) -> list:
    rows = []
    for op in DRIFT_OPS:
        fn = getattr(linrec_ref, op)
        for regime in ("slow_decay", "typical"):
            x = testing.make_inputs(op, regime, dtype=np.float32, **_dims(op, T))
            x64 = testing.as_float64(x)
            ref = fn(**x64, form="recurrent", output_final_state=True)
            row = {"op": op, "regime": regime, "T": T}
            for label, inputs, form in (("f64 chunkwise", x64, "chunkwise"),
                                        ("f32 recurrent", x, "recurrent"),
                                        ("f32 chunkwise", x, "chunkwise")):
                c = testing.compare(fn(**inputs, form=form, output_final_state=True), ref)
                row[label] = {"max_rel": c.max_rel, "rms_ratio": c.rms_ratio}
            rows.append(row)
            print(f"{op:17s} {regime:11s} " + "  ".join(
                f"{k}: {row[k]['max_rel']:.1e} (rms {row[k]['rms_ratio']:.1e})"
                for k in ("f64 chunkwise", "f32 recurrent", "f32 chunkwise")), flush=True)
    return rows


def mlstm_cases(T: int):
    """(name, float64 inputs) of the mlstm scenarios."""
    rng = np.random.default_rng(0)
    B, H, K, V = 1, 2, 64, 64
    yield "make_inputs typical", {n: a for n, a in testing.make_inputs(
        "mlstm", "typical", B=B, T=T, H=H, K=K, V=V).items()}
    for decay, std, qk in ((0.999, 3.0, 1e3), (0.9999, 5.0, 1e3), (0.9999, 10.0, 1e3)):
        yield (f"a={decay}, i~N(0,{std:g}^2), |q|,|k|~{qk:g}",
               {"q": qk * rng.standard_normal((B, T, H, K)), "k": qk * rng.standard_normal((B, T, H, K)),
                "v": rng.standard_normal((B, T, H, V)), "i": std * rng.standard_normal((B, T, H)),
                "f": np.full((B, T, H), np.log(decay))})


def mlstm(T: int) -> list:
    rows = []
    for name, x in mlstm_cases(T):
        kappa = testing.mlstm_condition(**x).output                                # [B, T, H]
        ref, _ = linrec_ref.mlstm(**x, form="recurrent")
        row = {"case": name, "T": T, "kappa_max": float(kappa.max()), "kappa_median": float(np.median(kappa))}
        line = [f"{name:36s} kappa max {kappa.max():.2g} median {np.median(kappa):.2g}"]
        for dtype in (np.float32, np.float64):
            inputs = {n: a.astype(dtype) for n, a in x.items()}
            for form in ("recurrent", "chunkwise", "parallel"):
                if dtype == np.float64 and form == "recurrent":
                    continue                                                       # the reference
                o, _ = linrec_ref.mlstm(**inputs, form=form)
                err = np.abs(o - ref).max(-1) / np.abs(ref).max(-1)                # [B, T, H]
                ratio = err / (UNIT_ROUNDOFF[dtype] * kappa)
                key = f"{np.dtype(dtype).name} {form}"
                row[key] = {"max_err": float(err.max()), "max_err_over_u_kappa": float(ratio.max())}
                line.append(f"{key}: {err.max():.1e} ({ratio.max():.0f} u kappa)")
        rows.append(row)
        print("  ".join(line), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--T", type=int, default=65536, help="tokens of the drift measurement")
    ap.add_argument("--mlstm-T", type=int, default=2048, help="tokens of the mlstm cases")
    ap.add_argument("--quick", action="store_true", help="T=4096 and mlstm T=512")
    args = ap.parse_args()
    if args.T < 1 or args.mlstm_T < 1:
        ap.error("--T and --mlstm-T must be >= 1")
    if args.quick:
        args.T, args.mlstm_T = 4096, 512
    _harness.pin_threads()
    env = _harness.environment()
    print(env)
    print(f"\n1. drift at T={args.T}: max relative error against the float64 recurrent loop")
    drift_rows = drift(args.T)
    print(f"\n2. mlstm at T={args.mlstm_T}: per-token relative error, and as a multiple of u kappa_t")
    mlstm_rows = mlstm(args.mlstm_T)
    out = Path(__file__).parent / "results" / "float32_accuracy.json"
    _harness.write_json_atomic(out, {"environment": env, "drift": drift_rows, "mlstm": mlstm_rows})
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
