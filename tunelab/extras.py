"""Optional stacks: pyproject's extras (`pip install 'tunelab[serve]'`), imported where they are first used.

A plain `pip install tunelab` trains, evaluates and predicts; the service, ONNX, the Optuna search, Japanese word
segmentation, the data check and the bundled corpora each come with an extra. Where one is missing the user gets
one line naming the extra to install (a MissingExtra, which the CLI prints and exits 2 on), not an ImportError's
traceback from deep inside the code.
"""
from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from types import ModuleType

from tunelab.errors import UserError

# extra (as named in pyproject.toml's [project.optional-dependencies]) -> what it is for, as the message says it
EXTRAS = {
    "serve": "the fine-tuning service (tunelab serve)",
    "onnx": "ONNX (tunelab export --onnx, tunelab predict --runtime onnx)",
    "tune": "the hyperparameter search (tunelab tune)",
    "ja": "Japanese word segmentation (MeCab)",
    "check": "the data check (tunelab data check, tunelab data clean)",
    "vision": "image tasks (torchvision, timm and the bundled EfficientNet-Lite0)",
    "qlora": "--tuning qlora (4-bit base weights through bitsandbytes)",
    "postgres": "the service's state in PostgreSQL (--db postgresql://...)",
    "data": "the bundled corpora (tunelab data tweets, topics, japanese-ner, chitchat, chatterbot-ja)",
}


class MissingExtra(UserError):
    """An optional stack is not installed. A UserError, so the CLI prints the one line and exits with 2, and the
    service's workers report it as the job's error."""

    def __init__(self, extra: str, what: str | None, module: str):
        self.extra, self.module = extra, module
        super().__init__(f"{what or EXTRAS[extra]} needs the '{extra}' extra: pip install 'tunelab[{extra}]' "
                         f"(no module named '{module}')")


def need(module: str, extra: str, what: str | None = None) -> ModuleType:
    """`module`, imported; or a MissingExtra naming `extra` when it (or a module it needs) is not installed."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra '{extra}'")
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        # Only a missing module: any other ImportError (a broken install, a version clash) keeps its own message.
        raise MissingExtra(extra, what, e.name or module) from e


def package_dir(module: str, extra: str, what: str | None = None) -> Path:
    """The folder of an installed package that ships data, found without importing it (importing may need
    runtimes tunelab never uses); a MissingExtra naming `extra` when it is not installed."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra '{extra}'")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtra(extra, what, module)
    return Path(list(spec.submodule_search_locations)[0])
