import os

# Pin BLAS threads before NumPy loads: oversubscribing 2 cores has cost 100x here.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

try:  # also limit a BLAS that was loaded before this file ran
    from threadpoolctl import threadpool_limits
    threadpool_limits(1)
except ImportError:  # pragma: no cover
    pass
