"""How far exact changes to tunelab's training can still go on this machine: the floor under a step.

    python bench/floor.py [--methods full,lora,head] [--rounds 1] [--train-size 1000] [--epochs 2] [--head-epochs 5]

Each round runs tunelab under `torch.profiler` (operator times only) and Hugging Face Trainer without it, each in
its own process, interleaved, on the same tweets, recipe and seed as `bench/train.py` (whose runners this uses;
neither evaluates before the end, so that no evaluation's products are counted). tunelab's training time, the
sum of its steps' times (the head's feature cache included), is split into
what no exact change to the recipe removes at this machine's speed:
- matrix products (`mm`, `addmm`, `bmm`, `baddbmm`, oneDNN's linear) at the rate the BLAS gives them at the run's
  own shapes: the FLOPs are the recipe's, and the rate is the library's;
- the optimizer (fused AdamW: one memory-bound kernel over every trainable parameter);
- drawing the dropout masks' random bits (`random_`, `bernoulli_`);
and the rest (GELU, layer norms, softmax, masks, copies, clipping, autograd and Python). If the rest cost nothing,
the same steps would take the floor's time; so the floor's tokens/s bounds every exact change that does not make
the products themselves faster, and so do the ratio to Trainer and the roofline (as `bench/train.py` counts it)
it implies. The profiler adds a little time of its own to every operator call, which this counts in the rest.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from common import gemm_peak, machine, median  # bench/common.py, beside this script

PRODUCTS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "mkldnn::_linear_pointwise",
            "aten::mkldnn_linear"}
OPTIMIZER = {"aten::_fused_adamw_", "aten::_fused_adam_"}
RANDOM = {"aten::random_", "aten::bernoulli_", "aten::uniform_"}


def run_profiled(method: str, data: Path, out: Path, epochs: int, every: int, args) -> dict:
    """tunelab's run as `bench/train.py` makes it, under the profiler from the start to its last step."""
    import train  # bench/train.py, beside this script
    from torch.profiler import ProfilerActivity, profile

    steps = -(-args.train_size // args.batch_size) * epochs  # tunelab runs ceil(examples / batch) steps an epoch
    prof = profile(activities=[ProfilerActivity.CPU])

    stopped = []

    def stop_after_last(step: int) -> None:
        if step == steps:
            prof.stop()
            stopped.append(step)
    prof.start()
    try:
        res = train.run_tunelab(method, data, out, epochs, every, args, on_step=stop_after_last)
    finally:
        if not stopped:
            prof.stop()
    if not stopped:
        raise SystemExit(f"tunelab ran fewer than the {steps} steps expected: the profile would hold its evaluation")
    self_us: dict[str, float] = {}
    for e in prof.key_averages():
        self_us[e.key] = self_us.get(e.key, 0.0) + e.self_cpu_time_total
    part = {name: sum(v for k, v in self_us.items() if k in keys) / 1e6
            for name, keys in (("products", PRODUCTS), ("optimizer", OPTIMIZER), ("random", RANDOM))}
    floor = PRODUCTS | OPTIMIZER | RANDOM
    rest = sorted(((v / 1e6, k) for k, v in self_us.items() if k not in floor), reverse=True)[:6]
    return {**res, **part, "rest": rest}


def main() -> int:
    import train  # bench/train.py, beside this script

    args = train.arguments(__doc__.split("\n\n")[0], rounds=1).parse_args()
    every = 10 ** 9  # no evaluation during training (its products would count in the profile)
    if args.one:
        return train.answer_one(args, run_profiled, every)

    methods = args.methods.split(",")
    peak = max(gemm_peak().values())
    rows: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = train.make_data(Path(tmp), args)
        fwd = train.flops_per_token(data, args.max_length)
        load_before = os.getloadavg()[0]
        for r in range(args.rounds):
            for method in methods:
                pair = {}
                for runner in ("tunelab", "trainer"):
                    out = Path(tmp) / f"{runner}-{method}-{r}"
                    pair[runner] = train.run_one(__file__, runner, method, data, out, args, seed=r)
                    shutil.rmtree(out, ignore_errors=True)  # MiniLM runs with checkpoints are ~0.5 GB each
                a, b = pair["tunelab"], pair["trainer"]
                floor = a["products"] + a["optimizer"] + a["random"]
                passes = train.PASSES[method] / (args.head_epochs if a["cached"] else 1)
                row = {"tunelab": a["tokens"] / a["seconds"], "trainer": b["tokens"] / b["seconds"],
                       "floor": a["tokens"] / floor,
                       **{k: a[k] / a["seconds"] for k in ("products", "optimizer", "random")}}
                row["roofline"] = fwd * passes * row["tunelab"] / peak
                row["floor_roofline"] = fwd * passes * row["floor"] / peak
                rows.setdefault(method, []).append(row)
                print(f"round {r + 1} {method:5} tunelab (profiled) {row['tunelab']:7.0f} real tokens/s, "
                      f"{a['seconds']:.1f} s: products {a['products']:.1f} s, optimizer {a['optimizer']:.1f} s, "
                      f"random bits {a['random']:.1f} s; floor {row['floor']:7.0f} real tokens/s; "
                      f"Trainer {row['trainer']:6.0f}", flush=True)
                rest = ", ".join(f"{k} {v / a['seconds']:.1%}" for v, k in a["rest"])
                print("        the rest's largest operators (self time over the training time; the profile also "
                      f"holds the run's setup): {rest}", flush=True)
        load_after = os.getloadavg()[0]

    print(f"\nmachine: {machine()}; load average before {load_before:.2f}, after {load_after:.2f}")
    print(f"fp32 GEMM peak measured here: {peak / 1e9:.1f} GFLOP/s; MiniLM forward {fwd / 1e6:.1f} MFLOP per real "
          f"token; {args.train_size} tweets, batch {args.batch_size}, {args.epochs} epochs (head {args.head_epochs}); "
          f"medians of {args.rounds} round(s); tunelab under the profiler")
    print(f"{'method':6} {'tok/s tunelab':>13} {'Trainer':>8} {'ratio':>6} {'roofline':>8}   {'share: products':>15} "
          f"{'optimizer':>9} {'random':>6} {'rest':>5}   {'floor tok/s':>11} {'ratio':>6} {'roofline':>8}")
    for method in methods:
        def med(key):
            return median(rows[method], key)
        rest = 1 - med("products") - med("optimizer") - med("random")
        print(f"{method:6} {med('tunelab'):13.0f} {med('trainer'):8.0f} {med('tunelab') / med('trainer'):5.2f}× "
              f"{med('roofline'):8.0%}   {med('products'):15.0%} {med('optimizer'):9.0%} {med('random'):6.0%} "
              f"{rest:5.0%}   {med('floor'):11.0f} {med('floor') / med('trainer'):5.2f}× {med('floor_roofline'):8.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
