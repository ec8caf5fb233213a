"""`tunelab compare`: the same task under several methods (and training-set fractions), side by side.

Each (method, fraction) runs as a separate `tunelab train` process so that its peak memory and time are its
own; with `--folds K` that process runs the K folds. The processes are forked from one server process that
imported the training stack once (multiprocessing's forkserver: a fresh interpreter that never runs a model), so
each run starts in a fraction of a second instead of spending ~8 s importing torch and transformers again.
Baselines do not depend on the method, so they are computed once per split here, on exactly the examples the
methods are scored on.
"""
from __future__ import annotations

import copy
import json
import logging
import multiprocessing
import os
import runpy
import sys
from pathlib import Path

import torch

from tunelab import config as config_mod
from tunelab.config import Config
from tunelab.errors import UserError
from tunelab.io import atomic_write_json
from tunelab.methods import METHODS
from tunelab.rundir import RunDir
from tunelab.tasks import TASKS
from tunelab.text import text_table
from tunelab.validate import validate

log = logging.getLogger(__name__)


def compare(base: Config, methods: list[str], out: Path, method_sets: list[str],
            fractions: list[float] | None = None, resume: bool = False) -> dict:
    fractions = sorted(fractions or [1.0])
    _check(base, methods, fractions)
    per_method = _parse_method_sets(method_sets, methods)
    out.mkdir(parents=True, exist_ok=True)
    task = TASKS[base.task]
    rows = []
    for frac in fractions:
        for m in methods:
            cfg = _run_config(base, m, frac, out, fractions, per_method.get(m, []))
            rows.append(_row(m, frac, _run(cfg, out, resume), cfg))
    result = {"task": task.name, "metric": task.primary, "metrics": list(task.metrics), "methods": methods,
              "fractions": fractions, "folds": base.eval.folds, "output": str(out), "rows": rows,
              "graded_on": "test" if base.data.test or base.data.test_split else "eval",
              "baselines": [b for frac in fractions for b in _baselines(base, frac)]}
    from tunelab.report import recommend, write_report

    result["recommendation"] = recommend(result)
    atomic_write_json(out / "comparison.json", result)
    result["report"] = str(write_report(result, out))
    return result


def _check(base: Config, methods: list[str], fractions: list[float]) -> None:
    unknown = [m for m in methods if _method(m)[0] not in METHODS]
    if unknown or not methods:
        raise UserError(f"unknown tuning method(s) {unknown} (known: {', '.join(METHODS)})", "--tuning")
    if base.task in TASKS and TASKS[base.task].judged_by_start:
        raise UserError(f"compare is for labelled tasks; train the {base.task} stage with `tunelab train` per method "
                        "(each run reports the model before training beside it)", "--task")
    if any(not 0 < f <= 1 for f in fractions):
        raise UserError(f"training fractions must be in (0, 1], got {fractions}", "--train-fractions")
    probe = copy.deepcopy(base)
    _use(probe, methods[0])
    validate(probe)


AUGMENT = "+augment"  # `--tuning full,full+augment`: the same method without and with train.augment
DEFAULT_AUGMENT = "swap,delete,insert,neighbour"


def _use(cfg: Config, method: str) -> None:
    """Set the method; the teacher and transfer texts (given once for the whole comparison) belong to distill only;
    augmentation (`--augment`, or all four operations) to the METHOD+augment arms only."""
    name, augmented = _method(method)
    cfg.tuning.name = name
    if name != "distill":
        cfg.tuning.teacher, cfg.data.transfer = None, None
    cfg.train.augment = (cfg.train.augment or DEFAULT_AUGMENT) if augmented else ""


def _method(arm: str) -> tuple[str, bool]:
    """(method, augmented) of a comparison arm such as `full+augment`."""
    return (arm[:-len(AUGMENT)], True) if arm.endswith(AUGMENT) else (arm, False)


def _run_name(method: str, frac: float, fractions: list[float]) -> str:
    return method if fractions == [1.0] else f"{method}/frac-{frac:g}"


def _run_config(base: Config, method: str, frac: float, out: Path, fractions: list[float], sets) -> Config:
    cfg = copy.deepcopy(base)
    _use(cfg, method)
    cfg.data.train_fraction = frac
    cfg.output, cfg.overwrite = str(out / _run_name(method, frac, fractions)), True
    cfg.eval.probe = False  # the probe does not depend on the method: computed once per split below
    for key, value in sets:
        config_mod.set_value(cfg, key, value, "--method-set")
    validate(cfg)
    return cfg


def _run(cfg: Config, out: Path, resume: bool) -> dict:
    """Train one (method, fraction) in its own process; returns its metrics (or the CV summary)."""
    run = Path(cfg.output)
    done = run / ("cv.json" if cfg.eval.folds else "metrics.json")
    if resume and done.is_file():
        log.info("\n=== %s: already complete, kept ===", run.relative_to(out))
        return json.loads(done.read_text(encoding="utf-8"))
    cfg_path = out / f"{run.relative_to(out).as_posix().replace('/', '-')}.config.yaml"
    config_mod.save_yaml(cfg, cfg_path)
    log.info("\n=== %s ===", run.relative_to(out))
    sys.stdout.flush()
    sys.stderr.flush()
    proc = _runs().Process(target=_train_process, args=(str(cfg_path.absolute()), dict(os.environ), os.getcwd()))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise UserError(f"the '{cfg.tuning.name}' run failed (exit {proc.exitcode}); see the output above "
                        "(finished runs are kept: rerun with --resume)", str(run))
    return json.loads(done.read_text(encoding="utf-8"))


PRELOAD = ["tunelab.cli", "tunelab.pipeline"]  # what `tunelab train` imports


def _runs():
    """The multiprocessing context the runs start from: its fork server imports PRELOAD once, when the first run
    starts, and writes to this process's standard output and error."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def _train_process(cfg_path: str, env: dict, cwd: str) -> None:
    """A run's process: `tunelab train CFG_PATH` with the comparison's environment and folder of the moment, run
    as `python -m tunelab` runs it (the package's __main__), so its output, errors and exit code are the command's."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    sys.argv = ["tunelab", "train", cfg_path]
    runpy.run_module("tunelab", run_name="__main__")


def _stat(m: dict, key: str, cv: bool, split: str = "eval") -> dict:
    if cv:
        s = m["eval"][key]
        return {"value": s["mean"], "ci": s["ci"], "std": s["std"]}
    ci = m.get("ci95" if split == "eval" else "test_ci95", {}).get(key)
    return {"value": m[split][key], "ci": ci, "std": None}


def _row(method: str, frac: float, m: dict, cfg: Config) -> dict:
    cv = bool(cfg.eval.folds)
    t, i = m["train"], m.get("inference", {})
    run = Path(cfg.output)
    history = [str(run / f"fold-{k}" / "history.jsonl") for k in range(cfg.eval.folds)] if cv else [
        str(run / "history.jsonl")]
    graded = m.get("graded_on", "eval")  # with a test set the row's numbers are the untouched ones
    metrics = TASKS[cfg.task].metrics
    return {"method": method, "fraction": frac, "train_examples": int(t["train_examples"]),
            "metrics": {k: _stat(m, k, cv, graded) for k in metrics}, "graded_on": graded,
            "selected_on_eval": bool(m.get("selected_on_eval")),
            **({"eval_metrics": {k: _stat(m, k, cv) for k in metrics}} if graded == "test" else {}),
            "train_s": t["seconds"], "samples_per_s": t["samples_per_second"], "trainable": int(t["trainable_params"]),
            "total_params": int(t["total_params"]), "peak_mb": t["peak_rss_mb"], "model_mb": i.get("model_mb"),
            "latency_ms": i.get("latency_ms"), "throughput": i.get("throughput"), "history": history,
            "run": str(run), **({"teacher": _teacher(cfg, m)} if _method(method)[0] == "distill" and not cv else {})}


def _teacher(cfg: Config, student: dict) -> dict:
    """The distilled student against its teacher: quality retained and what it costs, as ratios."""
    t = RunDir(cfg.tuning.teacher).metrics()
    main = TASKS[cfg.task].primary
    ti, si = t.get("inference", {}), student.get("inference", {})
    return {"run": cfg.tuning.teacher, main: t["eval"][main],
            "retained_pct": 100 * student["eval"][main] / t["eval"][main] if t["eval"][main] else None,
            "params_ratio": student["train"]["total_params"] / t["train"]["total_params"],
            "size_ratio": si["model_mb"] / ti["model_mb"] if ti.get("model_mb") else None,
            "latency_speedup": ti["latency_ms"] / si["latency_ms"] if si.get("latency_ms") else None,
            "throughput_speedup": si["throughput"] / ti["throughput"] if ti.get("throughput") else None}


def _baselines(base: Config, frac: float) -> list[dict]:
    """Majority/mean and linear probe on this fraction's split(s): per fold and summarised, or bootstrapped; scored
    on the test set when there is one, where the methods are graded."""
    from tunelab.data import load_splits
    from tunelab.evaluate.baselines import baselines
    from tunelab.evaluate.stats import t_interval
    from tunelab.models import folder_of

    task = TASKS[base.task]
    log.info("\n=== baselines at fraction %g ===", frac)
    tok = task.processor(folder_of(base.model), base.model.trust_remote_code)
    per_fold = []
    for k in range(max(base.eval.folds, 1)):
        cfg = copy.deepcopy(base)
        cfg.data.train_fraction, cfg.eval.fold = frac, (k if base.eval.folds else None)
        splits = load_splits(task, cfg)
        train_items = task.encode(tok, splits.train, splits.space, cfg.data.max_length)
        eval_items = task.encode(tok, splits.test or splits.eval, splits.space, cfg.data.max_length)
        per_fold.append(baselines(task, splits.space, train_items, eval_items, cfg.model, tok.pad_token_id or 0,
                                  torch.device("cpu"), cfg.eval.probe, cfg.eval.bootstrap, cfg.train.seed))
    out = []
    for name in per_fold[0]:
        if base.eval.folds:
            stats = {k: t_interval([f[name][k] for f in per_fold]) for k in task.metrics}
            metrics = {k: {"value": s["mean"], "ci": s["ci"], "std": s["std"]} for k, s in stats.items()}
        else:
            b = per_fold[0][name]
            metrics = {k: {"value": b[k], "ci": b["ci95"].get(k), "std": None} for k in task.metrics}
        out.append({"name": name, "fraction": frac, "metrics": metrics,
                    "graded_on": "test" if splits.test else "eval"})
    return out


def _parse_method_sets(items: list[str], methods: list[str]) -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    for item in items:
        method, _, kv = item.partition(":")
        if _method(method)[0] not in METHODS or "=" not in kv:
            raise UserError(f"--method-set needs METHOD:KEY=VALUE with a known method, got '{item}'", "--method-set")
        key, value = kv.split("=", 1)
        out.setdefault(method, []).append((key.strip(), value))
    return out


def _fmt_stat(s: dict, mark: str = "") -> str:
    ci = s.get("ci")
    return f"{s['value']:.4f}{mark}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def table(result: dict) -> str:
    """The comparison as aligned text: main metric with its 95% interval, then cost columns; baselines below."""
    from tunelab.report import OPTIMISTIC, OPTIMISTIC_NOTE, optimistic

    main, several = result["metric"], len(result["fractions"]) > 1
    on = "test " if result.get("graded_on") == "test" else ""
    head = ["method"] + (["train_n"] if several else []) + [f"{on}{main} [95% CI]", "train_s", "samples/s",
                                                              "trainable", "peak_MB", "model_MB", "latency_ms"]
    cells = [head]
    for frac in result["fractions"]:
        for r in (r for r in result["rows"] if r["fraction"] == frac):
            cells.append([r["method"]] + ([str(r["train_examples"])] if several else []) + [
                _fmt_stat(r["metrics"][main], OPTIMISTIC if optimistic(r) else ""), f"{r['train_s']:.1f}",
                f"{r['samples_per_s']:.1f}",
                f"{r['trainable']:,}", f"{r['peak_mb']:.0f}", f"{r['model_mb'] or 0:.1f}",
                f"{r['latency_ms'] or 0:.1f}"])
        n = next((str(r["train_examples"]) for r in result["rows"] if r["fraction"] == frac), "-")
        for b in (b for b in result["baselines"] if b["fraction"] == frac):
            cells.append([b["name"]] + ([n] if several else []) + [_fmt_stat(b["metrics"][main])]
                         + ["-"] * (len(head) - 2 - several))
    lines = text_table(cells)
    if any(optimistic(r) for r in result["rows"]):
        lines.append(OPTIMISTIC_NOTE)
    for r in (r for r in result["rows"] if "teacher" in r):
        t, size = r["teacher"], f" ({r['train_examples']} examples)" if several else ""
        lines.append(f"distill{size} vs teacher "
                     f"{t['run']}: keeps {t['retained_pct']:.1f}% of its {main} ({t[main]:.4f}); "
                     f"{t['params_ratio']:.2f}× its parameters, {t['size_ratio'] or 0:.2f}× its size, "
                     f"{t['latency_speedup'] or 0:.2f}× faster per request, {t['throughput_speedup'] or 0:.2f}× "
                     "its batch throughput")
    return "\n".join(lines)
