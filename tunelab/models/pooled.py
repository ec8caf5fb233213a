"""A sequence classifier that pools its encoder's token states the way the encoder was trained to be read, and a
token classifier over any backbone.

transformers' `BertForSequenceClassification` reads the [CLS] token through BERT's pooler; a sentence-transformers
model such as all-MiniLM-L6-v2 was trained to be *mean*-pooled instead, and its [CLS] state carries little of
the sentence. `PooledForSequenceClassification` is any `AutoModel` backbone plus a pooling (`cls` first token,
`mean` or `max` over the non-padding tokens, `last` non-padding token) and one linear layer, with the loss
transformers' own classifiers compute for `problem_type`.

It is an ordinary transformers model under its own `model_type` (`tunelab-pooled`): importing tunelab registers
it with `AutoConfig` and `AutoModelForSequenceClassification`, so `AutoModelForSequenceClassification
.from_pretrained(run/model)` loads it. This file imports nothing from tunelab, and the exported folder carries a
copy of it named in `auto_map`: without tunelab installed, `trust_remote_code=True` loads the same class. Without
either, transformers refuses the unknown model type loudly instead of reading [CLS] in silence.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput, TokenClassifierOutput

POOLINGS = ("cls", "mean", "max", "last")
MODEL_TYPE = "tunelab-pooled"
MODULE = "modeling_tunelab_pooled"  # the name of this file's copy in an exported folder


class PooledConfig(PretrainedConfig):
    """The backbone's own config (as a dict, under `backbone`) plus the pooling and the label settings."""

    model_type = MODEL_TYPE

    def __init__(self, backbone: dict | None = None, pooling: str = "mean", **kwargs):
        self.backbone = dict(backbone or {})
        self.pooling = pooling
        super().__init__(**kwargs)
        # Code that sizes things from the config (feature caches, exports) finds the width where it looks.
        self.hidden_size = self.backbone.get("hidden_size", self.backbone.get("d_model"))
        self.num_hidden_layers = self.backbone.get("num_hidden_layers", self.backbone.get("n_layer"))

    def backbone_config(self) -> PretrainedConfig:
        settings = dict(self.backbone)
        return AutoConfig.for_model(settings.pop("model_type"), **settings)


def pool(hidden: torch.Tensor, mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """(batch, tokens, width) token states → (batch, width), padding (mask 0) left out."""
    if mask is None:
        mask = hidden.new_ones(hidden.shape[:2])
    mask = mask.to(hidden.dtype)
    if how == "cls":
        return hidden[:, 0]
    if how == "mean":  # sentence-transformers' mean: padding excluded, at least one token counted
        return (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1e-9)
    if how == "max":  # padding can never win (sentence-transformers sets it to a large negative)
        return hidden.masked_fill(mask.unsqueeze(-1) == 0, torch.finfo(hidden.dtype).min).max(1).values
    if how == "last":  # the last non-padding token of each row, for left- and right-padded batches alike
        positions = torch.arange(mask.shape[1], device=mask.device)
        last = (positions * mask.long()).argmax(1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"unknown pooling '{how}' (known: {', '.join(POOLINGS)})")


class PooledForSequenceClassification(PreTrainedModel):
    config_class = PooledConfig
    base_model_prefix = "backbone"
    supports_gradient_checkpointing = True

    def __init__(self, config: PooledConfig, backbone: nn.Module | None = None):
        super().__init__(config)
        self.backbone = backbone if backbone is not None else AutoModel.from_config(config.backbone_config())
        dropout = config.backbone.get("classifier_dropout") or config.backbone.get("hidden_dropout_prob", 0.1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self._init_head()
        self.post_init()

    def _init_head(self) -> None:
        std = self.config.backbone.get("initializer_range", 0.02)
        nn.init.normal_(self.classifier.weight, std=std)
        nn.init.zeros_(self.classifier.bias)

    def _init_weights(self, module: nn.Module) -> None:
        # The backbone initialises itself (its own class knows how); only the head is ours.
        if module is getattr(self, "classifier", None):
            self._init_head()

    @classmethod
    def from_backbone(cls, folder, pooling: str, trust_remote_code: bool = False,
                      pretrained: bool = True, load: dict | None = None, **kwargs) -> PooledForSequenceClassification:
        """A new classifier over the encoder in `folder` (its pretrained weights, or random ones); `load` are
        from_pretrained's loading settings (dtype, quantization); `kwargs` are label settings (num_labels,
        id2label, label2id, problem_type)."""
        backbone_cfg = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        config = PooledConfig(backbone=backbone_cfg.to_dict(), pooling=pooling, **kwargs)
        if pretrained:
            backbone = AutoModel.from_pretrained(folder, trust_remote_code=trust_remote_code, use_safetensors=True,
                                                 **(load or {}))
        else:
            backbone = AutoModel.from_config(backbone_cfg, trust_remote_code=trust_remote_code)
        return cls(config, backbone)

    def save_pretrained(self, *args, **kwargs):
        # The backbone may have changed since the config was made (a distilled student keeps fewer layers, a pruned
        # vocabulary shrinks the embeddings): what is saved must rebuild it as it is now.
        settings = self.backbone.config.to_dict()
        if "vocab_size" in settings:
            settings["vocab_size"] = self.backbone.get_input_embeddings().num_embeddings
        self.config.backbone = settings
        return super().save_pretrained(*args, **kwargs)

    def forward(self, input_ids=None, attention_mask=None, labels=None, return_dict=None, **kwargs):
        kwargs.pop("output_hidden_states", None)
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        pooled = pool(out.last_hidden_state, attention_mask, self.config.pooling)
        logits = self.classifier(self.dropout(pooled))
        loss = _loss(logits, labels, self.config) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


class BackboneForTokenClassification(PooledForSequenceClassification):
    """A tag per token (NER) from any `AutoModel` backbone: one linear layer over each token's state, for the
    architectures transformers has no token classifier for (Gemma 3's decoder, for one). A causal decoder's
    state at a token has read only what comes before it; the tags are learnt all the same."""

    def forward(self, input_ids=None, attention_mask=None, labels=None, return_dict=None, **kwargs):
        kwargs.pop("output_hidden_states", None)
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        logits = self.classifier(self.dropout(out.last_hidden_state))
        loss = nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100) \
            if labels is not None else None
        return TokenClassifierOutput(loss=loss, logits=logits)


def _loss(logits: torch.Tensor, labels: torch.Tensor, config: PooledConfig) -> torch.Tensor:
    """transformers' sequence-classification loss for the config's problem type."""
    kind = config.problem_type or ("regression" if config.num_labels == 1 else "single_label_classification")
    if kind == "regression":
        return nn.functional.mse_loss(logits.squeeze(-1), labels.float())
    if kind == "multi_label_classification":
        return nn.functional.binary_cross_entropy_with_logits(logits, labels.float())
    return nn.functional.cross_entropy(logits.view(-1, config.num_labels), labels.view(-1))


def register() -> None:
    """Make `AutoConfig` and `AutoModelForSequenceClassification` know the model type (idempotent)."""
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if MODEL_TYPE not in CONFIG_MAPPING:
        AutoConfig.register(MODEL_TYPE, PooledConfig)
        AutoModelForSequenceClassification.register(PooledConfig, PooledForSequenceClassification)
        AutoModelForTokenClassification.register(PooledConfig, BackboneForTokenClassification)


def save_code(folder: Path) -> None:
    """Put this file beside an exported model and name it in config.json's `auto_map` (trust_remote_code)."""
    folder = Path(folder)
    (folder / f"{MODULE}.py").write_text(Path(__file__).read_text(encoding="utf-8"), encoding="utf-8")
    path = folder / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["auto_map"] = {"AutoConfig": f"{MODULE}.PooledConfig",
                          "AutoModelForSequenceClassification": f"{MODULE}.PooledForSequenceClassification",
                          "AutoModelForTokenClassification": f"{MODULE}.BackboneForTokenClassification"}
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")


def sentence_pooling(folder) -> str | None:
    """The pooling a sentence-transformers model folder declares (modules.json and its Pooling module's
    config.json): cls, mean, max or last; None for a folder that is no sentence-transformers model."""
    folder = Path(folder)
    try:
        modules = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
        pooling = next(m for m in modules if m.get("type", "").endswith("models.Pooling"))
        settings = json.loads((folder / pooling.get("path", "") / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, StopIteration, AttributeError, TypeError):
        return None
    if settings.get("pooling_mode"):  # newer files name the mode directly
        mode = str(settings["pooling_mode"])
        return {"lasttoken": "last", "mean_sqrt_len_tokens": "mean"}.get(mode, mode) \
            if mode in (*POOLINGS, "lasttoken", "mean_sqrt_len_tokens") else None
    for key, mode in (("pooling_mode_cls_token", "cls"), ("pooling_mode_mean_tokens", "mean"),
                      ("pooling_mode_max_tokens", "max"), ("pooling_mode_lasttoken", "last"),
                      ("pooling_mode_mean_sqrt_len_tokens", "mean")):
        if settings.get(key):
            return mode
    return None
