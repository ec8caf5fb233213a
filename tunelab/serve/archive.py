"""Uploaded zip archives of images, unpacked only when nothing in them can escape or explode.

An archive is read from its central directory before anything is written: every entry's name must stay inside
the folder it unpacks to (no absolute path, no `..` part, no drive letter or backslash), no entry may be a
symbolic link, the entries must be at most MAX_FILES, and their declared sizes must add up to at most
`max_bytes` and to at most MAX_RATIO times the archive's own size (a zip bomb packs gigabytes into kilobytes:
ordinary images, already compressed, hardly shrink). While unpacking, each entry's actual output is counted and
an entry that writes more than it declared is refused too (a declared size is only a claim). macOS's `__MACOSX/`
folder and hidden files are left out.
"""
from __future__ import annotations

import io
import os
import shutil
import stat
import zipfile
from pathlib import Path

from tunelab.errors import UserError

MAX_FILES = 50_000  # entries in one archive
MAX_RATIO = 20  # unpacked bytes per archive byte above which an archive is refused as a zip bomb
CHUNK = 1 << 20


def _unsafe(name: str) -> str | None:
    """Why an entry's name could write outside its folder, or None."""
    parts = name.split("/")
    if name.startswith("/") or "\\" in name or (parts and ":" in parts[0]):
        return "an absolute path"
    if ".." in parts:
        return "a '..' part"
    if "\x00" in name:
        return "a NUL character"
    return None


def _skipped(name: str) -> bool:
    parts = [p for p in name.split("/") if p]
    return not parts or parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts)


def unpack(data: bytes, dest: Path, name: str, max_bytes: int) -> Path:
    """Unpack the archive `data` into the new folder `dest` (its files private to the service); returns the data's
    root: `dest`, or its single top-level folder. `name` is the client's name for the archive in errors."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError) as e:
        raise UserError(f"not a readable zip archive ({e})", name) from None
    if len(infos) > MAX_FILES:
        raise UserError(f"the archive has {len(infos):,} entries; at most {MAX_FILES:,} are accepted", name)
    for info in infos:
        why = _unsafe(info.filename)
        if why:
            raise UserError(f"entry {info.filename[:200]!r} has {why}: refused (it would unpack outside its folder)",
                            name)
        if stat.S_ISLNK(info.external_attr >> 16):
            raise UserError(f"entry {info.filename[:200]!r} is a symbolic link: refused", name)
    declared = sum(i.file_size for i in infos)
    if declared > max_bytes:
        raise UserError(f"the archive unpacks to {declared / 2**20:,.1f} MiB; at most {max_bytes / 2**20:,.1f} MiB "
                        "are accepted", name)
    if declared > MAX_RATIO * max(len(data), 1) and declared > CHUNK:
        raise UserError(f"the archive unpacks to {declared / 2**20:,.1f} MiB from {len(data) / 2**20:,.2f} MiB "
                        f"(more than {MAX_RATIO}x): refused as a zip bomb", name)
    dest.mkdir(mode=0o700)
    try:
        for info in infos:
            if info.is_dir() or _skipped(info.filename):
                continue
            if info.flag_bits & 0x1:
                raise UserError(f"entry {info.filename[:200]!r} is encrypted", name)
            target = dest / info.filename
            if not target.resolve().is_relative_to(dest.resolve()):  # (the name checks above make this impossible)
                raise UserError(f"entry {info.filename[:200]!r} would unpack outside its folder", name)
            target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            written = 0
            with archive.open(info) as src, open(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600),
                                                 "wb") as out:
                while chunk := src.read(CHUNK):
                    written += len(chunk)
                    if written > info.file_size:
                        raise UserError(f"entry {info.filename[:200]!r} unpacks to more than it declares: refused",
                                        name)
                    out.write(chunk)
    except (zipfile.BadZipFile, NotImplementedError, EOFError, OSError) as e:
        shutil.rmtree(dest, ignore_errors=True)
        raise UserError(f"cannot unpack the archive ({e})", name) from None
    except UserError:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    top = [p for p in dest.iterdir()]
    return top[0] if len(top) == 1 and top[0].is_dir() else dest


def data_entry(root: Path) -> tuple[Path, str]:
    """(what a job trains on, its format): a CSV or JSONL table at the root (paths inside it relative to it), else
    the root as a folder with one sub-folder of images per class."""
    tables = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in (".csv", ".jsonl"))
    if len(tables) > 1:
        raise UserError(f"the archive holds {len(tables)} tables ({', '.join(p.name for p in tables[:4])}); "
                        "put one CSV or JSONL of image paths and labels at its top, or none (a folder per class)",
                        root.name)
    if tables:
        return tables[0], "image_table"
    return root, "image_folder"
