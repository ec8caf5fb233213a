"""A distilled student against its teacher: quality retained, size, and inference speed measured side by side.

    python bench/distill.py TEACHER_RUN STUDENT_RUN [--rounds 5]
    python bench/distill.py --make DIR      # first runs the tweet-sentiment recipe below into DIR (steps already
                                            # done are skipped), then measures DIR/teacher against DIR/student

Everything is measured in this one process on the student's eval file: macro-F1 of each variant on it, agreement
of the student's int8 and ONNX variants with its fp32 predictions, parameters and weight size, then single-request
latency (p50, batch of 1) and batch-32 throughput in rounds that interleave the variants (teacher, student, int8,
onnx, teacher, ...), medians over the rounds. The int8 and ONNX variants are the ones `tunelab export STUDENT --int8
--onnx` made (the recipe runs it). The machine and its load before and after are printed with the figures: the
machine may be shared, and another process's load makes every variant slower in the round it lands in.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

from common import machine, make  # bench/common.py, beside this script

RECIPE = [  # (what it makes, tunelab command): issue 6's goal on the bundled tweets
    ("data/transfer.jsonl", "data tweets --output {d}/data --train-size 2000 --eval-size 600 --seed 0 "
                            "--transfer-size 6000"),
    ("teacher/model", "train --task classification --train {d}/data/train.jsonl --eval {d}/data/eval.jsonl "
                      "--model minilm --tuning full --epochs 2 --batch-size 32 --max-length 64 --lr 8e-5 "
                      "--train.progress false --output {d}/teacher"),
    ("student/model", "train --task classification --train {d}/data/train.jsonl --eval {d}/data/eval.jsonl "
                      "--tuning distill --teacher {d}/teacher --tuning.student_layers 2 --tuning.prune_vocab true "
                      "--transfer {d}/data/transfer.jsonl --epochs 2 --batch-size 32 --max-length 64 --lr 1e-4 "
                      "--train.progress false --output {d}/student"),
    ("student/onnx/model.onnx", "export {d}/student --int8 --onnx"),
]


def main(argv=None) -> int:
    from tunelab.evaluate import evaluate, predict_outputs
    from tunelab.export import measure_inference
    from tunelab.export.compress import state_mb
    from tunelab.predict import load_run

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("teacher", nargs="?")
    p.add_argument("student", nargs="?")
    p.add_argument("--make", type=Path, help="run the tweet recipe into this folder first, then measure it")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--single", type=int, default=200, help="single requests timed per round (and the batch-32 "
                   "throughput runs over this many examples, at least 128)")
    args = p.parse_args(argv)
    if args.make:
        make(args.make, RECIPE)
        args.teacher, args.student = args.make / "teacher", args.make / "student"
    if not (args.teacher and args.student):
        p.error("give TEACHER_RUN STUDENT_RUN, or --make DIR")

    cpu = torch.device("cpu")
    teacher, student = load_run(args.teacher), load_run(args.student)
    variants = {"teacher": teacher, "student": student, "student int8": load_run(args.student, "int8")}
    if (Path(args.student) / "onnx" / "model.onnx").is_file():
        variants["student onnx"] = load_run(args.student, "onnx")
    cfg, task = student[0], student[1]
    examples = task.read(cfg.data.eval, cfg.data)
    items = {name: task.encode(v[3], examples, v[4], cfg.data.max_length) for name, v in variants.items()}
    pads = {name: v[3].pad_token_id or 0 for name, v in variants.items()}
    load_before = os.getloadavg()

    rows, reference = {}, None
    for name, (_, _, model, _, vspace) in variants.items():
        outputs = predict_outputs(task, model, items[name], pads[name], cpu)
        metrics = evaluate(task, model, items[name], vspace, pads[name], cpu, outputs=outputs)
        preds = metrics["_preds"]
        if name == "student":
            reference = preds
        rows[name] = {"f1_macro": metrics["f1_macro"], "preds": preds, "latency": [], "throughput": [],
                      # int8 packs its Linear weights outside parameters(): its count would mislead
                      "params": sum(p.numel() for p in model.parameters()) if name in ("teacher", "student") else None,
                      "mb": state_mb(model) if hasattr(model, "state_dict") else
                      (Path(args.student) / "onnx" / "model.onnx").stat().st_size / 2**20}
    for r in rows.values():
        r["agreement"] = sum(a == b for a, b in zip(r["preds"], reference)) / len(reference)

    for _ in range(args.rounds):
        for name, v in variants.items():
            m = measure_inference(v[2], items[name], pads[name], cpu, single=args.single, batch_size=32)
            rows[name]["latency"].append(m["latency_ms"])
            rows[name]["throughput"].append(m["throughput"])
    load_after = os.getloadavg()

    t = rows["teacher"]
    print(f"\nmachine: {machine()}; load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    print(f"eval: {len(examples)} examples of {cfg.data.eval}; speed: medians of {args.rounds} interleaved rounds "
          f"({args.single} single requests, then batch 32 over {min(len(examples), max(args.single, 128))} examples)")
    head = f"{'':14} {'macro-F1':>8} {'agrees':>7} {'params':>11} {'MiB':>6} {'p50 ms':>7} {'ex/s':>7}" \
           f"  {'vs teacher: F1':>14} {'size':>6} {'latency':>8} {'throughput':>10}"
    print(head + "\n" + "-" * len(head))
    for name, r in rows.items():
        lat, thr = statistics.median(r["latency"]), statistics.median(r["throughput"])
        r["lat"], r["thr"] = lat, thr
        params = f"{r['params']:,}" if r["params"] else "-"
        print(f"{name:14} {r['f1_macro']:8.4f} {r['agreement']:7.4f} {params:>11} {r['mb']:6.1f} {lat:7.2f} "
              f"{thr:7.1f}  {100 * r['f1_macro'] / t['f1_macro']:13.1f}% {100 * r['mb'] / t['mb']:5.0f}% "
              f"{t['lat'] / lat:7.2f}× {thr / t['thr']:9.2f}×")
    s = rows["student"]
    goals = [("student keeps ≥ 97% of the teacher's macro-F1", s["f1_macro"] >= 0.97 * t["f1_macro"]),
             ("student ≥ 2× faster, single request", t["lat"] / s["lat"] >= 2),
             ("student ≥ 2× faster, batch", s["thr"] / t["thr"] >= 2),
             ("student ≤ 50% of the teacher's size", s["mb"] <= 0.5 * t["mb"])]
    goals += [(f"{name} agrees with the fp32 student on ≥ 99%", rows[name]["agreement"] >= 0.99)
              for name in rows if name.startswith("student ")]
    print("\n" + "\n".join(f"{'met    ' if ok else 'NOT MET'}  {goal}" for goal, ok in goals))
    return 0


if __name__ == "__main__":
    sys.exit(main())
