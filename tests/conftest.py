import os

# Pin BLAS threads before NumPy loads: oversubscribing 2 cores has cost 100x here.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

try:  # also limit a BLAS that was loaded before this file ran
    from threadpoolctl import threadpool_limits
    threadpool_limits(1)
except ImportError:  # pragma: no cover
    pass

# Property tests: the same examples on every run by default, so that a landing cannot fail on a
# draw no earlier run saw; HYPOTHESIS_PROFILE=explore draws fresh examples (run it locally and
# keep what it finds as a fixed regression case).
try:
    from hypothesis import settings as _hyp_settings
    _hyp_settings.register_profile("default", derandomize=True, print_blob=True)
    _hyp_settings.register_profile("explore", derandomize=False, print_blob=True)
    _hyp_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
except ImportError:  # pragma: no cover
    pass
