"""The interface every task implements: how its data reads, which head and loss it gets, how it is scored.

The loop, the methods and the evaluation code are shared; a task supplies only what differs. Predictions and
gold answers are plain Python values (class index, set of label indices, number, tag sequence), so that the
metrics, bootstrap intervals and baselines all work on the same lists.
"""
from __future__ import annotations

import contextlib

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from tunelab import speed
from tunelab.config import DataConfig, ModelConfig
from tunelab.data.batching import FORWARD_TOKENS, collate, token_batches
from tunelab.data.load import Example, Problems, read_examples
from tunelab.errors import UserError
from tunelab.modes import eval_mode

NOT_INPUTS = ("labels", "teacher_logits", "labelled", "ref")  # what a task's or method's `collate` adds beside the inputs


@dataclass
class Space:
    """What the training data says about the outputs: class or tag names, target scaling, threshold."""

    labels: list[str] = field(default_factory=list)
    target_mean: float = 0.0
    target_std: float = 1.0
    threshold: float = 0.5
    beta: float = 0.1  # dpo: the strength of the pull towards the reference model
    overlong: str = "truncate"  # chat, dpo, reward: what happens to examples longer than max_length
    mlm_probability: float = 0.15
    seed: int = 0

    def configure(self, cfg) -> "Space":
        """Take the settings that encoding and scoring read (threshold, dpo beta, masking, length) from a Config."""
        self.threshold, self.beta, self.seed = cfg.eval.threshold, cfg.train.beta, cfg.train.seed
        self.overlong, self.mlm_probability = cfg.data.overlong, cfg.data.mlm_probability
        return self

    def label_mapping(self) -> dict:
        """The transformers config entries that name the outputs (saved in config.json)."""
        return dict(num_labels=len(self.labels), id2label=dict(enumerate(self.labels)),
                    label2id={n: i for i, n in enumerate(self.labels)})


class Task:
    name = ""
    modality = "text"  # what an example is: "text" (tokenized) or "image" (pixels; tunelab.tasks.image)
    label_key = "label"
    metrics: tuple[str, ...] = ()  # scalar metrics `score` returns; the first is the main one
    lower_is_better = frozenset({"loss", "mse", "mae"})
    model_class = "AutoModelForSequenceClassification"
    tunings: tuple[str, ...] = ("scratch", "head", "partial", "full", "lora", "qlora")  # the methods that make sense here
    # What one example's outputs are, for methods that compare two models' outputs (distill): "softmax" (logits of
    # one class), "sigmoid" (one logit per independent label) or "value" (a number, in `target`'s units).
    outputs_are: str | None = None
    judged_by_start = False  # language-model stages compare with the model before training, not a trivial answer
    loss_from_hidden = False  # a causal language model's token loss (speed.causal_lm_loss): chunked from hidden states
    chunked = False  # whether it does so in this run (bind)
    eval_batch_size = 64  # examples per forward pass when evaluating (language models: logits are vocabulary-wide)
    uses_reference = False  # dpo: scores need the starting model (prepare_items), not only the trained one
    default_layer_decay = 0.8  # full tuning's per-block learning-rate decay when tuning.layer_decay is unset
    pools = False  # one vector per text feeds the head: model.pooling applies (classification, regression, ...)

    @property
    def primary(self) -> str:
        return self.metrics[0]

    def better(self, metric: str, value: float, than: float | None) -> bool:
        if than is None:
            return True
        return value < than if metric in self.lower_is_better else value > than

    # --- data -----------------------------------------------------------------------------------------------
    def parse_label(self, value, path: Path, line: int, key: str):
        raise NotImplementedError

    def read(self, path, cfg: DataConfig, need_label: bool = True, problems: Problems | None = None) -> list[Example]:
        """The examples of a file; a bad record raises its error, or, given `problems`, is noted there and skipped
        (`tunelab data check` lists them all from one reading)."""
        return read_examples(path, cfg, need_label, self.parse_label, self.label_key, problems=problems)

    def space(self, train: list[Example], path: str) -> Space:
        """Output space learned from the training examples (class names, target mean and scale)."""
        return Space()

    def check(self, examples: list[Example], space: Space) -> None:
        """Refuse evaluation examples the model cannot represent (e.g. a class unseen in training)."""

    def strata(self, examples: list[Example]) -> list | None:
        """Per-example strata for stratified splits, or None for plain random splits."""
        return None

    # --- model ----------------------------------------------------------------------------------------------
    def processor(self, folder: Path, trust_remote_code: bool = False):
        """What turns raw inputs into model inputs for the model in `folder`: its tokenizer."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)

    def model_kwargs(self, space: Space) -> dict:
        return {}

    def build(self, cfg: ModelConfig, folder: Path, space: Space, pretrained: bool,
              quantize_on: torch.device | None = None) -> nn.Module:
        """The task's model from `folder`; `quantize_on`: its base weights in 4 bits on that device (qlora)."""
        import transformers
        from transformers import AutoConfig

        from tunelab.models import pretrained_kwargs

        cls = getattr(transformers, self.model_class)
        kwargs = self.model_kwargs(space)
        load = pretrained_kwargs(cfg, quantize_on if pretrained else None)
        if self.pools and cfg.pooling != "auto":  # pooled our way (the model's own head is `auto`)
            from tunelab.models.pooled import PooledForSequenceClassification

            return PooledForSequenceClassification.from_backbone(folder, cfg.pooling, cfg.trust_remote_code,
                                                                 pretrained, load, **kwargs)
        if pretrained:  # (in model.dtype straight from the file: a 7B model never needs its float32 size)
            return cls.from_pretrained(folder, trust_remote_code=cfg.trust_remote_code, use_safetensors=True,
                                       **load, **kwargs)
        config = AutoConfig.from_pretrained(folder, trust_remote_code=cfg.trust_remote_code, **kwargs)
        return cls.from_config(config, trust_remote_code=cfg.trust_remote_code)

    def encode(self, tokenizer, examples: list[Example], space: Space, max_length: int) -> list[dict]:
        """Model inputs per example (unpadded), `labels` for the loss and `_gold` (keys with _ are not inputs)."""
        texts = [e.text for e in examples]
        pairs = [e.text_pair for e in examples]
        kwargs = dict(truncation=True, max_length=max_length, padding=False)
        both = all(p is not None for p in pairs)
        enc = tokenizer(texts, pairs, **kwargs) if both else tokenizer(texts, **kwargs)
        return [self.labelled({k: enc[k][i] for k in enc.keys()}, e, space) for i, e in enumerate(examples)]

    def labelled(self, item: dict, example: Example, space: Space) -> dict:
        """`item` with the example's training target and gold answer, where it has a label."""
        if example.label is not None:
            item["labels"] = self.target(example.label, space)
            item["_gold"] = self.gold(example.label, space)
        return item

    def content_key(self, example: Example) -> list:
        """What identifies an example's input (not its label) in a cache key: its texts."""
        return [example.text, example.text_pair]

    def target(self, label, space: Space):
        """The training target of one label (what the loss sees)."""
        raise NotImplementedError

    def gold(self, label, space: Space):
        """The gold answer of one label (what the metrics see)."""
        return self.target(label, space)

    def length(self, item: dict) -> int:
        """The item's size for batching: its tokens (images: 1)."""
        return len(item["input_ids"])

    def replayable(self, items: list[dict]) -> bool:
        """Do the items give the same model inputs every time they are batched (no augmentation drawn anew)?"""
        return True

    def probe_features(self, model_cfg: ModelConfig, item_lists: list[list[dict]], device) -> list | None:
        """The linear probe's frozen features for each list of items; None: the text encoder's mean-pooled states
        (tunelab.evaluate.baselines)."""
        return None

    def more_baselines(self, train_items: list[dict], eval_items: list[dict], space: Space) -> dict[str, list]:
        """{name: predictions on eval_items} of the task's own extra baselines (images: pixel logistic regression)."""
        return {}

    def units(self, item: dict) -> int:
        """How many loss terms one example contributes (tokens for ner): the loss is averaged over these."""
        return 1

    def pack(self, items: list[dict], max_length: int) -> list[dict]:
        """The training items packed several to a row (train.packing)."""
        raise UserError(f"train.packing is for chat conversations, not {self.name}", "train.packing")

    def prepare_items(self, model: nn.Module, items: list[dict], pad_id: int, device) -> None:
        """Anything computed once with the starting model before training (dpo: the reference log-probabilities)."""

    # --- training and scoring ---------------------------------------------------------------------------------
    def collate(self, items: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
        """One padded batch of model inputs plus `labels`."""
        return collate(items, pad_id)

    def forward(self, model: nn.Module, batch: dict, space: Space) -> tuple[torch.Tensor, dict[str, float]]:
        """(summed loss over the batch's units, sums for the training log such as correct tokens)."""
        labels = batch.pop("labels")
        return self.loss(model(**batch).logits.float(), labels), {}

    def train_log(self, sums: dict[str, float], units: int) -> dict[str, float]:
        """Extra per-step log fields from the summed `forward` figures of one global batch."""
        return {}

    def outputs(self, model: nn.Module, batch: dict, lengths: list[int]) -> list[torch.Tensor]:
        """Per-example outputs for evaluation: (num_labels,) per text, or (tokens, num_labels) for token tasks."""
        for key in NOT_INPUTS:
            batch.pop(key, None)
        logits = model(**batch).logits.float().cpu()
        return [logits[row, :n] if logits.dim() == 3 else logits[row] for row, n in enumerate(lengths)]

    def eval_loss(self, outputs: list[torch.Tensor], items: list[dict], space: Space) -> float:
        """The training loss on these items, averaged over the task's units."""
        total, units = 0.0, 0
        for out, item in zip(outputs, items):
            labels = collate([{"input_ids": item["input_ids"], "labels": item["labels"]}], 0)["labels"]
            total += float(self.loss(out.unsqueeze(0), labels))
            units += self.units(item)
        return total / max(units, 1)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The summed loss over the batch's units."""
        raise NotImplementedError

    def decode(self, outputs: list[torch.Tensor], items: list[dict], space: Space) -> list:
        """Predictions from per-example model outputs."""
        raise NotImplementedError

    def score(self, preds: list, golds: list, space: Space) -> dict[str, float]:
        """The task's scalar metrics (the ones in `metrics`); bootstrap intervals resample these."""
        raise NotImplementedError

    def score_resamples(self, preds: list, golds: list, space: Space, idx) -> dict | None:
        """The metrics of many resamples at once (`idx`: resamples × examples, indices into preds and golds) as
        arrays, one value per resample, equal to `score` on each; None where the task has no faster way than
        calling `score` per resample."""
        return None

    def details(self, preds: list, golds: list, space: Space) -> dict:
        """Non-scalar results for metrics.json and plots (confusion matrix, per-type scores)."""
        return {}

    def baseline(self, train_golds: list, golds: list, space: Space) -> tuple[str, list]:
        """(name, predictions) of the trivial baseline: the majority class, or the mean for regression."""
        raise NotImplementedError

    def probe(self, train_x, train_items: list[dict], eval_x, eval_items: list[dict], space: Space) -> list:
        """Linear-probe predictions from frozen features (one row per example, or per word for ner)."""
        raise NotImplementedError

    def tune(self, outputs: list[torch.Tensor], items: list[dict], space: Space) -> dict:
        """Decision settings chosen on the eval set after training (multilabel threshold); may update space."""
        return {}

    def summary(self, history: list[dict], final: dict) -> dict:
        """Extra headline figures for metrics.json from the training log and the final eval metrics."""
        return {}

    def bind(self, cfg, tokenizer) -> None:
        """Take the run's settings and tokenizer before its examples are encoded (rl samples and scores answers
        with them). Here: whether a causal language model's loss or log-probabilities come from its hidden states
        in chunks (speed.causal_lm_loss, causal_lm_logps): train.speedups and train.chunked_loss, not under FSDP
        (its output layer's weight is a shard outside the model's forward; the logits' then)."""
        self.chunked = self.loss_from_hidden and cfg.train.speedups and cfg.train.chunked_loss \
            and cfg.train.strategy != "fsdp"

    def set_padding(self, model: nn.Module, pad_id: int) -> None:
        """Tell the model the id its batches are padded with, where it reads it: a decoder's sequence classifier (a
        reward model) reads each row at its last token that is not padding."""
        if self.model_class == "AutoModelForSequenceClassification":
            model.config.pad_token_id = pad_id

    def finalize(self, model: nn.Module, space: Space) -> None:
        """Last touches on the exported copy so it works in plain transformers (e.g. regression scaling)."""
        model.config.update({"tunelab_task": self.name})

    def unfinalize(self, model: nn.Module, space: Space) -> None:
        """Undo `finalize` on an exported model that trains again (a student cut from its teacher)."""

    def space_of(self, config) -> Space:
        """The output space of an exported model, from its config.json."""
        labels = [config.id2label[i] for i in range(len(config.id2label))] if getattr(config, "id2label", None) else []
        return Space(labels=labels, threshold=getattr(config, "tunelab_threshold", 0.5))

    def predict_row(self, example: Example, pred, output: torch.Tensor, space: Space) -> dict:
        raise NotImplementedError


@torch.no_grad()
def predict_outputs(task: Task, model: nn.Module, items: list[dict], pad_id: int, device, autocast_dtype=None
                    ) -> list[torch.Tensor]:
    """Per-item outputs in input order (the task's `outputs`: logits for most tasks), at most
    `task.eval_batch_size` items and `FORWARD_TOKENS` padded tokens at a time, longest first, in a fixed order:
    the same items always meet the same batches, so outputs repeat bit for bit."""
    batch_size = task.eval_batch_size
    out: list = [None] * len(items)
    lengths = [task.length(it) for it in items]
    with eval_mode(model), speed.onednn_linears(model):
        for batch in token_batches(lengths, FORWARD_TOKENS, batch_size):
            inputs = {k: v.to(device) for k, v in task.collate([items[i] for i in batch], pad_id).items()}
            # (None leaves autocast as the caller set it: a model.dtype run is inside one)
            cast = torch.autocast(device.type, dtype=autocast_dtype, cache_enabled=False) \
                if autocast_dtype is not None else contextlib.nullcontext()
            with cast:
                rows = task.outputs(model, inputs, [lengths[i] for i in batch])
            for row, i in zip(rows, batch):
                out[i] = row
    return out
