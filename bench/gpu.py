"""The GPU check: tunelab against Hugging Face Trainer on a CUDA machine, the same work, side by side.

    python bench/gpu.py [--out DIR]
    python bench/gpu.py --smoke     # every arm on the CPU, on 64 tweets for 1 epoch: checks the script, measures nothing

Three workloads, each run by tunelab and by Trainer in its own process (so that each peak GPU memory is its own),
tunelab first:
- MiniLM `full`, sequence classification on 2,000 bundled tweets (`tunelab data tweets`), batch 32, max length
  128, bfloat16 autocast with float32 weights on both sides (tunelab `--train.bf16 true`, Trainer `bf16=True`),
  learning rate 5e-5, linear schedule with 10% warm-up, 2 epochs;
- SmolLM2-135M `lora` (r 8, alpha 16, dropout 0.05 on q_proj and v_proj), causal language modelling on the same
  tweets' text packed into 256-token blocks (each tweet ends with eos; tunelab's clm packing, done the same way for
  Trainer), batch 8, frozen weights in bfloat16 with float32 adapters (tunelab `--model.dtype bfloat16`, Trainer:
  the base loaded in bfloat16, peft's adapters in float32, `bf16=True`), learning rate 2e-4, 4 epochs.
- SmolLM2-135M `qlora`: the same as `lora` with the base's linear layers in 4-bit NF4 with double quantization
  computed in bfloat16 (tunelab `--tuning qlora`, Trainer: the base loaded with transformers' BitsAndBytesConfig
  of the same settings, lm_head kept out of 4 bits on both sides).
It prints, per arm: real (non-padding) training tokens per second, peak GPU memory (torch.cuda.max_memory_allocated)
and the final training loss (the mean of the last 10 logged steps).
About 4-7 minutes of an H100, model preparation included. Needs: the lock (`make venv`) and a CUDA build of torch.
"""
from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import time
from pathlib import Path

PY = sys.executable
SMOKE = "--smoke" in sys.argv  # (the children get the flag too)
DEVICE = "cpu" if SMOKE else "cuda"


def _epochs(n: int) -> int:
    return 1 if SMOKE else n


def _peak_mb() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() and not SMOKE else 0.0


def _reset_peak() -> None:
    import torch

    if torch.cuda.is_available() and not SMOKE:
        torch.cuda.reset_peak_memory_stats()


def tunelab_arm(kind: str, data: Path, out: Path) -> dict:
    import tunelab

    common = {"output": str(out), "overwrite": True, "eval": {"bootstrap": 0, "probe": False},
              "data": {"train": str(data / "train.jsonl"), "eval": str(data / "eval.jsonl")}}
    if kind == "minilm":
        cfg = {**common, "task": "classification", "model": {"name": "minilm"},
               "data": {**common["data"], "max_length": 128}, "tuning": {"name": "full", "layer_decay": 1.0},
               "train": {"device": DEVICE, "bf16": True, "epochs": _epochs(2), "batch_size": 32, "lr": 5e-5,
                         "progress": False}}
    else:
        cfg = {**common, "task": "clm", "model": {"name": "smollm2", "dtype": "bfloat16"},
               "data": {**common["data"], "max_length": 256},
               "tuning": {"name": "qlora" if kind == "smollm2-qlora" else "lora", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.05,
                          "lora_targets": ["q_proj", "v_proj"]},
               "train": {"device": DEVICE, "epochs": _epochs(4), "batch_size": 8, "lr": 2e-4, "progress": False}}
    _reset_peak()
    result = tunelab.train(cfg)
    t = result.metrics["train"]
    losses = [json.loads(line)["loss"] for line in (out / "history.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    return {"tokens_per_s": t["tokens_seen"] / t["step_seconds"], "peak_gpu_mb": _peak_mb(), "final_loss": sum(losses[-10:]) / len(losses[-10:]), "steps": t["steps"]}


def trainer_arm(kind: str, data: Path, out: Path) -> dict:
    import torch

    importlib.import_module("tunelab")  # first: torchvision beside a torch it was not built for (README, Images)
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                              DataCollatorForLanguageModeling, DataCollatorWithPadding, Trainer, TrainerCallback,
                              TrainingArguments)

    from tunelab.models import resolve

    rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    folder = resolve("minilm" if kind == "minilm" else "smollm2")
    tok = AutoTokenizer.from_pretrained(folder)
    losses = []

    class Log(TrainerCallback):
        def on_log(self, args_, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    if kind == "minilm":
        labels = sorted({r["label"] for r in rows})
        enc = tok([r["text"] for r in rows], truncation=True, max_length=128)
        train = [{"input_ids": i, "attention_mask": m, "labels": labels.index(r["label"])}
                 for i, m, r in zip(enc["input_ids"], enc["attention_mask"], rows)]
        model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=len(labels))
        collator, extra = DataCollatorWithPadding(tok), {"num_train_epochs": _epochs(2), "per_device_train_batch_size": 32,
                                                         "learning_rate": 5e-5}
    else:
        from peft import LoraConfig, get_peft_model

        stream = [t for ids in tok([r["text"] for r in rows])["input_ids"] for t in ids + [tok.eos_token_id]]
        train = [{"input_ids": stream[i:i + 256]} for i in range(0, len(stream), 256) if len(stream[i:i + 256]) > 1]
        quantized = {}
        if kind == "smollm2-qlora":
            from transformers import BitsAndBytesConfig

            quantized = {"quantization_config": BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16), "device_map": {"": "cpu" if SMOKE else 0}}
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, **quantized)
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                                 target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        collator = DataCollatorForLanguageModeling(tok, mlm=False)
        extra = {"num_train_epochs": _epochs(4), "per_device_train_batch_size": 8, "learning_rate": 2e-4}
    targs = TrainingArguments(output_dir=str(out), bf16=True, lr_scheduler_type="linear", warmup_steps=0.1,
                              weight_decay=0.01, max_grad_norm=1.0, optim="adamw_torch_fused", report_to=[],
                              save_strategy="no", eval_strategy="no", logging_steps=1, disable_tqdm=True,
                              train_sampling_strategy="group_by_length", seed=0, use_cpu=SMOKE, **extra)
    _reset_peak()
    trainer = Trainer(model=model if kind == "smollm2-qlora" or SMOKE else model.cuda(), args=targs, train_dataset=train, data_collator=collator,
                      processing_class=tok, callbacks=[Log()])
    tic = time.perf_counter()
    state = trainer.train()
    seconds = time.perf_counter() - tic
    tokens = sum(len(e["input_ids"]) for e in train) * round(state.metrics.get("epoch", 1))
    return {"tokens_per_s": tokens / seconds, "peak_gpu_mb": _peak_mb(),
            "final_loss": sum(losses[-10:]) / max(len(losses[-10:]), 1), "steps": state.global_step}


def child(args) -> int:
    arm = tunelab_arm if args.arm == "tunelab" else trainer_arm
    print(json.dumps(arm(args.kind, Path(args.data), Path(args.out))))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench-gpu")
    parser.add_argument("--arm", help=argparse.SUPPRESS)
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true",
                        help="Every arm on the CPU on a little data for 1 epoch: checks the script, measures nothing.")
    args = parser.parse_args()
    if args.arm:
        return child(args)
    import torch

    if not torch.cuda.is_available() and not args.smoke:
        print("bench/gpu.py needs a CUDA device (none is visible to PyTorch here)", file=sys.stderr)
        return 2
    out = Path(args.out)
    data = out / "tweets"
    sizes = ("64", "16") if args.smoke else ("2000", "200")
    subprocess.run([PY, "-m", "tunelab", "data", "tweets", "--output", str(data), "--train-size", sizes[0],
                    "--eval-size", sizes[1], "--seed", "0"], check=True)
    subprocess.run([PY, "-m", "tunelab", "models", "prepare", "smollm2"], check=True)
    print(f"{'CPU smoke run (no figures)' if args.smoke else torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    print(f"{'workload':<16}{'arm':<10}{'tokens/s':>12}{'peak GPU MiB':>14}{'final loss':>12}{'steps':>7}")
    for kind in ("minilm", "smollm2", "smollm2-qlora"):
        for arm in ("tunelab", "trainer"):
            done = subprocess.run([PY, __file__, "--arm", arm, "--kind", kind, "--data", str(data), "--out",
                                   str(out / f"{kind}-{arm}"), *(["--smoke"] if args.smoke else [])],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{kind:<16}{arm:<10} failed: {done.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{kind:<16}{arm:<10}{r['tokens_per_s']:>12,.0f}{r['peak_gpu_mb']:>14,.0f}"
                  f"{r['final_loss']:>12.4f}{r['steps']:>7}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
