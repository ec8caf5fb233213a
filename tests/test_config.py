"""Typed config: YAML and flags reach every field, types are checked, the resolved config round-trips."""
from __future__ import annotations

import re

import pytest
import yaml

from tunelab.cli import build_parser, config_from_args
from tunelab.config import Config, choices, iter_fields, load_yaml, save_yaml, validate
from tunelab.errors import UserError


def test_every_field_has_help_and_a_flag():
    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for key, f, _ in iter_fields():
        assert f.metadata["help"], key
        assert f"--{key}" in help_text


def test_yaml_then_flags_then_set_override_in_order(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: 1.0e-4\n  epochs: 5\ntuning:\n  name: lora\n  lora_targets: [query, key]\n")
    args = build_parser().parse_args(["train", str(p), "--lr", "3e-5", "--set", "train.epochs=7",
                                      "--tuning.lora_r", "4", "--train.bf16"])
    cfg = config_from_args(args)
    assert (cfg.train.lr, cfg.train.epochs, cfg.tuning.name) == (3e-5, 7, "lora")
    assert cfg.tuning.lora_targets == ["query", "key"] and cfg.tuning.lora_r == 4 and cfg.train.bf16 is True


def test_contract_flags_keep_their_spelling():
    args = build_parser().parse_args([
        "train", "--model", "m", "--task", "classification", "--tuning", "partial", "--train", "t.jsonl",
        "--eval", "e.jsonl", "--eval-split", "0.2", "--output", "o", "--epochs", "2", "--lr", "1e-3",
        "--batch-size", "4", "--max-length", "32", "--seed", "7"])
    cfg = config_from_args(args)
    assert (cfg.model.name, cfg.tuning.name, cfg.data.train, cfg.data.eval, cfg.data.eval_split, cfg.output,
            cfg.train.epochs, cfg.train.lr, cfg.train.batch_size, cfg.data.max_length, cfg.train.seed) == (
        "m", "partial", "t.jsonl", "e.jsonl", 0.2, "o", 2, 1e-3, 4, 32, 7)


def test_resolved_config_round_trips(tmp_path):
    cfg = Config()
    cfg.train.lr, cfg.model.dropout, cfg.tuning.lora_targets = 2e-5, 0.0, ["dense"]
    save_yaml(cfg, tmp_path / "config.yaml")
    assert load_yaml(tmp_path / "config.yaml") == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["lr"] == 2e-5


def test_wrong_type_in_yaml_is_refused(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  batch_size: 2.5\n")
    with pytest.raises(UserError, match="setting 'train.batch_size' must be int, got 2.5"):
        load_yaml(p)


def test_every_numeric_setting_has_a_range_shown_in_help():
    help_text = " ".join(build_parser()._subparsers._group_actions[0].choices["train"].format_help().split())
    for key, f, tp in iter_fields():
        if tp in (int, float, int | None, float | None):
            assert f.metadata["range"] is not None, key
            assert f"valid: {f.metadata['range']}" in help_text, key


@pytest.mark.parametrize("flag,value,words", [
    ("--eval.bootstrap", "1000000000", "must be in [0, 100,000]"), ("--data.max_length", "1000000000", "[8, 65,536]"),
    ("--train.augment_copies", "1000000", "[1, 100]"), ("--train.keep_checkpoints", "1000000", "[1, 100]"),
    ("--tuning.lora_r", "1000000", "[1, 1024]"), ("--train.eval_every", "-1", "[0, "),
    ("--data.limit_train", "-5", "[0, "), ("--train.early_stopping_patience", "-1", "[0, 10,000]"),
    ("--lr", "nan", "finite"), ("--lr", "inf", "finite"), ("--lr", "1e400", "finite"), ("--lr", "0", "(0, 10]"),
    ("--epochs", "1e400", "must be int"), ("--seed", "9" * 5000, "must be int"), ("--eval-split", "1", "(0, 1)")])
def test_settings_outside_their_range_are_refused(flag, value, words):
    with pytest.raises(UserError, match=re.escape(words)) as e:
        config_from_args(build_parser().parse_args(["train", flag, value]))
    assert len(str(e.value)) < 200  # a 5,000-digit value is not echoed back whole


def test_a_config_built_in_python_is_range_checked_too():
    cfg = Config()
    cfg.data.train, cfg.eval.bootstrap = "t.jsonl", 10**9
    with pytest.raises(UserError, match=re.escape("'eval.bootstrap' must be in [0, 100,000]")):
        validate(cfg)


@pytest.mark.parametrize("flag,value", [("--train.schedule", "cosin"), ("--data.overlong", "cut"),
                                        ("--train.device", "tpu"), ("--tuning", "dora"), ("--model.pooling", "median"),
                                        ("--tuning.head_solver", "adam")])
def test_a_closed_choice_names_its_values(flag, value):
    with pytest.raises(UserError, match=r"must be one of .*, got '?" + value) as e:
        config_from_args(build_parser().parse_args(["train", flag, value]))


def test_closed_choices_are_shown_in_help_and_checked_in_python_built_configs():
    help_text = " ".join(build_parser()._subparsers._group_actions[0].choices["train"].format_help().split())
    assert "one of: linear, cosine, constant" in help_text
    cfg = Config()
    cfg.data.train, cfg.train.schedule = "t.jsonl", "step"
    with pytest.raises(UserError, match="'train.schedule' must be one of linear, cosine, constant, got 'step'"):
        validate(cfg)


def test_the_tuning_choices_are_the_registered_methods():
    """config may not import the method registry (layers point one way), so the closed choice names them."""
    from tunelab.methods import METHODS

    assert set(choices(dict((k, tp) for k, _, tp in iter_fields())["tuning.name"])) == {"auto", *METHODS}


def test_auto_tuning_is_lora_for_a_decoder_with_a_head_and_full_otherwise(task_config, tiny_llama):
    """auto resolves when the config is validated: a decoder under a head (classification, ner) gets lora; an
    encoder, or a decoder's own language-model stage, full."""
    from tunelab.validate import validate

    for task, model, expected in (("classification", tiny_llama, "lora"), ("ner", tiny_llama, "lora"),
                                  ("classification", None, "full"), ("image-classification", None, "full")):
        cfg = task_config(task)
        cfg.tuning.name = "auto"
        if model:
            cfg.model.name = model
        validate(cfg)
        assert cfg.tuning.name == expected, (task, model)


def test_the_task_choices_are_the_registered_tasks():
    """The same for tasks: the typed config and the service's request bodies name them without the registry."""
    from tunelab.tasks import TASKS

    assert list(choices(dict((k, tp) for k, _, tp in iter_fields())["task"])) == list(TASKS)
