"""``python -m bench <job>``: the benchmark harness's entry point (run from the repository root).

    python -m bench cpu [...]          the CPU benchmark (bench/cpu.py; --help for its options)
    python -m bench train_step [...]   one SelectivBench training step against PyTorch (bench/train_step.py)
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))   # the scripts import their siblings (_harness)

JOBS = {"cpu": "cpu", "train_step": "train_step"}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in JOBS:
        print(__doc__.strip(), file=sys.stderr)
        print(f"\nunknown or missing job; expected one of: {', '.join(JOBS)}", file=sys.stderr)
        return 2
    module = __import__(JOBS[argv[0]])
    return module.main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
