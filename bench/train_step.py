"""One SelectivBench training step: linrec_ref's NumPy stack against the same model in PyTorch.

    python -m bench train_step [--models gated_delta_net transformer] [--threads 1 2] [--repeats 5]

A step is forward + masked cross-entropy + backward + Adam on one batch of t1-small (amb 12,
batch 32, the longest sample sets T: about 128 steps), D = 64, 4 layers, 4 heads, float32; the
batch is drawn once, outside the timing, and its generation is timed on its own. Peers, measured
in the same run on the same threads (torch.set_num_threads; Numba's thread count; BLAS through
threadpoolctl):
    torch loop     the same network in PyTorch eager, the recurrence a loop over time
    torch chunk    the same, the recurrence the peer library's torch chunked function
                   (naive_chunk_gated_delta_rule, chunk 64), when installed
    torch sdpa     the transformer with scaled_dot_product_attention
The PyTorch model mirrors linrec_ref's: one-hot -> D projection, 4 post-norm blocks x <-
LayerNorm(x + mixer(x)), the mixer with q/k/v projections, causal depthwise convs (kernel 4) with
SiLU, L2-normalised q and k, beta = sigmoid, alpha = exp(-exp(A_log) softplus(a + dt_bias)),
the gated RMSNorm output gate and expand_v = 2; the decoder over the hidden-state classes; Adam.
Median of >= 5 steps after a warm-up step; peak RSS of one step above what was held before it.
Results: results/train_step.json and a markdown table on stdout.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import _harness
import numpy as np

from linrec_ref.nn import functional as F
from linrec_ref.nn import optim
from linrec_ref.nn.layers import Context
from linrec_ref.tasks import model as md
from linrec_ref.tasks import train as tr

import _torch_peers

RESULTS = Path(__file__).parent / "results"
SHAPE = dict(d_model=64, n_layers=4, n_heads=4)


def linrec_step(model_name: str, batch, seed: int = 1):
    mc = md.ModelConfig(model=model_name, **SHAPE)
    tc = tr.TrainConfig(preset="t1-small", seed=seed)
    model, _ = tr.build_model(mc, tc)
    opt = optim.Adam(model.parameters())
    limit = tr.blas_threads(mc, None)       # the training loop's BLAS policy (one thread beside Numba)

    def step():
        with tr.blas_limit(limit):
            return _step()

    def _step():
        z, cache = model.forward(batch.x, Context(True, np.random.default_rng(0)))
        ce = F.cross_entropy(z, batch.y, batch.mask)
        _, grads = model.backward(cache, ce.dlogits)
        optim.clip_by_global_norm(grads, 1.0)
        opt.step(grads, 1e-3)
        return ce.loss
    return step


# ------------------------------------------------------------------------------ torch peers
def torch_model(model_name: str, recurrence: str, n_in: int, n_out: int):
    import torch
    from torch import nn
    Fn = torch.nn.functional
    D, L, H = SHAPE["d_model"], SHAPE["n_layers"], SHAPE["n_heads"]

    def rms(x, w, eps=1e-6):
        return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * w

    class Conv(nn.Module):
        def __init__(self, C):
            super().__init__()
            self.conv = nn.Conv1d(C, C, 4, groups=C, padding=3, bias=False)

        def forward(self, x):                                       # [B, T, C]
            return Fn.silu(self.conv(x.transpose(1, 2))[..., :x.shape[1]].transpose(1, 2))

    class GDN(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k = nn.Linear(D, D, bias=False), nn.Linear(D, D, bias=False)
            self.v, self.g = nn.Linear(D, 2 * D, bias=False), nn.Linear(D, 2 * D, bias=False)
            self.b, self.a = nn.Linear(D, H, bias=False), nn.Linear(D, H, bias=False)
            self.cq, self.ck, self.cv = Conv(D), Conv(D), Conv(2 * D)
            self.A_log = nn.Parameter(torch.log(torch.empty(H).uniform_(1, 16)))
            self.dt_bias = nn.Parameter(torch.zeros(H))
            self.w = nn.Parameter(torch.ones(2 * D // H))
            self.o = nn.Linear(2 * D, D, bias=False)

        def forward(self, x):
            B, T, _ = x.shape
            q = Fn.normalize(self.cq(self.q(x)).view(B, T, H, -1), dim=-1)
            k = Fn.normalize(self.ck(self.k(x)).view(B, T, H, -1), dim=-1)
            v = self.cv(self.v(x)).view(B, T, H, -1)
            beta = torch.sigmoid(self.b(x))
            g = -self.A_log.exp() * Fn.softplus(self.a(x) + self.dt_bias)
            K = q.shape[-1]
            if recurrence == "chunk":
                o = _torch_peers._output(chunk_fn(q, k, v, g, beta, chunk_size=64))
            else:
                o = _torch_peers._delta_loop(q, k, v, g.exp()[..., None, None], beta, K ** -0.5)
            o = rms(o, self.w) * Fn.silu(self.g(x).view(B, T, H, -1))
            return self.o(o.reshape(B, T, -1))

    def rope(x, base=1000.0):
        T, Dh = x.shape[1], x.shape[-1]
        inv = base ** (-torch.arange(0, Dh, 2, dtype=torch.float64) / Dh)
        ang = torch.outer(torch.arange(T, dtype=torch.float64), inv).to(x.dtype)
        c, s = ang.cos()[None, :, None], ang.sin()[None, :, None]
        x1, x2 = x[..., :Dh // 2], x[..., Dh // 2:]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
            self.wq, self.wk = nn.Parameter(torch.ones(D // H)), nn.Parameter(torch.ones(D // H))
            self.n1, self.n2 = nn.LayerNorm(D), nn.LayerNorm(D)
            self.w1, self.w3 = nn.Linear(D, 4 * D, bias=False), nn.Linear(D, 4 * D, bias=False)
            self.w2 = nn.Linear(4 * D, D, bias=False)

        def forward(self, x):
            B, T, _ = x.shape
            q = rope(rms(self.q(x).view(B, T, H, -1), self.wq)).transpose(1, 2)
            k = rope(rms(self.k(x).view(B, T, H, -1), self.wk)).transpose(1, 2)
            v = self.v(x).view(B, T, H, -1).transpose(1, 2)
            o = Fn.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, D)
            h = self.n1(x + self.o(o))
            return self.n2(h + self.w2(Fn.silu(self.w1(h)) * self.w3(h)))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.mixer, self.norm = GDN(), nn.LayerNorm(D)

        def forward(self, x):
            return self.norm(x + self.mixer(x))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.dec = nn.Linear(n_in, D), nn.Linear(D, n_out)
            self.blocks = nn.ModuleList(Attention() if model_name == "transformer" else Block()
                                        for _ in range(L))

        def forward(self, x):
            h = self.embed(x)
            for b in self.blocks:
                h = b(h)
            return self.dec(h)

    chunk_fn = None
    if recurrence == "chunk":
        m = _torch_peers._naive_module("gated_delta_rule")
        if m is None:
            return None
        chunk_fn = m.naive_chunk_gated_delta_rule
    return Net()


def torch_step(model_name: str, recurrence: str, batch):
    try:
        import torch
    except ImportError:
        return None
    torch.manual_seed(0)
    net = torch_model(model_name, recurrence, batch.x.shape[-1], int(batch.y.max()) + 1)
    if net is None:
        return None
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x = torch.from_numpy(batch.x)
    y = torch.from_numpy(np.where(batch.mask, batch.y, -100))

    def step():
        opt.zero_grad()
        z = net(x)
        loss = torch.nn.functional.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        return float(loss)
    return step


# ------------------------------------------------------------------------------ main
def set_threads(n: int):
    from threadpoolctl import threadpool_limits
    threadpool_limits(n)
    try:
        import numba
        numba.set_num_threads(n)
    except ImportError:
        pass
    try:
        import torch
        torch.set_num_threads(n)
    except ImportError:
        pass


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench train_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="*", default=["gated_delta_net", "transformer"])
    p.add_argument("--threads", nargs="*", type=int, default=[1, 2])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    env = _harness.environment()
    tc = tr.TrainConfig(preset="t1-small", batch_size=32)
    task = tc.task()
    t0 = time.perf_counter()
    batch = tr.train_batch(task, tc.seed, 1, tc.batch_size)
    data_ms = 1e3 * (time.perf_counter() - t0)
    rows = []
    for threads in args.threads:
        set_threads(threads)
        for model_name in args.models:
            peers = {"linrec_ref": linrec_step(model_name, batch)}
            if model_name == "transformer":
                peers["torch sdpa"] = torch_step(model_name, "loop", batch)
            else:
                peers["torch loop"] = torch_step(model_name, "loop", batch)
                peers["torch chunk"] = torch_step(model_name, "chunk", batch)
            for impl, step in peers.items():
                if step is None:
                    rows.append(dict(model=model_name, threads=threads, impl=impl, ms=None, note="not installed"))
                    continue
                (_, rss) = _harness.peak_rss_during(step)
                med, _ = _harness.median_time(step, args.repeats)
                rows.append(dict(model=model_name, threads=threads, impl=impl, ms=1e3 * med,
                                 rss_mb=rss / 2 ** 20, note=""))
                print(f"{model_name:>16} {threads} thr {impl:>12}: {1e3 * med:8.1f} ms/step", flush=True)
    out = {"env": env, "batch": {"B": batch.batch_size, "T": batch.n_steps, "C": batch.n_input_classes,
                                  "generation_ms": data_ms}, "shape": SHAPE, "rows": rows}
    _harness.write_json_atomic(RESULTS / "train_step.json", out)
    print(f"\nbatch {batch.batch_size} x {batch.n_steps} steps (generated in {data_ms:.0f} ms), "
          f"D={SHAPE['d_model']}, {SHAPE['n_layers']} layers, {SHAPE['n_heads']} heads, float32\n")
    print("| model | threads | impl | ms / step | vs linrec_ref | peak RSS MB |\n|---|---|---|---|---|---|")
    for r in rows:
        own = next(x["ms"] for x in rows if x["model"] == r["model"] and x["threads"] == r["threads"]
                   and x["impl"] == "linrec_ref")
        ratio = "" if r["ms"] is None or own is None else f"{r['ms'] / own:.2f}x"
        ms = "-" if r["ms"] is None else f"{r['ms']:.1f}"
        rss = "" if r["ms"] is None else f"{r['rss_mb']:.0f}"
        print(f"| {r['model']} | {r['threads']} | {r['impl']} | {ms} | {ratio} | {rss} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
