"""`tunelab estimate`: will this run fit? Parameters, trainable parameters and the memory a training step needs,
before anything is downloaded into memory or trained.

The model is built on PyTorch's meta device (shapes, no storage) exactly as the run would build it, with the
method applied (LoRA's adapters, a frozen backbone), so the counts are the run's own. Memory, in bytes:
- weights: every trained parameter 4 bytes (the fp32 master copy); every frozen one in model.dtype (4 bytes for
  float32, 2 for bfloat16 or float16; auto as it resolves on this machine); with qlora the frozen linear layers
  in 4-bit NF4 with double quantization: half a byte a weight plus its block constants (one byte per 64 weights,
  4 bytes per 256 blocks of them), 0.516 bytes;
- gradients: 4 per trainable parameter; optimizer: AdamW's two moments, 8 per trainable parameter;
- activations: what autograd keeps for the backward pass, counted, not modelled: one forward pass of a batch of
  batch_size rows at max_length tokens (every row at the maximum: an upper bound) runs on the meta device, and a
  saved-tensor hook adds up the bytes of every tensor autograd saves (the norms' and projections' inputs, attention
  weights where the attention is not fused, the MLP's intermediate values, a language model's logits: what
  Korthikanti et al., 2022, section 4.1, count by hand), plus the backward pass's working memory: the gradient of
  the largest saved tensor next to it (twice its size: a language model's logits) and one layer's worth in
  flight. `head` keeps none (its backbone runs without gradients);
  with train.gradient_checkpointing the count is what checkpointing keeps, plus one layer's worth for its
  recomputation;
- runtime: this process's resident memory before the model is built (the interpreter, PyTorch, transformers and
  tunelab, measured here), which a CPU run pays too; a GPU run pays instead about CUDA_CONTEXT for the CUDA context.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tunelab.config import Config
from tunelab.errors import UserError

CUDA_CONTEXT = 0.5 * 2**30  # bytes a CUDA context and its kernels take on the GPU (typically 0.3-0.6 GiB)
MIB = 2**20


@dataclass
class Estimate:
    total_params: int
    trainable_params: int
    parts: dict[str, float]  # bytes by component
    suggestions: list[str] = field(default_factory=list)

    @property
    def cpu_bytes(self) -> float:
        return sum(self.parts.values())

    @property
    def gpu_bytes(self) -> float:
        return sum(v for k, v in self.parts.items() if k != "runtime") + CUDA_CONTEXT


def estimate(cfg: Config) -> Estimate:
    """The memory of one training step of `cfg` (its model, task, method, batch size and max length)."""
    from tunelab.methods import METHODS
    from tunelab.models import folder_of
    from tunelab.tasks import TASKS
    from tunelab.tasks.base import Space

    from tunelab.validate import default_tuning

    runtime = _rss_bytes()
    if cfg.tuning.name == "auto":
        cfg.tuning.name = default_tuning(cfg)
    task, method = TASKS[cfg.task], METHODS[cfg.tuning.name]()
    if cfg.tuning.name == "distill" or task.modality != "text":
        raise UserError("estimate covers text and language-model tasks with scratch, head, partial, full, lora and "
                        "qlora", "--tuning")
    folder = folder_of(cfg.model)
    space = Space(labels=["a", "b"])  # the head's size does not matter at this scale
    with torch.device("meta"):
        model = method.prepare(task.build(cfg.model, folder, space, pretrained=False), cfg.tuning)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    parts = {"weights": _weight_bytes(model, cfg), "gradients": 4.0 * trainable, "optimizer": 8.0 * trainable,
             "activations": _activations(model, cfg, task), "runtime": float(runtime)}
    return Estimate(total, trainable, parts, _suggestions(cfg, parts, trainable, total))


NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes, 8-bit block scales per 64, fp32 per 256 scales


def _weight_bytes(model, cfg: Config) -> float:
    """The parameters' bytes as the run holds them (see the module's docstring)."""
    from tunelab.models import pick_device, unquantized, weight_dtype

    frozen = torch.empty((), dtype=weight_dtype(cfg.model.dtype, pick_device("auto"))).element_size()
    total = 0.0
    for name, module in model.named_modules():
        quantized = cfg.tuning.name == "qlora" and isinstance(module, torch.nn.Linear) and \
            not unquantized(name.removeprefix("base_model.model."))
        for pname, p in module.named_parameters(recurse=False):
            total += p.numel() * (4 if p.requires_grad else NF4_BYTES if quantized and pname == "weight"
                                  else frozen)
    return total


def _activations(model, cfg: Config, task) -> float:
    """Bytes autograd saves in one training forward pass at batch_size x max_length (run on the meta device). A
    clm or chat run whose loss comes from the hidden states in chunks (train.chunked_loss) holds no logits: its
    forward is counted without the output layer, plus one chunk's logits and their gradient."""
    from tunelab.losses import CHUNK_BYTES
    from tunelab.models import enable_checkpointing, num_blocks

    if task.name not in BATCH:
        raise UserError(f"estimate covers {', '.join(BATCH)}", "--task")
    chunked = task.loss_from_hidden and cfg.train.chunked_loss and cfg.train.speedups
    batch = lambda: BATCH[task.name](cfg.train.batch_size, cfg.data.max_length)  # noqa: E731
    saved = _saved_bytes(model, batch(), chunked)
    if cfg.train.gradient_checkpointing:
        per_layer = saved / max(num_blocks(model), 1)
        enable_checkpointing(model)
        saved = _saved_bytes(model, batch(), chunked) + per_layer
    return saved + (2 * CHUNK_BYTES if chunked else 0)


def _meta(shape, dtype=torch.long):
    return torch.zeros(shape, dtype=dtype, device="meta")


# A training batch of each task as the model sees it (no attention mask: every row is full length).
BATCH = {
    "classification": lambda b, s: {"input_ids": _meta((b, s)), "labels": _meta((b,))},
    "regression": lambda b, s: {"input_ids": _meta((b, s)), "labels": _meta((b,), torch.float32)},
    "multilabel": lambda b, s: {"input_ids": _meta((b, s)), "labels": _meta((b, 2), torch.float32)},
    "ner": lambda b, s: {"input_ids": _meta((b, s)), "labels": _meta((b, s))},
    "mlm": lambda b, s: {"input_ids": _meta((b, s)), "labels": _meta((b, s))},
    "nsp": lambda b, s: {"input_ids": _meta((b, s)), "labels": _meta((b, s)), "next_sentence_label": _meta((b,))},
    "clm": lambda b, s: {"input_ids": _meta((b, s)), "labels": _meta((b, s))},
    "chat": lambda b, s: {"input_ids": _meta((b, s)), "labels": _meta((b, s))},
}


def _saved_bytes(model, batch: dict, hidden_only: bool = False) -> float:
    """The bytes autograd saves in one forward pass, plus the backward pass's working memory: the gradient of the
    largest saved tensor beside it (a language model's logits) and one layer's gradients in flight. `hidden_only`:
    the forward stops before the output layer (speed.final_hidden)."""
    from tunelab import speed

    saved: dict[int, int] = {}

    def pack(t):
        saved[id(t)] = t.numel() * t.element_size()  # (a tensor saved twice is kept once)
        return t
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if hidden_only:
            speed.final_hidden(model, {k: v for k, v in batch.items() if k != "labels"}, use_cache=True)
        else:
            model(**batch)
    from tunelab.models import num_blocks

    total = float(sum(saved.values()))
    return total + 2 * max(saved.values(), default=0) + total / max(num_blocks(model), 1)


def _suggestions(cfg: Config, parts: dict, trainable: int, total: int) -> list[str]:
    out = []
    model = sum(v for k, v in parts.items() if k != "runtime")  # what the model's size and the batch decide
    if cfg.tuning.name in ("full", "partial", "scratch") and parts["optimizer"] + parts["gradients"] > \
            parts["weights"]:
        out.append("--tuning lora trains adapters only: gradients and optimizer state shrink to a few MB")
    if cfg.tuning.name in ("full", "partial", "scratch", "lora") and parts["weights"] > 0.3 * model:
        out.append("--tuning qlora holds the frozen base in 4 bits: about a quarter of its bfloat16 size")
    if parts["activations"] > 0.3 * model and not cfg.train.gradient_checkpointing:
        out.append("--train.gradient_checkpointing true keeps one layer's activations instead of all of them")
    if parts["activations"] > 0.3 * model and cfg.train.batch_size > 1:
        out.append(f"--batch-size {max(1, cfg.train.batch_size // 4)} with --train.grad_accum "
                   f"{cfg.train.grad_accum * 4}: the same optimizer steps, a quarter of the activations")
    return out


def _rss_bytes() -> int:
    """This process's resident memory now (Linux: /proc/self/statm)."""
    import os

    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def render(e: Estimate, cfg: Config, device_gib: float | None) -> str:
    lines = [f"{cfg.model.name} · {cfg.task} · {cfg.tuning.name}: batch {cfg.train.batch_size} x max length "
             f"{cfg.data.max_length}" + (", gradient checkpointing" if cfg.train.gradient_checkpointing else ""),
             f"parameters {e.total_params:,}, trainable {e.trainable_params:,} "
             f"({e.trainable_params / max(e.total_params, 1):.1%})"]
    lines += [f"  {name:<12}{value / MIB:>10,.0f} MiB" for name, value in e.parts.items()]
    lines.append(f"  {'CPU run':<12}{e.cpu_bytes / MIB:>10,.0f} MiB resident (peak, about)")
    lines.append(f"  {'GPU run':<12}{e.gpu_bytes / MIB:>10,.0f} MiB of GPU memory (weights to activations, plus "
                 f"~{CUDA_CONTEXT / MIB:.0f} MiB CUDA context)")
    if device_gib is not None:
        fits = e.gpu_bytes <= device_gib * 2**30
        lines.append(f"fits a {device_gib:g} GiB device: {'yes' if fits else 'no'}")
        if not fits:
            lines += [f"  try: {s}" for s in e.suggestions] or ["  try: a smaller model"]
    elif e.suggestions:
        lines += [f"  to need less: {s}" for s in e.suggestions]
    return "\n".join(lines)
