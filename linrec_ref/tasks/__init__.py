"""SelectivBench: the synthetic selectivity tasks (docs/selectivbench.md).

Modules: ``grammar`` (the seeded automaton), ``sequences`` (strings and samples), ``expand``
(time expansion: blanks, distractors, noise, labels), ``presets`` (the paper's and the CPU
tasks), ``batching`` and ``metrics`` (masks, pooled and per-step accuracy), ``baselines``
(n-gram lookups and the Bayes-optimal causal filter), ``storage`` (datasets on disk), ``plot``
(pictures; needs matplotlib), ``cli`` (``linrec selectivbench ...``).
"""
