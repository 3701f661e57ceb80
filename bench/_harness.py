"""Shared benchmark plumbing: thread pinning, the timing protocol, the machine's yardsticks.

Import this module before NumPy (it pins BLAS threads through the environment first).
"""
from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import json  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402


def pin_threads() -> None:
    """Also limit a BLAS that was loaded before the environment was set (needs threadpoolctl)."""
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(1)
    except ImportError:
        pass


def median_time(fn, runs: int = 5):
    """(median seconds, all times) of ``runs`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), times


def matmul_gflops(n: int = 1024) -> float:
    """The named limit: this machine's float32 n^3 matmul rate on the pinned threads."""
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    return 2 * n ** 3 / median_time(lambda: a @ a, 5)[0] / 1e9


def flops_chunkwise(B: int, T: int, H: int, K: int, V: int, C: int) -> float:
    """Matrix-product FLOPs of one chunkwise forward: per chunk and head, Q K^T (2 C^2 K), the
    masked scores times V (2 C^2 V), the chunk state K^T V (2 C K V) and the inter-chunk read
    Q S (2 C K V). Elementwise work (exp, masks) is not counted."""
    C = min(C, T)
    return B * H * (-(-T // C)) * (2 * C * C * K + 2 * C * C * V + 4 * C * K * V)


def environment() -> dict:
    """Machine and library versions, printed with every result."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    env = {"python": platform.python_version(), "numpy": np.__version__, "machine": platform.machine(),
           "cpu": cpu, "cpus": os.cpu_count(), "OPENBLAS_NUM_THREADS": os.environ["OPENBLAS_NUM_THREADS"]}
    try:
        from threadpoolctl import threadpool_info
        env["threadpools"] = [(p["internal_api"], p["num_threads"]) for p in threadpool_info()]
    except ImportError:
        env["threadpools"] = "threadpoolctl not installed (threads pinned through the environment)"
    try:
        import torch
        env["torch"] = torch.__version__
    except ImportError:
        env["torch"] = "not installed (no PyTorch peer ratios)"
    return env


def write_json_atomic(path, payload) -> None:
    """Write JSON so that a reader never sees a half-written file (temp file + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        json.dump(payload, f, indent=1)
    os.replace(f.name, path)


def current_rss() -> int:
    """This process's resident set size in bytes (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def peak_rss_during(fn):
    """(fn(), the peak RSS in bytes above what the process held before the call).

    A thread samples the current RSS every 0.5 ms while fn runs: ru_maxrss, the process's
    high-water mark, reads 0 for any call that stays below an earlier peak (input generation
    usually sets one). Work that holds the GIL for long stretches is sampled less often."""
    import threading

    top, stop = [current_rss()], threading.Event()
    before = top[0]

    def sample():
        while not stop.is_set():
            top[0] = max(top[0], current_rss())
            time.sleep(0.0005)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        out = fn()
    finally:
        stop.set()
        th.join()
    return out, max(top[0], current_rss()) - before
