"""Image classification (one label per image) and image multi-label: the text tasks' heads, losses and metrics on
a timm network's pooled features.

What differs from text is only how examples read and become model inputs. Examples carry the decoded picture
(tunelab.data.images); an item keeps it with the transform that turns it into `pixel_values`: the model's own
evaluation transform (resize, centre crop, normalise, from its pretrained_cfg), or for the training split with
train.augment set, the random augmentation before it. Transforms run when a batch is collated, so augmented views
are drawn anew for every batch from torch's global random stream: seeded by train.seed, saved in every
checkpoint, so that a run and its resumption see the same views. The evaluation and test splits never get the
augmenting transform.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tunelab.config import DataConfig, ModelConfig
from tunelab.data.images import read_image_examples
from tunelab.data.load import Example, Problems
from tunelab.tasks.base import Space
from tunelab.tasks.classification import Classification, Multilabel

PIXELS = 16  # the pixel baseline's logistic regression reads each image as PIXELS x PIXELS grey levels


class ImageTask:
    """The image side of a classification task (mixed in before the text task it reuses)."""

    modality = "image"
    model_class = "AutoModelForImageClassification"
    default_layer_decay = 0.8
    eval_batch_size = 32

    def read(self, path, cfg: DataConfig, need_label: bool = True, problems: Problems | None = None) -> list[Example]:
        return read_image_examples(path, cfg, need_label, self.parse_label, self.label_key, problems=problems)

    def processor(self, folder: Path, trust_remote_code: bool = False):
        from tunelab.models.vision import ImageProcessor

        return ImageProcessor(folder)

    def build(self, cfg: ModelConfig, folder: Path, space: Space, pretrained: bool, quantize_on=None):
        from transformers import AutoConfig, AutoModelForImageClassification

        from tunelab.errors import UserError
        from tunelab.extras import need
        from tunelab.models.vision import is_image_model

        need("timm", "vision", "image models")
        if not is_image_model(folder):
            raise UserError(f"'{cfg.name}' is not an image model (a timm_wrapper folder, or efficientnet-lite0)",
                            "--model")
        kwargs = self.model_kwargs(space)
        if pretrained:  # a new head: the checkpoint's (ImageNet's 1,000 classes) does not fit the labels
            model = AutoModelForImageClassification.from_pretrained(folder, use_safetensors=True,
                                                                    ignore_mismatched_sizes=True, **kwargs)
        else:
            model = AutoModelForImageClassification.from_config(AutoConfig.from_pretrained(folder, **kwargs))
        # timm_wrapper's config.json names the classes in `label_names` (the base model's ImageNet names, which
        # would otherwise be saved again beside the new head): ours
        model.config.label_names = list(space.labels)
        return model

    def encode(self, processor, examples: list[Example], space: Space, max_length: int, transform=None) -> list[dict]:
        """Items of pictures and the transform that makes their pixel_values (the evaluation one by default)."""
        transform = transform or processor.eval_transform()
        return [self.labelled({"_image": e.image, "_transform": transform}, e, space) for e in examples]

    def content_key(self, example: Example) -> list:
        """The picture's pixels (a digest), not its file name: a file replaced under the same name is new."""
        import hashlib

        return [hashlib.sha256(example.image.tobytes()).hexdigest(), list(example.image.size)]

    def length(self, item: dict) -> int:
        return 1

    def collate(self, items: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
        batch = {"pixel_values": torch.stack([it["_transform"](it["_image"]) for it in items])}
        if "labels" in items[0]:
            batch["labels"] = torch.tensor([it["labels"] for it in items])
        return batch

    def replayable(self, items: list[dict]) -> bool:
        """Does every item give the same inputs each time (no random augmentation)?"""
        return not any(getattr(it["_transform"], "augments", False) for it in items)

    def eval_loss(self, outputs, items, space) -> float:
        labels = torch.tensor([it["labels"] for it in items])
        return float(self.loss(torch.stack(outputs).float(), labels)) / max(len(items), 1)

    def probe_features(self, model_cfg: ModelConfig, item_lists: list[list[dict]], device) -> list[np.ndarray]:
        """The pretrained network's pooled features (its own global pooling, no head) for each list of items."""
        from transformers import AutoModel
        from transformers.utils import logging

        from tunelab.models import folder_of

        logging.set_verbosity_error()  # its report of the classifier left unused is expected: features only
        logging.disable_progress_bar()
        encoder = AutoModel.from_pretrained(folder_of(model_cfg), use_safetensors=True).to(device).eval()
        out = []
        with torch.no_grad():
            for items in item_lists:
                rows = [encoder(**{"pixel_values": self.collate(items[i:i + 32], 0)["pixel_values"].to(device)}
                                ).pooler_output.float().cpu() for i in range(0, len(items), 32)]
                out.append(torch.cat(rows).numpy() if rows else np.zeros((0, 1)))
        return out

    def more_baselines(self, train_items: list[dict], eval_items: list[dict], space: Space) -> dict[str, list]:
        """A logistic regression on the raw pixels (grey levels at PIXELS x PIXELS): what any learner can take
        from the pictures without a pretrained network."""
        def pixels(items):
            return np.stack([np.asarray(it["_image"].convert("L").resize((PIXELS, PIXELS)), dtype=np.float32)
                             .ravel() / 255 for it in items])
        return {"pixel_logistic": self.probe(pixels(train_items), train_items, pixels(eval_items), eval_items,
                                             space)}

    def finalize(self, model, space: Space) -> None:
        model.config.tunelab_task = self.name

    def space_of(self, config) -> Space:
        labels = [config.id2label[i] for i in range(len(config.id2label))]
        return Space(labels=labels, threshold=getattr(config, "tunelab_threshold", 0.5))

    def row_base(self, example: Example) -> dict:
        return {"image": example.text}


class ImageClassification(ImageTask, Classification):
    name = "image-classification"
    tunings = ("scratch", "head", "partial", "full", "lora", "distill")

    def predict_row(self, example, pred, output, space):
        row = super().predict_row(example, pred, output, space)
        row.pop("text", None)
        return {**self.row_base(example), **row}


class ImageMultilabel(ImageTask, Multilabel):
    name = "image-multilabel"
    tunings = ("scratch", "head", "partial", "full", "lora", "distill")

    def finalize(self, model, space: Space) -> None:
        model.config.tunelab_task = self.name
        model.config.tunelab_threshold = space.threshold

    def predict_row(self, example, pred, output, space):
        row = super().predict_row(example, pred, output, space)
        row.pop("text", None)
        return {**self.row_base(example), **row}
