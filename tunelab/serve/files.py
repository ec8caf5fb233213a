"""Uploaded training files: stored under a server-made id, checked at upload by the readers `tunelab train` uses.

The client's file name is kept only as a label (its last path part, printable characters): it never becomes a
path. A file is written under a temporary name, checked, then renamed into place and recorded.
"""
from __future__ import annotations

import os
from pathlib import Path

from tunelab.config import DataConfig
from tunelab.data.formats import FORMAT_TASK, detect_format
from tunelab.errors import UserError
from tunelab.serve import access, storage
from tunelab.serve.db import connect, new_id, now, private_dir, transaction

EXTENSIONS = (".jsonl", ".csv", ".txt", ".zip")
MAX_UNPACKED = 4 << 30  # bytes an uploaded zip of images may unpack to (tunelab.serve.archive)
# The task a job gets when the request names none, for the image formats (text formats: tunelab.data.formats)
IMAGE_TASK = {"image_folder": "image-classification", "image_label": "image-classification",
              "image_labels": "image-multilabel"}


def display_name(filename: str | None) -> str:
    """The client's name reduced to a harmless label: last path part, printable, at most 255 characters."""
    base = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(c for c in base if c.isprintable()).strip()
    return base[:255] if base not in ("", ".", "..") else "upload"


def check(path: Path, task: str, name: str) -> int:
    """Read every record with the task's own reader; the number of records, or the reader's error, re-addressed to
    the name the client knows the file by."""
    from tunelab.tasks import TASKS

    try:
        return len(TASKS[task].read(path, DataConfig(train=str(path))))
    except UserError as e:
        where = e.path if task.startswith("image-") and e.line is None and e.path else name
        if task.startswith("image-") and where != name:  # an image of an archive: named inside it, never by our path
            where = f"{name}/{Path(where).relative_to(path).as_posix()}" if Path(where).is_relative_to(path) \
                else name
        raise UserError(e.problem, where, e.line) from None


def task_of(fmt: str) -> str:
    """The task a job on a file of this format gets when its request names none."""
    return IMAGE_TASK.get(fmt) or FORMAT_TASK[fmt]


def _record(home: Path, row: dict, undo) -> dict:
    """Insert the stored file's row for the caller's project, within its file-bytes quota (checked in the same
    transaction, so concurrent uploads cannot pass it together); over it, `undo()` removes what was stored."""
    row["project"] = access.project_of_caller()
    con = connect(home)
    try:
        row.setdefault("encoding", "utf-8")
        with transaction(con):
            access.check_file_bytes(con, row["project"], row["bytes"])
            con.execute("INSERT INTO files (id, filename, bytes, created_at, purpose, path, format, records, "
                        "project, encoding) VALUES (:id, :filename, :bytes, :created_at, :purpose, :path, :format, "
                        ":records, :project, :encoding)", row)
    except access.OverQuota:
        undo()
        raise
    return row


def _remove_archive(home: Path, file_id: str) -> None:
    """An archive upload's unpacked folder and its zip."""
    import shutil

    shutil.rmtree(storage.files_dir(home) / file_id, ignore_errors=True)
    (storage.files_dir(home) / f"{file_id}.zip").unlink(missing_ok=True)


def store(home: Path, data: bytes, filename: str | None, purpose: str, task: str | None = None) -> dict:
    access.check_file_bytes(connect(home), access.project_of_caller(), len(data))  # early; _record decides
    if purpose != "fine-tune":
        raise UserError(f"purpose must be 'fine-tune', got {purpose!r}", "purpose")
    name = display_name(filename)
    ext = Path(name).suffix.lower()
    if ext not in EXTENSIONS:
        raise UserError(f"unsupported file type {ext or '(none)'!r}: upload .jsonl, .csv, .txt or a .zip of images",
                        name)
    if ext == ".zip":
        return _store_archive(home, data, name, purpose, task)
    if task is not None and task.startswith("image-"):  # a table's paths would reach the service's own files
        raise UserError(f"task {task!r} reads images: upload them as a .zip (a folder per class, or a CSV/JSONL "
                        "with the images it names)", name)
    text, encoding = _decoded(data, name)
    data = text.encode("utf-8")  # stored (and counted, and served back) as UTF-8
    fmt = detect_format(text, ext, name)
    if task is not None:
        from tunelab.tasks import TASKS

        if task not in TASKS:
            raise UserError(f"unknown task {task!r} (one of {', '.join(TASKS)})", "task")
    file_id = new_id("file")
    folder = private_dir(storage.files_dir(home))
    final, tmp = folder / f"{file_id}{ext}", folder / f".upload-{file_id}{ext}"
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
        f.write(data)
    try:
        records = check(tmp, task or FORMAT_TASK[fmt], name)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    row = {"id": file_id, "filename": name, "bytes": len(data), "created_at": now(), "purpose": purpose,
           "path": final.name, "format": fmt, "records": records, "encoding": encoding}
    return _record(home, row, lambda: final.unlink(missing_ok=True))


def _decoded(data: bytes, name: str) -> tuple[str, str]:
    """(text, the encoding's codec): UTF-8, or what the CLI's `--encoding auto` detects (UTF-16, Shift_JIS/CP932,
    EUC-JP; tunelab.data.encoding); a byte-order mark is dropped. Binary data or an undetectable encoding: one
    line saying so."""
    from tunelab.data import encoding as enc

    codec = enc.detect(data)
    if codec is None:
        if b"\x00" in data[:8192]:
            raise UserError("a binary file, not text", name)
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data[:e.start].count(b"\n") + 1
            raise UserError(f"not UTF-8 text (nor UTF-16, Shift_JIS or EUC-JP; byte {e.start}): re-save it as UTF-8",
                            name, line) from None
    try:
        text = data.decode(codec).lstrip("\ufeff")
    except UnicodeDecodeError as e:  # what looked like UTF-16 (a byte-order mark, NUL bytes) is not
        raise UserError(f"not valid {enc.name(codec)} text (byte {e.start}): a binary file, or re-save it as UTF-8",
                        name) from None
    if any(c < " " and c not in "\t\n\r\f" for c in text[:8192]):  # control characters: no text has them
        raise UserError("a binary file, not text", name)
    return text, "utf-8" if codec == "utf-8-sig" else codec


def _store_archive(home: Path, data: bytes, name: str, purpose: str, task: str | None) -> dict:
    """A zip of images: unpacked safely under a server-made id, its data checked with the image task's reader (every
    image decoded), the archive itself kept for GET …/content."""
    import shutil

    from tunelab.serve.archive import data_entry, unpack

    if task is not None and not task.startswith("image-"):
        raise UserError(f"a .zip upload holds images; task {task!r} reads text files", "task")
    file_id = new_id("file")
    folder = private_dir(storage.files_dir(home))
    tmp = folder / f".upload-{file_id}"
    try:
        root = unpack(data, tmp, name, MAX_UNPACKED)
        entry, kind = data_entry(root)
        fmt = kind if kind == "image_folder" else _table_format(entry, name)
        records = check(entry, task or IMAGE_TASK[fmt], name) if fmt == "image_folder" else \
            _check_table(entry, task or IMAGE_TASK[fmt], name, tmp)
        with open(os.open(folder / f".upload-{file_id}.zip", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.write(data)
        os.replace(folder / f".upload-{file_id}.zip", folder / f"{file_id}.zip")
        os.replace(tmp, folder / file_id)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        (folder / f".upload-{file_id}.zip").unlink(missing_ok=True)
    row = {"id": file_id, "filename": name, "bytes": len(data), "created_at": now(), "purpose": purpose,
           "path": (Path(file_id) / entry.relative_to(tmp)).as_posix(), "format": fmt, "records": records}
    return _record(home, row, lambda: _remove_archive(home, file_id))


def _table_format(table: Path, name: str) -> str:
    """image_labels for a table whose first record has `labels` (multi-label), else image_label."""
    head = table.read_bytes()[:65536].decode("utf-8", errors="replace")
    if table.suffix.lower() == ".csv":
        columns = [c.strip().strip('"') for c in head.split("\n", 1)[0].split(",")]
        return "image_labels" if "labels" in columns and "label" not in columns else "image_label"
    fmt = detect_format(head, ".jsonl", name)
    return "image_labels" if fmt == "text_labels" else "image_label"


def _check_table(table: Path, task: str, name: str, root: Path) -> int:
    """Every record of an archive's table read (each image decoded); every image it names must lie inside the
    archive (`root`): a path like ../other-upload/cat.png is refused, never read."""
    from tunelab.data.images import read_image_examples
    from tunelab.tasks import TASKS

    reader = TASKS[task]
    try:
        return len(read_image_examples(table, DataConfig(train=str(table)), True, reader.parse_label,
                                       reader.label_key, root=root))
    except UserError as e:
        raise UserError(e.problem, f"{name}/{table.name}", e.line) from None


def content_path(home: Path, row: dict) -> Path:
    """What GET …/content sends: the uploaded file (a zip of images, not its unpacked folder)."""
    return storage.files_dir(home) / f"{row['id']}.zip" if row["format"] in IMAGE_TASK else path_of(home, row)


def get(home: Path, file_id: str) -> dict | None:
    """The file `file_id`, if the caller's project may see it (tunelab.serve.access)."""
    row = connect(home).execute(*access.scoped("SELECT * FROM files WHERE id = ?", (file_id,))).fetchone()
    return dict(row) if row else None


def path_of(home: Path, row: dict) -> Path:
    return storage.files_dir(home) / row["path"]


def public(row: dict) -> dict:
    """The OpenAI file object (plus tunelab's `format`, `records` and `encoding`: the text encoding the upload was
    detected in; it is stored, and served back, as UTF-8)."""
    return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": row["created_at"],
            "filename": row["filename"], "purpose": row["purpose"], "status": "processed", "status_details": None,
            "format": row["format"], "records": row["records"], "encoding": row.get("encoding", "utf-8")}


def delete(home: Path, file_id: str) -> bool:
    """Remove a file no unfinished job needs; False when there is no such file."""
    con = connect(home)
    row = get(home, file_id)
    if row is None:
        return False
    # A job names its data files as training_file, validation_file, or an id inside its request's config.
    busy = con.execute("SELECT id FROM jobs WHERE (training_file = ? OR validation_file = ? OR instr(request, ?)) "
                       "AND status IN ('validating_files', 'queued', 'running') AND project = ? LIMIT 1",
                       (file_id, file_id, f'"{file_id}"', row["project"])).fetchone()
    if busy:
        from tunelab.serve.jobs import Conflict

        raise Conflict(f"job {busy['id']} still needs this file; cancel it or wait until it ends", file_id)
    con.execute("DELETE FROM files WHERE id = ?", (file_id,))
    if row["format"] in IMAGE_TASK:
        _remove_archive(home, row["id"])
    else:
        content_path(home, row).unlink(missing_ok=True)
    return True


def remove_partial_uploads(home: Path) -> None:
    import shutil

    for tmp in (storage.files_dir(home)).glob(".upload-*"):
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
