"""`head` (the solved linear head) against the linear probe on the same split, over several seeds.

Issue 24 asks that `head` score at least the probe minus 0.01 macro-F1: they are the same model family (a linear
model on MiniLM's mean-pooled features), each with its L2 strength chosen by 5-fold cross-validation inside the
training split. This script shows how the difference is spread over seeds (the seed draws the training
subsample and the folds). On this 2-core machine, 10% (201 tweets), seeds 0-9, one run each: -0.0023..+0.0212,
mean +0.0059 (standard error 0.0023), after two changes: the feature cache no longer computes all but its first
batch with the backbone's dropout on, and λ is chosen by held-out cross-entropy instead of macro-F1 (before both:
seeds 0-4 -0.0122..+0.0066, mean -0.0027; the cache fix alone: -0.0299..+0.0031).

    .venv/bin/python bench/head_vs_probe.py [--fraction 0.1] [--seeds 0,1,2,3,4] [--out /tmp/head-vs-probe]

Prints one row per seed and the mean difference with its standard error.
"""
from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path

import tunelab
from tunelab.data.bundled import tweets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--out", default="/tmp/head-vs-probe")
    args = ap.parse_args()
    out = Path(args.out)
    data = tweets(out / "data", train_size=2000, eval_size=600, seed=0)  # the demo's data (Makefile)
    diffs = []
    print(f"{'seed':>4} {'train':>5} {'head':>7} {'probe':>7} {'diff':>8}")
    for seed in (int(s) for s in args.seeds.split(",")):
        run = out / f"head-{seed}"
        shutil.rmtree(run, ignore_errors=True)
        cfg = {"model": {"name": "minilm"}, "tuning": {"name": "head"}, "output": str(run),
               "data": {"train": data["train"], "eval": data["eval"], "max_length": 64,
                        "train_fraction": args.fraction},
               "train": {"batch_size": 32, "seed": seed, "progress": False}, "eval": {"bootstrap": 0}}
        m = tunelab.train(cfg).metrics
        head, probe = m["eval"]["f1_macro"], m["baseline"]["linear_probe"]["f1_macro"]
        diffs.append(head - probe)
        print(f"{seed:>4} {m['train']['train_examples']:>5} {head:>7.4f} {probe:>7.4f} {head - probe:>+8.4f}",
              flush=True)
        shutil.rmtree(run / "model", ignore_errors=True)
    mean = sum(diffs) / len(diffs)
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs)) if len(diffs) > 1 else 0.0
    print(f"mean head - probe over {len(diffs)} seeds: {mean:+.4f} (standard error {se:.4f}); "
          f"worst {min(diffs):+.4f}")


if __name__ == "__main__":
    main()
