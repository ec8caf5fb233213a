"""Image networks named by their library (tunelab.models.libraries): timm's from the Hugging Face cache, offline;
torchvision's from torch's hub cache, run as timm's twin with torchvision's own pre-processing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import digit_images, hub_cache, write_folder
from tunelab.cli import main
from tunelab.errors import UserError


def _tunelab(*args, env: dict) -> subprocess.CompletedProcess:
    """The CLI in a fresh interpreter: huggingface_hub reads HF_HOME and HF_HUB_OFFLINE when it is imported."""
    return subprocess.run([sys.executable, "-m", "tunelab", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def test_a_timm_name_converts_offline_from_the_hugging_face_cache_and_trains(tmp_path, monkeypatch):
    import timm
    from safetensors.torch import load_file, save

    torch.manual_seed(0)
    weights = {k: v.contiguous() for k, v in timm.create_model("test_efficientnet").state_dict().items()}
    hub_cache(tmp_path / "hf", "timm/test_efficientnet.r160_in1k", {"model.safetensors": save(weights)})
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "TUNELAB_CACHE": str(tmp_path / "cache")}

    done = _tunelab("models", "prepare", "timm:test_efficientnet.r160_in1k", env=env)
    assert done.returncode == 0, done.stderr
    folder = tmp_path / "cache" / "timm" / "test_efficientnet.r160_in1k"
    converted = load_file(folder / "model.safetensors")
    assert all(torch.equal(converted[f"timm_model.{k}"], v) for k, v in weights.items())  # the cache's weights
    config = json.loads((folder / "config.json").read_text())
    assert config["pretrained_cfg"]["input_size"] == [3, 160, 160]  # timm's pre-processing for these weights
    assert config["pretrained_cfg"]["crop_pct"] == 0.95 and "hf_hub_id" not in config["pretrained_cfg"]

    missing = _tunelab("models", "prepare", "timm:test_resnet.r160_in1k", env=env)  # not in the cache, offline
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "timm's test_resnet.r160_in1k are not on this machine" in missing.stderr

    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    data = {"train": write_folder(tmp_path / "train", digit_images(8, 0)),
            "eval": write_folder(tmp_path / "eval", digit_images(4, 100))}
    assert main(["train", "--task", "image-classification", "--model", "timm:test_efficientnet.r160_in1k",
                 "--tuning", "full", "--epochs", "1", "--train", str(data["train"]), "--eval", str(data["eval"]),
                 "--output", str(tmp_path / "run"), "--train.progress", "false", "--eval.bootstrap", "0"]) == 0
    saved = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert saved["architecture"] == "test_efficientnet" and saved["pretrained_cfg"]["input_size"] == [3, 160, 160]


@pytest.mark.parametrize("name, message", [
    ("timm:resnet_fifty", "timm has no architecture 'resnet_fifty' (close: "),
    ("timm:resnet18.nope", "timm has no pretrained weights named 'resnet18.nope' (close: "),
    ("torchvision:resnet_18", "torchvision has no classification network 'resnet_18' (close: resnet18"),
    ("torchvision:resnet18.IMAGENET9K", "torchvision's resnet18 has no weights 'IMAGENET9K' (it has "
                                        "IMAGENET1K_V1)"),
    ("torchvision:squeezenet1_0", "torchvision's squeezenet1_0 is not one of the families tunelab runs"),
    ("timm:../../etc", "is not a timm model name"),
])
def test_a_wrong_library_name_is_refused_before_anything_is_fetched(name, message, tmp_path, monkeypatch):
    from tunelab.models import resolve

    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(UserError) as e:
        resolve(name)
    assert message in str(e.value)
    assert not (tmp_path / "torch").exists()  # nothing was downloaded (or tried to be)


def test_a_torchvision_name_runs_as_its_timm_twin_with_torchvisions_preprocessing(tmp_path, monkeypatch):
    from PIL import Image
    from sklearn.datasets import load_sample_image
    from torchvision.models import ResNet18_Weights, resnet18
    from transformers import AutoModelForImageClassification

    from tunelab.models import resolve
    from tunelab.models.vision import ImageProcessor

    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.manual_seed(0)
    original = resnet18().eval()
    for m in original.modules():  # statistics as a trained network has them, not BatchNorm's 0 and 1
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    weights = ResNet18_Weights.IMAGENET1K_V1
    cached = tmp_path / "torch" / "hub" / "checkpoints" / Path(weights.url).name  # where torchvision keeps it
    cached.parent.mkdir(parents=True)
    torch.save(original.state_dict(), cached)

    folder = resolve("torchvision:resnet18")
    assert folder == tmp_path / "cache" / "torchvision" / "resnet18"
    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    picture = Image.fromarray(load_sample_image("flower.jpg"))
    ours = ImageProcessor(folder).eval_transform()(picture)
    theirs = weights.transforms()(picture)
    assert ours.shape == theirs.shape == (3, 224, 224)
    assert (ours - theirs).abs().mean() < 0.01  # resize 256, centre crop 224, ImageNet's mean and std
    with torch.no_grad():
        assert torch.allclose(model(pixel_values=theirs[None]).logits, original(theirs[None]), atol=1e-4)


@pytest.mark.parametrize("arch", ["mobilenet_v2", "efficientnet_b0", "densenet121"])
def test_the_twin_families_compute_what_torchvision_computes(arch):
    import timm
    from torchvision import models

    from tunelab.models.libraries import TIMM_TWIN, _copy_by_position

    torch.manual_seed(0)
    original = models.get_model(arch).eval()
    twin = timm.create_model(TIMM_TWIN.get(arch, arch)).eval()
    _copy_by_position(original, twin, arch, "its twin")  # raises unless the outputs agree
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert torch.allclose(original(x), twin(x), atol=1e-5)
