"""K-fold cross-validation: one complete run per fold (each kept in `fold-K/`), then mean, sd and 95% CI."""
from __future__ import annotations

import copy
import logging
from pathlib import Path

from tunelab import config as config_mod
from tunelab.config import Config
from tunelab.errors import UserError
from tunelab.evaluate.stats import t_interval
from tunelab.io import atomic_write_json
from tunelab.rundir import RunDir

log = logging.getLogger(__name__)


def summarize(fold_metrics: list[dict]) -> dict:
    """Per metric over folds: mean, std, t-interval; the same for each baseline."""
    first = fold_metrics[0]
    out = {"task": first["task"], "metric": first["metric"], "folds": len(fold_metrics),
           "eval": {k: t_interval([m["eval"][k] for m in fold_metrics]) for k in first["eval"]},
           "baseline": {name: {k: t_interval([m["baseline"][name][k] for m in fold_metrics])
                               for k, v in b.items() if isinstance(v, (int, float))}
                        for name, b in first.get("baseline", {}).items()},
           # a fold whose held-out part also chose its best step grades itself optimistically
           "selected_on_eval": any(m.get("selected_on_eval") for m in fold_metrics), "graded_on": "eval",
           "chosen_on_eval": list(dict.fromkeys(c for m in fold_metrics for c in m.get("chosen_on_eval", [])))}
    for section in ("train", "inference"):
        keys = [k for k, v in first.get(section, {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        out[section] = {k: sum(m[section][k] for m in fold_metrics) / len(fold_metrics) for k in keys}
    return out


def cross_validate(cfg: Config, resume: bool = False):
    """Run every fold (skipping finished ones on resume) and write `cv.json` beside the fold folders."""
    from tunelab.pipeline import TrainResult, train

    out = Path(cfg.output)
    if not resume and out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise UserError("run folder already exists and is not empty (choose another --output, or set --overwrite "
                        "to replace it)", str(out))
    out.mkdir(parents=True, exist_ok=True)
    config_mod.save_yaml(cfg, out / "config.yaml")
    fold_metrics = []
    for k in range(cfg.eval.folds):
        fold = copy.deepcopy(cfg)
        fold.eval.fold, fold.output = k, str(out / f"fold-{k}")
        done = RunDir(fold.output).metrics() if resume else None
        if done is not None:
            fold_metrics.append(done)
            continue
        log.info("\n--- fold %d of %d ---", k + 1, cfg.eval.folds)
        partial = resume and (Path(fold.output) / "checkpoints").is_dir()
        fold.overwrite = fold.overwrite or not partial
        fold_metrics.append(train(fold, resume=partial).metrics)
    summary = summarize(fold_metrics)
    summary["runs"] = [str(out / f"fold-{k}") for k in range(cfg.eval.folds)]
    atomic_write_json(out / "cv.json", summary)
    return TrainResult(out, out / "fold-0" / "model", summary)
