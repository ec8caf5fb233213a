"""DPO: tunelab's `--task dpo` against TRL's DPOTrainer, the same work, interleaved.

    python bench/dpo.py [--rounds 2] [--train-size 200] [--epochs 1]
    python bench/dpo.py --device cuda --train-size 1000 --batch-size 8   # on a GPU: bf16 autocast both sides

Both train SmolLM2-135M-Instruct with LoRA (r 8, alpha 16, dropout 0.1 on every linear layer of the attention and
MLP blocks) by DPO (sigmoid loss, β 0.1) on the bundled `chitchat-replies` pairs (`tunelab data chitchat-replies`,
seed 0; the pairs whose prompt and longer answer fit `--max-length` tokens, so neither side truncates), the
reference being the model with its adapters off, its log-probabilities computed once before training on both
sides (TRL: `precompute_ref_log_probs=True`). Same seed, batch size (pairs), epochs, learning rate, linear schedule
with 10% warm-up, weight decay 0.01, clipping 1.0, fused AdamW, fp32, no gradient checkpointing (TRL's defaults
turn on checkpointing and bf16 autocast; bench/NOTES.md). Reported, medians over rounds: pairs per second of
training (TRL: `train_runtime`; tunelab: the sum of its step times), and with each side's reference pass over the
training pairs added (TRL runs it in `DPOTrainer.__init__`, outside `train_runtime`: timed around its
`_precompute_ref_logps`), peak RSS at the end of training (peak GPU memory with `--device cuda`), the held-out
reward accuracy and DPO loss by one function for both sides (`heldout`: the share of held-out pairs whose chosen
answer gains more log-probability over the reference than the rejected one, ties wrong, and the mean −log σ(β ·
that margin)) on the trained model, and the time to a target held-out DPO loss (the same round's TRL final loss +
0.02), evaluated `--evals-per-epoch` times a epoch off the clock (tunelab: its own evaluation, `train.eval_every`,
the same loss over the same pairs). TRL and `datasets` come with the `dev` extra, as for bench/lm.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import eval_every, in_process, machine, median, options, peak_rss_mb  # bench/common.py, beside
from lm import TARGETS, model_path, read, recipe_arguments, times_to_target, trl_recipe  # bench/lm.py


def every(pairs: int, args) -> int:
    """Optimizer steps between held-out evaluations: `--evals-per-epoch` a epoch on both sides."""
    return max(1, -(-pairs // args.batch_size) // args.evals_per_epoch)


def make_data(folder: Path, args) -> Path:
    from transformers import AutoTokenizer

    raw = folder / "raw"
    subprocess.run([sys.executable, "-m", "tunelab", "data", "chitchat-replies", "--output", str(raw),
                    "--train-size", str(args.train_size), "--eval-size", str(args.eval_size), "--seed", "0"],
                   check=True, stdout=subprocess.DEVNULL)
    tok = AutoTokenizer.from_pretrained(model_path("smollm2"))

    def fits(r):
        longer = max(r["chosen"], r["rejected"], key=len)
        return len(tok.apply_chat_template(r["prompt"] + [{"role": "assistant", "content": longer}],
                                           tokenize=True, return_dict=True)["input_ids"]) <= args.max_length
    data = folder / "data"
    data.mkdir()
    for split in ("train", "eval"):
        rows = [r for r in read(raw / f"{split}.jsonl") if fits(r)]
        with open(data / f"{split}.jsonl", "w") as ours, open(data / f"{split}-trl.jsonl", "w") as trl:
            for r in rows:
                ours.write(json.dumps(r) + "\n")
                trl.write(json.dumps({"prompt": r["prompt"],
                                      "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                      "rejected": [{"role": "assistant", "content": r["rejected"]}]}) + "\n")
    return data


def heldout(model, tokenizer, data: Path, reference: dict) -> tuple[float, float]:
    """(reward accuracy, DPO loss) on the held-out pairs, one function for both sides: the share of pairs where
    log π(chosen) − log π_ref(chosen) > the same of rejected (ties wrong), and the mean −log σ(β · that margin),
    β 0.1; π_ref is the adapters off, its log-probabilities computed once into `reference`. Answers rendered by
    the chat template as tunelab renders them; the model's mode is restored (it runs during training)."""
    import math

    import torch

    from tunelab.data.chat import IGNORE, render

    def logps(rows):
        out = []
        for r in rows:
            messages = r[0] + [{"role": "assistant", "content": r[1]}]
            ids, labels = render(tokenizer, messages, [len(messages) - 1])
            device = next(model.parameters()).device
            ids_t, labels_t = torch.tensor([ids], device=device), torch.tensor([labels], device=device)[:, 1:]
            logits = model(input_ids=ids_t, use_cache=False).logits[:, :-1].float()
            lp = torch.log_softmax(logits, -1).gather(-1, labels_t.clamp(min=0)[..., None])[..., 0]
            out.append(float((lp * (labels_t != IGNORE)).sum()))
        return out

    pairs = read(data / "eval.jsonl")
    answers = [(p["prompt"], p["chosen"]) for p in pairs] + [(p["prompt"], p["rejected"]) for p in pairs]
    was = model.training
    model.eval()
    with torch.no_grad():
        policy = logps(answers)
        if "logps" not in reference:
            with model.disable_adapter():
                reference["logps"] = logps(answers)
    model.train(was)
    n = len(pairs)
    margins = [(policy[i] - reference["logps"][i]) - (policy[n + i] - reference["logps"][n + i]) for i in range(n)]
    loss = sum(math.log1p(math.exp(-0.1 * m)) if m > -200 else -0.1 * m for m in margins) / n
    return sum(m > 0 for m in margins) / n, loss


def run_tunelab(data: Path, out: Path, args) -> dict:
    import tunelab
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = {"task": "dpo", "model": {"name": "smollm2"}, "output": str(out), "overwrite": True,
           "data": {"train": str(data / "train.jsonl"), "eval": str(data / "eval.jsonl"),
                    "max_length": args.max_length},
           "tuning": {"name": "lora", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.1, "lora_targets": TARGETS},
           "train": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                     "warmup_ratio": 0.1, "weight_decay": 0.01, "max_grad_norm": 1.0, "progress": False,
                     "schedule": "linear", "beta": 0.1, "device": args.device, "bf16": args.device == "cuda",
                     "eval_every": every(len(read(data / "train.jsonl")), args)},
           "eval": {"bootstrap": 0}}
    from tunelab.tasks.preference import DPO

    reference = []  # seconds of each reference pass: the training pairs' first (TRL precomputes only those)
    prepare = DPO.prepare_items

    def timed(self, *a, **kw):
        tic = time.perf_counter()
        prepare(self, *a, **kw)
        reference.append(time.perf_counter() - tic)
    DPO.prepare_items = timed
    training_peak = []
    result = tunelab.train(cfg, on_step=lambda step: training_peak.append(peak_rss_mb()))
    t = result.metrics["train"]
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    seconds = {h["step"]: h["train_seconds"] for h in history if "loss" in h}
    curve = [(seconds[h["step"]], h["eval_loss"]) for h in history if "eval_loss" in h]
    base = AutoModelForCausalLM.from_pretrained(model_path("smollm2"))
    model = PeftModel.from_pretrained(base, out / "adapter").to(args.device)
    pairs = len(read(data / "train.jsonl")) * args.epochs
    accuracy, loss = heldout(model, AutoTokenizer.from_pretrained(model_path("smollm2")), data, {})
    return {"seconds": t["step_seconds"], "with_reference": t["step_seconds"] + reference[0],
            "pairs": pairs, "accuracy": accuracy, "loss": loss, "curve": curve,
            "tunelab_accuracy": result.eval.get("reward_accuracy"), "peak_rss_mb": training_peak[-1],
            "peak_gpu_mb": t.get("peak_gpu_mb"), "steps": t["steps"]}


def run_trl(data: Path, out: Path, args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging
    from trl import DPOConfig, DPOTrainer

    logging.set_verbosity_error()
    path = model_path("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = DPOConfig(**trl_recipe(out, args), beta=0.1, gradient_checkpointing=False, bf16=args.device == "cuda",
                       precompute_ref_log_probs=True)
    reference = {}  # seconds of each precompute pass, by split: TRL runs them in __init__, outside train_runtime
    precompute = DPOTrainer._precompute_ref_logps

    def timed(self, dataset, name, batch_size):
        tic = time.perf_counter()
        out = precompute(self, dataset, name, batch_size)
        reference[name] = time.perf_counter() - tic
        return out
    DPOTrainer._precompute_ref_logps = timed
    cache = {}
    clock = eval_every(every(len(read(data / "train.jsonl")), args),
                       lambda model: heldout(model, tokenizer, data, cache)[1])
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(read(data / "train-trl.jsonl")),
                         processing_class=tokenizer,
                         peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=TARGETS,
                                                task_type="CAUSAL_LM"),
                         callbacks=[clock])
    seconds = trainer.train().metrics["train_runtime"] - clock.paused
    training_peak = peak_rss_mb()
    gpu = torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else None
    accuracy, loss = heldout(trainer.model, tokenizer, data, cache)
    return {"seconds": seconds, "with_reference": seconds + reference["train"],
            "pairs": len(read(data / "train.jsonl")) * args.epochs, "accuracy": accuracy, "loss": loss,
            "curve": clock.curve, "tunelab_accuracy": None,
            "peak_rss_mb": training_peak, "peak_gpu_mb": gpu, "steps": trainer.state.global_step}


def main() -> int:
    p = recipe_arguments(__doc__.split("\n\n")[0], train_size=200, eval_size=60, max_length=160, lr=2e-4)
    args = p.parse_args()
    if args.one:
        arm, data, out = args.one
        fn = run_trl if arm == "trl" else run_tunelab
        print("RESULT " + json.dumps(fn(Path(data), Path(out), args)), flush=True)
        return 0
    arms = ["tunelab", "trl"]
    results: dict[str, list[dict]] = {a: [] for a in arms}
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(Path(tmp), args)
        print(f"{len(read(data / 'train.jsonl'))} training and {len(read(data / 'eval.jsonl'))} held-out pairs within "
              f"{args.max_length} tokens", flush=True)
        load_before = os.getloadavg()[0]
        for r in range(args.rounds):
            for arm in arms:
                res = in_process(__file__, ["--one", arm, str(data), str(Path(tmp) / f"{arm}-{r}"),
                                            *options(args, ("one", "rounds", "seed", "first_seed")),
                                            f"--seed={args.first_seed + r}"], arm)
                res["pairs_per_s"] = res["pairs"] / res["seconds"]
                res["pairs_per_s_with_reference"] = res["pairs"] / res["with_reference"]
                results[arm].append(res)
                with_reference = res["pairs_per_s_with_reference"]
                gpu = f"  peak GPU {res['peak_gpu_mb']:.0f} MB" if res.get("peak_gpu_mb") else ""
                print(f"round {r + 1} {arm:8} {res['pairs_per_s']:5.2f} pairs/s ({with_reference:.2f} "
                      f"with the reference pass)  {res['steps']} steps  held-out reward accuracy {res['accuracy']:.3f}"
                      f" loss {res['loss']:.4f}  peak RSS {res['peak_rss_mb']:.0f} MB{gpu}", flush=True)
            times_to_target(results, "trl", f"round {r + 1} time to held-out DPO loss")
        load_after = os.getloadavg()[0]
    print(f"\nmachine: {machine()}; load average before {load_before:.2f}, after {load_after:.2f}")
    for arm in arms:
        rows = results[arm]
        med = lambda key: median(rows, key)  # noqa: E731
        trl, trl_ref, trl_rss = (median(results["trl"], key) for key in ("pairs_per_s", "pairs_per_s_with_reference",
                                                                          "peak_rss_mb"))
        print(f"{arm:8} {med('pairs_per_s'):5.2f} pairs/s ({med('pairs_per_s') / trl:.2f}×)"
              f"  with reference {med('pairs_per_s_with_reference'):5.2f} "
              f"({med('pairs_per_s_with_reference') / trl_ref:.2f}×)  accuracy {med('accuracy'):.3f}  "
              f"loss {med('loss'):.4f}  to target {med('to_target'):.1f} s  "
              f"peak RSS {med('peak_rss_mb'):.0f} MB ({med('peak_rss_mb') / trl_rss:.2f}×)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
