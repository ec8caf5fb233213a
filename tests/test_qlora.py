"""--tuning qlora: LoRA over 4-bit NF4 base weights (bitsandbytes, here on the CPU), exported merged into a plain
de-quantized copy."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from tunelab.errors import UserError
from tunelab.pipeline import build_job, train


def losses(run) -> list[float]:
    rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_qlora_holds_the_base_in_4_bits_and_trains_only_adapters_and_head(toy_config):
    toy_config.tuning.name, toy_config.model.dtype = "qlora", "bfloat16"
    job = build_job(toy_config, torch.device("cpu"))
    adapted = [type(m).__name__ for name, m in job.model.named_modules() if name.endswith(".base_layer")]
    assert adapted == ["Linear4bit"] * 12  # the 6 linear layers of each of the 2 blocks, under their adapters
    trainable = [n for n, p in job.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "classifier" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in job.model.parameters() if p.requires_grad)  # float32 masters
    head = job.model.base_model.model.classifier.modules_to_save.default
    assert type(head) is torch.nn.Linear  # the new head is never quantized
    from tunelab.models import count_params

    toy_config.tuning.name, toy_config.model.dtype = "lora", "float32"
    assert count_params(job.model) == count_params(build_job(toy_config, torch.device("cpu")).model)


def test_qlora_chat_learns_and_its_merged_export_computes_what_was_trained(lm_config):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.models import pretrained_kwargs, resolve

    cfg = lm_config("chat", "qlora")
    cfg.model.dtype, cfg.eval.bootstrap = "bfloat16", 0
    result = train(cfg)
    trace = losses(result.run_dir)
    assert trace[-1] < 0.7 * trace[0]
    assert result.eval["loss"] < result.metrics["baseline"]["before_training"]["loss"] - 0.5
    config = json.loads((result.model_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"

    tok = AutoTokenizer.from_pretrained(result.model_dir)
    text = tok.apply_chat_template([{"role": "user", "content": "name a city"}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    merged = AutoModelForCausalLM.from_pretrained(result.model_dir).eval()
    base4 = AutoModelForCausalLM.from_pretrained(resolve(cfg.model.name), **pretrained_kwargs(
        cfg.model, torch.device("cpu")))
    for module in base4.modules():  # (as the run did: see QLora.build)
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    adapted = PeftModel.from_pretrained(base4, result.run_dir / "adapter").eval()
    plain = AutoModelForCausalLM.from_pretrained(resolve(cfg.model.name)).eval()
    with torch.no_grad():
        a, b, c = (m(ids).logits.float() for m in (merged, adapted, plain))
    scale = b.abs().max()
    assert (a - b).abs().max() < 0.02 * scale  # bfloat16 arithmetic in a different order: close, not equal
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9
    assert (c - b).abs().max() > 0.3 * scale  # and the adapters did change the model


def test_qlora_without_bitsandbytes_is_one_line_naming_the_extra(toy_config, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ModuleNotFoundError
    toy_config.tuning.name = "qlora"
    with pytest.raises(UserError, match=r"--tuning qlora \(4-bit base weights through bitsandbytes\) needs the "
                                        r"'qlora' extra: pip install 'tunelab\[qlora\]'"):
        train(toy_config)


def test_qlora_of_a_pooled_classifier_exports_and_predicts_as_trained(toy_config, tmp_path):
    """A sentence-transformers folder (the default minilm) or model.pooling builds tunelab's pooled classifier,
    whose quantized part is its backbone: the export de-quantizes it there, and the saved model predicts what the
    run evaluated."""
    from tunelab.predict import evaluate_file

    toy_config.tuning.name, toy_config.model.pooling, toy_config.eval.bootstrap = "qlora", "mean", 0
    result = train(toy_config)
    config = json.loads((result.model_dir / "config.json").read_text())
    assert config["model_type"] == "tunelab-pooled" and "quantization_config" not in config
    again = evaluate_file(result.run_dir, toy_config.data.eval, str(tmp_path / "p.jsonl"), "cpu")
    assert again["accuracy"] == pytest.approx(result.eval["accuracy"], abs=1 / 30)  # (float32 base vs 4-bit compute)
