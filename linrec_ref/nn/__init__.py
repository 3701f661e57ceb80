"""A small NumPy training stack: layers, mixers and an optimiser, with hand-written backwards.

    functional   the layers' math: ``f(x, ...) -> (y, cache)`` and ``f_vjp(cache, dy) -> grads``
    layers       modules holding parameters (Linear, LayerNorm, RMSNorm, ShortConv, SwiGLU, ...)
    mixers       the sequence layers of the SelectivBench models, each calling a library op
    optim        Adam, global-norm clipping, the warmup + cosine learning-rate schedule

No autodiff engine: every backward is written out, like the ops' vjps, and checked against
central finite differences in float64 (tests/test_nn.py). Choosing this over the ``autograd``
package keeps one style across ops and layers, needs no extra dependency, and keeps the float32
path (autograd's NumPy wrapper re-traces every call and promotes scalars to float64).
"""
from . import functional, layers, mixers, optim  # noqa: F401
