"""`tunelab data check`: each problem class found where it is, and its valid twin left alone."""
from __future__ import annotations

import json

import pytest
import forkrun
from conftest import make_rows, write_jsonl

from tunelab import check as check_module
from tunelab.config import DataConfig
from tunelab.check import check, render
from tunelab.data import load
from tunelab.errors import UserError
from tunelab.tasks import TASKS


def codes(report, level=None):
    return {f.code for f in report.findings if level is None or f.level == level}


def lines_of(report, code):
    return [n for f in report.findings if f.code == code for n in f.lines]


@pytest.fixture
def clean_rows():
    return make_rows(60, 5)


def test_clean_data_passes_with_exit_code_0(tmp_path, clean_rows, tiny_model):
    report = check(write_jsonl(tmp_path / "ok.jsonl", clean_rows), "classification", model=None,
                   label_errors=False)
    assert report.examples == 60 and report.exit_code == 0, render(report)
    assert report.stats["labels"] == {"negative": 20, "neutral": 20, "positive": 20}
    assert report.stats["tokens"]["model"] == "minilm" and report.stats["tokens"]["max"] < 40


def test_every_format_problem_is_listed_with_its_line_and_code(tmp_path, clean_rows):
    lines = [json.dumps(r) for r in clean_rows[:10]]
    lines[2] = '{"text": "cut off", "label": '
    lines[5] = '{"label": "positive"}'
    lines[7] = '["a list"]'
    lines[8] = '{"text": "no label here"}'
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    report = check(path, "classification", label_errors=False)
    errors = {f.lines[0]: f.code for f in report.findings if f.level == "error"}
    assert errors == {3: "bad-json", 6: "missing-text", 8: "not-an-object", 9: "missing-label"}
    assert report.examples == 6 and report.exit_code == 2
    assert "broken.jsonl:3  invalid JSON" in render(report)


def test_many_bad_records_are_found_in_one_reading_each_with_its_errors_code(tmp_path, clean_rows, monkeypatch):
    lines = [json.dumps(r) for r in clean_rows[:40]]
    bad = {3: ('{"text": "cut off", "label": ', "bad-json"),
           7: ('["a list"]', "not-an-object"),
           12: ('{"label": "positive"}', "missing-text"),
           18: ('{"text": "no label"}', "missing-label"),
           25: ('{"text": "x", "label": ["invalid JSON", "not UTF-8"]}', "wrong-type"),  # its value quotes others' words
           31: ('{"text": "x", "label": " "}', "empty"),
           36: ('{"text": 5, "label": "positive"}', "wrong-type")}
    for n, (line, _) in bad.items():
        lines[n - 1] = line
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    parsed, reads = [], []
    parse_json, read = load.parse_json, TASKS["classification"].read
    monkeypatch.setattr(load, "parse_json", lambda text, p, n: parsed.append(n) or parse_json(text, p, n))
    monkeypatch.setattr(TASKS["classification"], "read", lambda *a, **k: reads.append(a[0]) or read(*a, **k))
    report = check(path, "classification", label_errors=False)
    errors = [(f.lines, f.code) for f in report.findings if f.level == "error"]
    assert errors == [([n], code) for n, (_, code) in sorted(bad.items())]
    assert report.examples == 40 - len(bad)
    assert reads == [path] and parsed == list(range(1, 41))  # one reading: each line parsed once, in order


def test_a_findings_code_is_the_one_its_error_was_raised_with(tmp_path, clean_rows, monkeypatch):
    def parse_label(value, path, line, key):
        if value == "neutral":  # a message that reads like other problems does not change the code
            raise UserError("invalid JSON, not UTF-8, empty", str(path), line, "made-up")
        if value == "negative":
            raise UserError("a problem with no code of its own", str(path), line)
        return value
    monkeypatch.setattr(TASKS["classification"], "parse_label", parse_label)
    report = check(write_jsonl(tmp_path / "d.jsonl", clean_rows[:12]), "classification", label_errors=False)
    codes_by_label = {r["label"]: set() for r in clean_rows[:12]}
    for f in report.findings:
        if f.level == "error":
            codes_by_label[clean_rows[f.lines[0] - 1]["label"]].add(f.code)
    assert codes_by_label == {"neutral": {"made-up"}, "negative": {"invalid-record"}, "positive": set()}


def test_reading_stops_at_the_bad_record_after_the_limit(tmp_path, clean_rows, monkeypatch):
    monkeypatch.setattr(check_module, "MAX_PROBLEMS", 3)
    rows = [{"text": r["text"]} if i % 2 else r for i, r in enumerate(clean_rows[:12])]  # lines 2, 4, ... 12
    report = check(write_jsonl(tmp_path / "d.jsonl", rows), "classification", label_errors=False)
    assert sorted(f.lines[0] for f in report.findings if f.level == "error") == [2, 4, 6, 8]  # the 4th ends it
    assert report.examples == 0 and report.exit_code == 2


def test_csv_rows_are_checked_in_one_reading_and_a_bad_header_stops_it(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\ngood one,a\nhello\rworld,a\ntoo,many,fields\n,b\nfine,b\n", encoding="utf-8")
    report = check(path, "classification", label_errors=False)
    assert {f.lines[0]: f.code for f in report.findings if f.level == "error"} == \
        {3: "invalid-record", 4: "field-count", 5: "empty"}
    assert report.examples == 2
    path.write_text("te\rxt,label\ngood one,a\n,b\n", encoding="utf-8")
    report = check(path, "classification", label_errors=False)
    assert [(f.lines, f.code) for f in report.findings if f.level == "error"] == [([1], "invalid-record")]


def test_a_file_of_only_bad_records_lists_them_and_nothing_more(tmp_path):
    chat = [{"messages": [{"role": "robot", "content": "beep"}]}, {"messages": [{"role": "user", "content": "hi"}]}]
    report = check(write_jsonl(tmp_path / "chat.jsonl", chat), "chat", label_errors=False)
    assert [(f.lines, f.code) for f in report.findings] == [([1], "unknown-role"), ([2], "no-assistant")]
    assert report.examples == 0


def test_chat_and_dpo_files_get_their_own_problems(tmp_path):
    chat = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "ok"}]},
            {"messages": [{"role": "user", "content": "hi"}]},
            {"messages": [{"role": "user"}, {"role": "assistant", "content": "ok"}]}]
    report = check(write_jsonl(tmp_path / "chat.jsonl", chat), label_errors=False)  # the task from the records
    assert report.task == "chat"
    assert {f.lines[0]: f.code for f in report.findings if f.level == "error"} == \
        {2: "unknown-role", 3: "no-assistant", 4: "missing-content"}
    dpo = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "same", "rejected": "same"}]
    report = check(write_jsonl(tmp_path / "dpo.jsonl", dpo), label_errors=False)
    assert report.task == "dpo" and [f.lines for f in report.findings if f.level == "error"] == [[2]]


def test_duplicates_near_duplicates_and_conflicting_labels(tmp_path, clean_rows):
    rows = clean_rows[:30]
    rows.append(dict(rows[0]))  # line 31: an exact copy of line 1
    rows.append({"text": "  " + rows[1]["text"].upper() + " ", "label": rows[1]["label"]})  # 32: same after folding
    other = "negative" if rows[2]["label"] != "negative" else "positive"
    rows.append({"text": rows[2]["text"], "label": other})  # 33: line 3's text, another label
    rows.append({"text": rows[3]["text"] + " ok", "label": rows[3]["label"]})  # 34: nearly line 4
    report = check(write_jsonl(tmp_path / "dups.jsonl", rows), "classification", label_errors=False)
    exact = [f.lines for f in report.findings if f.code == "exact-duplicate"]
    assert [1, 31] in exact and [2, 32] in exact
    assert lines_of(report, "conflicting-labels") == [3, 33]
    assert [4, 34] in [f.lines for f in report.findings if f.code == "near-duplicate"]
    assert report.exit_code == 1
    flagged = {n for f in report.findings for n in f.lines}
    assert not flagged & {5, 6, 7, 8, 9, 10}  # the valid twins


def test_leakage_between_train_and_eval(tmp_path, clean_rows):
    train = write_jsonl(tmp_path / "train.jsonl", clean_rows[:40])
    evaluation = clean_rows[40:] + [clean_rows[0], {"text": clean_rows[1]["text"] + "!", "label": "x"}]
    report = check(train, "classification", eval_path=str(write_jsonl(tmp_path / "eval.jsonl", evaluation)),
                   label_errors=False)
    leak = {f.code: (f.file, f.lines) for f in report.findings if f.code.startswith("leak")}
    assert leak == {"leak-exact": (str(tmp_path / "eval.jsonl"), [21]), "leak-near": (str(tmp_path / "eval.jsonl"), [22])}


def test_imbalance_and_label_typos(tmp_path, clean_rows):
    rows = clean_rows + [{"text": "so good", "label": "postive"}, {"text": "truly good", "label": "Positive"}]
    rows += [r for r in make_rows(300, 6) if r["label"] == "negative"]
    report = check(write_jsonl(tmp_path / "labels.jsonl", rows), "classification", label_errors=False)
    typos = {f.message.split("'")[1]: f.lines for f in report.findings if f.code == "label-typo"}
    assert typos == {"postive": [61], "Positive": [62]}
    assert "imbalance" in codes(report)
    assert "label-typo" not in codes(check(write_jsonl(tmp_path / "ok.jsonl", clean_rows), "classification",
                                           label_errors=False))


def test_spam_noise_and_boilerplate(tmp_path, clean_rows):
    rows = [dict(r) for r in clean_rows]
    for r in rows[:10]:
        r["text"] += " Sent from my shiny new phone"
    rows += [{"text": "https://spam.example.com/win", "label": "neutral"},
             {"text": "noooooooooooo", "label": "negative"}, {"text": "ok", "label": "neutral"},
             {"text": "see https://docs.example.com for the good details", "label": "positive"}]
    report = check(write_jsonl(tmp_path / "noise.jsonl", rows), "classification", label_errors=False)
    assert lines_of(report, "url-only") == [61] and lines_of(report, "repeated-characters") == [62]
    assert lines_of(report, "too-short") == [63]
    assert lines_of(report, "boilerplate") == list(range(1, 11))


def test_truncation_in_the_models_tokens(tmp_path, clean_rows, tiny_model):
    rows = clean_rows[:20] + [{"text": " ".join(["word"] * 80), "label": "neutral"}]
    report = check(write_jsonl(tmp_path / "long.jsonl", rows), "classification", model=tiny_model,
                   cfg=DataConfig(max_length=32), label_errors=False, batch_size=4, epochs=2)
    assert lines_of(report, "truncated") == [21]
    estimate = report.stats["estimate"]
    assert estimate["measured_steps"] >= 2 and estimate["training_seconds"] == pytest.approx(
        estimate["seconds_per_example"] * 21 * 2)


def test_likely_label_errors_are_found(tmp_path):
    rows = make_rows(300, 7)
    names = ["negative", "neutral", "positive"]
    wrong = [10, 50, 90, 130, 170]
    for i in wrong:  # each to the next class
        rows[i]["label"] = names[(names.index(rows[i]["label"]) + 1) % 3]
    report = check(write_jsonl(tmp_path / "noisy.jsonl", rows), "classification")
    found = set(lines_of(report, "label-error"))
    assert {i + 1 for i in wrong} <= found, render(report)
    assert len(found) <= 15  # few clean rows accused
    assert report.stats["label_error_probe"]["accuracy"] > 0.8


@pytest.mark.slow
def test_the_cli_prints_a_table_or_json_and_exits_by_the_worst_finding(tmp_path, clean_rows):
    ok = write_jsonl(tmp_path / "ok.jsonl", clean_rows)
    run = ["data", "check", "--no-label-errors"]
    done = forkrun.run(run + [ok])
    assert done.returncode == 0 and "result: clean (exit code 0)" in done.stdout, done.stderr
    dup = write_jsonl(tmp_path / "dup.jsonl", clean_rows + [clean_rows[0]])
    done = forkrun.run(run + [dup, "--json"])
    data = json.loads(done.stdout)
    assert done.returncode == 1 and data["exit_code"] == 1 and data["findings"][0]["code"] == "exact-duplicate"
    sjis = tmp_path / "sjis.csv"
    sjis.write_bytes("text,label\r\nとても良い,positive\r\n最悪でした,negative\r\n".encode("cp932"))
    done = forkrun.run(run + [sjis])
    assert done.returncode == 2 and "looks like Shift_JIS (CP932)" in done.stdout and "Traceback" not in done.stderr
    done = forkrun.run(run + [sjis, "--encoding", "auto"])
    assert "2 examples read as classification data (Shift_JIS (CP932))" in done.stdout
