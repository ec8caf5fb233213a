"""`tunelab tune`: hyperparameter search with Optuna (Akiba et al., 2019, "Optuna: A Next-generation
Hyperparameter Optimization Framework").

Every trial is a complete `tunelab.train` run in `DIR/trials/trial-NNN`. The TPE sampler proposes the next
settings from the finished trials; the median pruner stops a trial whose evaluation falls below the median of
earlier trials at the same point. The study lives in `DIR/study.db` (SQLite), so a killed search continues
where it stopped: finished trials count towards `--trials`. One `tune` process per folder.
"""
from __future__ import annotations

import copy
import csv
import io
import itertools
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab import config as config_mod
from tunelab.config import Config
from tunelab.errors import UserError
from tunelab.extras import need
from tunelab.io import atomic_write_json, atomic_write_text
from tunelab.tasks import TASKS
from tunelab.text import text_table
from tunelab.validate import validate

if TYPE_CHECKING:  # optuna is the 'tune' extra: imported when a search starts, so lr-find and the rest run without it
    import optuna
    from optuna.trial import FrozenTrial

log = logging.getLogger(__name__)

STUDY = "tunelab"  # fixed, so that a second `tune` on the same folder finds the first one's study
FINISHED = ("COMPLETE", "PRUNED")  # trial states, by name
# A frozen backbone tolerates (and needs) large steps; adapters less; moving every weight wants small ones.
LR_RANGES = {"head": (1e-4, 1e-1), "lora": (1e-5, 1e-2), "qlora": (1e-5, 1e-2)}
OTHER_LR_RANGE = (1e-6, 1e-3)


@dataclass
class SearchSpace:
    """What a trial may choose; `SearchSpace.default(cfg)` is what `tunelab tune` searches."""

    lr: tuple[float, float]  # log-uniform
    epochs: tuple[int, int]
    batch_sizes: tuple[int, ...] = (8, 16, 32)
    weight_decay: tuple[float, float] = (0.0, 0.1)
    layer_decay: tuple[float, float] = (0.5, 1.0)  # method full only
    lora_ranks: tuple[int, ...] = (4, 8, 16, 32)  # method lora only; lora_alpha follows as 2 x rank

    @classmethod
    def default(cls, cfg: Config) -> SearchSpace:
        from tunelab.methods import METHODS

        epochs = cfg.train.epochs or METHODS[cfg.tuning.name].epochs
        return cls(lr=LR_RANGES.get(cfg.tuning.name, OTHER_LR_RANGE), epochs=(1, max(epochs, 4)))


def sample(trial: optuna.Trial, space: SearchSpace, method: str) -> None:
    """Draw one trial's settings; parameter names are config keys, so `apply` needs no mapping."""
    trial.suggest_float("train.lr", *space.lr, log=True)
    trial.suggest_categorical("train.batch_size", list(space.batch_sizes))
    trial.suggest_int("train.epochs", *space.epochs)
    trial.suggest_float("train.weight_decay", *space.weight_decay)
    if method == "full":
        trial.suggest_float("tuning.layer_decay", *space.layer_decay)
    if method in ("lora", "qlora"):
        trial.suggest_categorical("tuning.lora_r", list(space.lora_ranks))


def apply(base: Config, params: dict[str, Any]) -> Config:
    """The base config with a trial's settings."""
    cfg = copy.deepcopy(base)
    for key, value in params.items():
        config_mod.set_value(cfg, key, value, "tune")
    if "tuning.lora_r" in params:
        cfg.tuning.lora_alpha = 2 * params["tuning.lora_r"]  # keep alpha / r = 2: the update's scale stays put
    return cfg


def tune(cfg: Config, trials: int, output: str | Path = "runs/tune", timeout: float | None = None,
         space: SearchSpace | None = None, pruner: optuna.pruners.BasePruner | None = None) -> dict:
    """Search until `trials` trials have finished (or `timeout` seconds pass); returns what trials.json holds.

    The timeout is checked between trials: a running trial finishes first.
    """
    from tunelab.data import load_splits

    optuna = need("optuna", "tune")

    if trials < 1:
        raise UserError(f"--trials must be at least 1, got {trials}")
    if timeout is not None and timeout <= 0:
        raise UserError(f"--timeout must be positive seconds, got {timeout:g}")
    validate(cfg)
    load_splits(TASKS[cfg.task], cfg)  # refuse bad data now, not as the first trial's failure
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own line per trial is enough
    out, task = Path(output), TASKS[cfg.task]
    metric = task.primary
    direction = "minimize" if metric in task.lower_is_better else "maximize"
    study = _open_study(out, cfg, direction, pruner)
    cv = cfg.eval.folds >= 2 and cfg.eval.fold is None
    space = space or SearchSpace.default(cfg)
    done = sum(t.state.name in FINISHED for t in study.trials)
    if done < trials:
        def after_trial(study: optuna.Study, trial: FrozenTrial) -> None:
            log.info("%s", _trial_line(trial, metric))
            write_reports(study, cfg, out, metric)

        study.optimize(lambda trial: _objective(trial, cfg, space, out, metric, cv), n_trials=trials - done,
                       timeout=timeout, callbacks=[after_trial])
    return write_reports(study, cfg, out, metric)


def _open_study(out: Path, cfg: Config, direction: str, pruner) -> optuna.Study:
    optuna = need("optuna", "tune")
    out.mkdir(parents=True, exist_ok=True)
    # Median pruning compares a trial with the median of earlier ones at the same evaluation (Akiba et al.);
    # n_min_trials=2: a median of one earlier trial is that trial, too thin a reason to stop (seen on MiniLM).
    pruner = pruner or optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0, n_min_trials=2)
    study = optuna.create_study(storage=f"sqlite:///{(out / 'study.db').resolve()}", study_name=STUDY,
                                direction=direction, load_if_exists=True, pruner=pruner,
                                sampler=optuna.samplers.TPESampler(seed=cfg.train.seed))
    base = _fingerprint(cfg)
    if "base" not in study.user_attrs:
        study.set_user_attr("base", base)
    elif study.user_attrs["base"] != base or study.direction.name.lower() != direction:
        raise UserError("this folder holds a search over a different config; choose another --output "
                        "(or repeat the first command to continue it)", str(out))
    for t in study.trials:
        if t.state == optuna.trial.TrialState.RUNNING:  # left by a killed `tune`: it will never finish
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
    if study.trials:  # continuing: a re-seeded sampler must not replay the first trials' random draws
        study.sampler = optuna.samplers.TPESampler(seed=cfg.train.seed + len(study.trials))
    return study


def _fingerprint(cfg: Config) -> dict:
    d = config_mod.to_dict(cfg)
    d.pop("output"), d.pop("overwrite"), d["train"].pop("progress")
    return d


def _objective(trial: optuna.Trial, base: Config, space: SearchSpace, out: Path, metric: str, cv: bool) -> float:
    from tunelab.pipeline import train

    optuna = need("optuna", "tune")
    sample(trial, space, base.tuning.name)
    cfg = apply(base, trial.params)
    cfg.output, cfg.overwrite = str(out / "trials" / f"trial-{trial.number:03d}"), True
    cfg.eval.probe, cfg.eval.bootstrap = False, 0  # a search needs the main metric, not its baselines or CI
    trial.set_user_attr("run_dir", cfg.output)
    evaluations = itertools.count(1)

    def on_eval(step: int, row: dict) -> None:
        # Report at the evaluation's ordinal (the epoch, with eval_every 0), not the optimizer step: trials with
        # different batch sizes reach epoch k at different steps, and the pruner compares equal steps only.
        trial.report(row[f"eval_{metric}"], next(evaluations))
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned after the evaluation at step {step}")

    try:  # cross-validation runs every fold to the end: there is no single curve to prune on
        result = train(cfg, on_eval=None if cv else on_eval)
    finally:  # resume state only, several times the model's size, and a trial is never resumed
        for folder in Path(cfg.output).glob("**/checkpoints"):
            shutil.rmtree(folder, ignore_errors=True)
    value = result.metrics["eval"][metric]
    return value["mean"] if cv else value


def write_reports(study: optuna.Study, base: Config, out: Path, metric: str) -> dict:
    """best.yaml, trials.csv, trials.json and trials.png, each written atomically; returns trials.json."""
    rows = [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
             "seconds": (t.datetime_complete - t.datetime_start).total_seconds() if t.state.name in FINISHED else None,
             "run_dir": t.user_attrs.get("run_dir")}
            for t in study.trials]
    best = None
    if any(t.state.name == "COMPLETE" for t in study.trials):
        b = study.best_trial  # among completed trials only: a pruned trial's value is a partial one
        best = {"number": b.number, "value": b.value, "params": b.params, "config": str(out / "best.yaml"),
                **_untouched(b.user_attrs.get("run_dir"))}
        cfg = apply(base, b.params)  # with the base's probe and bootstrap: the final run gets its intervals
        cfg.output = str(out / "best-run")
        config_mod.save_yaml(cfg, out / "best.yaml")
        atomic_write_json(out / "best.json", best)
    summary = {"metric": metric, "direction": study.direction.name.lower(), "best": best, "trials": rows}
    keys = list(dict.fromkeys(k for r in rows for k in r["params"]))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["number", "state", "value", "seconds", *keys])
    for r in rows:
        writer.writerow([r["number"], r["state"], r["value"], r["seconds"], *(r["params"].get(k) for k in keys)])
    atomic_write_text(out / "trials.csv", buf.getvalue())
    atomic_write_json(out / "trials.json", summary)
    _plot(summary, out / "trials.png")
    return summary


def _untouched(run_dir: str | None) -> dict:
    """What the best trial's `value` means, and its test metrics (its metrics.json `test`) when the config has a
    test set. Only the best trial's: test numbers of every trial would invite choosing among them on the test set."""
    path = Path(run_dir) / "metrics.json" if run_dir else None
    m = json.loads(path.read_text(encoding="utf-8")) if path and path.is_file() else {}
    if "test" not in m:
        return {"test": None, "note": "value is the eval score the search chose this trial by, so it is optimistic; "
                                      "give --test FILE or data.test_split for an untouched estimate"}
    return {"test": m["test"], "test_ci95": m.get("test_ci95", {}),
            "note": "value is the eval score the search chose this trial by (optimistic); test is the untouched "
                    "estimate: scored once, never used to choose"}


def _plot(summary: dict, path: Path) -> None:
    from tunelab.evaluate.plots import figure, save_png

    rows, pick = summary["trials"], max if summary["direction"] == "maximize" else min
    fig, ax = figure()
    done = [r for r in rows if r["state"] == "COMPLETE"]
    pruned = [r for r in rows if r["state"] == "PRUNED" and r["value"] is not None]
    ax.plot([r["number"] for r in done], [r["value"] for r in done], "o", label="completed")
    ax.plot([r["number"] for r in pruned], [r["value"] for r in pruned], "x", color="grey",
            label="pruned (last evaluation)")
    running = list(itertools.accumulate([r["value"] for r in done], pick))
    ax.step([r["number"] for r in done], running, where="post", color="red", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"eval {summary['metric']}")
    ax.legend()
    save_png(fig, path)


def _trial_line(t: FrozenTrial, metric: str) -> str:
    value = f"{metric}={t.value:.4f}" if t.value is not None else "no value"
    params = " ".join(f"{k}={_fmt(v)}" for k, v in t.params.items())
    return f"trial {t.number}: {t.state.name.lower()} {value}  {params}"


def table(summary: dict) -> str:
    """The trials and the best settings, for the terminal."""
    keys = list(dict.fromkeys(k for r in summary["trials"] for k in r["params"]))
    head = ["trial", "state", summary["metric"], "seconds", *keys]
    cells = [head] + [[str(r["number"]), r["state"].lower(), _fmt(r["value"]), _fmt(r["seconds"], "{:.1f}"),
                       *(_fmt(r["params"].get(k)) for k in keys)] for r in summary["trials"]]
    lines = text_table(cells, left_columns=0)
    best = summary["best"]
    if best is None:
        lines.append("no trial completed, so there is no best configuration yet")
    else:
        lines.append(f"best: trial {best['number']}, {summary['metric']} {best['value']:.4f} on the eval set that "
                     "chose it, " + ", ".join(f"{k}={_fmt(v)}" for k, v in best["params"].items()))
        lines.append(_test_line(best, summary["metric"]))
        lines.append(f"train it: tunelab train {best['config']}")
    return "\n".join(lines)


def _test_line(best: dict, metric: str) -> str:
    test = best.get("test")
    if not test or metric not in test:
        return ("no test set: that score is optimistic (the search selected the trial by it); give --test FILE or "
                "data.test_split for an untouched estimate")
    ci = (best.get("test_ci95") or {}).get(metric)
    return (f"untouched estimate of trial {best['number']} on the test set: {metric} {test[metric]:.4f}"
            + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""))


def _fmt(v, float_format: str = "{:.4g}") -> str:
    if v is None:
        return "-"
    return float_format.format(v) if isinstance(v, float) else str(v)
