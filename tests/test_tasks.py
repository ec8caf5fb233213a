"""Each task's metrics against hand-computed values; data reading, alignment and splits per task."""
from __future__ import annotations

import json
import math

import pytest
import torch
from sklearn.metrics import f1_score

from tunelab.cli import main
from tunelab.config import DataConfig
from tunelab.data import fold_split, fraction
from tunelab.data.load import Example, Problems
from tunelab.errors import UserError
from tunelab.evaluate.stats import bootstrap_ci, t_interval
from tunelab.tasks import TASKS, Space

CLS, ML, REG, NER = (TASKS[n] for n in ("classification", "multilabel", "regression", "ner"))


def test_classification_scores_by_hand():
    golds, preds = [0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0]
    m = CLS.score(preds, golds, Space(["a", "b", "c"]))
    # per class F1: a 0.5 (P 1/2, R 1/2), b 0.8 (P 2/3, R 1), c 2/3 (P 1, R 1/2)
    assert m["f1_macro"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["f1_macro"] == pytest.approx(f1_score(golds, preds, average="macro"))
    assert CLS.details(preds, golds, Space(["a", "b", "c"]))["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]


def test_multilabel_scores_by_hand():
    golds = [frozenset({0, 1}), frozenset({1}), frozenset()]
    preds = [frozenset({0}), frozenset({1, 2}), frozenset()]
    m = ML.score(preds, golds, Space(["x", "y", "z"]))
    # micro: TP 2, FP 1 (z in row 2), FN 1 (y in row 1) -> F1 4/6; per label F1: x 1, y 2/3, z 0
    assert m["f1_micro"] == pytest.approx(2 / 3)
    assert m["f1_macro"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert m["exact_match"] == pytest.approx(1 / 3)
    assert m["precision_micro"] == pytest.approx(2 / 3) and m["recall_micro"] == pytest.approx(2 / 3)


def test_multilabel_threshold_is_tuned_on_the_eval_set():
    # Probabilities of the true labels sit around 0.3: a 0.5 threshold misses them all, 0.25 finds them.
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    outputs = [torch.tensor([logit(0.3), logit(0.1)]), torch.tensor([logit(0.1), logit(0.32)])]
    items = [{"_gold": frozenset({0})}, {"_gold": frozenset({1})}]
    space = Space(["x", "y"])
    assert ML.score(ML.decode(outputs, items, space), [it["_gold"] for it in items], space)["f1_micro"] == 0
    tuned = ML.tune(outputs, items, space)
    assert 0.1 < tuned["threshold"] <= 0.3 and tuned["f1_micro_at_threshold"][tuned["threshold"]] == 1.0


def test_regression_scores_by_hand():
    m = REG.score([1, 2, 3, 5], [1, 2, 3, 4], Space())
    assert m == pytest.approx({"mse": 0.25, "mae": 0.25, "r2": 1 - 0.25 / 1.25})


def test_regression_targets_are_standardised_and_decoded_back():
    train = [Example("a", 100.0), Example("b", 300.0)]
    space = REG.space(train, "t")
    assert (space.target_mean, space.target_std) == (200.0, 100.0)
    assert REG.target(300.0, space) == 1.0
    assert REG.decode([torch.tensor([1.0]), torch.tensor([-0.5])], [{}, {}], space) == [300.0, 150.0]


def test_ner_entity_scores_by_conlleval_rules():
    gold = [["B-PER", "I-PER", "O", "B-LOC"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"]]
    m = NER.score(pred, gold, Space())
    assert m["f1"] == pytest.approx(0.5) and m["precision"] == pytest.approx(0.5) and m["recall"] == pytest.approx(0.5)
    assert m["accuracy"] == pytest.approx(3 / 4)
    # conlleval: an I- tag after O opens an entity, so this prediction matches the gold entity exactly
    assert NER.score([["O", "I-PER"]], [["O", "B-PER"]], Space())["f1"] == 1.0
    # a wrong boundary is a miss, not half a hit
    assert NER.score([["B-PER", "O"]], [["B-PER", "I-PER"]], Space())["f1"] == 0.0


def test_ner_reads_conll_and_aligns_first_subtokens(tmp_path, tiny_model):
    from transformers import AutoTokenizer

    p = tmp_path / "d.conll"
    p.write_text("-DOCSTART- O\n\nJohn\tB-PER\nunbelievably\tO\nin\tO\nnew\tB-LOC\nyork\tI-LOC\n\nhi O\n",
                 encoding="utf-8")
    rows = NER.read(p, DataConfig())
    assert [r.tokens for r in rows] == [["John", "unbelievably", "in", "new", "york"], ["hi"]]
    assert rows[0].label == ["B-PER", "O", "O", "B-LOC", "I-LOC"] and rows[0].where.endswith(":3")
    space = NER.space(rows, str(p))
    tok = AutoTokenizer.from_pretrained(tiny_model)
    item = NER.encode(tok, rows[:1], space, 64)[0]
    pieces = tok.convert_ids_to_tokens(item["input_ids"])
    labelled = [(piece, space.labels[l]) for piece, l in zip(pieces, item["labels"]) if l != -100]
    assert labelled == [("john", "B-PER"), ("un", "O"), ("in", "O"), ("new", "B-LOC"), ("york", "I-LOC")]
    assert len(pieces) > 7  # "unbelievably" is several pieces; only the first carries the tag


def test_ner_truncated_words_count_as_missed(tmp_path, tiny_model):
    from transformers import AutoTokenizer

    rows = [Example("", ["O"] * 10 + ["B-PER"], tokens=["word"] * 10 + ["alice"])]
    tok = AutoTokenizer.from_pretrained(tiny_model)
    space = Space(["B-PER", "O"])
    item = NER.encode(tok, rows, space, 8)[0]  # room for 6 words: "alice" is cut off
    outputs = [torch.zeros(len(item["input_ids"]), 2)]
    pred = NER.decode(outputs, [item], space)[0]
    assert len(pred) == 11 and pred[-1] == "O"
    assert NER.score([pred], [item["_gold"]], space)["recall"] == 0.0


@pytest.mark.parametrize("content, expected", [
    ('{"tokens": ["a", "b"], "tags": ["O"]}', "1 tags for 2 tokens"),
    ('{"tokens": ["a"], "tags": ["PER"]}', "tag 'PER' is not IOB2"),
    ('{"words": ["a"], "tags": ["O"]}', "missing 'tokens'"),
])
def test_ner_bad_records_name_the_line(tmp_path, content, expected):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"tokens": ["x"], "tags": ["B-LOC"]}\n' + content + "\n", encoding="utf-8")
    with pytest.raises(UserError) as e:
        NER.read(p, DataConfig())
    assert expected in str(e.value) and f"{p}:2:" in str(e.value)


def test_ner_notes_every_bad_record_when_problems_are_collected(tmp_path):
    conll = tmp_path / "d.conll"
    conll.write_text("EU\tB-ORG\nrejects\tO\n\nPeter\tB-PER\nBlackburn\tX-PER\n\nlonely\nGerman\tB-MISC\n",
                     encoding="utf-8")
    problems = Problems(limit=10)
    rows = NER.read(conll, DataConfig(), problems=problems)
    assert [e.line for e in problems.errors] == [5, 7]
    assert [r.text for r in rows] == ["EU rejects", "Peter", "German"]  # a bad line reads as a sentence break
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"tokens": ["a"], "tags": ["O"]}\n{"tokens": [], "tags": []}\n{"tokens": ["a"], "tags": "O"}\n'
                     '{"tokens": ["b"], "tags": ["B-LOC"]}\n', encoding="utf-8")
    problems = Problems(limit=10)
    rows = NER.read(jsonl, DataConfig(), problems=problems)
    assert [(e.line, e.code) for e in problems.errors] == [(2, "empty"), (3, "wrong-type")]
    assert [r.text for r in rows] == ["a", "b"]


@pytest.mark.parametrize("value, expected", [("abc", "must be a number"), (float("nan"), "finite number"),
                                             (True, "finite number")])
def test_regression_refuses_non_numbers(tmp_path, value, expected):
    p = tmp_path / "r.jsonl"
    p.write_text(json.dumps({"text": "t", "target": 1}) + "\n" + json.dumps({"text": "t", "target": value}) + "\n")
    with pytest.raises(UserError) as e:
        REG.read(p, DataConfig())
    assert expected in str(e.value) and ":2:" in str(e.value)


def test_multilabel_reads_lists_and_csv_cells(tmp_path):
    p = tmp_path / "m.csv"
    p.write_text('text,labels\nhello,"sport|news"\nbye,\n', encoding="utf-8")
    assert [r.label for r in ML.read(p, DataConfig())] == [["sport", "news"], []]


def test_bootstrap_interval_brackets_the_estimate_and_narrows_with_data():
    space = Space(["a", "b"])
    small = bootstrap_ci(CLS, [0, 1, 1, 0] * 10, [0, 1, 0, 0] * 10, space, 500, seed=1)
    large = bootstrap_ci(CLS, [0, 1, 1, 0] * 100, [0, 1, 0, 0] * 100, space, 500, seed=1)
    acc = 0.75
    assert small["accuracy"][0] < acc < small["accuracy"][1]
    assert large["accuracy"][1] - large["accuracy"][0] < (small["accuracy"][1] - small["accuracy"][0]) / 2
    assert small == bootstrap_ci(CLS, [0, 1, 1, 0] * 10, [0, 1, 0, 0] * 10, space, 500, seed=1)


def test_resampled_classification_scores_equal_scoring_each_resample():
    """The vectorised bootstrap (one confusion matrix per resample at once) gives the same numbers as `score` on
    each resample, also with a class the model never predicts and one absent from a resample."""
    import numpy as np

    space = Space(["a", "b", "c", "d"])
    rng = np.random.default_rng(0)
    golds = rng.integers(0, 4, 50).tolist()
    for preds in ([g if rng.random() < 0.6 else int(rng.integers(0, 4)) for g in golds], [0] * 50):
        idx = rng.integers(0, 50, (200, 50))
        fast = CLS.score_resamples(preds, golds, space, idx)
        for r, row in enumerate(idx):
            one = CLS.score([preds[i] for i in row], [golds[i] for i in row], space)
            assert {k: fast[k][r] for k in one} == one


def test_t_interval_by_hand():
    s = t_interval([0.7, 0.8, 0.9])
    half = 4.302653 * 0.1 / math.sqrt(3)  # t(0.975, df=2)
    assert s["mean"] == pytest.approx(0.8) and s["std"] == pytest.approx(0.1)
    assert s["ci"] == pytest.approx([0.8 - half, 0.8 + half], abs=1e-5)


def _rows(n):
    return [Example(f"t{i}", "ab"[i % 3 == 0], group=f"g{i // 4}") for i in range(n)]


def test_fractions_are_nested_and_stratified():
    rows = _rows(200)
    strata = [r.label for r in rows]
    parts = [fraction(rows, strata, f, seed=0) for f in (0.1, 0.25, 0.5, 1.0)]
    for small, big in zip(parts, parts[1:]):
        assert {r.text for r in small} < {r.text for r in big}
    share = sum(r.label == "b" for r in parts[0]) / len(parts[0])
    assert share == pytest.approx(sum(s == "b" for s in strata) / 200, abs=0.05)


@pytest.mark.parametrize("grouped", [False, True])
def test_folds_cover_everything_once_and_never_split_a_group(grouped):
    rows = _rows(60) if grouped else [Example(r.text, r.label) for r in _rows(60)]
    held = [fold_split(rows, [r.label for r in rows], 3, k, seed=0)[1] for k in range(3)]
    texts = [r.text for part in held for r in part]
    assert sorted(texts) == sorted(r.text for r in rows)
    if grouped:
        homes = [{r.group for r in part} for part in held]
        assert not (homes[0] & homes[1]) and not (homes[1] & homes[2]) and not (homes[0] & homes[2])


def test_cross_validation_keeps_every_fold_and_reports_intervals(toy_config, tmp_path, capsys):
    from tunelab.config import save_yaml

    toy_config.data.eval, toy_config.eval.folds, toy_config.train.epochs = None, 3, 1
    toy_config.eval.bootstrap, toy_config.eval.probe = 0, False
    save_yaml(toy_config, tmp_path / "cv.yaml")
    assert main(["train", str(tmp_path / "cv.yaml")]) == 0
    run = tmp_path / "run"
    assert all((run / f"fold-{k}" / "metrics.json").is_file() for k in range(3))
    cv = json.loads((run / "cv.json").read_text())
    folds = [json.loads((run / f"fold-{k}" / "metrics.json").read_text())["eval"]["f1_macro"] for k in range(3)]
    s = cv["eval"]["f1_macro"]
    assert s["mean"] == pytest.approx(sum(folds) / 3) and s["n"] == 3 and s["ci"][0] <= s["mean"] <= s["ci"][1]
    assert sum(json.loads((run / f"fold-{k}" / "metrics.json").read_text())["train"]["eval_examples"]
               for k in range(3)) == 96
    assert "3-fold cross-validation" in capsys.readouterr().out


def test_folds_with_an_eval_file_are_refused(toy_config, capsys, tmp_path):
    from tunelab.config import save_yaml

    toy_config.eval.folds = 3
    save_yaml(toy_config, tmp_path / "c.yaml")
    assert main(["train", str(tmp_path / "c.yaml")]) == 2
    assert "--folds splits the training data" in capsys.readouterr().err


def test_unknown_metric_for_the_task_is_refused(toy_config):
    from tunelab.validate import validate

    toy_config.task, toy_config.train.metric = "regression", "f1_macro"
    with pytest.raises(UserError, match="not one of the regression task's"):
        validate(toy_config)


@pytest.mark.parametrize("task", ["classification", "ner"])
def test_linear_probe_and_majority_sit_beside_the_model(task, task_config):
    from tunelab.pipeline import train

    cfg = task_config(task)
    cfg.eval.probe = True
    m = train(cfg).metrics
    if task == "ner":  # the probe reads each word's first sub-token, tags as names (it once broke on those)
        assert m["baseline"]["linear_probe"]["f1"] > m["baseline"]["majority"]["f1"]
        return
    assert set(m["baseline"]) == {"majority", "linear_probe"}
    assert m["baseline"]["majority"]["accuracy"] == pytest.approx(1 / 3, abs=0.05)  # 30 balanced eval rows
    assert m["baseline"]["linear_probe"]["accuracy"] > m["baseline"]["majority"]["accuracy"]
    lo, hi = m["ci95"]["f1_macro"]
    assert lo <= m["eval"]["f1_macro"] <= hi
    assert m["inference"]["latency_ms"] > 0 and m["inference"]["model_mb"] > 0


@pytest.mark.parametrize("task", ["regression", "multilabel", "ner"])
def test_every_task_trains_end_to_end_and_beats_its_trivial_baseline(task, task_config):
    from tunelab.pipeline import train

    cfg = task_config(task)
    cfg.train.epochs = 6
    m = train(cfg).metrics
    main_metric = TASKS[task].primary
    trivial = next(iter(m["baseline"].values()))
    assert m["eval"][main_metric] > trivial[main_metric] + 0.1, (m["eval"], trivial)
