"""Smaller, faster classifiers from a finished run: dynamic int8 quantization and an ONNX export (ONNX Runtime).

Each variant is checked against the fp32 model on the run's eval examples: prediction agreement and the largest
difference of any class probability, plus size and speed (`tunelab export RUN --int8 --onnx` → compression.json).
int8 is applied when the run is loaded (`tunelab predict RUN --runtime int8`): quantizing takes well under a
second and keeps model files safetensors (a quantized state dict would be a pickle). The ONNX graph is written to
RUN/onnx/model.onnx (weights inside, no pickle) and read by `tunelab predict RUN --runtime onnx`.
"""
from __future__ import annotations

import io
from types import SimpleNamespace

import torch
from torch import nn

from tunelab.errors import UserError
from tunelab.io import atomic_write_bytes

RUNTIMES = ("torch", "int8", "onnx")


def quantize_int8(model: nn.Module) -> nn.Module:
    """Linear layers with int8 weights, activations quantized on the fly (dynamic quantization)."""
    return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def state_mb(model: nn.Module) -> float:
    """The serialized size of a model's weights in MiB (measured in memory, comparable between fp32 and int8)."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell() / 2**20


class OnnxClassifier:
    """An ONNX Runtime session that answers like a transformers classifier: `model(**batch).logits`."""

    training = False

    def __init__(self, path):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, **batch) -> SimpleNamespace:
        feed = {k: v.cpu().numpy().astype("int64") for k, v in batch.items() if k in self.inputs}
        return SimpleNamespace(logits=torch.from_numpy(self.session.run(["logits"], feed)[0]))

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self


def export_onnx(model: nn.Module, tokenizer, path) -> None:
    """The fp32 model as an ONNX graph with dynamic batch and sequence axes, written atomically."""
    enc = tokenizer(["a first example", "and a second, longer example text"], padding=True, return_tensors="pt")
    names = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    dynamic = {k: {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")} for k in names}
    program = torch.onnx.export(model.eval(), (), kwargs={k: enc[k] for k in names}, input_names=names,
                                output_names=["logits"], dynamic_shapes=dynamic, dynamo=True, verbose=False)
    atomic_write_bytes(path, program.model_proto.SerializeToString())


def check_runtime(runtime: str) -> None:
    if runtime not in RUNTIMES:
        raise UserError(f"unknown runtime {runtime!r} (one of {', '.join(RUNTIMES)})", "--runtime")
