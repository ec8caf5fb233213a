"""Language-model fine-tuning: tunelab's chat SFT (or clm) against TRL's SFTTrainer at its best, the same work,
interleaved.

    python bench/lm.py [--arms tunelab,tunelab-packed,trl,trl-packed] [--rounds 2] [--train-size 400] [--epochs 1]
    python bench/lm.py --task clm --train-size 1000 --eval-size 200 [--rounds 2]   # continued pre-training, tweets
    python bench/lm.py --device cuda --train-size 2000 --max-length 512 --batch-size 16   # on a GPU, bf16 autocast
    python bench/lm.py --model gemma3-270m --arms tunelab-logits,tunelab --rounds 1 --batch-size 8 --max-length 256
        # peak memory of a chat SFT with a 262,144-token vocabulary: the loss from the logits against chunked

TRL and `datasets` are in the `dev` extra (`make` installs them); nothing in tunelab imports them.

Both fine-tune SmolLM2-135M-Instruct with LoRA (r 8, alpha 16, dropout 0.1 on every linear layer of the attention
and MLP blocks, peft) on the bundled chit-chat conversations (`tunelab data chitchat`, seed 0), keeping those whose
whole conversation fits `--max-length` tokens under the model's chat template, so neither side truncates. Each
conversation trains its last assistant turn only (TRL: conversational prompt/completion, `completion_only_loss`;
tunelab: the earlier assistant turns have weight 0). Same seed (round r: seed r), batch size, epochs, learning rate,
linear schedule with 10% warm-up, weight decay 0.01, clipping 1.0, fused AdamW, fp32, no gradient checkpointing.

TRL runs at its best on this machine (bench/NOTES.md says why each setting): `gradient_checkpointing=False` and
`bf16=False` (SFTConfig's defaults turn both on; tunelab runs neither by default), `use_cpu`, no dataloader workers,
batches of similar lengths (`train_sampling_strategy="group_by_length"`) for the padded arm, and for the packed arm
`packing=True` (best-fit decreasing, padding-free: position ids restart, transformers masks each conversation).
Each run is its own process (its peak RSS is its own), in the order of `--arms`, round after round. Reported:
- real tokens per second: the non-padding tokens of the training rows over all epochs, over the training time
  (tunelab: the sum of its step times; TRL: `train_runtime` less the held-out evaluations' time);
- the held-out loss (mean over the eval conversations' last-turn tokens, the same function and tokenization for
  both sides, on the model in memory after training) and the time to reach a target held-out loss, evaluated
  `--evals-per-epoch` times per epoch off the clock (target: the same round's TRL padded arm's final loss + 0.02);
- peak RSS at the end of training (VmHWM of the run's own process; for tunelab also after its whole `train`: the
  final evaluation, the export and its timing).
Medians over rounds, ratios against the faster TRL arm, the machine and its load before and after. Arms:
`tunelab` (padded rows, length-bucketed), `tunelab-packed` (train.packing), `tunelab-logits` (train.chunked_loss
false: the loss from the whole logits, as before), `trl` (padded), `trl-packed`.

`--task clm`: the bundled tweets as plain text (`tunelab data tweets`, labels dropped), every token trained.
tunelab's clm ends each tweet with eos, concatenates them and cuts the stream into max-length blocks; TRL's
`trl-packed` arm does the same (`packing_strategy="wrapped"`: the same blocks, attention across tweets as in
tunelab), and its `trl` arm trains each tweet as its own padded row (another recipe: no context across tweets).
The held-out loss is over the eval tweets' blocks; the time-to-target's target is `trl-packed`'s final loss + 0.02.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import eval_every, in_process, machine, median, options, peak_rss_mb  # bench/common.py, beside

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def model_path(name: str) -> str:
    from tunelab.generate import model_folder

    return str(model_folder(name))


def make_data(folder: Path, args) -> Path:
    return make_tweets(folder, args) if args.task == "clm" else make_chat(folder, args)


def make_tweets(folder: Path, args) -> Path:
    """The bundled tweets as plain text, the same files for both sides (`text` rows; labels dropped)."""
    raw = folder / "raw"
    subprocess.run([sys.executable, "-m", "tunelab", "data", "tweets", "--output", str(raw), "--train-size",
                    str(args.train_size), "--eval-size", str(args.eval_size), "--seed", "0"], check=True,
                   stdout=subprocess.DEVNULL)
    data = folder / "data"
    data.mkdir()
    for split in ("train", "eval"):
        rows = [json.dumps({"text": r["text"]}) + "\n" for r in read(raw / f"{split}.jsonl")]
        (data / f"{split}.jsonl").write_text("".join(rows))
        (data / f"{split}-trl.jsonl").write_text("".join(rows))
    return data


def text_blocks(tokenizer, data: Path, split: str, max_length: int) -> list[list[int]]:
    """The documents of a split tokenized, each ended by eos, concatenated and cut into max_length blocks: what
    tunelab's clm trains on and TRL's `packing_strategy="wrapped"` makes of the same text."""
    stream: list[int] = []
    for r in read(data / f"{split}.jsonl"):
        ids = tokenizer(r["text"])["input_ids"]
        stream += ids + ([tokenizer.eos_token_id] if not ids or ids[-1] != tokenizer.eos_token_id else [])
    return [stream[i:i + max_length] for i in range(0, len(stream), max_length)]


def make_chat(folder: Path, args) -> Path:
    """The chit-chat conversations that fit max_length under the model's chat template, three ways: tunelab's
    (earlier assistant turns weight 0), TRL's (prompt and completion) and plain (for the held-out evaluation)."""
    from transformers import AutoTokenizer

    raw = folder / "raw"
    subprocess.run([sys.executable, "-m", "tunelab", "data", "chitchat", "--output", str(raw), "--train-size",
                    str(args.train_size), "--eval-size", str(args.eval_size), "--seed", "0"], check=True,
                   stdout=subprocess.DEVNULL)
    tok = AutoTokenizer.from_pretrained(model_path(args.model))
    data = folder / "data"
    data.mkdir()
    for split in ("train", "eval"):
        rows = [r["messages"] for r in read(raw / f"{split}.jsonl")]
        rows = [m for m in rows if len(tok.apply_chat_template(m, tokenize=True, return_dict=True)["input_ids"])
                <= args.max_length]
        with open(data / f"{split}.jsonl", "w") as tunelab_rows, open(data / f"{split}-trl.jsonl", "w") as trl_rows:
            for m in rows:
                weighted = [{**x, "weight": 0} if x["role"] == "assistant" else x for x in m[:-1]] + [m[-1]]
                tunelab_rows.write(json.dumps({"messages": weighted}) + "\n")
                trl_rows.write(json.dumps({"prompt": m[:-1], "completion": [m[-1]]}) + "\n")
    return data


def heldout_loss(model, tokenizer, data: Path, task: str, max_length: int, batch_size: int = 2) -> float:
    """Mean cross-entropy, the same for both sides: chat, over the eval conversations' last assistant turn (its
    tokens through the end of turn, as tunelab's chat template renders them); clm, over every next token of the
    eval tweets' blocks (`text_blocks`)."""
    import torch

    from tunelab.data.chat import IGNORE, render

    if task == "clm":
        encoded = [(b, list(b)) for b in text_blocks(tokenizer, data, "eval", max_length) if len(b) > 1]
    else:
        rows = [r["messages"] for r in read(data / "eval.jsonl")]
        encoded = [render(tokenizer, m, [len(m) - 1]) for m in rows]
    total, count = 0.0, 0
    was = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            part = encoded[start:start + batch_size]
            longest = max(len(ids) for ids, _ in part)
            ids = torch.tensor([i + [tokenizer.pad_token_id] * (longest - len(i)) for i, _ in part])
            labels = torch.tensor([lab + [IGNORE] * (longest - len(lab)) for _, lab in part])
            mask = torch.tensor([[1] * len(i) + [0] * (longest - len(i)) for i, _ in part])
            device = next(model.parameters()).device
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                           use_cache=False).logits[:, :-1].float().cpu()
            target = labels[:, 1:]
            total += float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), target.clamp(min=0),
                                                             reduction="none")[target != IGNORE].sum())
            count += int((target != IGNORE).sum())
    model.train(was)
    return total / count


def training_rows(data: Path, args, packed: bool) -> int:
    """How many rows tunelab trains on per epoch (to evaluate as often per epoch as TRL): the conversations, the
    rows its packing makes of them, or clm's blocks."""
    from transformers import AutoTokenizer

    from tunelab.tasks.lm import ChatSFT

    tok = AutoTokenizer.from_pretrained(model_path(args.model))
    if args.task == "clm":
        return len(text_blocks(tok, data, "train", args.max_length))
    if not packed:
        return len(read(data / "train.jsonl"))
    lengths = [len(tok.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"])
               for r in read(data / "train.jsonl")]
    return len(ChatSFT().pack([{"input_ids": [0] * n, "labels": [0] * n} for n in lengths], args.max_length))


def run_tunelab(arm: str, data: Path, out: Path, args) -> dict:
    """One tunelab run; its held-out curve is tunelab's own evaluation (`train.eval_every`: the same loss over the
    same last-turn tokens, outside its step times), its final loss `heldout_loss` of the saved model."""
    import tunelab
    from transformers import AutoModelForCausalLM, AutoTokenizer

    packed = arm == "tunelab-packed"
    rows = training_rows(data, args, packed)
    every = max(1, -(-rows // args.batch_size) // args.evals_per_epoch)
    cfg = {"task": args.task, "model": {"name": args.model}, "output": str(out), "overwrite": True,
           "data": {"train": str(data / "train.jsonl"), "eval": str(data / "eval.jsonl"),
                    "max_length": args.max_length},
           "tuning": {"name": "lora", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.1, "lora_targets": TARGETS},
           "train": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                     "warmup_ratio": 0.1, "weight_decay": 0.01, "max_grad_norm": 1.0, "progress": False,
                     "schedule": "linear", "packing": packed, "eval_every": every,
                     "chunked_loss": arm != "tunelab-logits", "device": args.device,
                     "bf16": args.device == "cuda"},
           "eval": {"bootstrap": 0}}
    training_peak = []
    result = tunelab.train(cfg, on_step=lambda step: training_peak.append(peak_rss_mb()))
    whole_run = peak_rss_mb()  # training, the final evaluation, the export and its timing: `tunelab train`'s peak
    t = result.metrics["train"]
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    seconds = {h["step"]: h["train_seconds"] for h in history if "loss" in h}
    curve = [(seconds[h["step"]], h["eval_loss"]) for h in history if "eval_loss" in h]
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    loss = heldout_loss(model, AutoTokenizer.from_pretrained(out / "model"), data, args.task, args.max_length)
    return {"seconds": t["step_seconds"], "tokens": t["tokens_seen"], "loss": loss, "tunelab_loss": result.eval["loss"],
            "curve": curve, "peak_rss_mb": training_peak[-1], "process_rss_mb": whole_run, "steps": t["steps"],
            "peak_gpu_mb": t.get("peak_gpu_mb"),
            "chunked_loss": t.get("chunked_loss")}


def trl_recipe(out: Path, args) -> dict:
    """The settings of TRL's config (SFTConfig here, DPOConfig in bench/dpo.py) that are tunelab's recipe: batch,
    epochs, learning rate, linear schedule with 10% warm-up, weight decay, clipping, fused AdamW, the seed, the
    device; no saving, logging or evaluation of its own, no dataloader workers."""
    return dict(output_dir=str(out), per_device_train_batch_size=args.batch_size, num_train_epochs=args.epochs,
                learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=0.1, weight_decay=0.01,
                max_grad_norm=1.0, optim="adamw_torch_fused", seed=args.seed, report_to=[], save_strategy="no",
                eval_strategy="no", logging_strategy="no", disable_tqdm=True, use_cpu=args.device == "cpu",
                dataloader_num_workers=0, max_length=args.max_length)


def run_trl(arm: str, data: Path, out: Path, args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging
    from trl import SFTConfig, SFTTrainer

    logging.set_verbosity_error()
    path = model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    train = Dataset.from_list(read(data / "train-trl.jsonl"))
    packed = arm == "trl-packed"

    if args.task == "clm":  # plain text; packed: tunelab's blocks (concatenated, cut at max_length, no borders)
        mode = {"dataset_text_field": "text", **({"packing_strategy": "wrapped"} if packed else {})}
    else:  # the last assistant turn only; packed: best-fit decreasing, padding-free
        mode = {"completion_only_loss": True}
    if not packed:
        mode["train_sampling_strategy"] = "group_by_length"
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = SFTConfig(**trl_recipe(out, args), gradient_checkpointing=args.trl_checkpointing,
                       bf16=args.trl_bf16 or args.device == "cuda", packing=packed, **mode)
    clock = eval_every(1, lambda model: heldout_loss(model, tokenizer, data, args.task, args.max_length))
    trainer = SFTTrainer(model=model, args=config, train_dataset=train, processing_class=tokenizer,
                         peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=TARGETS,
                                                task_type="CAUSAL_LM"),
                         callbacks=[clock])
    clock.every = max(1, -(-len(trainer.train_dataset) // args.batch_size) // args.evals_per_epoch)  # its rows
    tokens = sum(len(r["input_ids"]) for r in trainer.train_dataset) * args.epochs
    seconds = trainer.train().metrics["train_runtime"] - clock.paused
    training_peak = peak_rss_mb()
    gpu = torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else None
    return {"seconds": seconds, "tokens": tokens,
            "loss": heldout_loss(trainer.model, tokenizer, data, args.task, args.max_length),
            "curve": clock.curve, "peak_rss_mb": training_peak, "process_rss_mb": peak_rss_mb(), "peak_gpu_mb": gpu,
            "steps": trainer.state.global_step, "chunked_loss": None}


def recipe_arguments(description: str, train_size: int, eval_size: int, max_length: int,
                     lr: float) -> argparse.ArgumentParser:
    """The options this script and bench/dpo.py share: the data's size, the recipe, the rounds, the device."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--train-size", type=int, default=train_size)
    p.add_argument("--eval-size", type=int, default=eval_size)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=max_length)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--evals-per-epoch", type=int, default=4)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: both sides on the GPU under bf16 autocast (weights fp32), peak GPU memory reported")
    p.add_argument("--first-seed", type=int, default=0, help="round r runs every arm with seed first-seed + r")
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)  # one run's, set by the rounds
    p.add_argument("--one", nargs=3, metavar=("ARM", "DATA", "OUT"), help=argparse.SUPPRESS)
    return p


def arguments() -> argparse.ArgumentParser:
    p = recipe_arguments(__doc__.split("\n\n")[0], train_size=400, eval_size=40, max_length=128, lr=3e-4)
    p.add_argument("--task", choices=["chat", "clm"], default="chat",
                   help="clm: continued pre-training on the bundled tweets (arms tunelab, trl, trl-packed)")
    p.add_argument("--arms", default=None, help="default: tunelab,tunelab-packed,trl,trl-packed (clm: "
                   "tunelab,trl,trl-packed)")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--trl-checkpointing", action="store_true", help="TRL's default gradient checkpointing (on)")
    p.add_argument("--trl-bf16", action="store_true", help="TRL's default bf16 autocast (on)")
    return p


def run_one(arm: str, data: Path, out: Path, args, seed: int) -> dict:
    """One run in its own process (`lm.py --one ARM DATA OUT`, the same options), its RESULT line parsed."""
    return in_process(__file__, ["--one", arm, str(data), str(out),
                                 *options(args, ("one", "arms", "rounds", "seed", "first_seed")), f"--seed={seed}"],
                      arm)


def time_to(curve: list, target: float) -> float | None:
    return next((s for s, loss in curve if loss <= target), None)


def times_to_target(results: dict[str, list[dict]], baseline: str, what: str) -> None:
    """Each arm's seconds to reach the baseline arm's final held-out loss of the latest round + 0.02 (None: never),
    kept as that round's `to_target` and printed after `what`."""
    target = results[baseline][-1]["loss"] + 0.02
    for rows in results.values():
        rows[-1]["to_target"] = time_to(rows[-1]["curve"], target)
    print(f"{what} {target:.4f}: " + ", ".join(f"{arm} {rows[-1]['to_target']}" for arm, rows in results.items()),
          flush=True)


def main() -> int:
    args = arguments().parse_args()
    if args.one:
        arm, data, out = args.one
        fn = run_trl if arm.startswith("trl") else run_tunelab
        print("RESULT " + json.dumps(fn(arm, Path(data), Path(out), args)), flush=True)
        return 0
    arms = (args.arms or ("tunelab,trl,trl-packed" if args.task == "clm" else
                          "tunelab,tunelab-packed,trl,trl-packed")).split(",")
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(Path(tmp), args)
        what = "tweets" if args.task == "clm" else "conversations"
        print(f"{len(read(data / 'train.jsonl'))} training and {len(read(data / 'eval.jsonl'))} eval {what} "
              f"within {args.max_length} tokens", flush=True)
        load_before = os.getloadavg()[0]
        results: dict[str, list[dict]] = {arm: [] for arm in arms}
        for r in range(args.rounds):
            for arm in arms:
                res = run_one(arm, data, Path(tmp) / f"{arm}-{r}", args, seed=args.first_seed + r)
                res["tokens_per_s"] = res["tokens"] / res["seconds"]
                results[arm].append(res)
                gpu = f"  peak GPU {res['peak_gpu_mb']:.0f} MB" if res.get("peak_gpu_mb") else ""
                print(f"round {r + 1} {arm:15} {res['tokens_per_s']:7.0f} real tokens/s  {res['seconds']:6.1f} s  "
                      f"{res['steps']:3} steps  held-out loss {res['loss']:.4f}  peak RSS training "
                      f"{res['peak_rss_mb']:.0f} MB (process {res['process_rss_mb']:.0f} MB){gpu}", flush=True)
            same_work = "trl-packed" if args.task == "clm" else "trl"  # clm: TRL's wrapped blocks are tunelab's
            if same_work in arms:
                times_to_target(results, same_work, f"round {r + 1} time to held-out loss")
        load_after = os.getloadavg()[0]

    print(f"\nmachine: {machine()}; load average before {load_before:.2f}, after {load_after:.2f}")
    work = "continued pre-training (clm)" if args.task == "clm" else "chat SFT"
    print(f"{args.model} LoRA {work}, batch {args.batch_size}, max length {args.max_length}, {args.epochs} "
          f"epoch(s), lr {args.lr}; medians of {args.rounds} interleaved rounds")

    trl_arms = [a for a in arms if a.startswith("trl")]
    base = max(trl_arms, key=lambda a: median(results[a], "tokens_per_s")) if trl_arms else arms[0]
    print(f"baseline: {base} (the faster TRL arm)")
    print(f"{'arm':15} {'tok/s':>7} {'ratio':>6} {'loss':>7} {'to target':>9} {'peak RSS':>9} {'ratio':>6}")
    for arm in arms:
        rows = results[arm]
        speedup = median(rows, 'tokens_per_s') / median(results[base], 'tokens_per_s')
        print(f"{arm:15} {median(rows, 'tokens_per_s'):7.0f} {speedup:5.2f}× "
              f"{median(rows, 'loss'):7.4f} {median(rows, 'to_target'):8.1f}s {median(rows, 'peak_rss_mb'):7.0f}MB "
              f"{median(rows, 'peak_rss_mb') / median(results[base], 'peak_rss_mb'):5.2f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())
