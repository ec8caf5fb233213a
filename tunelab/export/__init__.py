"""Export: the run's `model/` folder loads with plain transformers (and `adapter/` with peft); and what it costs
to use: size on disk, single-request latency, batch throughput."""
from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from tunelab import speed
from tunelab.data.batching import collate
from tunelab.io import atomic_dir
from tunelab.methods.base import Method
from tunelab.models.pooled import PooledForSequenceClassification, save_code


def export_model(run: Path, model: nn.Module, method: Method, tokenizer, task, space) -> tuple[Path, nn.Module]:
    """Write model/ (safetensors, config with label names and task settings, tokenizer) atomically, plus
    method extras. Returns the folder and the plain model that was saved."""
    plain = method.export(model)
    if plain is model:
        plain = copy.deepcopy(model)  # finalize may change weights (regression scaling): never the trained model
    task.finalize(plain, space)
    low = {p.dtype for p in plain.parameters()} - {torch.float32}
    if low:  # model.dtype: the frozen weights' dtype, the trained ones (float32 masters) with them
        plain.to(low.pop())

    def fill(tmp: Path) -> None:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if isinstance(plain, PooledForSequenceClassification):  # loadable without tunelab (trust_remote_code)
            save_code(tmp)

    atomic_dir(run / "model", fill)
    method.save_extra(model, run)
    return run / "model", plain.eval()


def folder_mb(folder: Path) -> float:
    """Size of the model weights on disk (every file of the folder), in MiB."""
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file()) / 2**20


@torch.no_grad()
def measure_inference(model: nn.Module, items: list[dict], pad_id: int, device, single: int = 30,
                      batch_size: int = 32, task=None) -> dict:
    """Median latency of one request (batch of 1) and throughput at `batch_size`, on eval examples (batched by
    `task`'s collate where given: images). A causal language model's forward makes the last position's logits
    only, as generation's first pass does (the whole [32 x length x vocabulary] logits were gemma3-270m's 6.7 GB
    peak, far above its training's)."""
    model.eval()
    last_only = {"logits_to_keep": 1} if task is not None and task.loss_from_hidden else {}
    if task is not None and task.modality != "text":
        sample = items[: max(single, batch_size * 4)]
    else:
        sample = [{"input_ids": it["input_ids"],
                   "attention_mask": it.get("attention_mask") or [1] * len(it["input_ids"]),
                   **({"token_type_ids": it["token_type_ids"]} if "token_type_ids" in it else {})}
                  for it in items[: max(single, batch_size * 4)]]
    if not sample:
        return {}

    def run(batch):
        inputs = task.collate(batch, pad_id) if task is not None and task.modality != "text" else \
            collate(batch, pad_id)
        inputs = {k: v.to(device) for k, v in inputs.items() if k != "labels"}
        with speed.onednn_linears(model):  # as tunelab predict runs it
            model(**inputs, **last_only)
        if device.type == "cuda":
            torch.cuda.synchronize()

    for it in sample[:3]:  # warm-up: first calls pay for allocation and kernel selection
        run([it])
    times = []
    for it in sample[:single]:
        tic = time.perf_counter()
        run([it])
        times.append(time.perf_counter() - tic)
    tic = time.perf_counter()
    for i in range(0, len(sample), batch_size):
        run(sample[i:i + batch_size])
    batch_seconds = time.perf_counter() - tic
    return {"latency_ms": statistics.median(times) * 1000, "throughput": len(sample) / batch_seconds,
            "measured_on": len(sample), "device": str(device)}


def exported_checkpoint(run: Path, step: int) -> Path | None:
    """The checkpoint's folder if `export_checkpoint` has made it servable already."""
    folder = Path(run) / "checkpoints" / f"step-{step:07d}"
    return folder if (folder / "model" / "config.json").is_file() and (folder / "config.yaml").is_file() else None


def export_checkpoint(run: Path, step: int) -> Path:
    """A resumable checkpoint of `run` (finished or still training) exported as the run's own `model/` is (its
    adapters merged, its labels, scaling and chat template kept), into RUN/checkpoints/step-N/model once, with the
    run's config.yaml beside it: a folder that loads like a finished run (OpenAI's `ft:…:ckpt-step-N` models). The
    training-time model is rebuilt as the run built it (its data's label space, the base model, the method's
    wrapping) and takes the checkpoint's weights. Raises LookupError when the run does not keep that checkpoint."""
    import shutil

    from safetensors.torch import load_model

    from tunelab import config as config_mod
    from tunelab.data import load_splits
    from tunelab.errors import UserError
    from tunelab.methods import METHODS
    from tunelab.tasks import TASKS

    done = exported_checkpoint(run, step)
    if done is not None:
        return done
    folder = Path(run) / "checkpoints" / f"step-{step:07d}"
    if not (folder / "model.safetensors").is_file():
        raise LookupError(f"checkpoint step {step}")
    cfg = config_mod.load_yaml(Path(run) / "config.yaml")
    if cfg.tuning.name == "distill":
        raise UserError("checkpoints of a distill run are not served (its student needs its teacher to rebuild); "
                        "use the fine-tuned model", "model")
    task = TASKS[cfg.task]
    splits = load_splits(task, cfg)
    space = splits.space.configure(cfg)
    method = METHODS[cfg.tuning.name]()
    model, tokenizer = method.build(cfg, task, space, splits.train)
    task.set_padding(model, tokenizer.pad_token_id or 0)
    model = method.prepare(model, cfg.tuning)
    load_model(model, str(folder / "model.safetensors"), strict=True)
    export_model(folder, model.eval(), method, tokenizer, task, space)
    shutil.copyfile(Path(run) / "config.yaml", folder / "config.yaml")
    return folder
