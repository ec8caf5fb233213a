"""`tunelab compare`: the same task under several methods, each in its own process, side by side.

Each method runs as a separate `tunelab train` process so that its peak memory and time are its own.
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

from tunelab import config as config_mod
from tunelab.config import Config
from tunelab.errors import UserError
from tunelab.io import atomic_write_json
from tunelab.methods import METHODS

COLUMNS = [("method", "{}"), ("accuracy", "{:.4f}"), ("f1_macro", "{:.4f}"), ("train_s", "{:.1f}"),
           ("samples/s", "{:.1f}"), ("trainable", "{:,}"), ("peak_MB", "{:.0f}")]


def compare(base: Config, methods: list[str], out: Path, method_sets: list[str]) -> dict:
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UserError(f"unknown tuning method(s) {unknown} (known: {', '.join(METHODS)})", "--tuning")
    per_method = _parse_method_sets(method_sets, methods)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for m in methods:
        cfg = copy.deepcopy(base)
        cfg.tuning.name, cfg.output, cfg.overwrite = m, str(out / m), True
        for key, value in per_method.get(m, []):
            config_mod.set_value(cfg, key, value, "--method-set")
        config_mod.validate(cfg)
        cfg_path = out / f"{m}.config.yaml"
        config_mod.save_yaml(cfg, cfg_path)
        print(f"\n=== {m} ===", flush=True)
        proc = subprocess.run([sys.executable, "-m", "tunelab", "train", str(cfg_path)])
        if proc.returncode != 0:
            raise UserError(f"the '{m}' run failed (exit {proc.returncode}); see the output above", str(out / m))
        metrics = json.loads((out / m / "metrics.json").read_text())
        rows.append(_row(m, metrics))
    baseline = metrics["baseline"]["majority"]
    result = {"methods": rows, "baseline_majority": baseline, "output": str(out)}
    atomic_write_json(out / "comparison.json", result)
    print("\n" + table(rows, baseline))
    return result


def _parse_method_sets(items: list[str], methods: list[str]) -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    for item in items:
        method, _, kv = item.partition(":")
        if method not in METHODS or "=" not in kv:
            raise UserError(f"--method-set needs METHOD:KEY=VALUE with a known method, got '{item}'", "--method-set")
        key, value = kv.split("=", 1)
        out.setdefault(method, []).append((key.strip(), value))
    return out


def _row(method: str, m: dict) -> dict:
    e, t = m["eval"], m["train"]
    return {"method": method, "accuracy": e["accuracy"], "f1_macro": e["f1_macro"], "train_s": t["seconds"],
            "samples/s": t["samples_per_second"], "trainable": t["trainable_params"], "peak_MB": t["peak_rss_mb"],
            "total_params": t["total_params"]}


def table(rows: list[dict], baseline: dict) -> str:
    cells = [[name for name, _ in COLUMNS]] + [[fmt.format(r[name]) for name, fmt in COLUMNS] for r in rows]
    cells.append(["majority", f"{baseline['accuracy']:.4f}", f"{baseline['f1_macro']:.4f}", "-", "-", "0", "-"])
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
