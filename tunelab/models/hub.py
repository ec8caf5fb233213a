"""Models by their Hugging Face Hub name, `ORG/NAME[@REVISION]`, resolved by huggingface_hub as transformers does.

The files come through huggingface_hub's own cache (`HF_HOME`, `HF_HUB_CACHE`), with the user's login token, and
`HF_HUB_OFFLINE=1` reads that cache alone: a connected machine downloads on first use, an offline one works from
what it holds. Only what a model needs is fetched: its config, safetensors weights, tokenizer and pre-processing
files (never Python code unless `model.trust_remote_code` is on, which warns naming the repository).

Pickles: a repository with only `pytorch_model.bin`-style weights is refused, since unpickling can run code. With
`model.allow_pickle true` (an explicit opt-in) they are read once with `torch.load(weights_only=True)` (tensors
only) and kept as safetensors under $TUNELAB_CACHE/hub/ORG--NAME/COMMIT, beside copies of the snapshot's other
files; every later load reads that folder.
"""
from __future__ import annotations

import functools
import logging
import re
import shutil
from pathlib import Path

from tunelab.errors import UserError

log = logging.getLogger(__name__)

HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(@[\w./-]+)?")
NEEDED = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken", "*/config.json"]  # (pooling)
CODE = ["*.py"]
PICKLES = ["*.bin", "*.pt", "*.pth"]


def is_hub_name(name: str) -> bool:
    """ORG/NAME[@REVISION] that is not a folder on this machine (a local folder always wins)."""
    return bool(HUB_NAME.fullmatch(name)) and not Path(name).exists() and ".." not in name.split("@")[0]


@functools.lru_cache(maxsize=32)
def snapshot(name: str, allow_pickle: bool = False, trust_remote_code: bool = False) -> Path:
    """The local folder of a hub model: its cached snapshot, or (pickled weights, allowed) a safetensors copy."""
    repo, _, revision = name.partition("@")
    if trust_remote_code:
        log.warning("%s: model.trust_remote_code is on: this repository's own Python code will run on this machine",
                    repo)
    folder = _download(repo, revision or None, NEEDED + (CODE if trust_remote_code else []))
    if _has_safetensors(folder):
        return folder
    if not allow_pickle:
        raise UserError(f"{repo} has no safetensors weights (only pickled ones, such as pytorch_model.bin, or none): "
                        "unpickling can run code. Convert them to safetensors (transformers' save_pretrained "
                        "writes them) or pass --model.allow_pickle true to read them once with "
                        "torch.load(weights_only=True)", "--model")
    return _converted(repo, _download(repo, revision or None, PICKLES))


def _download(repo: str, revision: str | None, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    at = f"{repo}@{revision}" if revision else repo
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns))
    except GatedRepoError:
        raise UserError(f"{at} is gated: accept its terms on huggingface.co and log in (hf auth login)",
                        "--model") from None
    except RepositoryNotFoundError:
        raise UserError(f"{at}: no such model on the Hugging Face Hub (or it is private: log in with hf auth login)",
                        "--model") from None
    except RevisionNotFoundError:
        raise UserError(f"{at}: the repository has no revision '{revision}'", "--model") from None
    except LocalEntryNotFoundError:
        raise UserError(f"{at} is not in the Hugging Face cache on this machine and cannot be downloaded (offline, "
                        "or HF_HUB_OFFLINE=1): fetch it on a connected machine (tunelab models prepare ORG/NAME) and "
                        "copy the cache (HF_HOME)", "--model") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise UserError(f"{at}: could not be fetched ({str(e).strip().splitlines()[0][:200]})", "--model") from None


def _has_safetensors(folder: Path) -> bool:
    return any(folder.glob("*.safetensors"))


def _converted(repo: str, snapshot_dir: Path) -> Path:
    """A copy of the snapshot with its pickled weights as one model.safetensors (tensors only were unpickled)."""
    from tunelab.io import atomic_dir
    from tunelab.models.gguf import cache_root, is_prepared

    folder = cache_root() / "hub" / repo.replace("/", "--") / snapshot_dir.name  # (the snapshot's name: the commit)
    if not is_prepared(folder):
        atomic_dir(folder, lambda out: _convert(snapshot_dir, out, repo))
    return folder


def _convert(snapshot_dir: Path, out: Path, repo: str) -> None:
    import torch
    from safetensors.torch import save_file

    shards = sorted(p for p in snapshot_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    if not shards:
        raise UserError(f"{repo} has no weights (neither safetensors nor pickled)", "--model")
    state, seen = {}, set()
    for shard in shards:
        loaded = torch.load(shard, map_location="cpu", weights_only=True)
        if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
            raise UserError(f"{repo}: {shard.name} is not a state dict of tensors", "--model")
        for key, tensor in loaded.items():
            # safetensors stores each tensor once: a tied copy (the output layer sharing the embeddings) is cloned
            state[key] = tensor.clone() if tensor.data_ptr() in seen else tensor.contiguous()
            seen.add(tensor.data_ptr())
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in snapshot_dir.rglob("*"):
        if f.is_file() and f.suffix not in (".bin", ".pt", ".pth") and not f.name.endswith(".index.json"):
            target = out / f.relative_to(snapshot_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, target)


def cached() -> list[tuple[str, list[str]]]:
    """(repository, its cached revisions as short commits, with the refs that name them) of every model in the
    Hugging Face cache; empty where there is no cache."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        repos = scan_cache_dir().repos
    except CacheNotFound:
        return []
    return sorted((repo.repo_id, [r.commit_hash[:12] + (f" ({', '.join(sorted(r.refs))})" if r.refs else "")
                               for r in sorted(repo.revisions, key=lambda r: r.commit_hash)])
                  for repo in repos if repo.repo_type == "model")
