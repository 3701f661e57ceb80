"""
SelectivBench in ten minutes
============================

**At the end of this page you can** draw a SelectivBench grammar and a sample from it, say what
the n-gram and Bayes reference lines mean for a task, train a small gated delta net and a
transformer on a CPU, and read the metrics they report.

SelectivBench hides a *state* behind ambiguous letters: a letter like ``a`` has several copies
``a0 .. a{D-1}``, each a different hidden state with its own successors. A model sees only the
letters and must output the hidden state of the latest one, which it can only know by
remembering which letters came before: selective recall. Time expansion (blanks or distractor
letters inserted after each letter) tests whether the model can hold that state across a gap.
"""

# %%
# A grammar and a sample
# ----------------------
# ``linrec_ref.tasks.presets`` has the paper's tasks and small CPU-sized ones (``t1-small`` ..
# ``t4-small``). A task's grammar is drawn from the seed, exactly as the released generator does.
import os
import tempfile

from linrec_ref.tasks import baselines, plot, presets
from linrec_ref.tasks import train as tr
from linrec_ref.tasks.model import ModelConfig

QUICK = os.environ.get("LINREC_TUTORIAL_QUICK") == "1"
task = presets.get_preset("t2-small", amb=6)       # 1..4 blanks after each letter, amb = 6 copies
grammar = task.grammar(seed=1)
print(f"{task.name}: {len(grammar.state_letter)} hidden states over {grammar.n_letters} letters; "
      f"{grammar.n_classes} output classes; sample length {task.L} letters")
assert grammar.n_amb == 6

import matplotlib.pyplot as plt

plot.plot_grammar(grammar)
plt.show()

# %%
# The transition matrix above has one row per hidden state; the copies of an ambiguous letter sit
# next to each other, so the blocks show how differently the copies of one letter continue. Now
# one training sample, time-expanded: the input at every step (one-hot letter, or a blank) and
# the label every step carries (the hidden state of the latest letter).
sample = presets.make_sample(task, seed=1, idx=1, split="train")
plot.plot_sample(sample, grammar, max_steps=80)
plt.show()
assert sample.y.shape == (sample.n_steps,) and sample.x.shape[0] == sample.n_steps

# %%
# Reference lines: what memory buys
# ---------------------------------
# An n-gram lookup predicts the hidden state from the last n letters alone (fitted on the
# training split); the Bayes filter knows the true grammar and tracks the posterior over hidden
# states exactly, the best any causal model can do. A model above the 3-gram line remembers more
# than two letters back; a model at the Bayes line has solved the task.
ref = baselines.report(task, seed=1, n_train=300 if QUICK else 2000, n_test=50 if QUICK else 200)
for name in ("1-gram", "2-gram", "3-gram", "4-gram", "bayes"):
    print(f"  {name:6s} {ref[name]:.3f}")
assert ref["1-gram"] <= ref["3-gram"] <= ref["bayes"] + 1e-9

# %%
# Train two small models
# ----------------------
# ``tr.train`` runs the NumPy training stack (layers with hand-written backwards, Adam) in a run
# folder that resumes if interrupted. These are tiny runs (the command line's defaults are
# ``linrec selectivbench train --preset t1-small --model gdn``: D = 64, 4 layers, 2000 steps).
steps = 10 if QUICK else 250
out = tempfile.mkdtemp(prefix="selectivbench-")
runs = {}
for model in ("gated_delta_net", "transformer"):
    mc = ModelConfig(model=model, d_model=32, n_layers=2)
    tc = tr.TrainConfig(preset="t2-small", amb=6, seed=1, steps=steps, warmup=max(1, steps // 10),
                        eval_every=max(1, steps // 3), eval_samples=64, batch_size=16)
    runs[model] = tr.train(mc, tc, out, progress=False)
    print(f"{model}: trained {steps} steps in {runs[model]}")

# %%
# Reading the metrics
# -------------------
# Every evaluation is a line of the run's ``metrics.jsonl``. The paper's accuracy is
# ``acc_pooled``: per letter, the softmax outputs are summed over the letter's step and its
# blanks, then the argmax is compared with the hidden state. ``acc_step`` scores every step on
# its own; ``acc_by_offset`` splits it by the position inside the gap (0 = the letter itself):
# a model that forgets during the gap loses accuracy at the larger offsets.
fig, ax = plt.subplots(figsize=(6, 3.5))
for model, run_dir in runs.items():
    evals = [r for r in tr.read_metrics(run_dir) if r["kind"] == "eval"]
    final = evals[-1]
    print(f"{model:16s} step {final['step']}: loss {final['loss']:.3f}, pooled accuracy "
          f"{final['acc_pooled']:.3f}, per step {final['acc_step']:.3f}, by offset "
          + " ".join(f"{a:.2f}" for a in final["acc_by_offset"]))
    assert 0.0 <= final["acc_pooled"] <= 1.0 and len(final["acc_by_offset"]) >= 2
    ax.plot([r["step"] for r in evals], [r["acc_pooled"] for r in evals], "o-", label=model)
for name, style in (("3-gram", ":"), ("bayes", "-.")):
    ax.axhline(ref[name], color="gray", ls=style, label=name)
ax.set(xlabel="step", ylabel="test pooled accuracy", title="t2-small, amb 6", ylim=(0, 1.02))
ax.legend(fontsize=8)
plt.show()

import shutil

shutil.rmtree(out)                                      # the run folders were for this page only

# %%
# Where to go next
# ----------------
# * ``linrec selectivbench train --preset t1-small --model gdn --out runs/`` trains the CPU-sized
#   default with a progress bar; ``linrec selectivbench eval RUN --preset t4-small --gap 20``
#   scores it on longer gaps.
# * ``linrec selectivbench sweep experiments/quick.toml --out runs`` then
#   ``linrec selectivbench report runs --out results`` runs a small experiment plan on Dask and
#   writes the results page with a verdict per claim of the paper.
