"""Use a finished run: predict with it, or evaluate it on a labelled file."""
from __future__ import annotations

from pathlib import Path

import torch

from tunelab import speed
from tunelab.errors import UserError
from tunelab.evaluate import evaluate, predict_outputs
from tunelab.evaluate.stats import bootstrap_ci
from tunelab.io import atomic_write_json, atomic_write_jsonl
from tunelab.tasks import runs


def load_run(run_dir: str | Path, runtime: str = "auto", device: str = "cpu"):
    """(config, task, model, tokenizer, space) of a complete run folder; `runtime` int8 quantizes the model, onnx
    answers with RUN/onnx/model.onnx through ONNX Runtime (see tunelab.export.compress), auto is onnx where the run
    has that export and torch otherwise. The torch runtime runs on `device` (int8 and onnx are CPU runtimes)."""
    from tunelab.models import device_for

    where = device_for(device)
    cfg, task, model, tokenizer, space = runs.load_run(run_dir)
    run = Path(run_dir)
    runtime = _resolve(run, task, runtime) if where.type == "cpu" else "torch" if runtime == "auto" else runtime
    if runtime != "torch" and where.type != "cpu":
        raise UserError(f"the {runtime} runtime runs on the CPU; on {device} use --runtime torch", "--runtime")
    model.to(where)
    if not task.judged_by_start and task.modality == "text" and runtime != "onnx":  # (onnx answers from its own graph, exported from a cut model)
        # a sequence classifier's last layer need only compute the first position: exact, checked on a probe
        speed.cut_to_first_token(model, speed.sample_inputs(tokenizer))
    return cfg, task, _runtime(model, run, runtime, task), tokenizer, space


def _sequence_classifier(task) -> bool:
    """Does the task answer with one label (or number) per text: what the int8 and onnx runtimes serve."""
    return not task.judged_by_start and task.name != "ner"


def _resolve(run: Path, task, runtime: str) -> str:
    """auto: ONNX Runtime for a sequence classifier exported with `tunelab export RUN --onnx` after its weights were
    last written (the export is checked against the fp32 model when it is written; in bench/infer.py it had 1.9-2.8x
    the batch throughput of plain transformers and 0.45-0.48x its single-request latency), PyTorch otherwise."""
    if runtime != "auto":
        return runtime
    onnx = run / "onnx" / "model.onnx"
    return "onnx" if _sequence_classifier(task) and onnx.is_file() and _fresh(onnx, run) else "torch"


def _fresh(export: Path, run: Path) -> bool:
    """Whether an export is at least as new as the model's files: an older one (the run trained on after it)
    would answer for old weights."""
    return export.stat().st_mtime >= max(f.stat().st_mtime for f in (run / "model").iterdir() if f.is_file())


def _runtime(model, run: Path, runtime: str, task):
    from tunelab.export.compress import OnnxClassifier, check_runtime, quantize_int8

    check_runtime(runtime)
    if runtime == "torch":
        return model
    if not _sequence_classifier(task):
        raise UserError(f"the {runtime} runtime is for sequence classifiers, not {task.name} runs", "--runtime")
    if runtime == "int8" and task.modality == "image":
        return OnnxClassifier(_checked_image_int8(run))
    if runtime == "int8":
        return quantize_int8(model, _smoothing(run))
    if not (run / "onnx" / "model.onnx").is_file():
        raise UserError("no onnx/model.onnx in the run: make it with `tunelab export RUN --onnx`", str(run))
    return OnnxClassifier(run / "onnx" / "model.onnx")


SMOOTHING = Path("int8") / "smoothing.safetensors"  # the int8 input scales that `tunelab export --int8` calibrates
IMAGE_INT8 = Path("int8") / "model.onnx"  # an image network's static int8 graph, kept by `tunelab export --int8`
MIN_AGREEMENT = 0.99  # the share of eval predictions an image network's int8 graph must keep to be kept
CALIBRATION_IMAGES = 100


def _checked_image_int8(run: Path) -> Path:
    graph = run / IMAGE_INT8
    if not graph.is_file():
        raise UserError(f"no {IMAGE_INT8} in the run: make it with `tunelab export RUN --int8` (kept only where it "
                        f"agrees with fp32 on the eval images)", str(run))
    if not _fresh(graph, run):
        raise UserError(f"{IMAGE_INT8} is older than the run's model: make it again with `tunelab export RUN "
                        "--int8`", str(run))
    return graph


def _smoothing(run: Path) -> dict | None:
    from safetensors.torch import load_file

    return load_file(str(run / SMOOTHING)) if (run / SMOOTHING).is_file() else None


def predict(run_dir: str | Path, input_path: str | Path, output: str | Path | None = None,
            runtime: str = "auto", device: str = "cpu") -> Path:
    cfg, task, model, tokenizer, space = load_run(run_dir, runtime, device)
    if task.judged_by_start:
        raise UserError(f"a {cfg.task} run does not predict labels; use `tunelab generate {run_dir} --prompt ...` "
                        "to talk to it, or `tunelab eval` to score it on a file", str(run_dir))
    rows = predict_examples((cfg, task, model, tokenizer, space), task.read(input_path, cfg.data, need_label=False))
    out = Path(output) if output else Path(run_dir) / "predictions.jsonl"
    atomic_write_jsonl(out, rows)
    return out


def predict_examples(loaded, examples) -> list[dict]:
    """One prediction row per example (label and probabilities, labels, value or entities) from `load_run`'s tuple."""
    cfg, task, model, tokenizer, space = loaded
    items = task.encode(tokenizer, examples, space, cfg.data.max_length)
    outputs = predict_outputs(task, model, items, tokenizer.pad_token_id or 0, _device_of(model))
    preds = task.decode(outputs, items, space)
    return [task.predict_row(e, p, o, space) for e, p, o in zip(examples, preds, outputs)]


def _device_of(model) -> torch.device:
    """Where a loaded model runs: its parameters' device (ONNX and int8 runtimes: the CPU)."""
    params = getattr(model, "parameters", None)
    first = next(params(), None) if callable(params) else None
    return first.device if first is not None else torch.device("cpu")


def evaluate_file(run_dir: str | Path, data_path: str | Path, output: str | Path | None = None,
                  device: str = "cpu") -> dict:
    cfg, task, model, tokenizer, space = load_run(run_dir, "auto", device)
    examples = task.read(data_path, cfg.data)
    task.check(examples, space)
    items = task.encode(tokenizer, examples, space, cfg.data.max_length)
    pad_id = tokenizer.pad_token_id or 0
    if task.uses_reference:  # dpo rewards are relative to the reference: the model the run started from
        from tunelab.models import build_model

        task.prepare_items(build_model(cfg.model, task, space, pretrained=True).to(_device_of(model)), items, pad_id,
                           _device_of(model))
    m = evaluate(task, model, items, space, pad_id, _device_of(model))
    metrics = {k: v for k, v in m.items() if not k.startswith("_")}
    metrics["ci95"] = bootstrap_ci(task, m["_preds"], [it["_gold"] for it in items], space, cfg.eval.bootstrap)
    metrics.update(m["_details"], examples=len(items), data=str(data_path))
    out = Path(output) if output else Path(run_dir) / f"eval-{Path(data_path).stem}.json"
    atomic_write_json(out, metrics)
    return metrics


def compress(run_dir: str | Path, int8: bool, onnx: bool, min_agreement: float | None = None) -> dict:
    """Make and check the int8 and/or ONNX variants of a classifier run against its fp32 model on the run's eval
    examples: agreement of the predicted labels, the largest probability difference, size and speed.
    Written to RUN/compression.json. An image network's int8 graph is kept only where its agreement reaches
    `min_agreement` (otherwise the figures are written and the export refused)."""
    from tunelab.export import measure_inference
    from tunelab.export.compress import export_onnx, state_mb

    run = Path(run_dir)
    # the fp32 torch model, even where an earlier export would make auto answer with ONNX Runtime
    cfg, task, model, tokenizer, space = load_run(run, "torch")
    if not (int8 or onnx):
        raise UserError("choose --int8, --onnx or both", "tunelab export")
    if task.outputs_are not in ("softmax", "sigmoid"):
        raise UserError(f"compression is checked on classifiers, not {task.name} runs", str(run))
    min_agreement = MIN_AGREEMENT if min_agreement is None else min_agreement
    if not 0 < min_agreement <= 1:
        raise UserError(f"--min-agreement is a share of the predictions, in (0, 1], not {min_agreement}",
                        "--min-agreement")
    if onnx:
        export_onnx(model, tokenizer, run / "onnx" / "model.onnx")
    examples = task.read(cfg.data.eval or cfg.data.train, cfg.data, need_label=False)[:512]
    items = task.encode(tokenizer, examples, space, cfg.data.max_length)
    pad = tokenizer.pad_token_id or 0

    def probs(m, on=items):
        out = torch.stack(predict_outputs(task, m, on, pad, torch.device("cpu")))
        return torch.sigmoid(out) if task.outputs_are == "sigmoid" else torch.softmax(out, -1)

    def figures(m, mb: float) -> dict:
        p = probs(m)
        same = (p.argmax(-1) == base.argmax(-1)) if task.outputs_are == "softmax" else \
            ((p > space.threshold) == (base > space.threshold)).all(-1)  # every label's decision the same
        return {"agreement": int(same.sum()) / len(same), "max_abs_difference": float((p - base).abs().max()),
                "model_mb": mb,
                **measure_inference(m, items, pad, torch.device("cpu"), task=task)}

    base = probs(model)
    result = {"examples": len(items), "data": str(cfg.data.eval or cfg.data.train),
              "fp32": {"model_mb": state_mb(model), **measure_inference(model, items, pad, torch.device("cpu"),
                                                                        task=task)}}
    if int8 and task.modality == "image":
        result["int8"] = _image_int8(run, cfg, task, model, tokenizer, space, figures, min_agreement,
                                     run / "onnx" / "model.onnx" if onnx else None)
    elif int8:
        result["int8_smoothing"] = _calibrate(run, cfg, task, model, tokenizer, space, probs)
        quantized = _runtime(model, run, "int8", task)  # the loaded fp32 model stays as it is (a copy is quantized)
        result["int8"] = figures(quantized, state_mb(quantized))
    if onnx:
        result["onnx"] = figures(_runtime(model, run, "onnx", task), (run / "onnx" / "model.onnx").stat().st_size / 2**20)
    atomic_write_json(run / "compression.json", result)
    if not result.get("int8", {}).get("kept", True):
        r = result["int8"]
        raise UserError(f"the int8 graph agreed with fp32 on {r['agreement']:.1%} of the {len(items)} eval images, "
                        f"below --min-agreement {min_agreement:g}: not kept (its figures are in compression.json); "
                        "8-bit weights and activations change this network's predictions too often here: use "
                        "--onnx", "--int8")
    return result


def _image_int8(run: Path, cfg, task, model, tokenizer, space, figures, minimum: float,
                fp32: Path | None) -> dict:
    """An image network's static int8 graph (export.compress.quantize_image_onnx) calibrated on up to 100 training
    images spread over the file, checked like every variant; written to RUN/int8/model.onnx only where it agrees
    with fp32 on at least `minimum` of the eval images, and an older one removed where it does not (it would
    answer for weights it was not checked against). It is made from `fp32`, the ONNX graph this export just
    wrote, or (without --onnx) from one exported to a temporary folder."""
    import tempfile

    from tunelab.export.compress import OnnxClassifier, export_onnx, quantize_image_onnx
    from tunelab.io import atomic_write_bytes

    train = task.read(cfg.data.train, cfg.data, need_label=False)
    spread = train[::max(1, len(train) // CALIBRATION_IMAGES)][:CALIBRATION_IMAGES]  # folders come class by class
    pixels = task.collate(task.encode(tokenizer, spread, space, cfg.data.max_length), 0)["pixel_values"]
    with tempfile.TemporaryDirectory() as tmp:
        candidate = Path(tmp) / "int8.onnx"
        if fp32 is None:
            fp32 = Path(tmp) / "model.onnx"
            export_onnx(model, tokenizer, fp32)
        quantize_image_onnx(fp32, pixels, candidate)
        found = figures(OnnxClassifier(candidate), candidate.stat().st_size / 2**20)
        found.update(calibration_images=len(spread), min_agreement=minimum, kept=found["agreement"] >= minimum)
        if found["kept"]:
            atomic_write_bytes(run / IMAGE_INT8, candidate.read_bytes())
        else:
            (run / IMAGE_INT8).unlink(missing_ok=True)
    return found


def _calibrate(run: Path, cfg, task, model, tokenizer, space, probs) -> dict:
    """Choose and save the int8 smoothing on up to 1,024 training texts (not the texts the variant is checked on):
    the input maxima need enough texts to meet the rare large values."""
    from safetensors.torch import save

    from tunelab.export.compress import calibrate_int8
    from tunelab.io import atomic_write_bytes

    texts = task.read(cfg.data.train, cfg.data, need_label=False)[:1024]
    calibration = task.encode(tokenizer, texts, space, cfg.data.max_length)

    def log_probs(m):  # per class, or per label (yes, no) for multilabel
        p = probs(m, calibration).clamp(1e-7, 1 - 1e-7)
        return (torch.stack([p, 1 - p], -1) if task.name == "multilabel" else p).log()

    alpha, scales, kl = calibrate_int8(model, log_probs)
    (run / SMOOTHING).parent.mkdir(exist_ok=True)
    atomic_write_bytes(run / SMOOTHING, save({k: v.contiguous() for k, v in scales.items()}))
    return {"alpha": alpha, "calibration_examples": len(calibration), "kl_by_alpha": kl}


def score_records(loaded, records: list[dict]) -> list[float]:
    """A reward run's scores of parsed {"prompt", "response"} records (RewardModel.parse_scored), from `load_run`'s
    tuple (its callers have refused any other kind of run)."""
    cfg, task, model, tokenizer, space = loaded
    return task.score_responses(model, tokenizer, records, cfg.data.max_length, _device_of(model))


def score(run_dir: str | Path, input_path: str | Path, output: str | Path | None, device: str = "cpu") -> Path:
    """`tunelab score`: each {"prompt", "response"} of a JSONL file with the reward run's score, as JSONL."""
    from tunelab.data.chat import read_records

    loaded = load_run(run_dir, "torch", device)
    cfg, task = loaded[0], loaded[1]
    if task.name != "reward":
        raise UserError(f"a {task.name} run: only reward runs score responses", str(run_dir))
    examples = read_records(input_path, cfg.data, task.parse_scored)
    records = [e.label for e in examples]
    scores = score_records(loaded, records)
    out = Path(output) if output else Path(run_dir) / "scores.jsonl"
    atomic_write_jsonl(out, [{"prompt": r["prompt"], "response": r["response"], "score": s}
                             for r, s in zip(records, scores)])
    return out
