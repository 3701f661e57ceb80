"""PyTorch peers for the CPU benchmark: the obvious eager loop over time, and the peer library's
own torch reference functions (its ``naive`` modules: recurrent loops and chunked forms).

Every peer takes the NumPy inputs of ``linrec_ref.testing.make_inputs`` (layout [B, T, H, ...])
and returns ``(forward, forward_backward)`` closures over torch copies of them, or None where no
peer exists. The benchmark validates each peer's output against the float64 reference before
timing it. torch and the peer library are optional; without them every peer is None.

The peer library's package imports triton at import time, which CPU machines lack, so its
``naive.py`` files (plain torch) are loaded by path, without the package's ``__init__``.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable, Optional, Tuple

import numpy as np

Closures = Optional[Tuple[Callable, Callable]]


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def _closures(run, args: dict, do: np.ndarray) -> Closures:
    """forward (no_grad) and forward+backward (autograd into every float input) of run(**tensors)."""
    torch = _torch()
    tensors = {n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in args.items()}
    leaves = {n: t.clone().requires_grad_(t.is_floating_point()) for n, t in tensors.items()}
    do_t = torch.from_numpy(do)

    def forward():
        with torch.no_grad():
            return run(**tensors)

    def forward_backward():
        for t in leaves.values():
            t.grad = None
        run(**leaves).backward(do_t)

    return forward, forward_backward


# ------------------------------------------------------------------------------ eager loops
def _gated_loop(q, k, v, a, scale):
    """S_t = a_t * S_{t-1} + k_t v_t^T, o_t = scale S_t^T q_t; a broadcastable to [B, T, H, K, 1]."""
    torch = _torch()
    B, T, H, K = q.shape
    S = q.new_zeros(B, H, K, v.shape[-1])
    out = []
    for t in range(T):
        S = (a if isinstance(a, float) else a[:, t]) * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        out.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(out, 1)


def _delta_loop(q, k, v, a, beta, scale):
    """S' = a_t S, S_t = S' + k_t (beta_t (v_t - S'^T k_t))^T, o_t = scale S_t^T q_t."""
    torch = _torch()
    B, T, H, K = q.shape
    S = q.new_zeros(B, H, K, v.shape[-1])
    out = []
    for t in range(T):
        S = (a if isinstance(a, float) else a[:, t]) * S
        r = torch.einsum("bhk,bhkv->bhv", k[:, t], S)
        S = S + k[:, t, :, :, None] * (beta[:, t, :, None] * (v[:, t] - r))[:, :, None, :]
        out.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(out, 1)


def eager_loop(op: str, x: dict, do: np.ndarray) -> Closures:
    """The loop a user would write in torch for op (default variant, zero initial state)."""
    torch = _torch()
    if torch is None:
        return None
    K = x["q"].shape[-1] if "q" in x else None
    if op == "linear_attention":
        return _closures(lambda q, k, v: _gated_loop(q, k, v, 1.0, K ** -0.5),
                         {n: x[n] for n in "qkv"}, do)
    if op == "retnet":
        if x.get("g") is None:
            return None
        T, H = x["q"].shape[1:3]
        a = np.ascontiguousarray(np.broadcast_to(np.exp(x["g"])[None, None, :, None, None], (1, T, H, 1, 1)))
        return _closures(lambda q, k, v, a: _gated_loop(q, k, v, a, K ** -0.5),
                         dict(q=x["q"], k=x["k"], v=x["v"], a=a), do)
    if op == "simple_gla":
        return _closures(lambda q, k, v, g: _gated_loop(q, k, v, torch.exp(g)[..., None, None], K ** -0.5),
                         {n: x[n] for n in ("q", "k", "v", "g")}, do)
    if op == "gla" and x.get("gv") is None:
        return _closures(lambda q, k, v, g: _gated_loop(q, k, v, torch.exp(g)[..., None], K ** -0.5),
                         {n: x[n] for n in ("q", "k", "v", "g")}, do)
    if op in ("delta_rule", "gated_delta_rule", "kda") and x["q"].shape[2] == x["v"].shape[2]:
        if op == "delta_rule":
            run = lambda q, k, v, beta: _delta_loop(q, k, v, 1.0, beta, K ** -0.5)
            args = {n: x[n] for n in ("q", "k", "v", "beta")}
        else:
            shape = (lambda g: torch.exp(g)[..., None, None]) if op == "gated_delta_rule" else \
                    (lambda g: torch.exp(g)[..., None])
            run = lambda q, k, v, g, beta: _delta_loop(q, k, v, shape(g), beta, K ** -0.5)
            args = {n: x[n] for n in ("q", "k", "v", "g", "beta")}
        return _closures(run, args, do)
    if op == "hgrn":
        def run(x, g):
            h = x.new_zeros(x.shape[0], x.shape[2])
            out = []
            for t in range(x.shape[1]):
                h = torch.exp(g[:, t]) * h + x[:, t]
                out.append(h)
            return torch.stack(out, 1)
        return _closures(run, {"x": x["x"], "g": x["g"]}, do)
    if op == "mamba" and x.get("delta_softplus", True):
        F = torch.nn.functional

        def run(u, delta, A, Bm, Cm, D, z, delta_bias):
            dt = F.softplus(delta + delta_bias)                         # [B, T, D]
            h = u.new_zeros(u.shape[0], A.shape[0], A.shape[1])         # [B, D, S]
            ys = []
            for t in range(u.shape[1]):
                h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * u[:, t])[:, :, None] * Bm[:, t, None, :]
                ys.append((h @ Cm[:, t, :, None])[..., 0])
            return (torch.stack(ys, 1) + D * u) * F.silu(z)
        return _closures(run, {n: x[n] for n in ("u", "delta", "A", "Bm", "Cm", "D", "z", "delta_bias")}, do)
    return None


# ------------------------------------------------------------------------------ the peer library
def _output(result):
    """The output of a peer function that returns o or (o, final_state)."""
    return result[0] if isinstance(result, tuple) else result


def _naive_module(name: str):
    """fla.ops.<name>.naive loaded by path (plain torch), or None."""
    spec = importlib.util.find_spec("fla")
    if spec is None or _torch() is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "ops" / name / "naive.py"
    if not path.exists():
        return None
    module_spec = importlib.util.spec_from_file_location(f"_fla_naive_{name}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except ImportError:          # e.g. einops missing
        return None
    return module


def fla_chunked(op: str, x: dict, do: np.ndarray, chunk: int = 64) -> Closures:
    """The peer library's torch chunked form of op (its ``naive_chunk_*``), where one exists."""
    if op == "simple_gla" and (m := _naive_module("simple_gla")):
        return _closures(lambda q, k, v, g: _output(m.naive_chunk_simple_gla(q, k, v, g, chunk_size=chunk)),
                         {n: x[n] for n in ("q", "k", "v", "g")}, do)
    if op == "retnet" and x.get("g") is not None and (m := _naive_module("simple_gla")):
        g = np.ascontiguousarray(np.broadcast_to(x["g"], x["q"].shape[:3]))
        return _closures(lambda q, k, v, g: _output(m.naive_chunk_simple_gla(q, k, v, g, chunk_size=chunk)),
                         dict(q=x["q"], k=x["k"], v=x["v"], g=g), do)
    if op == "gated_delta_rule" and x["q"].shape[2] == x["v"].shape[2] and (m := _naive_module("gated_delta_rule")):
        return _closures(lambda q, k, v, g, beta: _output(m.naive_chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=chunk)),
                         {n: x[n] for n in ("q", "k", "v", "g", "beta")}, do)
    if op == "delta_rule" and x["q"].shape[2] == x["v"].shape[2] and (m := _naive_module("delta_rule")):
        # its layout is [B, H, T, K]; chunk 32 is its default
        heads = lambda t: t.transpose(1, 2).contiguous()
        return _closures(lambda q, k, v, beta: _output(m.delta_rule_chunkwise(heads(q), heads(k), heads(v),
                                                                              beta.transpose(1, 2).contiguous(),
                                                                              chunk_size=32)).transpose(1, 2),
                         {n: x[n] for n in ("q", "k", "v", "beta")}, do)
    if op == "linear_attention" and (m := _naive_module("linear_attn")):
        return _closures(lambda q, k, v: _output(m.naive_chunk_linear_attn(q, k, v)),
                         {n: x[n] for n in "qkv"}, do)
    return None
