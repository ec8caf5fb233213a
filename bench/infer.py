"""Inference: tunelab's predictor against plain transformers fp32 with dynamic padding, the same model, interleaved.

    python bench/infer.py RUN [--rounds 5] [--single 200]
    python bench/infer.py --make DIR    # first makes DIR/run: MiniLM fully tuned on 1,000 tweets for 1 epoch,
                                        # exported with --onnx (steps already done are skipped), then measures it

Both answer the run's eval texts from raw text to label, tokenizing included, in this one process:
- baseline: the run's model/ folder loaded by `AutoModelForSequenceClassification` (fp32, eval, inference mode),
  texts tokenized 32 at a time in their given order with dynamic padding (`padding=True`), argmax of the logits;
- tunelab: `tunelab.predict.load_run(RUN, runtime)` + `predict_examples` (what `tunelab predict` runs: it batches
  by length and writes label and probabilities per row), with runtime torch and onnx (`tunelab export RUN --onnx`).
Measured per round, rounds interleaving baseline, torch, onnx: batch throughput over all eval texts (examples/s),
and `--single` one-text requests (p50 and p95 latency, ms). Medians over rounds are printed with the ratios to the
baseline, the agreement of each runtime's labels with the baseline's on every eval text, the machine and its load.
"""
from __future__ import annotations

import sys
from pathlib import Path

from common import compare_arms, inference_arguments  # bench/common.py, beside this script

RECIPE = [  # (what it makes, tunelab command)
    ("data/eval.jsonl", "data tweets --output {d}/data --train-size 1000 --eval-size 600 --seed 0"),
    ("run/model", "train --task classification --train {d}/data/train.jsonl --eval {d}/data/eval.jsonl --model minilm "
                  "--tuning full --epochs 1 --batch-size 16 --lr 5e-5 --eval.bootstrap 0 --eval.probe false "
                  "--train.progress false --output {d}/run"),
    ("run/onnx/model.onnx", "export {d}/run --onnx"),
]


class Baseline:
    """Plain transformers: tokenizer + AutoModelForSequenceClassification, batches in the given order."""

    def __init__(self, model_dir: Path, max_length: int):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
        self.max_length = max_length

    def __call__(self, texts: list[str], batch_size: int = 32) -> list[str]:
        import torch

        labels = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                enc = self.tokenizer(texts[i:i + batch_size], padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt")
                ids = self.model(**enc).logits.argmax(-1).tolist()
                labels += [self.model.config.id2label[j] for j in ids]
        return labels


class Tunelab:
    def __init__(self, run: Path, runtime: str):
        from tunelab.predict import load_run

        self.loaded = load_run(run, runtime)

    def __call__(self, texts: list[str]) -> list[str]:
        from tunelab.data.load import Example
        from tunelab.predict import predict_examples

        return [row["label"] for row in predict_examples(self.loaded, [Example(text=t, label=None) for t in texts])]


def main(argv=None) -> int:
    import json

    args = inference_arguments(argv, __doc__, RECIPE, 200, "text")
    from tunelab.config import load_yaml

    cfg = load_yaml(args.run / "config.yaml")
    texts = [json.loads(line)["text"] for line in Path(cfg.data.eval).read_text(encoding="utf-8").splitlines()]
    arms = {"transformers fp32": Baseline(args.run / "model", cfg.data.max_length),
            "tunelab torch": Tunelab(args.run, "torch")}
    if (args.run / "onnx" / "model.onnx").is_file():
        arms["tunelab onnx"] = Tunelab(args.run, "onnx")
    compare_arms(arms, texts, "transformers fp32", args.rounds, args.single, "ex/s",
                 f"eval texts of {cfg.data.eval}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
