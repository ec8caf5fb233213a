"""The typed configuration, declared once.

Every setting is one dataclass field with a type, a default and one line of help. YAML files load into these
classes (unknown keys are an error), `--set section.field=value` and the generated `--section.field` flags
reach every field, and a few fields carry a short contract flag (`--lr`, `--tuning`, ...) in their metadata.
The fully resolved config is written beside every run as `config.yaml`.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from tunelab.errors import UserError, excerpt


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric setting: [lo, hi], an open end marked by lo_open / hi_open."""

    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        return above and below

    def __str__(self) -> str:
        def show(x: float) -> str:
            return f"{int(x):,}" if float(x).is_integer() and abs(x) >= 1e4 else f"{x:g}"
        return f"{'(' if self.lo_open else '['}{show(self.lo)}, {show(self.hi)}{')' if self.hi_open else ']'}"


# What a path-typed setting names. The service lets no client give one: jobs.py resolves ids the caller owns.
PATH_KINDS = ("data", "run", "model", "output")


def setting(default: Any, help: str, flag: str | None = None, *, range: Range | None = None,
            path: str | None = None) -> Any:
    """A config field: its default, one line of help, optionally its short CLI flag, its valid range (every
    numeric setting has one) and, for a setting that names a file or folder, which kind of path it is."""
    assert path is None or path in PATH_KINDS, path
    meta = {"help": help, "flag": flag, "range": range, "path": path}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    name: str = setting("minilm", "Bundled alias (minilm, smollm2, gemma3-270m; images: efficientnet-lite0), a Hugging Face Hub name (ORG/NAME[@REVISION], through the Hugging Face cache; HF_HUB_OFFLINE=1 reads that cache alone), an image network by its library's name (timm:NAME[.TAG], torchvision:NAME[.WEIGHTS]; weights from that library's cache, downloaded there first when online) or a local Hugging Face model folder (an image model: a timm_wrapper folder, or a folder as the Hub's timm/ repositories hold).", "--model",
        path="model")
    dropout: float | None = setting(None, "Override every dropout probability in the model (None keeps the model's).",
        range=Range(0, 1, hi_open=True))
    trust_remote_code: bool = setting(False, "Allow code shipped with a model folder to run. Off by default: it is arbitrary code.")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = setting("float32", "Text models: the dtype of the weights that do not train (a LoRA or head run's frozen backbone); trained weights stay float32 (the optimizer's master copy) and forward passes run under autocast in this dtype. auto: bfloat16 on a GPU that has it (else float16), on a CPU only where it has bfloat16 units (AVX512-BF16 or AMX), else float32. The exported model is saved in this dtype.")
    allow_pickle: bool = setting(False, "A Hub model with only pickled weights (pytorch_model.bin): read them once with torch.load(weights_only=True) and keep a safetensors copy. Off by default: unpickling can run code.")
    pooling: Literal["auto", "cls", "mean", "max", "last"] = setting("auto", "classification, multilabel, regression: how token states become one vector for the head: auto (a sentence-transformers folder's own pooling, else the model's own head: BERT's pooler over [CLS], a decoder's last token), cls (first token's state), mean, max, or last (last non-padding token).")


@dataclass
class DataConfig:
    train: str = setting("", "Training data: JSONL, CSV with a header, or a folder with one sub-folder of .txt files (images: image files) per class.", "--train",
        path="data")
    eval: str | None = setting(None, "Evaluation data in the same formats; when absent, --eval-split of the training data is held out.", "--eval",
        path="data")
    encoding: str = setting("utf-8", "Text encoding of the data files: utf-8 (a byte-order mark is fine), auto (detect UTF-8, UTF-16, Shift_JIS/CP932 or EUC-JP), or a Python codec name such as cp932.", "--encoding")
    eval_split: float = setting(0.1, "Fraction of the training data held out (stratified) when no --eval file is given.", "--eval-split",
        range=Range(0, 1, True, True))
    test: str | None = setting(None, "Test data in the same formats, scored once at the end with the chosen weights and threshold: nothing (early stopping, threshold, tune's best trial) selects on it, so its numbers are an untouched estimate.", "--test",
        path="data")
    test_split: float = setting(0.0, "When no --test file is given: carve this fraction of the training data off (stratified, before the eval holdout and train_fraction) as a test set that nothing looks at until the end; 0: none.",
        range=Range(0, 1, hi_open=True))
    text_column: str = setting("text", "Column or JSON key holding the text.")
    image_column: str = setting("image", "Image tasks, CSV or JSONL data: the column or JSON key holding each image's path, relative to the data file's folder.")
    text_pair_column: str = setting("text_pair", "Column or JSON key holding the optional second text of a pair.")
    label_column: str | None = setting(None, "Column or JSON key holding the label; None uses the task's (label, labels, target or tags).")
    group_column: str | None = setting(None, "Column or JSON key of a group id: cross-validation folds never split a group.")
    train_fraction: float = setting(1.0, "Train on this fraction of the training split (a nested, stratified sample: a learning-curve point).",
        range=Range(0, 1, lo_open=True))
    transfer: str | None = setting(None, "distill: unlabelled texts (JSONL with text, or .txt lines; images: a folder of image files) that the teacher labels softly; the student learns them too.", "--transfer",
        path="data")
    max_length: int = setting(128, "Longest input in tokens; longer texts are truncated.", "--max-length",
        range=Range(8, 65536))
    limit_train: int | None = setting(None, "Use at most this many training examples (a stratified sample); None or 0 uses all.",
        range=Range(0, 2**31 - 1))
    overlong: Literal["truncate", "drop"] = setting("truncate", "chat, dpo, reward: examples longer than max_length are cut at the end (truncate) or left out (drop); both are counted.")
    skip_invalid: bool = setting(False, "Skip records with bad content (an empty text, a bad label, an unknown role, identical responses) with a counted warning instead of stopping.")
    mlm_probability: float = setting(0.15, "mlm: share of the tokens chosen for prediction (of those 80% masked, 10% random, 10% kept).",
        range=Range(0, 1, True, True))


@dataclass
class TuningConfig:
    name: Literal["auto", "scratch", "head", "partial", "full", "lora", "qlora", "distill"] = setting("auto", "How the weights adapt: scratch, head, partial, full, lora, qlora (lora on the base weights held in 4 bits: bitsandbytes' NF4 with double quantization, computed in model.dtype; Dettmers et al. 2023; text models, the 'qlora' extra), or distill (learn a teacher run's soft targets); auto: lora for a decoder (a causal language model) given a classification, regression or NER head, whose weights are many and whose new head is small, full otherwise.", "--tuning")
    partial_layers: int = setting(2, "partial: how many of the top encoder blocks train (plus the head).",
        range=Range(1, 1000))
    cache_features: bool = setting(True, "head: run the frozen backbone once over the training data and replay its outputs every epoch (same losses up to float rounding).")
    layer_decay: float | None = setting(None, "full: each lower block's learning rate is this times the block above, embeddings lowest; None: 0.8 for encoder tasks, 1 (off) for language-model stages.",
        range=Range(0, 1, lo_open=True))
    gradual_unfreeze: bool = setting(False, "full: start with only the head trainable and unfreeze one more block from the top each epoch.")
    lora_r: int = setting(8, "lora: rank of the low-rank update.",
        range=Range(1, 1024))
    lora_alpha: int = setting(16, "lora: scaling numerator; the update is scaled by alpha / r.",
        range=Range(1, 65536))
    lora_dropout: float = setting(0.1, "lora: dropout on the adapter input.",
        range=Range(0, 1, hi_open=True))
    teacher: str | None = setting(None, "distill: the finished run (classification, multilabel or regression, the student's task; a clm or chat run for a language model) whose soft targets the student learns.", "--teacher",
        path="run")
    kd_temperature: float = setting(2.0, "distill: T that softens both distributions; the KL term is scaled by T^2 (Hinton et al. 2015).",
        range=Range(0, 100, lo_open=True))
    kd_alpha: float = setting(0.5, "distill: weight of the KL term; 1 - alpha weighs cross-entropy on the gold labels.",
        range=Range(0, 1))
    student_layers: int = setting(0, "distill: build the student from the teacher itself with this many layers, initialised from evenly spaced teacher layers (every other one for half, as DistilBERT); 0 uses --model.",
        range=Range(0, 1000))
    kd_level: Literal["auto", "token", "sequence"] = setting("auto", "distill of a language model (clm, chat): token matches the teacher's next-token distributions on the training texts (Hinton's KL at every labelled token; the teacher must share the student's tokenizer); sequence (chat) trains the student on the teacher's own greedy answers to the training prompts (Kim & Rush 2016; any teacher), saved as RUN/distill/teacher_answers.jsonl; auto: token where the tokenizers match, else sequence.")
    kd_max_new_tokens: int = setting(128, "distill, kd_level sequence: most tokens of each teacher answer.",
        range=Range(1, 4096))
    prune_vocab: bool = setting(False, "distill: keep only the vocabulary the training and transfer texts use (plus every single character) and shrink the student's embeddings to it; WordPiece tokenizers.")
    lora_targets: list[str] = setting([], "lora: names (or name endings) of the linear modules that get adapters, e.g. query,value; empty: every linear layer of the attention and MLP blocks.")
    warm_head: bool = setting(True, "full, partial, distill (a student from --model): before the first step, set the new linear head to its solved optimum on the pretrained features (linear probing then fine-tuning, LP-FT); classification, multilabel, regression.")
    bn_statistics: Literal["frozen", "update"] = setting("frozen", "Networks with batch norm (image CNNs): frozen keeps a pretrained network's running means and variances as pre-training left them while its weights train (the batch-norm scale and shift still train); update lets every training batch move them, as PyTorch's train mode does. scratch always updates them.")
    head_solver: Literal["lbfgs", "sgd"] = setting("lbfgs", "head: lbfgs (the linear head fitted to convergence on the frozen features by full-batch L-BFGS, L2 chosen by cross-validation inside the training split) or sgd (the loop's epochs and learning rate).")
    head_l2: float | None = setting(None, "head, lbfgs: the L2 penalty (lambda in mean loss + lambda/2 |W|^2 on standardised features); None: chosen by 5-fold cross-validation on the training split.",
        range=Range(0, 1e6))


@dataclass
class TrainConfig:
    epochs: int | None = setting(None, "Passes over the training data; None: the method's default (full 3, lora 4, partial 3, scratch 3, head 3 where it is stepped).", "--epochs",
        range=Range(1, 1000))
    lr: float | None = setting(None, "Peak learning rate (of the head; lower blocks may get less, see tuning.layer_decay); None: the method's default (full 5e-5, lora 1e-3, partial 3e-4, scratch 1e-4, head 2e-3 where it is stepped).", "--lr",
        range=Range(0, 10, lo_open=True))
    lr_scale: float = setting(1.0, "Multiplies the learning rate, given or the method's default (the service's learning_rate_multiplier); the saved config.yaml holds the product.",
        range=Range(0, 1000, lo_open=True))
    batch_size: int = setting(16, "Examples per forward pass on one process.", "--batch-size",
        range=Range(1, 4096))
    grad_accum: int = setting(1, "Forward passes accumulated per optimizer step (global batch = batch_size x grad_accum x processes).",
        range=Range(1, 4096))
    weight_decay: float = setting(0.01, "AdamW decoupled weight decay (L2) on weights; never on biases or LayerNorm.",
        range=Range(0, 10))
    l1: float = setting(0.0, "L1 penalty coefficient on trainable weights, added to the loss.",
        range=Range(0, 10))
    warmup_ratio: float = setting(0.1, "Fraction of the optimizer steps spent warming the learning rate up linearly from 0.",
        range=Range(0, 1, hi_open=True))
    schedule: Literal["linear", "cosine", "constant"] = setting("linear", "Learning-rate decay after warmup: linear, cosine or constant.")
    max_grad_norm: float = setting(1.0, "Clip the global gradient norm to this (0 disables clipping).",
        range=Range(0, 1e6))
    eval_every: int = setting(0, "Evaluate every N optimizer steps; 0 evaluates at the end of each epoch.",
        range=Range(0, 2**31 - 1))
    checkpoint_every: int = setting(0, "Save a resumable checkpoint every N optimizer steps (and always at each epoch end); 0 only at epoch ends.",
        range=Range(0, 2**31 - 1))
    keep_checkpoints: int = setting(2, "How many of the latest resumable checkpoints are kept (older ones are deleted).",
        range=Range(1, 100))
    early_stopping_patience: int = setting(0, "Stop after this many evaluations without improvement and restore the best weights; 0 disables.",
        range=Range(0, 10000))
    metric: str = setting("auto", "Evaluation metric that decides the best weights and early stopping; auto uses the task's main one.")
    beta: float = setting(0.1, "dpo: how strongly the policy is held near the reference model (larger: closer).",
        range=Range(0, 100, lo_open=True))
    reward: str = setting("", "rl: where rewards come from: a reward run's folder (--task reward), or a Python function module:function (or path/to/file.py:function) called as function(prompt_messages, answer_text, record) -> float.")
    rl_algorithm: Literal["rloo", "grpo"] = setting("rloo", "rl: the policy update. rloo: REINFORCE with the leave-one-out baseline, the KL penalty inside the reward (Ahmadian et al. 2024). grpo: advantages normalised within each prompt's answers, a per-token KL term (Shao et al. 2024).")
    rl_samples: int = setting(4, "rl: answers sampled per prompt at each step (the group the advantages compare).",
        range=Range(2, 64))
    rl_max_new_tokens: int = setting(64, "rl: most tokens of a sampled answer.", range=Range(1, 4096))
    rl_temperature: float = setting(1.0, "rl: sampling temperature of the training answers (evaluation answers are greedy).",
        range=Range(0, 10, lo_open=True))
    kl_coef: float = setting(0.05, "rl: weight of the KL divergence from the starting model (larger: closer to it).",
        range=Range(0, 100))
    seed: int = setting(42, "Seed for initialisation, data order and dropout; the same seed gives the same run.", "--seed",
        range=Range(0, 2**32 - 1))
    device: Literal["auto", "cpu", "cuda"] = setting("auto", "cpu, cuda, or auto (cuda when available).")
    strategy: Literal["ddp", "fsdp"] = setting("ddp", "How the processes of a torchrun launch share a model. ddp: each holds the whole model, its gradients and its optimizer state, and gradients are averaged (PyTorch DistributedDataParallel). fsdp: each holds 1/N of every parameter, gradient and optimizer state, and gathers a transformer block's full weights only while the block runs (PyTorch FSDP2, fully_shard) - for models whose training state does not fit one device; its checkpoints are sharded (torch.distributed.checkpoint) and resume on any number of processes. One process: the same arithmetic either way.")
    bf16: bool = setting(False, "Run forward passes under bfloat16 autocast on GPU (weights and optimizer stay fp32).")
    packing: bool = setting(False, "chat: train on rows that hold several conversations each, up to max_length tokens (best-fit decreasing), in place of one padded conversation a row: fewer rows, little padding. Attention stops at each conversation's border and its positions restart at 0, so every conversation's loss is what it is alone (tested); --batch-size then counts rows. Evaluation keeps one conversation a row.")
    gradient_checkpointing: bool = setting(False, "Keep only each transformer layer's inputs in the forward pass and recompute the rest in the backward pass: activation memory falls to about one layer's, for about a third more compute (transformers' activation checkpointing, non-reentrant). The gradients are the same.")
    augment: str = setting("", "Augmentation of the training split, comma-separated. Text: swap, delete, insert, neighbour (replacement by nearest neighbours in the model's input embeddings); Japanese is split into MeCab words. Images (torchvision transforms.v2, drawn anew every epoch): flip, vflip, rotate, zoom (random resized crop), color (jitter), randaugment, trivialaugment. Empty: off.", "--augment")
    augment_rate: float = setting(0.1, "augment: the share of a text's words each augmented copy changes.",
        range=Range(0, 1, True, True))
    augment_copies: int = setting(1, "augment: augmented copies added per training example.",
        range=Range(1, 100))
    progress: bool = setting(True, "Show a progress bar with loss and samples/s.")
    speedups: bool = setting(True, "tunelab's exact speed-ups (the first-token cut, the reused embedding gradient, oneDNN linears where they pay, fast dropout, lean LoRA; see tunelab/speed.py); false, or TUNELAB_SPEEDUPS=0 in the environment, runs the model as PyTorch, transformers and peft do.")
    chunked_loss: bool = setting(True, "clm and chat: compute the token loss from the model's last hidden states in chunks of positions (only those with a label), never holding the [tokens x vocabulary] logits (losses.linear_cross_entropy); dpo: its answers' log-probabilities the same way (losses.linear_log_probs). The same values and gradients, in less memory the larger the vocabulary, and faster where prompts are long. Part of train.speedups (not under FSDP); false computes them from the logits.")
    fast_dropout: bool = setting(True, "Draw dropout masks on the CPU from 16 random bits per unit (p rounded to 1/65,536), 2x cheaper than PyTorch's dropout; false: PyTorch's own random stream.")


@dataclass
class EvalConfig:
    folds: int = setting(0, "K-fold cross-validation over the training data (K >= 2); 0 uses the eval file or split.", "--folds",
        range=Range(0, 100))
    fold: int | None = setting(None, "With folds: run only this fold (0-based); None runs all of them.",
        range=Range(0, 99))
    bootstrap: int = setting(1000, "Bootstrap resamples of the eval set for 95% confidence intervals; 0 disables.",
        range=Range(0, 100000))
    probe: bool = setting(True, "Also fit the linear-probe baseline (frozen pretrained embeddings + scikit-learn).")
    threshold: float = setting(0.5, "multilabel: probability above which a label is predicted.",
        range=Range(0, 1, True, True))
    tune_threshold: bool = setting(True, "multilabel: pick the threshold that maximises micro-F1 on the eval set (reported beside 0.5).")


@dataclass
class Config:
    task: Literal["classification", "multilabel", "regression", "ner", "clm", "mlm", "nsp", "chat", "dpo", "reward", "rl", "image-classification", "image-multilabel"] = setting("classification", "What the model learns: classification, multilabel, regression, ner; language models: clm, mlm, nsp (mlm plus next-sentence prediction), chat, dpo, reward, rl (reinforcement learning from a reward); images: image-classification, image-multilabel.", "--task")
    output: str = setting("runs/run", "Run folder to write (config, metrics, history, plots, model, checkpoints).", "--output",
        path="output")
    overwrite: bool = setting(False, "Replace an existing, non-empty run folder instead of refusing.", "--overwrite")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tuning: TuningConfig = field(default_factory=TuningConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "tuning": TuningConfig, "train": TrainConfig, "eval": EvalConfig}


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)  # resolving the annotations is slow: once per class


def iter_fields(cls: type = Config, prefix: str = ""):
    """Yield (dotted key, dataclass field, python type) for every leaf setting."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            yield from iter_fields(hints[f.name], key + ".")
        else:
            yield key, f, hints[f.name]


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, optional?) for `X | None`."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def choices(tp: Any) -> tuple[str, ...] | None:
    """The values a closed-choice setting (`Literal[...]`) allows; None for any other type."""
    inner, _ = _base_type(tp)
    return typing.get_args(inner) if typing.get_origin(inner) is Literal else None


def coerce(key: str, value: Any, tp: Any, source: str, valid: Range | None = None) -> Any:
    """Turn a YAML or command-line value into the field's type within its range, or say why it cannot be."""
    inner, optional = _base_type(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise UserError(f"setting '{key}' may not be empty", source)
    allowed = choices(tp)
    if allowed is not None:
        if not isinstance(value, str) or value not in allowed:
            raise UserError(f"setting '{key}' must be one of {', '.join(allowed)}, got {excerpt(value)}", source)
        return value
    try:
        if inner is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes", "on"):
                return True
            if str(value).lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if typing.get_origin(inner) is list:
            if not isinstance(value, (str, list)) or any(isinstance(v, (list, dict)) for v in value):
                raise ValueError
            items = value.split(",") if isinstance(value, str) else value
            return [str(v).strip() for v in items if str(v).strip()]
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError  # a list, an object or a boolean is no number or text
        if inner is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        out = inner(value)
    except (TypeError, ValueError, OverflowError):
        name = getattr(inner, "__name__", str(inner))
        raise UserError(f"setting '{key}' must be {name}, got {excerpt(value)}", source) from None
    if isinstance(out, float) and not math.isfinite(out):
        raise UserError(f"setting '{key}' must be a finite number, got {excerpt(value)}", source)
    if inner in (int, float) and valid is not None and out not in valid:  # exact for ints of any size
        raise UserError(f"setting '{key}' must be in {valid}, got {excerpt(value)}", source)
    return out


def _unknown(key: str, known: list[str], source: str) -> UserError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return UserError(f"unknown config key '{key}'{hint}", source)


@functools.cache
def fields_by_key() -> dict[str, tuple[dataclasses.Field, Any]]:
    """{dotted key: (dataclass field, python type)} of every leaf setting, built once."""
    return {k: (f, tp) for k, f, tp in iter_fields()}


def set_value(cfg: Config, key: str, value: Any, source: str = "--set") -> None:
    """Set one dotted key, checking the name and the type."""
    fields = fields_by_key()
    if key not in fields:
        raise _unknown(key, list(fields), source)
    target: Any = cfg
    *parents, leaf = key.split(".")
    for p in parents:
        target = getattr(target, p)
    f, tp = fields[key]
    setattr(target, leaf, coerce(key, value, tp, source, f.metadata["range"]))


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and f"{prefix}{k}" in SECTIONS:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def load_yaml(path: str | Path) -> Config:
    """Read a YAML config file into a Config; unknown keys and wrong types are refused."""
    p = Path(path)
    if not p.is_file():
        raise UserError("config file not found", str(p))
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        raise UserError(f"not valid YAML ({getattr(e, 'problem', e)})", str(p), line + 1 if line is not None else None) from None
    if not isinstance(raw, dict):
        raise UserError("a config file must be a mapping of settings", str(p))
    cfg = Config()
    for key, value in _flatten(raw).items():
        set_value(cfg, key, value, str(p))
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(d: dict, source: str = "config") -> Config:
    cfg = Config()
    for key, value in _flatten(d).items():
        set_value(cfg, key, value, source)
    return cfg


def save_yaml(cfg: Config, path: Path) -> None:
    from tunelab.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def with_absolute_paths(cfg: Config) -> Config:
    """A copy whose files (the data, a teacher run, a local model folder) are named by absolute paths: a run's
    config.yaml then works from any directory (`tunelab export RUN`, `eval`, `--resume`)."""
    out = from_dict(to_dict(cfg))
    for section, key in (("data", "train"), ("data", "eval"), ("data", "test"), ("data", "transfer"),
                         ("tuning", "teacher")):
        value = getattr(getattr(out, section), key)
        if value:
            setattr(getattr(out, section), key, str(Path(value).absolute()))
    if out.model.name and Path(out.model.name).exists():
        out.model.name = str(Path(out.model.name).absolute())
    return out


def check_values(cfg: Config) -> None:
    """Every numeric setting within its declared range and every closed choice one of its values (a config built
    in Python skips coerce)."""
    for key, f, tp in iter_fields():
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if (f.metadata["range"] is not None or choices(tp)) and value is not None:
            coerce(key, value, tp, "config", f.metadata["range"])


def validate(cfg: Config) -> None:
    """Checks of the settings themselves and between them, run before any file is written; the checks against
    the registries of tasks and methods are tunelab.validate's."""
    check_values(cfg)
    if not cfg.data.train:
        raise UserError("no training data given (use --train PATH)", "--train")
    checks = [
        ((cfg.tuning.name == "distill") == bool(cfg.tuning.teacher),
         "--tuning distill needs --teacher RUN_DIR, and --teacher only applies to it"),
        (not cfg.data.transfer or cfg.tuning.name == "distill", "--transfer only applies to --tuning distill"),
        (not cfg.tuning.prune_vocab or cfg.tuning.name == "distill", "tuning.prune_vocab only applies to --tuning distill"),
        (not cfg.train.augment or cfg.task in ("classification", "multilabel", "regression", "image-classification",
                                               "image-multilabel"),
         "train.augment applies to classification, multilabel and regression (text with a label per text) and to "
         "image tasks"),
        (cfg.eval.folds == 0 or cfg.eval.folds >= 2, "eval.folds must be 0 (off) or at least 2"),
        (cfg.eval.fold is None or 0 <= cfg.eval.fold < max(cfg.eval.folds, 1), "eval.fold must be in [0, folds)"),
        (not (cfg.eval.folds and cfg.data.eval), "--folds splits the training data into folds; drop --eval "
                                                 "(score a held-out file afterwards with `tunelab eval`)"),
        *_test_checks(cfg),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message, "config")


def _test_checks(cfg: Config) -> list[tuple[bool, str]]:
    """A test set is one untouched holdout: from one source, never a file that also trains or selects."""
    d = cfg.data
    same = [name for name, other in (("--train", d.train), ("--eval", d.eval))
            if d.test and other and Path(d.test).resolve() == Path(other).resolve()]
    return [
        (not (d.test and d.test_split), "give either --test FILE or data.test_split, not both"),
        (not (cfg.eval.folds and (d.test or d.test_split)),
         "--folds already scores every example once on a model that never trained on it; drop --test and "
         "data.test_split (score a held-out file afterwards with `tunelab eval`)"),
        (not same, f"--test names the same file as {' and '.join(same)}: a test set must be data that nothing "
                   "trains on or selects with"),
    ]
