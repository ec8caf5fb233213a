"""The command line: every family of commands is reachable, and the data commands' reading flags are the
training config's settings (generated from DataConfig, checked by its types and ranges)."""
from __future__ import annotations

import json

import pytest
from conftest import make_rows, write_jsonl

from tunelab.cli import build_parser, main


def test_every_family_registers_its_commands():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"train", "compare", "lr-find", "tune", "predict", "export", "generate", "chat", "eval", "models",
            "serve", "worker", "keys", "data"} <= set(sub.choices)


def test_data_clean_reads_the_columns_its_generated_flags_name(tmp_path):
    rows = [{"body": r["text"], "y": r["label"]} for r in make_rows(20, 3)]
    rows.append(dict(rows[0]))  # an exact copy: the one record --drop-duplicates removes
    src = write_jsonl(tmp_path / "train.jsonl", rows)
    out = tmp_path / "clean.jsonl"
    assert main(["data", "clean", str(src), "-o", str(out), "--task", "classification", "--text-column", "body",
                 "--label-column", "y", "--drop-duplicates"]) == 0
    kept = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(kept) == 20 and kept[0] == rows[0]


@pytest.mark.parametrize("flag, value, says", [("--max-length", "3", "--max-length"),
                                               ("--max-length", "many", "--max-length")])
def test_a_bad_reading_flag_is_refused_by_the_settings_own_check(tmp_path, capsys, flag, value, says):
    src = write_jsonl(tmp_path / "train.jsonl", make_rows(10, 1))
    assert main(["data", "clean", str(src), "-o", str(tmp_path / "out.jsonl"), flag, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tunelab: error:") and says in err[0]
