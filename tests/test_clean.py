"""`tunelab data clean`: the chosen fixes applied to a copy, every dropped or changed record in the log."""
from __future__ import annotations

import json

import pytest
import forkrun
from conftest import make_rows, write_jsonl

from tunelab.check import check
from tunelab.clean import clean
from tunelab.errors import UserError


def read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def messy(tmp_path):
    rows = make_rows(40, 8)
    rows.append(dict(rows[0]))  # 41: copy of 1
    other = "negative" if rows[1]["label"] != "negative" else "positive"
    rows.append({"text": rows[1]["text"], "label": other})  # 42: conflicts with 2
    rows.append({"text": rows[2]["text"] + "!", "label": rows[2]["label"]})  # 43: nearly 3
    rows.append({"text": "https://spam.example.com/x", "label": "neutral"})  # 44: URL only
    rows.append({"text": "ＦＵＬＬ　ｗｉｄｔｈ ｇｏｏｄ ｇｒｅａｔ", "label": "positive", "id": 7})  # 45: NFKC changes it
    for r in rows[5:15]:
        r["text"] += " Sent from my shiny new phone"  # 6-15: boilerplate
    evaluation = make_rows(10, 9) + [dict(rows[20])]  # line 21 of the training file leaks into eval
    return write_jsonl(tmp_path / "train.jsonl", rows), write_jsonl(tmp_path / "eval.jsonl", evaluation)


def test_each_fix_drops_or_changes_exactly_its_records_and_logs_them(tmp_path, messy):
    train, evaluation = messy
    out = tmp_path / "clean.jsonl"
    result = clean(train, out, "classification", str(evaluation), drop_duplicates=True, drop_near_duplicates=True,
                   drop_conflicts=True, drop_leaked=True, drop_noise=True, normalize=True, strip_boilerplate=True)
    log = read(tmp_path / "clean.log.jsonl")
    dropped = {e["line"]: e["reason"] for e in log if e["action"] == "dropped"}
    assert dropped == {41: "exact-duplicate", 2: "conflicting-labels", 42: "conflicting-labels",
                       43: "near-duplicate", 44: "url-only", 21: "leaked"}
    changed = {e["line"]: e for e in log if e["action"] == "changed"}
    assert set(changed) == set(range(6, 16)) | {45}
    assert changed[45]["after"] == "FULL width good great" and changed[45]["reason"] == "normalize"
    assert all("Sent from my" not in e["after"] for n, e in changed.items() if n != 45)
    kept = read(out)
    assert len(kept) == result["kept"] == 45 - 6 and {"text": "FULL width good great", "label": "positive", "id": 7} in kept
    original = read(train)
    for e in log:  # the log holds every dropped record whole and every change before and after
        if e["action"] == "dropped":
            assert e["record"] == original[e["line"] - 1]
        else:
            assert e["before"] == original[e["line"] - 1]["text"]
    after = check(out, "classification", str(evaluation), label_errors=False)
    assert not {f.code for f in after.findings} & {"exact-duplicate", "conflicting-labels", "near-duplicate",
                                                  "url-only", "leak-exact", "boilerplate"}


def test_likely_label_errors_are_dropped_under_a_threshold(tmp_path):
    rows = make_rows(300, 7)  # the same rows as test_check's label-error test
    names = ["negative", "neutral", "positive"]
    for i in (10, 50, 90):
        rows[i]["label"] = names[(names.index(rows[i]["label"]) + 1) % 3]
    path = write_jsonl(tmp_path / "noisy.jsonl", rows)
    clean(path, tmp_path / "out.jsonl", "classification", label_errors=0.1)
    dropped = {e["line"] for e in read(tmp_path / "out.log.jsonl")}
    assert {11, 51, 91} <= dropped and len(dropped) <= 10


def test_csv_keeps_its_columns(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("id,text,label\n1,good one here,positive\n2,good one here,positive\n3,bad one,negative\n"
                    "4,bad one too,negative\n", encoding="utf-8")
    clean(path, tmp_path / "out.csv", "classification", drop_duplicates=True)
    assert (tmp_path / "out.csv").read_text() == "id,text,label\n1,good one here,positive\n3,bad one,negative\n" \
                                                  "4,bad one too,negative\n"
    assert [e["line"] for e in read(tmp_path / "out.log.jsonl")] == [3]


def test_refusals(tmp_path, messy):
    train, _ = messy
    with pytest.raises(UserError, match="choose what to fix"):
        clean(train, tmp_path / "o.jsonl", "classification")
    with pytest.raises(UserError, match="never overwrites its input"):
        clean(train, train, "classification", drop_duplicates=True)
    with pytest.raises(UserError, match="--drop-leaked needs --eval"):
        clean(train, tmp_path / "o.jsonl", "classification", drop_leaked=True)
    broken = tmp_path / "broken.jsonl"
    broken.write_text(train.read_text() + '{"text": "cut\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"1 records fail the format check \(first: line 46: invalid JSON"):
        clean(broken, tmp_path / "o.jsonl", "classification", drop_duplicates=True)
    clean(broken, tmp_path / "o.jsonl", "classification", drop_invalid=True)
    assert [e["reason"] for e in read(tmp_path / "o.log.jsonl")] == ["invalid"]
    assert not (tmp_path / "never.jsonl").exists()


@pytest.mark.slow
def test_the_cli(tmp_path, messy):
    train, evaluation = messy
    done = forkrun.run(["data", "clean", train, "-o", tmp_path / "c.jsonl", "--drop-duplicates", "--drop-noise"])
    assert done.returncode == 0, done.stderr
    assert "kept 43 of 45 records" in done.stdout and "exact-duplicate" in done.stdout
    done = forkrun.run(["data", "clean", train, "-o", tmp_path / "d.jsonl"])
    assert done.returncode == 2 and "choose what to fix" in done.stderr and "Traceback" not in done.stderr


def test_a_shift_jis_csv_round_trips_to_utf8_with_encoding_auto(tmp_path):
    from tunelab.config import DataConfig
    from tunelab.data.load import read_examples

    rows = [("この商品はとても良かったです。", "positive"), ("配送が遅く、箱も壊れていました。", "negative"),
            ("この商品はとても良かったです。", "positive"), ("普通です。", "neutral")]
    path = tmp_path / "excel.csv"
    path.write_bytes(("text,label\r\n" + "".join(f"{t},{label}\r\n" for t, label in rows)).encode("cp932"))
    clean(path, tmp_path / "out.csv", "classification", cfg=DataConfig(encoding="auto"), drop_duplicates=True)
    out = read_examples(tmp_path / "out.csv", DataConfig())  # UTF-8 now: the default reads it
    assert [(e.text, e.label) for e in out] == [rows[0], rows[1], rows[3]]
