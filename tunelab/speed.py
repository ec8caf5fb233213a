"""Exact speed-ups: the same computation, less time (bench/NOTES.md has the profiles behind them).

`cut_to_first_token` / `first_token_only`: a sequence classifier's last encoder layer computes only the position
its head reads (training, `tunelab predict`, the ONNX export).

`reused_embedding_grads`: a trainable embedding table's gradient is written into one buffer kept for the whole
run. PyTorch's own embedding backward allocates a fresh dense gradient every step; MiniLM's 30,522 × 384 table is
47 MB, above glibc's largest mmap threshold (32 MB), so each step maps new memory and faults in all of its pages:
23-62 ms of a 360 ms full-tuning step on 2 CPU cores. Here the backward adds the rows into the kept buffer
(zeroed in place, its pages already resident), the same sums as PyTorch's `embedding_dense_backward`. Only the
rows a step's ids touched are nonzero, so the buffer is zeroed by those rows, and `clip_grad_norm_` measures and
scales only them: zeroing, norm and scaling of the whole table were 12.6 ms of a 438 ms step (3%, Zen 3).

`onednn_linears`: fp32 linear layers on the CPU multiply through oneDNN instead of PyTorch's default BLAS (MKL).
MKL runs its AVX2 code on AMD processors, ~190 GFLOP/s on 2 Zen cores with AVX-512 here, where oneDNN (shipped
inside PyTorch, dispatching on the processor's features, not its vendor) reaches 390-470 in fp32 (IEEE, no
reduced-precision mode): the same products, summed in another order. Only there: on an AVX2-only AMD processor
(Zen 3) oneDNN and MKL ran at the same 90-130 GFLOP/s and whole runs were slower with oneDNN (LoRA 1,090-1,137
against 1,276-1,326 real tokens/s, +70 MB peak RSS), so `onednn_pays` decides by the processor.

`fast_dropout`: the same dropout (each unit zeroed with probability p, the rest scaled by 1 / (1 - p)) from a
cheaper random stream. PyTorch's CPU dropout draws one float per unit (`bernoulli_`, one at a time), then divides
and multiplies, and keeps a float mask for the backward: 8% of a MiniLM full-tuning step and 12% of a LoRA step
on 2 Zen 3 cores, 2.6 ms of a 3.3 ms forward + backward on [16, 35, 384]. Here each unit gets 16 random bits of
PyTorch's generator (four units per 64-bit draw) compared with round(p x 65,536): p is rounded to 1/65,536 and
the scale follows the rounded p, so the expected output is exactly the input. The mask is kept as bytes.
1.46 ms for the same forward + backward. Not bit-identical to PyTorch's stream: a different but equally random
draw (`train.fast_dropout false` restores PyTorch's).

`lean_lora`: peft's LoRA linear layer (frozen base, one adapter) as one autograd function, `_LoraLinear`. Profile of
a MiniLM LoRA step (r = 8 on query and value, 600 tweets, 2 Zen 3 cores): the adapters' rank-8 products took
15.4 ms a step at 13 GFLOP/s, because MKL runs a product with an 8-column output 1.4-4.5× slower than its transpose;
computed as transposes, 7.4 ms. The adapter's output is added into the base layer's in place, its dropout mask is
the one `fast_dropout` draws (the same masks in the same order as peft's dropout under `fast_dropout`), and it
keeps its input (shared by the layers that read it) and the mask in bytes for the backward pass. A gated MLP block
whose three layers qualify runs as one function, `_LoraMLP`, that keeps x, gate(x) and up(x) and computes the
activation and the product again in the backward pass. The same sums in another order; anything peft computes
otherwise (DoRA, merged or several adapters, a base layer that trains, other dtypes and devices) is peft's own
forward.

`causal_lm_loss` / `causal_lm_logps`: a causal language model's token loss (clm, chat) and sequence
log-probabilities (dpo) from its last hidden states in chunks (losses.linear_cross_entropy, linear_log_probs),
never holding the [tokens × vocabulary] logits; checked once per model (`output_layer`).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import weakref

import torch
from torch import nn

from tunelab.losses import IGNORE, linear_cross_entropy, linear_log_probs, sequence_logps, token_stats
from tunelab.modes import eval_mode

log = logging.getLogger(__name__)

LARGE = 8 << 20  # bytes: smaller tables gain nothing worth the indirection
ONEDNN_CACHE = 16  # oneDNN kernels kept
OFF = "TUNELAB_SPEEDUPS"  # =0 in the environment turns every speed-up off, as train.speedups false does


def onednn_cache_setting() -> None:
    """oneDNN keeps each matrix shape's kernel, with its own scratch memory, 1,024 of them by default; every batch
    length is a new shape. Peak RSS of a MiniLM LoRA epoch on 1,000 tweets (1 run each): 1,232 MB at 1,024,
    1,079 at 64, 1,019 at 16, 1,003 at 0 (14% slower: every call builds its kernel again); torch.mm 979. A step
    reuses ~15 shapes, layer after layer, so 16 keep its speed. oneDNN reads ONEDNN_PRIMITIVE_CACHE_CAPACITY once,
    before its first kernel (set inside onednn_available it came too late: 1,429 MB), so the command line sets it
    as it starts (tunelab.cli.main); a program that imports tunelab sets it itself. The user's own value wins."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(ONEDNN_CACHE))


def enabled() -> bool:
    """Speed-ups are on unless the environment turns them off (TUNELAB_SPEEDUPS=0; train.speedups is `apply`'s)."""
    return os.environ.get(OFF, "1").strip() not in ("0", "false", "no", "off")


class _Lookup(torch.autograd.Function):
    """F.embedding whose weight gradient is added into the module's kept buffer (handed to weight.grad)."""

    @staticmethod
    def forward(ctx, ids, weight, module):
        ctx.save_for_backward(ids)
        ctx.module = module
        return nn.functional.embedding(ids, weight, module.padding_idx, module.max_norm, module.norm_type,
                                       module.scale_grad_by_freq, False)

    @staticmethod
    def backward(ctx, grad_out):
        (ids,) = ctx.saved_tensors
        module = ctx.module
        weight = module.weight
        if weight.grad is None:  # the optimizer's zero_grad(set_to_none) dropped it: hand back the kept buffer
            buffer = module._grad_buffer
            if buffer is None:
                buffer = module._grad_buffer = torch.zeros_like(weight)
            elif module._rows is not None:  # nonzero only where the last step's ids wrote
                buffer.index_fill_(0, torch.cat(module._rows), 0)
            else:
                buffer.zero_()
            weight.grad, module._rows = buffer, [] if module._sparse else None
        flat = ids.reshape(-1)
        rows = grad_out.reshape(flat.numel(), -1).to(weight.grad.dtype)
        if module.padding_idx is not None:
            rows = rows.masked_fill((flat == module.padding_idx).unsqueeze(1), 0)
        weight.grad.index_add_(0, flat, rows)
        if module._rows is not None:
            if weight.grad is module._grad_buffer:
                module._rows.append(flat)
            else:  # another gradient took its place: its rows are not known, nor the buffer's
                module._rows = None
        return None, None, None


def _forward(module: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    if not (module.weight.requires_grad and torch.is_grad_enabled()):
        return nn.Embedding.forward(module, ids)
    return _Lookup.apply(ids, module.weight, module)


@contextlib.contextmanager
def reused_embedding_grads(model: nn.Module, sole_writer: bool = True):
    """Within the block, the model's large trainable `nn.Embedding` tables (exactly that class: subclasses may
    scale or reshape) keep one gradient buffer. Single process only: DDP's hooks watch autograd's own gradients.
    Yields `{weight: module}` for `clip_grad_norm_`. The rows a step wrote are tracked unless something else may
    add to the same gradient: a table whose weight another module shares (a tied language-model head), or any
    term the caller adds (`sole_writer=False`, e.g. an L1 penalty on every weight)."""
    patched = [m for m in model.modules() if type(m) is nn.Embedding and m.weight.requires_grad
               and not m.sparse and m.max_norm is None and not m.scale_grad_by_freq
               and m.weight.numel() * m.weight.element_size() >= LARGE]
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    for m in patched:
        m._grad_buffer, m._rows, m._sparse = None, None, sole_writer and uses[id(m.weight)] == 1
        m.forward = _forward.__get__(m)
    try:
        yield {m.weight: m for m in patched}
    finally:
        for m in patched:
            del m.forward, m._grad_buffer, m._rows, m._sparse


def _written_rows(param, tables: dict):
    """The rows of `param`'s gradient that can be nonzero (sorted ids), or None where that is not known."""
    module = tables.get(param)
    if module is None or not module._rows or param.grad is not module._grad_buffer:
        return None
    return torch.unique(torch.cat(module._rows))


@torch.no_grad()
def clip_grad_norm_(params, max_norm: float, tables: dict | None = None) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` (2-norm over all gradients, scaled by min(1, max_norm / (norm + 1e-6)))
    that reads and scales only the written rows of the tables `reused_embedding_grads` yielded: the others are
    zero, so the norm and the result are the same. Returns the total norm."""
    grads = [(p.grad, _written_rows(p, tables or {})) for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = [torch.linalg.vector_norm(g if rows is None else g.index_select(0, rows)) for g, rows in grads]
    total = torch.linalg.vector_norm(torch.stack(norms))
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g, rows in grads:
        if rows is None:
            g.mul_(coef)
        else:
            g.index_copy_(0, rows, g.index_select(0, rows).mul_(coef))
    return total


def sample_inputs(tokenizer) -> dict:
    """Two short texts of different lengths, padded: model inputs to probe or trace a classifier with."""
    return dict(tokenizer(["a first example", "and a second, longer example text"], padding=True,
                          return_tensors="pt"))


def _encoder_layers(model: nn.Module) -> nn.ModuleList | None:
    found = [m for n, m in model.named_modules() if n.endswith("encoder.layer") and isinstance(m, nn.ModuleList)]
    return found[0] if len(found) == 1 else None


def _first_token_layer(layer: nn.Module, hidden_states, attention_mask=None, *args, **kwargs):
    """A BERT-style encoder layer computed for the first position only: keys and values from every position,
    the query, the attention output and the feed-forward block for position 0."""
    import sys

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    attention = layer.attention.self
    first = hidden_states[:, :1]
    batch, length, _ = hidden_states.shape
    size = attention.attention_head_size
    query = attention.query(first).view(batch, 1, -1, size).transpose(1, 2)
    key = attention.key(hidden_states).view(batch, length, -1, size).transpose(1, 2)
    value = attention.value(hidden_states).view(batch, length, -1, size).transpose(1, 2)
    if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[-2] > 1:
        attention_mask = attention_mask[..., :1, :]
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(attention.config._attn_implementation,
                                                   sys.modules[type(attention).__module__].eager_attention_forward)
    out, _ = attend(attention, query, key, value, attention_mask, scaling=attention.scaling,
                    dropout=attention.dropout.p if attention.training else 0.0)
    out = layer.attention.output(out.reshape(batch, 1, -1), first)
    return layer.output(layer.intermediate(out), out)


def cut_to_first_token(model: nn.Module, probe: dict):
    """Make the last encoder layer of a BERT-style sequence classifier compute position 0 only, when its head reads
    nothing else (BERT's pooler and classifier; tested on BERT only). Checked, not assumed: the model answers
    `probe` (a padded batch of model inputs) in eval mode with and without the change, and the change stays only
    when the logits agree. Returns the function that undoes it, or None where nothing changed. MiniLM's last layer
    is 1/6 of its matrix multiplies; cut to K and V for every position, a training step does ~14% less."""
    layers = _encoder_layers(model)
    last = layers[-1] if layers is not None and len(layers) > 1 else None
    if last is None or not all(hasattr(last, a) for a in ("attention", "intermediate", "output")) \
            or not hasattr(getattr(last.attention, "self", None), "query") \
            or getattr(last, "add_cross_attention", False) or getattr(last, "is_decoder", False):
        return None
    with eval_mode(model), torch.no_grad():
        full = model(**probe).logits
        last.forward = _first_token_layer.__get__(last)
        try:
            short = model(**probe).logits
        except Exception:  # noqa: BLE001 - a layout this code does not know: the model stays as it was
            short = None
    if short is None or short.shape != full.shape or not torch.allclose(short, full, atol=1e-4):
        del last.forward
        return None

    def undo() -> None:
        del last.forward
    return undo


@contextlib.contextmanager
def first_token_only(model: nn.Module, probe: dict):
    """`cut_to_first_token` within the block; yields whether it applied."""
    undo = cut_to_first_token(model, probe)
    try:
        yield undo is not None
    finally:
        if undo:
            undo()


class _OneDnnLinear(torch.autograd.Function):
    """y = x Wᵀ + b, its product and the input gradient's (g W) by oneDNN. The weight gradient (gᵀ x) stays with
    torch.mm: oneDNN's linear would copy both transposed activations first, which made it slower and cost
    +140 MB of peak RSS in a MiniLM run."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        flat = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(flat, weight)
        ctx.input_shape = x.shape
        y = torch.ops.mkldnn._linear_pointwise(flat, weight, bias, "none", [], "")
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        flat, weight = ctx.saved_tensors
        g = grad_y.reshape(-1, grad_y.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:  # g W: transposed views, which oneDNN reads in place
            grad_x = torch.ops.mkldnn._linear_pointwise(g, weight.t(), None, "none", [], "").view(ctx.input_shape)
        if ctx.needs_input_grad[1]:
            grad_w = g.t().mm(flat)
        if ctx.needs_input_grad[2]:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b


def _onednn_forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if x.device.type != "cpu" or x.dtype != torch.float32 or module.weight.dtype != torch.float32 \
            or torch.is_autocast_enabled("cpu") or x.numel() == 0:
        return nn.functional.linear(x, module.weight, module.bias)
    return _OneDnnLinear.apply(x, module.weight, module.bias)


def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), "")
    except OSError:  # not Linux
        return ""


@functools.cache
def onednn_pays() -> bool:
    """Is oneDNN's linear faster than PyTorch's default BLAS on this processor? Measured so only on AMD processors
    with AVX-512 (MKL runs its AVX2 code there); `TUNELAB_ONEDNN=1` or `0` overrides."""
    choice = os.environ.get("TUNELAB_ONEDNN", "").strip()
    if choice in ("0", "1"):
        return choice == "1"
    return torch.backends.cpu.get_cpu_capability() == "AVX512" and _cpu_vendor() == "AuthenticAMD"


@functools.cache
def onednn_available() -> bool:
    """Is oneDNN's fp32 linear in this PyTorch, and does it give F.linear's outputs and gradients (to float
    rounding) on a probe? Not where a reduced-precision mode (ONEDNN_DEFAULT_FPMATH_MODE=BF16) is set."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    generator = torch.Generator().manual_seed(0)
    x, weight, bias = (torch.randn(*shape, generator=generator, requires_grad=True)
                       for shape in ((3, 29, 48), (40, 48), (40,)))
    g = torch.randn(3, 29, 40, generator=generator)
    try:
        ours = torch.autograd.grad(_OneDnnLinear.apply(x, weight, bias), (x, weight, bias), g)
        theirs = torch.autograd.grad(nn.functional.linear(x, weight, bias), (x, weight, bias), g)
    except RuntimeError:  # an operator this build lacks
        return False
    return all(torch.allclose(a, b, rtol=1e-5, atol=1e-5) for a, b in zip(ours, theirs))


def _keep(shape, p: float):
    """A mask of `shape` in bytes (uint8), each unit 1 with probability 1 - round(p × 65,536) / 65,536, else 0, and
    the scale (1 / that probability) that keeps the expected output equal to the input. Bytes, not bools: PyTorch
    converts a mask to floats before multiplying a float tensor by it (a copy as large as that tensor), and it
    converts bytes ~5× faster than bools (0.027 against 0.149 ms on [16, 35, 384], 2 Zen 3 cores)."""
    n, drop = shape.numel(), round(p * 65536)
    bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2 ** 63, None)  # all 64 bits random
    return (bits.view(torch.int16)[:n].view(shape) >= drop - 32768).view(torch.uint8), 65536 / (65536 - drop)


def _masked(x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
    """scale · x where `keep` (a `_keep` mask) is 1, else 0: 0 + scale · x · keep, one `addcmul` (after PyTorch's
    conversion of the mask to floats). 0.057 ms on [16, 35, 384] on 2 Zen 3 cores, against 0.166 with a bool mask
    and 0.27 for `torch.where` then `mul_`; the same values."""
    return torch.addcmul(x.new_zeros(()), x, keep, value=scale)


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p):
        keep, ctx.scale = _keep(x.shape, p)
        ctx.save_for_backward(keep)
        return _masked(x, keep, ctx.scale)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        keep, = ctx.saved_tensors
        return _masked(grad_y, keep, ctx.scale), None


def _drawable(p: float) -> bool:
    """Whether `_keep` draws masks for rate p: p rounds to at least one 65,536th and keeps at least one."""
    return 1 / 65536 <= p <= 1 - 1 / 65536


def _draws_keep(module: nn.Dropout, x: torch.Tensor) -> bool:
    """Whether `_dropout_forward` drops `x` with `_keep`'s mask (else it is PyTorch's dropout)."""
    return module.training and not module.inplace and x.device.type == "cpu" and x.is_floating_point() \
        and _drawable(module.p)


def _dropout_forward(module: nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    if not _draws_keep(module, x):
        return nn.functional.dropout(x, module.p, module.training, module.inplace)
    return _Dropout.apply(x, module.p)


def _lora_apply(rows: torch.Tensor, weight, bias, lora_a, lora_b, scaling: float, p: float):
    """One LoRA layer's output on [N, in] rows, y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ, with what its backward pass
    keeps: (y, the dropout mask in bytes or None, its scale, h_t = A drop(x)ᵀ [r, N]). The products with a
    rank-r output are computed as their transposes: MKL runs the narrow-output form 1.4-4.5× slower (N = 700
    rows of 384, r = 8, 2 Zen 3 cores: 164 / 289 / 448 µs against 116 / 114 / 99). The adapter's product is
    added into the base layer's output in place (`addmm_`); the mask is `_keep`'s."""
    keep, scale = _keep(rows.shape, p) if p > 0 else (None, 1.0)
    dropped = rows if keep is None else _masked(rows, keep, scale)
    h_t = lora_a @ dropped.t()  # [r, N]
    y = rows @ weight.t() if bias is None else torch.addmm(bias, rows, weight.t())
    y.addmm_(h_t.t(), lora_b.t(), alpha=scaling)
    return y, keep, scale, h_t


def _lora_grads(g: torch.Tensor, rows, keep, scale: float, h_t, weight, lora_a, lora_b, scaling: float,
                need: tuple[bool, bool, bool]):
    """The gradients (of the rows, A, B; each None unless `need`s) of `_lora_apply` given its output's gradient
    `g` [N, out]. A's needs the dropped rows: dropped again from the rows and the mask (the same values)."""
    grad_h_t = (lora_b.t() @ g.t()).mul_(scaling)  # [r, N]: the gradient of drop(x) Aᵀ, transposed
    grad_a = grad_h_t @ (rows if keep is None else _masked(rows, keep, scale)) if need[1] else None
    grad_b = (h_t @ g).t().mul_(scaling) if need[2] else None
    grad_x = None
    if need[0]:
        grad_x = g @ weight
        if keep is None:
            grad_x.addmm_(grad_h_t.t(), lora_a)
        else:
            grad_x.addcmul_(grad_h_t.t() @ lora_a, keep, value=scale)
    return grad_x, grad_a, grad_b


class _LoraLinear(torch.autograd.Function):
    """peft's LoRA linear layer, y = x Wᵀ + b + s · (drop(x) Aᵀ) Bᵀ with W and b frozen, as one function
    (`_lora_apply`). The backward pass keeps the input and the mask in bytes, not the dropped input, and drops it
    again for A's gradient: layers that share an input (q, k and v; gate and up) then share what they keep — a
    third less memory saved for the backward pass in a Llama block, for one elementwise product each."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, p: float):
        rows = x.reshape(-1, x.shape[-1])
        y, keep, ctx.scale, h_t = _lora_apply(rows, weight, bias, lora_a, lora_b, scaling, p)
        ctx.save_for_backward(weight, lora_a, lora_b, rows, h_t, keep)
        ctx.scaling = scaling
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        weight, lora_a, lora_b, rows, h_t, keep = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad_x, grad_a, grad_b = _lora_grads(grad_y.reshape(-1, grad_y.shape[-1]), rows, keep, ctx.scale, h_t,
                                             weight, lora_a, lora_b, ctx.scaling, (need[0], need[3], need[4]))
        if grad_x is not None:
            grad_x = grad_x.view(*grad_y.shape[:-1], grad_x.shape[-1])
        return grad_x, None, None, grad_a, grad_b, None, None


def _lean_parts(module, x: torch.Tensor) -> tuple | None:
    """(frozen weight, bias, A, B, scaling, dropout p) of a peft `lora.Linear` that computes exactly a plain LoRA
    layer on `x`: one adapter (no DoRA or other variant, no adapter bias), unmerged, over a frozen `nn.Linear`,
    fp32 on the CPU without autocast, dropout off or an `nn.Dropout` that `fast_dropout` gave `_keep`'s masks
    (`_lora_apply` then draws the same masks in the same order). None: anything else."""
    names = module.active_adapters
    name = names[0] if len(names) == 1 else None
    base = module.base_layer
    if (module.disable_adapters or module.merged or name not in module.lora_A
            or name in getattr(module, "lora_variant", {}) or type(base) is not nn.Linear or "forward" in base.__dict__
            or base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad)
            or x.device.type != "cpu" or x.dtype != torch.float32 or base.weight.dtype != torch.float32
            or torch.is_autocast_enabled("cpu") or x.numel() == 0):
        return None
    lora_a, lora_b, dropout = module.lora_A[name], module.lora_B[name], module.lora_dropout[name]
    drops = type(dropout) is nn.Dropout and dropout.training and dropout.p > 0
    if (type(lora_a) is not nn.Linear or type(lora_b) is not nn.Linear or lora_a.bias is not None
            or lora_b.bias is not None or type(dropout) not in (nn.Dropout, nn.Identity)
            or lora_a.weight.dtype != torch.float32 or lora_b.weight.dtype != torch.float32
            or drops and not (_runs(dropout, _dropout_forward) and _draws_keep(dropout, x))):
        return None
    return base.weight, base.bias, lora_a.weight, lora_b.weight, module.scaling[name], dropout.p if drops else 0.0


def _lora_forward(module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A peft `lora.Linear`'s forward through `_LoraLinear` where `_lean_parts` allows; else peft's own."""
    parts = None if args or kwargs else _lean_parts(module, x)
    if parts is None:
        return type(module).forward(module, x, *args, **kwargs)
    return _LoraLinear.apply(x, *parts)


# transformers' gated MLP blocks whose forward is down_proj(act_fn(gate_proj(x)) * up_proj(x))
GATED_MLPS = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "GemmaMLP", "Gemma2MLP", "Gemma3MLP", "SmolLM3MLP",
              "Olmo2MLP", "GraniteMLP"}


class _LoraMLP(torch.autograd.Function):
    """A gated MLP block, down(act(gate(x)) · up(x)), whose three linear layers are LoRA layers `_lean_parts`
    accepts, as one function. The backward pass keeps x, gate(x), up(x) and the three masks, and computes
    act(gate(x)) and the product again (the same values): two [tokens × intermediate] tensors fewer per block than
    autograd keeps through the separate layers (the activation's output for the product, the product for the
    down layer) — Unsloth's and Liger's LoRA MLP idea, written here. Masks drawn in the block's own order (gate,
    up, down), so the same as the separate layers'."""

    @staticmethod
    def forward(ctx, x, act, gw, gb, ga, gB, uw, ub, ua, uB, dw, db, da, dB, scalings, ps):
        rows = x.reshape(-1, x.shape[-1])
        gate, g_keep, g_scale, g_h = _lora_apply(rows, gw, gb, ga, gB, scalings[0], ps[0])
        up, u_keep, u_scale, u_h = _lora_apply(rows, uw, ub, ua, uB, scalings[1], ps[1])
        product = act(gate).mul_(up)
        y, d_keep, d_scale, d_h = _lora_apply(product, dw, db, da, dB, scalings[2], ps[2])
        ctx.save_for_backward(rows, gate, up, g_keep, u_keep, d_keep, g_h, u_h, d_h, gw, ga, gB, uw, ua, uB, dw, da,
                              dB)
        ctx.act, ctx.scales, ctx.scalings = act, (g_scale, u_scale, d_scale), scalings
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        rows, gate, up, g_keep, u_keep, d_keep, g_h, u_h, d_h, gw, ga, gB, uw, ua, uB, dw, da, dB = ctx.saved_tensors
        need = ctx.needs_input_grad
        (g_scale, u_scale, d_scale), s = ctx.scales, ctx.scalings
        with torch.enable_grad():
            gate_in = gate.detach().requires_grad_()
            activated = ctx.act(gate_in)
        product = activated.detach() * up
        grad_product, grad_da, grad_dB = _lora_grads(grad_y.reshape(-1, grad_y.shape[-1]), product, d_keep,
                                                     d_scale, d_h, dw, da, dB, s[2], (True, need[12], need[13]))
        del product
        grad_up = grad_product * activated.detach()
        grad_gate = torch.autograd.grad(activated, gate_in, grad_product.mul_(up))[0]
        wants_x = need[0]
        grad_x, grad_ga, grad_gB = _lora_grads(grad_gate, rows, g_keep, g_scale, g_h, gw, ga, gB, s[0],
                                               (wants_x, need[4], need[5]))
        grad_x_up, grad_ua, grad_uB = _lora_grads(grad_up, rows, u_keep, u_scale, u_h, uw, ua, uB, s[1],
                                                  (wants_x, need[8], need[9]))
        if wants_x:
            grad_x = grad_x.add_(grad_x_up).view(*grad_y.shape[:-1], rows.shape[-1])
        return (grad_x, None, None, None, grad_ga, grad_gB, None, None, grad_ua, grad_uB, None, None, grad_da, grad_dB,
                None, None)


def _mlp_forward(module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """A gated MLP block through `_LoraMLP` where its three layers are lean LoRA layers; else its own forward
    (whose layers still run `_lora_forward`)."""
    layers = (module.gate_proj, module.up_proj, module.down_proj)
    parts = [] if args or kwargs else [_lean_parts(m, x) if _runs(m, _lora_forward) else None for m in layers]
    if len(parts) != 3 or any(p is None for p in parts) \
            or parts[2][0].shape[1] != parts[0][0].shape[0]:  # (down's input is the product's width)
        return type(module).forward(module, x, *args, **kwargs)
    (gw, gb, ga, gB, gs, gp), (uw, ub, ua, uB, us, up), (dw, db, da, dB, ds, dp) = parts
    return _LoraMLP.apply(x, module.act_fn, gw, gb, ga, gB, uw, ub, ua, uB, dw, db, da, dB, (gs, us, ds),
                          (gp, up, dp))


@contextlib.contextmanager
def lean_lora(model):
    """Within the block, the model's peft LoRA linear layers run `_lora_forward`. Nests. Yields whether any layer
    runs it."""
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError:  # peft is a dependency; a model without it has no LoRA layers
        yield False
        return
    if not isinstance(model, nn.Module):
        yield False
        return
    mlps = {type(m) for m in model.modules() if type(m).__name__ in GATED_MLPS
            and all(isinstance(getattr(m, n, None), Linear) for n in ("gate_proj", "up_proj", "down_proj"))}
    with contextlib.ExitStack() as stack:
        applied = stack.enter_context(_forwards(model, Linear, _lora_forward))
        for kind in mlps:
            stack.enter_context(_forwards(model, kind, _mlp_forward))
        yield applied


def _runs(module: nn.Module, forward) -> bool:
    """Whether a `_forwards` block gave `module` the function `forward`."""
    return getattr(vars(module).get("forward"), "__func__", None) is forward


@contextlib.contextmanager
def _forwards(model, kind: type, forward):
    """Within the block, every module of exactly `kind` runs `forward` (bound to it) unless a module already has
    its own forward (an outer block's): nested blocks leave the outer one's modules as they are. Yields whether
    any module runs `forward`."""
    modules = [m for m in model.modules() if type(m) is kind]
    patched = [m for m in modules if "forward" not in m.__dict__]
    for m in patched:
        m.forward = forward.__get__(m)
    try:
        yield any(_runs(m, forward) for m in modules)
    finally:
        for m in patched:
            m.__dict__.pop("forward", None)


ATTENTION = "tunelab_sdpa"  # the attention implementation `fast_dropout` gives SDPA models (see _attention)


def _attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
               **kwargs):
    """transformers' SDPA attention, except where it trains with dropout on the CPU in fp32: there the
    probabilities, softmax(q kᵀ · scale + mask), are dropped as `_Dropout` drops, then multiply v. PyTorch's SDPA
    with dropout runs its unfused math path anyway and draws the mask with `bernoulli_` (2 ms a layer for
    [16, 12, 35, 35] on 2 Zen 3 cores). Bidirectional attention only (encoders); causal, grouped-query, biased,
    soft-capped or cached attention is transformers' own."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if (not module.training or not _drawable(dropout) or query.device.type != "cpu"
            or query.dtype != torch.float32 or is_causal or getattr(module, "is_causal", True)
            or key.shape[1] != query.shape[1] or any(kwargs.get(k) is not None for k in
                                                     ("position_bias", "cache", "softcap", "sliding_window"))):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    scores = torch.matmul(query, key.transpose(-1, -2)) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    if attention_mask is not None:
        scores = (scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min) if attention_mask.dtype == torch.bool
                  else scores + attention_mask)
    probs = _Dropout.apply(scores.softmax(-1), dropout)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


@functools.cache
def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, _attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


@contextlib.contextmanager
def _fast_attention(model: nn.Module):
    """Within the block, the model's configs that name SDPA name `ATTENTION` instead (the same masks)."""
    from transformers import PretrainedConfig

    configs = {id(c): c for m in model.modules() if isinstance(c := getattr(m, "config", None), PretrainedConfig)
               and c._attn_implementation == "sdpa"}.values()
    if configs:
        _register_attention()
    for c in configs:
        c._attn_implementation = ATTENTION
    try:
        yield bool(configs)
    finally:
        for c in configs:
            c._attn_implementation = "sdpa"


@contextlib.contextmanager
def fast_dropout(model, enabled: bool = True):
    """Within the block, the model's `nn.Dropout` modules (exactly that class) draw their masks as described
    above when they run on the CPU in training mode, and so does SDPA attention's dropout on the probabilities of
    an encoder (`_attention`); other devices and other dropout are PyTorch's. Nests. Yields whether any module
    was given it."""
    if not enabled or not isinstance(model, nn.Module):
        yield False
        return
    with _forwards(model, nn.Dropout, _dropout_forward) as applied, _fast_attention(model) as attention:
        yield applied or attention


@contextlib.contextmanager
def onednn_linears(model, force: bool = False):
    """Within the block, the model's `nn.Linear` layers (exactly that class) multiply through oneDNN when they
    run in fp32 on the CPU (other devices, dtypes and autocast go to F.linear as before), where that pays on this
    processor (`onednn_pays`) or `force` asks. Nests: an inner block leaves an outer block's layers as they are.
    Yields whether oneDNN is in use."""
    if not isinstance(model, nn.Module) or not (force or onednn_pays()) or not onednn_available():
        yield False
        return
    with _forwards(model, nn.Linear, _onednn_forward) as applied:
        yield applied


# The speed-ups `apply` checks on the probe batch before keeping them (a resume keeps their verdicts)
CHECKED = ("first_token_only", "lean_lora", "chunked_loss")


@contextlib.contextmanager
def apply(model: nn.Module, probe: dict, *, on: bool = True, dropout: bool = True, sequence: bool = True,
          causal_lm: bool = False, single_process: bool = True, sole_writer: bool = True,
          checked: dict | None = None):
    """Every speed-up of this module for one training run, within the block; `on` False (train.speedups, or
    TUNELAB_SPEEDUPS=0) leaves the model as PyTorch, transformers and peft run it. `probe` is a small batch of
    model inputs: the first-token cut and lean LoRA are each kept only where a forward and backward pass over it
    (without dropout) gives the same outputs and gradients as without them (a new transformers or peft can then
    cost speed, never correctness). `checked` ({name: bool} for CHECKED, from the run's start) replaces those
    checks on a resume, so that a run's arithmetic never changes halfway. `causal_lm`: the loss may come from the
    last hidden states in chunks (`chunked_loss`, checked on the probe's logits by `_loss_checked`; the verdict
    stays with the model after the block, for its evaluations). Yields {name: whether it applied} and,
    under "tables", what `reused_embedding_grads` yielded (for `clip_grad_norm_`)."""
    applied = {"first_token_only": False, "onednn_linears": False, "fast_dropout": False, "lean_lora": False,
               "chunked_loss": False, "tables": None}
    if not (on and enabled()):
        yield applied
        return
    with contextlib.ExitStack() as stack:
        def passes(name: str, patch) -> bool:
            return checked[name] if checked is not None else _checked(model, probe, name, patch)

        if sequence and passes("first_token_only", lambda: first_token_only(model, probe)):
            applied["first_token_only"] = stack.enter_context(first_token_only(model, probe))
        applied["onednn_linears"] = stack.enter_context(onednn_linears(model))
        applied["fast_dropout"] = stack.enter_context(fast_dropout(model, dropout))
        if passes("lean_lora", lambda: lean_lora(model)):
            applied["lean_lora"] = stack.enter_context(lean_lora(model))
        if causal_lm:
            applied["chunked_loss"] = chunked_loss(model, checked.get("chunked_loss", False) if checked is not None
                                                   else _loss_checked(model, probe))
        if single_process:  # DDP's hooks watch autograd's own gradients
            applied["tables"] = stack.enter_context(reused_embedding_grads(model, sole_writer))
        yield applied


def _checked(model: nn.Module, probe: dict, name: str, patch) -> bool:
    """Does `patch()` (a context manager yielding whether it applied) leave a training step's outputs and
    gradients on `probe` as they are? Both passes run forward and backward without dropout (eval mode: a
    first-token cut draws fewer dropout and attention-dropout masks, so no random state could make the two passes
    comparable with it), from the same random state, restored after. False where it does not apply, and, with a
    logged warning, where the passes differ."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return False
    def step():
        model.eval()  # (for each pass: entering the first-token cut restores the model's mode)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            out = model(**probe)
            out = (out.logits if "logits" in out else out[0]).float()  # BERT's pre-training: its MLM logits
            weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
            grads = torch.autograd.grad((out * weights).sum(), params, allow_unused=True)
        return out.detach(), grads

    with eval_mode(model):
        with patch() as applies:  # the patched pass first: where the patch does not apply, no pass at all
            if not applies:
                return False
            ours = step()
        theirs = step()
    same = _close(ours[0], theirs[0]) and all((a is None) == (b is None) and (a is None or _close(a, b))
                                              for a, b in zip(ours[1], theirs[1]))
    if not same:
        log.warning("the %s speed-up gave other outputs or gradients than %s on this model's first batch: off "
                    "for this run (it costs speed, not correctness)", name,
                    "peft" if name == "lean_lora" else "the full last layer")
    return same


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float32 summation order: the difference's norm within 1e-4 of the tensor's (a gradient summed
    over a batch in another order differs by ~1e-5 of its size; an adapter scaled 1% wrong, by 1e-2)."""
    return bool(torch.linalg.vector_norm(a - b) <= 1e-4 * torch.linalg.vector_norm(b) + 1e-7)


_CHUNKED = weakref.WeakKeyDictionary()  # model -> whether its language-model loss may come from its hidden states


def output_layer(model: nn.Module, probe: dict | None = None) -> nn.Linear | None:
    """The output layer (hidden states → vocabulary) of a model whose loss may be computed from its last hidden
    states (see `final_hidden` and losses.linear_cross_entropy); None: compute it from the logits. Decided once
    per model: by `chunked_loss` (a training run's check, or its checkpoint's verdict), else by `_loss_checked` on
    the first two rows of `probe` (an evaluation's first batch); without a probe, undecided models use their
    logits."""
    verdict = _CHUNKED.get(model)
    if verdict is None and probe is not None:
        verdict = _CHUNKED[model] = _loss_checked(model, {k: v[:2] for k, v in probe.items()})
    return model.get_output_embeddings() if verdict else None


def chunked_loss(model: nn.Module, verdict: bool = True) -> bool:
    """From now on, a causal language model's token loss may (`verdict`) be computed from its last hidden states,
    chunk by chunk (losses.linear_cross_entropy): the [tokens × vocabulary] logits are never held, in fp32 or at
    all, and only the positions with a label go through the output layer (a chat's prompt tokens do not). Applies
    where the output layer is a plain linear layer; whether the model does anything to the logits after it (Gemma
    2's soft-capping) is `_loss_checked`'s question. Returns whether it applies."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    _CHUNKED[model] = verdict = verdict and type(head) is nn.Linear
    return verdict


def final_hidden(model: nn.Module, batch: dict, use_cache: bool = False) -> torch.Tensor:
    """The hidden states the model's output layer would read, [batch, positions, hidden]: the model runs with that
    layer answering an empty tensor, so no logits are computed. Without a key-value cache (`use_cache`: on the
    meta device, where transformers' look for packed rows cannot read the positions)."""
    head = model.get_output_embeddings()
    own = vars(head).get("forward")  # another speed-up's forward (oneDNN), put back after
    seen = {}

    def keep(x: torch.Tensor) -> torch.Tensor:
        seen["hidden"] = x
        return x[..., :0]

    head.forward = keep
    try:
        model(**batch, use_cache=use_cache)
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own
    return seen["hidden"]


def causal_lm_loss(model: nn.Module, batch: dict, labels: torch.Tensor,
                   chunked: bool = True) -> tuple[torch.Tensor, ...]:
    """(summed loss, per-row loss, labelled tokens and correct argmax tokens, the three detached) of next-token
    prediction (labels IGNORE where no token counts): from the hidden states in chunks where `chunked` (the run's
    train.speedups and train.chunked_loss) and `output_layer` allow, else from the logits as transformers gives
    them. Without a key-value cache: transformers looks for packed rows (position ids that restart, no attention
    mask) only then."""
    head = output_layer(model, batch) if chunked and enabled() else None
    if head is None:
        loss, tokens, correct = token_stats(model(**batch, use_cache=False).logits.float(), labels, shift=True)
        return loss.sum(), loss.detach(), tokens, correct
    hidden, targets, rows, tokens = _labelled_hidden(model, batch, labels)
    total, losses, argmax = linear_cross_entropy(hidden, head.weight, head.bias, targets)
    per_row = torch.zeros(len(labels), dtype=losses.dtype, device=losses.device).index_add_(0, rows, losses)
    right = torch.zeros(len(labels), dtype=torch.long, device=losses.device).index_add_(
        0, rows, (argmax == targets).long())
    return total, per_row, tokens, right


def _labelled_hidden(model: nn.Module, batch: dict, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The last hidden states at the positions whose next token has a label, for the output layer in chunks:
    (those hidden states [n, hidden], their target tokens [n], their rows [n], each row's count of them)."""
    hidden, labels = final_hidden(model, batch)[:, :-1], labels[:, 1:]
    mask = labels != IGNORE
    return hidden[mask], labels[mask], mask.nonzero()[:, 0], mask.sum(1)


def causal_lm_logps(model: nn.Module, batch: dict, labels: torch.Tensor, chunked: bool = True) -> torch.Tensor:
    """Each row's summed log-probability of its labelled tokens (labels IGNORE elsewhere; next-token), from the
    hidden states in chunks where `chunked` and `output_layer` allow (losses.linear_log_probs: only the labelled
    positions go through the output layer), else from the logits."""
    head = output_layer(model, batch) if chunked and enabled() else None
    if head is None:
        return sequence_logps(model(**batch, use_cache=False).logits.float(), labels)
    hidden, targets, rows, _ = _labelled_hidden(model, batch, labels)
    logps = linear_log_probs(hidden, head.weight, head.bias, targets)
    return torch.zeros(len(labels), dtype=logps.dtype, device=logps.device).index_add(0, rows, logps)


def _loss_checked(model: nn.Module, probe: dict) -> bool:
    """Does the model's output layer, applied to the hidden states `final_hidden` gives, make the model's own logits
    on the probe batch (eval mode, no gradients)? Then the loss from the hidden states is the logits' loss, to
    rounding (losses.linear_cross_entropy is tested against the whole logits' loss and gradients); a model that
    soft-caps or scales its logits after that layer fails. The logits themselves are compared, not the two losses'
    gradients: at a 262,144-token vocabulary PyTorch's fp32 cross-entropy of the whole logits is the less exact of
    the two (gemma3-270m: its parameter gradients 0.3% from float64's, the chunked ones 0.004%)."""
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if type(head) is not nn.Linear or type(head.weight) is not nn.Parameter:  # (FSDP's shards are DTensors)
        return False
    with eval_mode(model), torch.no_grad():
        model.eval()
        logits = model(**probe, use_cache=False).logits.float()
        ours = head(final_hidden(model, probe)).float()
    same = ours.shape == logits.shape and _close(ours, logits)
    if not same:
        log.warning("the loss from the hidden states would not be the loss from this model's logits (it changes "
                    "them after its output layer): computed from the logits for this run (it costs memory, not "
                    "correctness)")
    return same
