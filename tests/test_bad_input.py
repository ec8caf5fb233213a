"""Every bad input gets one clear message naming the file, line or setting, exit code 2, and no traceback."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tunelab.cli import main


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


@pytest.fixture
def base_args(tiny_model, tmp_path):
    return ["train", "--model", tiny_model, "--output", str(tmp_path / "run"), "--epochs", "1",
            "--train.progress", "false"]


def bad_file(tmp_path: Path, name: str, content: bytes) -> str:
    p = tmp_path / name
    p.write_bytes(content)
    return str(p)


GOOD = b'{"text": "good day", "label": "pos"}\n{"text": "bad day", "label": "neg"}\n'

CASES = {
    "missing file": (None, "file not found"),
    "empty file": (("empty.jsonl", b""), "no examples found"),
    "invalid json": (("bad.jsonl", GOOD + b'{"text": "oops", "label": \n'), "bad.jsonl:3: invalid JSON"),
    "missing label": (("nolabel.jsonl", GOOD + b'{"text": "hi"}\n'), "nolabel.jsonl:3: missing label field 'label'"),
    "missing text": (("notext.jsonl", b'{"label": "a"}\n'), "notext.jsonl:1: missing text field 'text'"),
    "ragged csv": (("ragged.csv", b"text,label\nhello,a\nworld,b,extra\n"),
                   "ragged.csv:3: row has 3 fields but the header has 2"),
    "csv no label column": (("cols.csv", b"sentence,label\nhello,a\n"), "cols.csv:1: no 'text' column"),
    "non utf8": (("latin.jsonl", GOOD + '{"text": "caf\xe9", "label": "pos"}\n'.encode("latin-1")),
                 "latin.jsonl:3: not UTF-8 text"),
    "one class": (("one.jsonl", b'{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n'),
                  "classification needs at least two"),
    "non-scalar label": (("listlabel.jsonl", GOOD + b'{"text": "a", "label": [1]}\n'),
                         "listlabel.jsonl:3: label 'label' must be a string or an integer"),
    "unknown format": (("data.parquet", b"xx"), "unknown data format"),
    "csv carriage return": (("cr.csv", b"text,label\nhello\rworld,a\n"), "cr.csv:2: not valid CSV"),  # Hypothesis found it
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_training_data(case, capsys, base_args, tmp_path):
    spec, expected = CASES[case]
    path = str(tmp_path / "nope.jsonl") if spec is None else bad_file(tmp_path, *spec)
    code, err = run_cli(capsys, *base_args, "--train", path)
    assert code == 2
    assert expected in err and err.startswith("tunelab: error: ")
    assert path.split("/")[-1] in err
    assert not (tmp_path / "run").exists()  # refused before any run folder is written


def test_eval_label_unseen_in_training(capsys, base_args, tmp_path):
    train = bad_file(tmp_path, "train.jsonl", GOOD)
    evaluation = bad_file(tmp_path, "eval.jsonl", GOOD + b'{"text": "meh", "label": "neutral"}\n')
    code, err = run_cli(capsys, *base_args, "--train", train, "--eval", evaluation)
    assert code == 2
    assert "eval.jsonl:3: label 'neutral' never occurs in the training data" in err


@pytest.mark.parametrize("argv, expected", [
    (["--tuning", "bogus"], "'tuning.name' must be one of auto, scratch, head, partial, full, lora, qlora, distill, got 'bogus'"),
    (["--set", "train.lrr=1"], "unknown config key 'train.lrr' (did you mean 'train.lr'?)"),
    (["--epochs", "two"], "setting 'train.epochs' must be int, got 'two'"),
    (["--model", "/no/such/model"], "'/no/such/model' is neither a bundled model"),
    (["--task", "poetry"], "setting 'task' must be one of classification, multilabel"),
])
def test_bad_settings(argv, expected, capsys, base_args, toy_data, tmp_path):
    code, err = run_cli(capsys, *base_args, "--train", toy_data["train"], *argv)
    assert code == 2
    assert expected in err
    assert not (tmp_path / "run").exists()


def test_unknown_key_in_yaml_names_the_file(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  epochs: 2\n  batchsize: 4\n")
    code, err = run_cli(capsys, "train", str(cfg))
    assert code == 2
    assert f"{cfg}: unknown config key 'train.batchsize' (did you mean 'train.batch_size'?)" in err


def test_existing_run_folder_is_not_overwritten(capsys, base_args, toy_data, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "precious.txt").write_text("keep me")
    code, err = run_cli(capsys, *base_args, "--train", toy_data["train"])
    assert code == 2 and "run folder already exists" in err
    assert (tmp_path / "run" / "precious.txt").read_text() == "keep me"


@pytest.mark.slow
def test_real_process_prints_one_line_and_exit_2(tiny_model, tmp_path):
    bad = bad_file(tmp_path, "bad.jsonl", b'{"text": 1, "label": "a"}\n')
    proc = subprocess.run([sys.executable, "-m", "tunelab", "train", "--model", tiny_model, "--train", bad,
                           "--output", str(tmp_path / "run")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"tunelab: error: {bad}:1: 'text' must be a string, got 1"


def _few(tmp_path, n: int = 18, classes: str = "abc") -> str:
    rows = b"".join(b'{"text": "text number %d", "label": "%s"}\n' % (i, classes[i % len(classes)].encode())
                    for i in range(n))
    return bad_file(tmp_path, "few.jsonl", rows)


def test_too_little_data_for_the_split_is_refused_with_the_numbers(capsys, base_args, tmp_path):
    few = _few(tmp_path)  # 10% of 18 is 2 held out, fewer than the 3 classes: sklearn raised a ValueError here
    code, err = run_cli(capsys, *base_args, "--train", few)
    assert code == 2 and err.startswith(f"tunelab: error: {few}: 18 examples of 3 classes (a 6, b 6, c 6)")
    assert "data.eval_split takes 2 of them" in err and not (tmp_path / "run").exists()
    code, err = run_cli(capsys, *base_args, "--train", _few(tmp_path, 60), "--data.limit_train", "2")
    assert code == 2 and "54 examples of 3 classes (a 18, b 18, c 18): data.limit_train takes 2 of them" in err


def test_data_check_calls_too_little_data_an_error(capsys, tmp_path):
    code = main(["data", "check", _few(tmp_path), "--task", "classification", "--no-label-errors"])
    out = capsys.readouterr().out
    assert code == 2 and "too-few" in out and "18 examples of 3 classes" in out


@pytest.mark.parametrize("text", ["", "   "])
def test_an_empty_text_is_an_error_unless_skipped(text, capsys, base_args, tmp_path):
    rows = GOOD * 10 + json.dumps({"text": text, "label": "pos"}).encode() + b"\n"
    data = bad_file(tmp_path, "blank.jsonl", rows)
    code, err = run_cli(capsys, *base_args, "--train", data)
    assert code == 2 and f"blank.jsonl:21: 'text' is empty" in err
    csv = bad_file(tmp_path, "blank.csv", b"text,label\ngood,pos\n" + text.encode() + b",neg\n")
    code, err = run_cli(capsys, *base_args, "--train", csv)
    assert code == 2 and "blank.csv:3: 'text' is empty" in err
    code, err = run_cli(capsys, *base_args, "--train", data, "--data.skip_invalid", "true", "--eval.bootstrap", "0",
                        "--eval.probe", "false")
    assert code == 0 and "skipped 1 invalid records (data.skip_invalid)" in err and "blank.jsonl:21" in err
