"""Knowledge distillation (Hinton, Vinyals & Dean 2015): a student learns a finished teacher run's soft targets.

loss = α · T² · KL(softmax(teacher / T) ‖ softmax(student / T)) + (1 − α) · cross-entropy(student, gold)

The T² keeps the soft term's gradients on the scale of the hard term's as T changes (the paper's §2). Soft
targets are per example, so the teacher may have another tokenizer and architecture: it reads the raw texts with
its own. They are computed once and cached under $TUNELAB_CACHE/teacher-logits, keyed by the teacher's weights,
its max length and the texts. Unlabelled transfer texts (`--transfer`) get only the soft term.
The student trains every weight (as `full`); with `tuning.student_layers` it is the teacher itself with fewer
layers, initialised from evenly spaced teacher layers (0, 2, 4 of 6 for 3: DistilBERT's every other layer).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tunelab.errors import UserError
from tunelab.io import atomic_write_bytes
from tunelab.methods.full import Full

IGNORE = -100  # the gold label of a transfer text: cross-entropy skips it


class Distill(Full):
    uses_teacher = True


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float,
            alpha: float) -> torch.Tensor:
    """The summed distillation loss of a batch: (batch, classes) logits, labels with IGNORE for unlabelled rows."""
    soft_teacher = torch.log_softmax(teacher.float() / temperature, -1)
    soft_student = torch.log_softmax(student.float() / temperature, -1)
    kl = nn.functional.kl_div(soft_student, soft_teacher, log_target=True, reduction="sum")
    ce = nn.functional.cross_entropy(student.float(), labels, ignore_index=IGNORE, reduction="sum")
    return alpha * temperature ** 2 * kl + (1 - alpha) * ce


def soft_targets(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / T): T = 1 is the teacher's own distribution, larger T flattens it towards uniform."""
    return torch.softmax(logits.float() / temperature, -1)


def evenly_spaced(total: int, keep: int) -> list[int]:
    """`keep` of `total` layer indices, evenly spaced from the bottom: every other one when keep = total / 2."""
    if not 1 <= keep <= total:
        raise UserError(f"must be between 1 and the teacher's {total} layers, got {keep}", "tuning.student_layers")
    return [i * total // keep for i in range(keep)]


def layer_list(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """(parent, attribute, list) of the model's stack of transformer layers: the ModuleList as long as the
    config's num_hidden_layers (encoder.layer for BERT, layers for Llama-style models)."""
    n = model.config.num_hidden_layers
    for name, module in model.named_modules():
        for attr, child in module.named_children():
            if isinstance(child, nn.ModuleList) and len(child) == n:
                return module, attr, child
    raise UserError(f"cannot find the {n} transformer layers of a {type(model).__name__}", "tuning.student_layers")


def keep_layers(model: nn.Module, keep: list[int]) -> nn.Module:
    """The same model with only the layers at `keep` (in order), its config updated to match."""
    parent, attr, layers = layer_list(model)
    setattr(parent, attr, nn.ModuleList([layers[i] for i in keep]))
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):  # per-layer attention kinds (some decoders) follow their layer
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    for new, layer in enumerate(getattr(parent, attr)):  # layers that know their index (KV caches) get the new one
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new
    return model


class Teacher:
    """A finished classification run that labels texts softly."""

    def __init__(self, run_dir: str):
        from tunelab.predict import load_run

        run = Path(run_dir)
        self.run = run
        self.cfg, self.task, self.model, self.tokenizer, self.space = load_run(run)
        if self.task.name != "classification":
            raise UserError(f"the teacher must be a classification run, not {self.task.name}", "--teacher")

    def check_labels(self, labels: list[str]) -> None:
        if labels != self.space.labels:
            raise UserError(f"the student's labels {labels} differ from the teacher's {self.space.labels}",
                            "--teacher")

    def student(self, n_layers: int) -> nn.Module:
        """A copy of the teacher with `n_layers` of its layers (its embeddings and head as they are)."""
        import transformers

        model = getattr(transformers, self.task.model_class).from_pretrained(self.run / "model", use_safetensors=True)
        return keep_layers(model, evenly_spaced(model.config.num_hidden_layers, n_layers))

    def logits(self, examples) -> list[list[float]]:
        """The teacher's logits for each example (its text and text pair), cached on disk."""
        from tunelab.evaluate import predict_outputs
        from tunelab.models.gguf import cache_root

        key = hashlib.sha256()
        key.update(_file_digest(self.run / "model" / "model.safetensors").encode())
        key.update(json.dumps([self.cfg.data.max_length, [(e.text, e.text_pair) for e in examples]]).encode())
        path = cache_root().parent / "teacher-logits" / f"{key.hexdigest()}.safetensors"
        if path.is_file():
            return load_file(str(path))["logits"].tolist()
        unlabelled = [dataclasses.replace(e, label=None) for e in examples]  # the teacher needs only the texts
        items = self.task.encode(self.tokenizer, unlabelled, self.space, self.cfg.data.max_length)
        out = torch.stack(predict_outputs(self.task, self.model, items, self.tokenizer.pad_token_id or 0,
                                          torch.device("cpu")))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"logits": out.contiguous()}, str(tmp))
        atomic_write_bytes(path, tmp.read_bytes())
        tmp.unlink()
        return out.tolist()


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
