"""Data files in the encodings Japanese users meet: detected, named in the error, decoded only when asked."""
from __future__ import annotations

import re

import pytest

import forkrun
from tunelab.config import DataConfig
from tunelab.data.encoding import detect
from tunelab.data.load import read_examples
from tunelab.errors import UserError

ROWS = [("この商品はとても良かったです。", "positive"), ("配送が遅く、箱も壊れていました。", "negative"),
        ("普通です。特に不満はありません。", "neutral"), ("また買いたいと思います！", "positive")]


def _csv(rows=ROWS) -> str:
    return "text,label\r\n" + "".join(f"{t},{label}\r\n" for t, label in rows)  # as Excel writes it


@pytest.mark.parametrize("codec,want", [("utf-8", "utf-8"), ("utf-8-sig", "utf-8-sig"), ("utf-16", "utf-16"),
                                        ("cp932", "cp932"), ("euc_jp", "euc_jp")])
def test_each_encoding_is_detected(codec, want):
    assert detect(_csv().encode(codec)) == want


def test_utf16_without_a_byte_order_mark_and_what_cannot_be_told():
    text = '{"text": "plain ascii words here", "label": "a"}\n' * 3
    assert detect(text.encode("utf-16-le")) == "utf-16-le" and detect(text.encode("utf-16-be")) == "utf-16-be"
    assert detect("déjà vu, café".encode("latin-1")) is None


@pytest.mark.parametrize("codec,named", [("cp932", "Shift_JIS (CP932)"), ("euc_jp", "EUC-JP")])
def test_a_japanese_csv_is_named_by_default_and_read_with_auto(tmp_path, codec, named):
    path = tmp_path / "excel.csv"
    path.write_bytes(_csv().encode(codec))
    with pytest.raises(UserError, match=rf"excel.csv:2: not UTF-8 text .*it looks like {re.escape(named)}: read "
                                        r"it with --encoding auto"):
        read_examples(path, DataConfig())
    for encoding in ("auto", codec):
        rows = read_examples(path, DataConfig(encoding=encoding))
        assert [(e.text, e.label) for e in rows] == ROWS, encoding


def test_utf8_with_a_byte_order_mark_and_utf16_jsonl(tmp_path):
    import json

    lines = "".join(json.dumps({"text": t, "label": label}, ensure_ascii=False) + "\n" for t, label in ROWS)
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(lines.encode("utf-8-sig"))
    assert [e.text for e in read_examples(bom, DataConfig())] == [t for t, _ in ROWS]  # the default reads it
    wide = tmp_path / "wide.jsonl"
    wide.write_bytes(lines.encode("utf-16"))
    with pytest.raises(UserError, match="it looks like UTF-16"):
        read_examples(wide, DataConfig())
    assert [e.text for e in read_examples(wide, DataConfig(encoding="auto"))] == [t for t, _ in ROWS]


def test_refusals_name_the_file_and_the_problem(tmp_path):
    latin = tmp_path / "latin.csv"
    latin.write_bytes("text,label\ncafé au lait,positive\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin.csv:2: not UTF-8 text \(byte 0xe9 at column 4\); re-save the file"):
        read_examples(latin, DataConfig())
    with pytest.raises(UserError, match="latin.csv: cannot tell the text encoding"):
        read_examples(latin, DataConfig(encoding="auto"))
    assert read_examples(latin, DataConfig(encoding="latin-1"))[0].text == "café au lait"
    with pytest.raises(UserError, match="unknown encoding 'klingon'"):
        read_examples(latin, DataConfig(encoding="klingon"))
    sjis = tmp_path / "sjis.csv"
    sjis.write_bytes(_csv().encode("cp932"))
    with pytest.raises(UserError, match=r"sjis.csv:2: not euc_jp text"):
        read_examples(sjis, DataConfig(encoding="euc_jp"))


@pytest.mark.slow
def test_the_cli_trains_on_a_shift_jis_csv_with_encoding_auto(tmp_path, tiny_model):
    path = tmp_path / "excel.csv"
    path.write_bytes(_csv(ROWS * 6).encode("cp932"))
    base = ["train", "--model", tiny_model, "--train", str(path), "--epochs", "1",
            "--max-length", "32", "--eval-split", "0.25", "--train.progress", "false", "--eval.bootstrap", "0",
            "--eval.probe", "false"]
    refused = forkrun.run(base + ["--output", tmp_path / "a"])
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "excel.csv:2: not UTF-8 text" in refused.stderr and "Shift_JIS (CP932)" in refused.stderr
    done = forkrun.run(base + ["--output", tmp_path / "b", "--encoding", "auto"])
    assert done.returncode == 0, done.stderr
