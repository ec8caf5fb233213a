"""Smaller, faster classifiers from a finished run: dynamic int8 quantization and an ONNX export (ONNX Runtime).

Each variant is checked against the fp32 model on the run's eval examples: prediction agreement and the largest
difference of any class probability, plus size and speed (`tunelab export RUN --int8 --onnx` → compression.json).

int8: every Linear layer gets int8 weights, one scale per output channel, and its input is quantized on the fly
(dynamic quantization). Per-tensor input scales are set by a few outlier channels (the GELU outputs feeding the
feed-forward's second layer above all), which cost MiniLM 4-8% of its tweet predictions. So `tunelab export
--int8` first migrates that range from the inputs into the weights (SmoothQuant, Xiao et al. 2023): per input
channel j, s_j = max|X_j|^α / max|W_j|^(1-α) from calibration texts (the run's training texts), the layer computes
(X / s) · (W · s)ᵀ, and α is the grid value whose int8 outputs differ least (KL) from fp32 on those texts. The
scales go to RUN/int8/smoothing.safetensors. int8 is applied when the run is loaded (`tunelab predict RUN --runtime
int8`): quantizing takes well under a second and keeps model files safetensors (a quantized state dict would be a
pickle); a run without the scales is quantized without smoothing. The ONNX graph is written to
RUN/onnx/model.onnx (weights inside, no pickle) and read by `tunelab predict RUN --runtime onnx`.

An image network's int8 is static instead (quantize_image_onnx): an ONNX graph with int8 convolutions, kept as
RUN/int8/model.onnx only where it agrees with fp32 well enough (tunelab.predict.compress).
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from types import SimpleNamespace

import torch
from torch import nn

from tunelab.errors import UserError
from tunelab.extras import need
from tunelab.io import atomic_write_bytes
from tunelab.speed import sample_inputs

RUNTIMES = ("torch", "int8", "onnx")


ALPHAS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))  # SmoothQuant strengths tried: 0.5, 0.55 … 0.95


class Smoothed(nn.Module):
    """A Linear layer whose input is divided per channel by `scale` and whose weight columns are multiplied by it:
    the same function, with the input's outlier range moved into the weights."""

    def __init__(self, linear: nn.Linear, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("inverse", 1 / scale)
        with torch.no_grad():
            linear.weight.mul_(scale)
        self.linear = linear

    def forward(self, x):
        return self.linear(x * self.inverse)


def quantize_int8(model: nn.Module, scales: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """A copy of the model whose Linear layers have per-channel int8 weights and inputs quantized on the fly,
    smoothed first by `scales` (Linear name → per-input-channel scale) where given."""
    import copy

    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    model = copy.deepcopy(model)
    for name, scale in (scales or {}).items():
        parent, _, attr = name.rpartition(".")
        holder = model.get_submodule(parent)
        setattr(holder, attr, Smoothed(getattr(holder, attr), scale))
    with warnings.catch_warnings():  # torch.ao's notice that eager quantization is moving to torchao
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)


def input_maxima(model: nn.Module, run_batches) -> tuple[dict[str, torch.Tensor], object]:
    """(the largest absolute input of every Linear layer per input channel over what `run_batches()` feeds it,
    what `run_batches()` returned)."""
    maxima: dict[str, torch.Tensor] = {}

    def watch(name):
        def hook(module, inputs, output):
            seen = inputs[0].detach().abs().flatten(0, -2).amax(0)
            maxima[name] = torch.maximum(maxima[name], seen) if name in maxima else seen
        return hook

    hooks = [m.register_forward_hook(watch(n)) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        result = run_batches()
    finally:
        for h in hooks:
            h.remove()
    return maxima, result


def smoothing_scales(model: nn.Module, maxima: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """s_j = max|X_j|^α / max|W_j|^(1-α) for every Linear layer seen in `maxima`."""
    scales = {}
    for name, x in maxima.items():
        w = model.get_submodule(name).weight.detach().abs().amax(0)
        scales[name] = (x.clamp(min=1e-5) ** alpha / w.clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)
    return scales


def calibrate_int8(model: nn.Module, outputs) -> tuple[float, dict[str, torch.Tensor], dict[float, float]]:
    """(α, scales, KL per α tried): the smoothing whose int8 model's outputs, `outputs(m)` as log-probabilities
    on the calibration texts, are closest to the fp32 model's."""
    maxima, reference = input_maxima(model, lambda: outputs(model))
    kl = {}
    for alpha in ALPHAS:
        q = outputs(quantize_int8(model, smoothing_scales(model, maxima, alpha)))
        kl[alpha] = float((reference.exp() * (reference - q)).sum(-1).mean())
    best = min(kl, key=kl.get)
    return best, smoothing_scales(model, maxima, best), kl


def state_mb(model: nn.Module) -> float:
    """The serialized size of a model's weights in MiB (measured in memory, comparable between fp32 and int8)."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell() / 2**20


# Rows per ONNX Runtime call. MiniLM on 600 length-sorted tweets, 2 Zen 3 cores, medians of 4 interleaved rounds:
# 152 / 163 / 143 examples/s in calls of 16 / 32 / 64 rows (fused graph: 161 / 167 / 151).
ONNX_ROWS = 32


class OnnxClassifier:
    """An ONNX Runtime session that answers like a transformers classifier: `model(**batch).logits`, computed
    `ONNX_ROWS` rows at a time, each slice without the trailing columns that are padding in all of its rows."""

    training = False

    def __init__(self, path):
        onnxruntime = need("onnxruntime", "onnx")
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, **batch) -> SimpleNamespace:
        feed = {k: v.cpu().float() if v.is_floating_point() else v.cpu().to(torch.int64)  # pixels, or token ids
                for k, v in batch.items() if k in self.inputs}
        logits = []
        for part in zip(*(v.split(ONNX_ROWS) for v in feed.values())):
            part = dict(zip(feed, part))
            if "attention_mask" in part:
                columns = part["attention_mask"].any(0).nonzero()
                part = {k: v[:, :int(columns.max()) + 1 if len(columns) else 1] for k, v in part.items()}
            logits.append(torch.from_numpy(self.session.run(["logits"], {k: v.numpy() for k, v in part.items()})[0]))
        return SimpleNamespace(logits=torch.cat(logits))

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self


def export_onnx(model: nn.Module, tokenizer, path) -> None:
    """The fp32 model as an ONNX graph with dynamic batch and sequence axes (an image network: a dynamic batch of
    images at the size its pre-processing gives), written atomically."""
    # torch.onnx's exporter builds the graph with onnx and onnxscript; ONNX Runtime fuses it (_fused) and checks it
    for module in ("onnx", "onnxscript", "onnxruntime"):
        need(module, "onnx")
    if hasattr(tokenizer, "data_config"):  # an image processor (tunelab.models.vision.ImageProcessor)
        names, enc = ["pixel_values"], {"pixel_values": torch.zeros(2, *tokenizer.data_config["input_size"])}
        dynamic = {"pixel_values": {0: torch.export.Dim("batch")}}
    else:
        enc = sample_inputs(tokenizer)
        names = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
        dynamic = {k: {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")} for k in names}
    # torch.onnx's notes on absent torchvision ops and axis names are not ours
    with _quiet("torch.onnx"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model.eval(), (), kwargs={k: enc[k] for k in names}, input_names=names,
                                    output_names=["logits"], dynamic_shapes=dynamic, dynamo=True, verbose=False)
    atomic_write_bytes(path, _fused(program.model_proto, model.config).SerializeToString())


def _fused(proto, config):
    """A BERT encoder's graph with ONNX Runtime's transformer fusions (its own SkipLayerNormalization and BiasGelu
    operators: one pass over memory where the plain graph makes three or four), the graph as it was for other
    models. MiniLM on 600 tweets, 2 Zen 3 cores, medians of 4 interleaved rounds: 161 / 167 / 151 against 152 /
    163 / 143 examples/s in calls of 16 / 32 / 64 rows, the same labels, logits within 1e-7."""
    if getattr(config, "model_type", None) != "bert":
        return proto
    from onnxruntime.transformers import optimizer

    with _quiet("onnxruntime.transformers"):  # it reports each fusion it makes
        return optimizer.optimize_model(proto, model_type="bert", num_heads=config.num_attention_heads,
                                        hidden_size=config.hidden_size, opt_level=0).model


@contextlib.contextmanager
def _quiet(logger: str):
    """Within the block, the named logger reports errors only."""
    quiet = logging.getLogger(logger)
    level, quiet.level = quiet.level, logging.ERROR
    try:
        yield
    finally:
        quiet.level = level


def check_runtime(runtime: str) -> None:
    if runtime not in RUNTIMES:
        raise UserError(f"unknown runtime {runtime!r} (one of {', '.join(RUNTIMES)})", "--runtime")


def quantize_image_onnx(fp32_onnx, pixels: torch.Tensor, path) -> None:
    """An image network's ONNX graph with static int8 (ONNX Runtime's quantize_static, written atomically to
    `path`): batch norm folded into the convolutions first (quant_pre_process), then int8 weights with one scale per
    output channel and uint8 activations whose ranges are calibrated (min-max) on `pixels`, the run's training
    images as its evaluation transform gives them. Dynamic quantization, the text models' int8, would quantize a
    CNN's classifier only; ONNX Runtime's dynamic quantization of the convolutions ran 18 times slower than fp32."""
    import tempfile
    from pathlib import Path

    need("onnxruntime", "onnx")
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Calibration(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(pixels.split(ONNX_ROWS))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"pixel_values": batch.float().numpy()}

    with tempfile.TemporaryDirectory() as tmp, _quiet("root"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its advice to pre-process, which it has been
        folded, quantized = Path(tmp) / "folded.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(fp32_onnx), str(folded))
        quantize_static(str(folded), str(quantized), Calibration(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        atomic_write_bytes(path, quantized.read_bytes())
