"""Which text encoding a data file is in: named for the user when it is not UTF-8, decoded only when asked.

Excel saves Japanese CSV files as Shift_JIS (Windows code page 932), older Unix tools write EUC-JP, and Windows
tools write UTF-16 or UTF-8 with a byte-order mark. A byte-order mark settles it; otherwise UTF-16 without a mark
(every other byte NUL for Latin text), then UTF-8 (strict: it almost never decodes text in another encoding), then
each Japanese encoding, scored by how much of what it decodes is Japanese script — decoding
EUC-JP bytes as Shift_JIS succeeds often, but yields half-width katakana rather than kana and kanji.
"""
from __future__ import annotations

NAMES = {"utf-8": "UTF-8", "utf-8-sig": "UTF-8 with a byte-order mark", "utf-16": "UTF-16",
         "utf-16-le": "UTF-16 (little-endian, no byte-order mark)", "utf-16-be": "UTF-16 (big-endian, no byte-order mark)",
         "cp932": "Shift_JIS (CP932)", "euc_jp": "EUC-JP"}
JAPANESE = ("cp932", "euc_jp")


def detect(raw: bytes) -> str | None:
    """The Python codec that reads `raw`, or None when none of the encodings above fits."""
    if raw.startswith(b"\xef\xbb\xbf"):
        return "utf-8-sig"
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "utf-16"
    sample = raw[:4096]  # NUL bytes are valid UTF-8 but never in text: every other one means UTF-16
    if len(sample) >= 4 and sample[1::2].count(0) > 0.3 * len(sample) / 2:
        return "utf-16-le"
    if len(sample) >= 4 and sample[0::2].count(0) > 0.3 * len(sample) / 2:
        return "utf-16-be"
    try:
        raw.decode("utf-8")
        return "utf-8"
    except UnicodeDecodeError:
        pass
    scores = {}
    for codec in JAPANESE:
        try:
            scores[codec] = _japanese_share(raw.decode(codec))
        except UnicodeDecodeError:
            continue
    best = max(scores, key=scores.get, default=None)
    return best if best and scores[best] >= 0.5 else None


def _japanese_share(text: str) -> float:
    """The share of non-ASCII characters that are kana, kanji or full-width forms (not half-width katakana)."""
    wide = [c for c in text if ord(c) > 0x7F]
    if not wide:
        return 0.0
    japanese = sum(1 for c in wide if "\u3000" <= c <= "\u30ff" or "\u4e00" <= c <= "\u9fff"
                   or "\uff01" <= c <= "\uff5e")
    return japanese / len(wide)


def name(codec: str) -> str:
    return NAMES.get(codec, codec)
