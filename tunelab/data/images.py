"""Read labelled images: a folder with one sub-folder per class, or a CSV/JSONL file with a path and a label.

Every image is opened and decoded when the data is read, so a bad one stops the run before any training with one
line naming the file and the problem (or, with data.skip_invalid, is skipped and counted). What loads, and how it
becomes the 8-bit RGB picture a network pre-trained on ImageNet expects:
- PNG, JPEG, WebP, BMP, GIF (its first frame) and TIFF, as Pillow reads them;
- the EXIF orientation of a photo is applied (a phone's portrait shot stands upright);
- grayscale and palette images become RGB; an image with transparency (RGBA, LA, a palette with a transparent
  colour) is laid over white first;
- 16- and 32-bit images (PNG's 16-bit grayscale, TIFF) are scaled to 8 bits by their type's full range
  (a 16-bit value v becomes round(v / 257)), never clipped.
Images larger than `MAX_SIDE` are shrunk (aspect kept) when read: the networks see 224 pixels or so, and the
decoded images stay in memory for the whole run (at most 0.75 MB each), where 12-megapixel photos would fill it.
For prediction (need_label False) a folder may also hold the images themselves, with no class sub-folders.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from tunelab.config import DataConfig
from tunelab.data.load import Example, Problems, Records, class_label, csv_rows, group_of, json_records, \
    label_of, _columns, _decoded_lines

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MIN_SIDE = 8  # pixels: a smaller image (a 1x1 tracking pixel, a broken thumbnail) is refused
MAX_SIDE = 512  # pixels: larger images are shrunk when read (the networks see 224-384; zoom crops need some more)


class ImageError(ValueError):
    """Why an image file cannot be used (the reader adds the file's name)."""


def load_image(path: Path):
    """The image at `path` as an 8-bit RGB PIL image (see the module's docstring), or ImageError saying why not."""
    if not path.is_file():
        raise ImageError("image file not found")
    if path.stat().st_size == 0:
        raise ImageError("empty image file (0 bytes)")
    return decode_image(path)


def image_from_bytes(data: bytes):
    """An image sent as bytes (the service's base64 inputs), decoded as load_image decodes a file."""
    import io

    if not data:
        raise ImageError("empty image (0 bytes)")
    return decode_image(io.BytesIO(data))


def decode_image(source):
    """A file's or a byte stream's image as 8-bit RGB (see load_image), or ImageError."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                img.draft("RGB", (MAX_SIDE, MAX_SIDE))  # JPEG: decode at a reduced scale where that suffices
                img.load()
                img = ImageOps.exif_transpose(img)
    except UnidentifiedImageError:  # (its message quotes the file's path: never sent back by the service)
        raise ImageError("not a readable image (no format Pillow knows: PNG, JPEG, WebP, BMP, GIF, TIFF)") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise ImageError(f"not a readable image ({_reason(e, source)})") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data inside a known format
        raise ImageError(f"corrupt image data ({_reason(e, source)})") from None
    if min(img.size) < MIN_SIDE:
        raise ImageError(f"image is {img.size[0]}x{img.size[1]} pixels; at least {MIN_SIDE}x{MIN_SIDE} is needed")
    img = to_rgb(img)
    if max(img.size) > MAX_SIDE:
        img.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.BICUBIC)
    return img


def to_rgb(img):
    """8-bit RGB: transparency over white, grayscale and palettes expanded, high bit depths scaled down."""
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        data = np.asarray(img)
        top = 65535.0 if img.mode.startswith("I;16") or (img.mode == "I" and data.max(initial=0) <= 65535) \
            else float(np.iinfo(np.int32).max) if img.mode == "I" else 1.0
        img = Image.fromarray(np.clip(np.rint(data.astype(np.float64) / top * 255), 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def _reason(error: Exception, source) -> str:
    """The library's words for what went wrong, without the file's path."""
    text = str(error).split("\n")[0]
    if isinstance(source, Path):
        text = text.replace(repr(str(source)), "the file").replace(str(source), "the file")
    return text if len(text) <= 120 else text[:117] + "..."


def read_image_examples(path: str | Path, cfg: DataConfig, need_label: bool = True, parse=class_label,
                        default_key: str = "label", problems: Problems | None = None,
                        root: Path | None = None) -> list[Example]:
    """The images of a class-per-folder tree, or of a CSV/JSONL file whose `data.image_column` holds paths
    (relative to the file's folder). Each Example carries its decoded image; `where` names the image's file (and
    the data file's line). Bad images raise (or are skipped, or noted in `problems`) like any bad record. Given
    `root` (the service's unpacked archive), a table's path that leads outside it is refused before anything is
    opened."""
    from tunelab.errors import UserError

    p = Path(path)
    if not p.exists():
        raise UserError("file not found", str(p))
    if p.is_dir():
        rows = _read_folder(p, cfg, problems, need_label)
    elif p.suffix.lower() in (".jsonl", ".json", ".ndjson", ".csv", ".tsv"):
        rows = _read_table(p, cfg, need_label, parse, cfg.label_column or default_key, problems, root)
    else:
        raise UserError("unknown image data format (use a folder with one sub-folder of images per class, or a "
                        ".csv/.jsonl file with an image path column)", str(p))
    if not rows:
        raise UserError("no images found", str(p), code="empty")
    return rows


def _example(file: Path, label, where: str, line: int | None, group=None, written: str = "") -> Example:
    """`written`: the path as the data file gives it (what an error on its line quotes)."""
    from tunelab.errors import UserError

    try:
        image = load_image(file)
    except ImageError as e:
        raise UserError(f"{written or file}: {e}" if line is not None else str(e), where, line, "bad-image") from None
    return Example(str(file), label, None, f"{where}:{line}" if line is not None else where, group=group,
                   image=image)


def _refuse(error: Exception):
    raise error


def _read_folder(root: Path, cfg: DataConfig, problems: Problems | None, need_label: bool = True) -> list[Example]:
    """A sub-folder per class; without labels (prediction), the folder's own images, or its sub-folders' with no
    label: a class the model never saw is no error where nothing is scored."""
    from tunelab.errors import UserError

    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    records = Records(root, cfg.skip_invalid, problems)
    if not need_label and not classes:
        for f in _images(root):
            records.add(lambda: _example(f, None, str(f), None))
        return records.done()
    if not classes:
        raise UserError("an image folder needs one sub-folder of images per class", str(root))
    for d in classes:
        for f in _images(d):
            records.add(lambda: _example(f, d.name if need_label else None, str(f), None))
    return records.done()


def _images(folder: Path) -> list[Path]:
    return [f for f in sorted(folder.iterdir())
            if f.is_file() and f.suffix.lower() in EXTENSIONS and not f.name.startswith(".")]


def _read_table(path: Path, cfg: DataConfig, need_label: bool, parse, key: str,
                problems: Problems | None, root: Path | None = None) -> list[Example]:
    from tunelab.errors import UserError

    column = cfg.image_column
    records = Records(path, cfg.skip_invalid, problems)

    def example(line: int, rec: dict) -> Example:
        value = rec.get(column)
        if not isinstance(value, str) or not value.strip():
            raise UserError(f"missing image path '{column}' (data.image_column)", str(path), line, "missing-image")
        file = Path(value.strip())
        if file.is_absolute():
            raise UserError(f"image path '{column}' must be relative to the data file's folder, got an absolute "
                            "path", str(path), line, "absolute-path")
        file = path.parent / file
        if root is not None and not file.resolve().is_relative_to(root.resolve()):
            raise UserError(f"image path '{column}' leads outside the archive", str(path), line, "outside")
        label = label_of(rec, key, need_label, parse, path, line)
        return _example(file, label, str(path), line, group_of(rec, cfg, path, line), value.strip())

    if path.suffix.lower() in (".csv", ".tsv"):
        rows = csv_rows("\n".join(_decoded_lines(path, cfg.encoding)), path, problems)
        try:
            _, header = next(rows)
        except StopIteration:
            raise UserError("empty file", str(path), code="empty") from None
        header = [h.strip() for h in header]
        for name in (column, *([key] if need_label else [])):
            if name not in header:
                raise UserError(f"no '{name}' column in the header ({_columns(header)})", str(path), 1)
        for line, fields in rows:
            if not fields or not any(f.strip() for f in fields):
                continue
            if len(fields) != len(header):
                records.add(lambda: _refuse(UserError(f"row has {len(fields)} fields but the header has "
                                                      f"{len(header)}", str(path), line, "field-count")))
                continue
            rec = dict(zip(header, fields))
            records.add(lambda: example(line, rec))
    else:
        for line, rec in json_records(path, cfg.encoding, problems):
            records.add(lambda: example(line, rec))
    return records.done()
