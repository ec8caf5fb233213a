"""Image networks by their library's name: `timm:NAME[.TAG]` and `torchvision:NAME[.WEIGHTS]`.

The weights come from where that library keeps them, fetched by the library's own code: timm's from the Hugging
Face cache (`HF_HOME`; downloaded there first on a connected machine, read from it offline with
`HF_HUB_OFFLINE=1`), torchvision's from torch's hub cache (`TORCH_HOME`/hub/checkpoints, likewise). Each is
converted once into a timm_wrapper folder under $TUNELAB_CACHE/timm or /torchvision (model.safetensors and a
config.json whose pretrained_cfg says how images are pre-processed), the format every image run uses.

Pickles: timm reads safetensors where the Hub has them and otherwise `torch.load(weights_only=True)`; torchvision's
own loader would unpickle its checkpoints in full (torch.hub's default), so it is called with weights_only=True.

torchvision networks run as the timm network of the same architecture: timm implements these torchvision families
with the same tensors in the same order (ResNet, ResNeXt, Wide ResNet, DenseNet, EfficientNet B0-B7, MobileNetV2:
TWINS). The conversion maps the tensors by position and then checks that both networks give the same outputs on
the same input. Other torchvision networks (VGG, ConvNeXt, ViT, Swin, ...: timm lays them out differently) are
refused before anything is fetched, pointing to timm's own weights for them. Pre-processing is the one torchvision
documents for those weights (resize, centre crop, mean, standard deviation, interpolation).
"""
from __future__ import annotations

from pathlib import Path

from tunelab.errors import UserError
from tunelab.extras import need

LIBRARIES = ("timm", "torchvision")

# The torchvision networks whose timm twin holds the same tensors in the same order and computes the same outputs
# (checked for every one of them with random weights; tests/test_image_models.py checks a few on every run).
TWINS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d",
         "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2", "densenet121", "densenet161", "densenet169",
         "densenet201", *(f"efficientnet_b{i}" for i in range(8)), "mobilenet_v2")
FAMILIES = "ResNet, ResNeXt, Wide ResNet, DenseNet, EfficientNet B0-B7, MobileNetV2"
TIMM_TWIN = {"mobilenet_v2": "mobilenetv2_100"}  # twins under another name (the rest share theirs)


def is_library_name(name: str) -> bool:
    return name.partition(":")[0] in LIBRARIES and ":" in name


def prepare_named(name: str, force: bool = False) -> Path:
    """The cached timm_wrapper folder of a library name, converted on first use (or again with `force`)."""
    from tunelab.io import atomic_dir
    from tunelab.models.gguf import cache_root, is_prepared

    library, _, spec = name.partition(":")
    if not spec or "/" in spec or "\\" in spec or spec.startswith("."):
        raise UserError(f"'{name}' is not a {library} model name ({library}:NAME)", "--model")
    folder = cache_root() / library / spec
    if force or not is_prepared(folder):
        convert = {"timm": _from_timm, "torchvision": _from_torchvision}[library]
        atomic_dir(folder, lambda out: convert(spec, out))
    return folder


def _from_timm(spec: str, out: Path) -> None:
    """timm's pretrained network `spec` (architecture[.tag]) with its own pretrained_cfg."""
    from tunelab.models.vision import save_timm

    timm = need("timm", "vision", "image models")
    arch = spec.partition(".")[0]
    if not timm.is_model(arch):
        raise UserError(f"timm has no architecture '{arch}'{_close(timm.list_models(), arch)}", "--model")
    if not timm.list_pretrained(spec if "." in spec else f"{spec}.*"):
        raise UserError(f"timm has no pretrained weights named '{spec}'"
                        f"{_close(timm.list_pretrained(f'{arch}.*'), arch)}", "--model")
    try:
        net = timm.create_model(spec, pretrained=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"the weights of timm's {spec} are not on this machine and could not be downloaded "
                        f"({_first_line(e)}); on a connected machine the first run fetches them into the Hugging "
                        "Face cache (HF_HOME), which can then be copied here", "--model") from None
    cfg = net.pretrained_cfg
    save_timm(net, out, source=f"timm {spec} (weights: {cfg.get('hf_hub_id') or cfg.get('url') or 'timm'})")


def _from_torchvision(spec: str, out: Path) -> None:
    """torchvision's weights `spec` (architecture[.WEIGHTS], DEFAULT without) on timm's twin of the network."""
    import torch
    from torchvision import models

    from tunelab.models.vision import save_timm

    timm = need("timm", "vision", "image models")
    arch, _, tag = spec.partition(".")
    known = models.list_models(module=models)  # the classification networks
    if arch not in known:
        raise UserError(f"torchvision has no classification network '{arch}'{_close(known, arch)}", "--model")
    enum = models.get_model_weights(arch)
    weights = enum.DEFAULT if not tag else getattr(enum, tag, None)
    if weights is None:
        raise UserError(f"torchvision's {arch} has no weights '{tag}' (it has {', '.join(w.name for w in enum)})",
                        "--model")
    if arch not in TWINS:
        raise UserError(f"torchvision's {arch} is not one of the families tunelab runs as timm's twin ({FAMILIES}); "
                        f"use timm's weights instead (--model timm:NAME{_close(timm.list_pretrained(), arch)})",
                        "--model")
    twin = TIMM_TWIN.get(arch, arch)
    try:
        state = weights.get_state_dict(progress=False, weights_only=True, check_hash=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"the weights {arch}.{weights.name} are not on this machine and could not be downloaded "
                        f"({_first_line(e)}); torchvision keeps them in {torch.hub.get_dir()}/checkpoints",
                        "--model") from None
    classes = len(weights.meta["categories"])
    original = models.get_model(arch, weights=None, num_classes=classes).eval()
    original.load_state_dict(state)
    net = timm.create_model(twin, pretrained=False, num_classes=classes).eval()
    _copy_by_position(original, net, f"torchvision's {arch}", f"timm's {twin}")
    net.pretrained_cfg = {**net.pretrained_cfg, **_preprocessing(weights), "num_classes": classes}
    save_timm(net, out, source=f"torchvision {arch}.{weights.name} ({weights.url})")


def _copy_by_position(source, target, source_name: str, target_name: str) -> None:
    """Load `source`'s tensors into `target` by position, then make sure the two compute the same function."""
    import torch

    theirs, ours = source.state_dict(), target.state_dict()
    if len(theirs) != len(ours) or any(a.shape != b.shape for a, b in zip(theirs.values(), ours.values())):
        raise UserError(f"{source_name} and {target_name} lay out their weights differently: tunelab cannot run "
                        f"it; use timm's weights instead (--model timm:NAME)", "--model")
    target.load_state_dict(dict(zip(ours, theirs.values())))
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = source(x), target(x)
    if not torch.allclose(expected, got, atol=1e-3 * float(expected.abs().max()) + 1e-5):
        raise UserError(f"{target_name} does not reproduce {source_name} with its weights (largest difference "
                        f"{float((expected - got).abs().max()):.3g}): tunelab cannot run it; use timm's weights "
                        "instead (--model timm:NAME)", "--model")


def _preprocessing(weights) -> dict:
    """torchvision's documented evaluation transform of `weights` as timm's pretrained_cfg fields."""
    t = weights.transforms()
    crop, resize = t.crop_size[0], t.resize_size[0]
    return {"input_size": [3, crop, crop], "crop_pct": crop / resize, "crop_mode": "center",
            "interpolation": t.interpolation.value, "mean": list(t.mean), "std": list(t.std)}


def _close(names: list[str], wanted: str) -> str:
    import difflib

    close = difflib.get_close_matches(wanted, names, n=5, cutoff=0.6)
    return f" (close: {', '.join(close)})" if close else ""


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
