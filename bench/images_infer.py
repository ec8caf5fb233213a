"""Image inference: tunelab's predictor (torch, ONNX, int8) against the plain timm forward, the same model,
interleaved.

    python bench/images_infer.py RUN [--rounds 5] [--single 100]
    python bench/images_infer.py --make DIR   # first makes DIR/run: EfficientNet-Lite0's head on 600 digits,
                                              # exported with --onnx (steps already done are skipped)

Every arm answers the run's eval images from decoded pictures to labels in this one process:
- baseline: timm itself: `timm.create_model(architecture)` with the run's exported weights, its pre-processing from
  `timm.data.create_transform(**resolve_data_config(model=...))`, images 32 at a time, argmax of the logits;
- tunelab: `tunelab.predict.load_run(RUN, runtime)` + `predict_examples` (what `tunelab predict` runs), with the
  runtimes torch and onnx (`tunelab export RUN --onnx`).
Per round, rounds interleaving the arms: batch throughput over all eval images (images/s) and `--single`
one-image requests (p50, p95 latency in ms). Printed: medians over rounds, ratios to the baseline, each arm's
agreement with the baseline's labels, the machine and its load.
"""
from __future__ import annotations

import sys
from pathlib import Path

from common import compare_arms, inference_arguments  # bench/common.py, beside this script

RECIPE = [  # (what it makes, tunelab command)
    ("digits/eval", "data digits --output {d}/digits --train-size 600 --eval-size 300 --seed 0"),
    ("run/model", "train --task image-classification --model efficientnet-lite0 --tuning head "
                  "--train {d}/digits/train --eval {d}/digits/eval --eval.bootstrap 0 --eval.probe false "
                  "--train.progress false --output {d}/run"),
    ("run/onnx/model.onnx", "export {d}/run --onnx"),
]


class Baseline:
    """timm alone: the architecture with the run's weights, timm's own evaluation transform."""

    def __init__(self, model_dir: Path):
        import json

        import timm
        import torch
        from safetensors.torch import load_file

        config = json.loads((model_dir / "config.json").read_text())
        self.labels = config["label_names"]
        self.model = timm.create_model(config["architecture"], pretrained=False, num_classes=len(self.labels),
                                       pretrained_cfg_overlay=config["pretrained_cfg"])
        weights = load_file(str(model_dir / "model.safetensors"))
        self.model.load_state_dict({k.removeprefix("timm_model."): v for k, v in weights.items()})
        self.model.eval()
        self.transform = timm.data.create_transform(**timm.data.resolve_data_config(model=self.model))
        self.torch = torch

    def __call__(self, images, batch_size: int = 32) -> list[str]:
        labels = []
        with self.torch.inference_mode():
            for i in range(0, len(images), batch_size):
                x = self.torch.stack([self.transform(img) for img in images[i:i + batch_size]])
                labels += [self.labels[j] for j in self.model(x).argmax(-1).tolist()]
        return labels


class Tunelab:
    def __init__(self, run: Path, runtime: str):
        from tunelab.predict import load_run

        self.loaded = load_run(run, runtime)

    def __call__(self, images) -> list[str]:
        from tunelab.data.load import Example
        from tunelab.predict import predict_examples

        return [row["label"] for row in predict_examples(self.loaded, [Example("", None, image=img)
                                                                       for img in images])]


def main(argv=None) -> int:
    args = inference_arguments(argv, __doc__, RECIPE, 100, "image")
    from tunelab.config import load_yaml
    from tunelab.tasks import TASKS

    cfg = load_yaml(args.run / "config.yaml")
    images = [e.image for e in TASKS[cfg.task].read(cfg.data.eval, cfg.data, need_label=False)]
    arms = {"timm fp32": Baseline(args.run / "model"), "tunelab torch": Tunelab(args.run, "torch")}
    if (args.run / "onnx" / "model.onnx").is_file():
        arms["tunelab onnx"] = Tunelab(args.run, "onnx")
    compare_arms(arms, images, "timm fp32", args.rounds, args.single, "img/s",
                 f"eval images of {cfg.data.eval}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
