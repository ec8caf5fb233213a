"""Training commands: train, compare, lr-find, tune (and how a finished run's metrics print)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from tunelab import config as config_mod
from tunelab.cli.flags import add_config_flags, config_from_args
from tunelab.errors import UserError
from tunelab.text import text_table


def cmd_train(args) -> int:
    from tunelab.pipeline import train

    if args.resume:
        cfg = config_mod.load_yaml(Path(args.resume) / "config.yaml")
        cfg.output = args.resume
    else:
        cfg = config_from_args(args)
    result = train(cfg, resume=bool(args.resume))
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only the main process reports
        print_metrics(result.metrics, result.run_dir)
    return 0


def print_metrics(m: dict, run: Path) -> None:
    """The run's metrics beside its baselines, each with its 95% interval (bootstrap, or t over folds)."""
    print(f"\nrun folder: {run}")
    if "folds" in m:
        print(f"{m['folds']}-fold cross-validation: mean ± sd [95% CI of the mean]; each fold in {run}/fold-K")
        print(f"{'metric':<18}{'model':>32}" + "".join(f"{n:>32}" for n in m["baseline"]))
        for k, v in m["eval"].items():
            cells = [v] + [b[k] for b in m["baseline"].values() if k in b]
            print(f"{k:<18}" + "".join(f"{_cv_cell(c):>32}" for c in cells))
        if m.get("selected_on_eval"):
            print(f"fold metrics are optimistic: each fold's held-out part also chose "
                  f"{' and '.join(m.get('chosen_on_eval') or ['the best step'])}")
        return
    if "test" in m:
        print("eval set:")
    print("\n".join(text_table(_metric_rows(m["eval"], m["ci95"], m["baseline"]))))
    if "valid_loss" in m:  # language models: the headline figures under the OpenAI fine-tuning API's names
        print("  ".join(f"{k} {m[k]:.4f}" for k in ("train_loss", "valid_loss", "train_mean_token_accuracy",
                                                     "valid_mean_token_accuracy") if m.get(k) is not None))
    if "threshold_search" in m:
        print(f"threshold {m['threshold_search']['threshold']:.2f} chosen on the eval set (optimistic); "
              f"at the default: f1_micro {m['eval_at_default_threshold']['f1_micro']:.4f}")
    _print_test(m)
    t, i = m["train"], m.get("inference", {})
    print(f"train: {t['seconds']:.1f} s, {t['samples_per_second']:.1f} samples/s, "
          f"{t['trainable_params']:,} of {t['total_params']:,} parameters trainable, peak RSS {t['peak_rss_mb']:.0f} MB")
    if i:
        print(f"inference: {i['latency_ms']:.1f} ms per single request, {i['throughput']:.0f} examples/s batched, "
              f"model {i['model_mb']:.1f} MiB")


def _metric_rows(values: dict, ci95: dict, baselines: dict) -> list[list[str]]:
    """metric | model | 95% CI | one column per baseline, for text_table."""
    names = list(baselines)
    rows = [["metric", "model", "95% CI", *names]]
    for k, v in values.items():
        ci = ci95.get(k)
        rows.append([k, f"{v:.4f}", f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "",
                     *(f"{baselines[n][k]:.4f}" if k in baselines[n] else "" for n in names)])
    return rows


def _print_test(m: dict) -> None:
    """Say plainly whether the eval numbers are optimistic, and print the untouched test estimate if there is one."""
    chose = " and ".join(m.get("chosen_on_eval") or [])
    if "test" not in m:
        if m.get("selected_on_eval"):
            print(f"eval metrics are optimistic: the eval set also chose {chose}; give --test FILE (or "
                  "data.test_split) for an untouched estimate")
        return
    if m.get("selected_on_eval"):
        print(f"eval metrics are optimistic (the eval set also chose {chose}); the test set below is not")
    n = m.get("train", {}).get("test_examples")
    print(f"\ntest set{f' ({n} examples)' if n else ''}, scored once with the selected model: the untouched estimate")
    print("\n".join(text_table(_metric_rows(m["test"], m.get("test_ci95", {}), m.get("baseline_test", {})))))


def _cv_cell(s: dict) -> str:
    return f"{s['mean']:.4f} ± {s['std']:.4f} [{s['ci'][0]:.3f}, {s['ci'][1]:.3f}]"


def cmd_compare(args) -> int:
    from tunelab.compare import compare, table

    cfg = config_from_args(args)
    methods = [m.strip() for m in args.tuning.split(",") if m.strip()]
    out = Path(args.output or cfg.output)
    result = compare(cfg, methods, out, args.method_set, _fractions(args.train_fractions), resume=args.resume)
    print("\n" + table(result))
    print(f"\n{result['recommendation']}\n\nwrote {out / 'comparison.json'} and {result['report']}")
    return 0


def _fractions(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--train-fractions needs comma-separated numbers, got '{text}'", "--train-fractions") from None



def cmd_lr_find(args) -> int:
    from tunelab.hparams import lr_find

    try:
        result = lr_find(config_from_args(args), args.min_lr, args.max_lr, args.steps, Path(args.output))
    except KeyboardInterrupt:  # nothing to resume: the test is short and saves nothing until it ends
        print("tunelab: interrupted; nothing was written", file=sys.stderr)
        return 130
    print(result.summary())
    return 0


def cmd_tune(args) -> int:
    from tunelab.hparams import table, tune

    try:
        summary = tune(config_from_args(args), args.trials, Path(args.output), args.timeout)
    except KeyboardInterrupt:
        print("tunelab: interrupted; run the same command again to continue the search", file=sys.stderr)
        return 130
    print("\n" + table(summary))
    return 0



def cmd_estimate(args) -> int:
    from tunelab.estimate import estimate, render

    cfg = config_from_args(args)
    print(render(estimate(cfg), cfg, args.device_memory))
    return 0


def add_parsers(sub) -> None:
    """The training commands commands."""
    t = sub.add_parser("train", help="Train one model: data, method, loop, evaluation, export.")
    add_config_flags(t)
    t.add_argument("--resume", metavar="RUN_DIR", help="Continue an interrupted run from its latest checkpoint.")
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("compare", help="Train the same task under several methods and compare them side by side.")
    add_config_flags(c, skip=("tuning.name", "output"))
    c.add_argument("--tuning", default="scratch,head,lora,full", help="Comma-separated methods to compare.")
    c.add_argument("--output", help="Folder for the comparison; each method's run goes in a sub-folder.")
    c.add_argument("--method-set", action="append", default=[], metavar="METHOD:KEY=VALUE",
                   help="A setting for one method only, e.g. head:train.lr=1e-3 (repeatable).")
    c.add_argument("--train-fractions", default="1.0", metavar="F,F,...",
                   help="Training-set fractions for a learning curve, e.g. 0.1,0.25,0.5,1.0 (nested samples).")
    c.add_argument("--resume", action="store_true", help="Keep runs that already finished; run only the rest.")
    c.set_defaults(func=cmd_compare)

    lf = sub.add_parser("lr-find", help="Learning-rate range test: suggest a --lr for this config (Smith 2017).")
    add_config_flags(lf, skip=("output",))
    lf.add_argument("--min-lr", type=float, default=1e-7, help="Learning rate of the first step.")
    lf.add_argument("--max-lr", type=float, default=1.0, help="Learning rate of the last step.")
    lf.add_argument("--steps", type=int, default=100, help="Optimizer steps from --min-lr to --max-lr (at least 10).")
    lf.add_argument("--output", default="runs/lr-find", help="Folder for lr_find.json and lr_find.png.")
    lf.set_defaults(func=cmd_lr_find)

    es = sub.add_parser("estimate", help="Parameters and the memory a training step of this config needs (no data "
                                         "read, no weights loaded), and whether it fits a device.")
    add_config_flags(es, skip=("output",))
    es.add_argument("--device-memory", type=float, metavar="GIB", help="The device's memory in GiB: says whether "
                    "the run fits and what to change when it does not.")
    es.set_defaults(func=cmd_estimate)

    tu = sub.add_parser("tune", help="Search learning rate, batch size, epochs and more with Optuna.")
    add_config_flags(tu, skip=("output",))
    tu.add_argument("--trials", type=int, required=True, help="Finished trials wanted (earlier runs count).")
    tu.add_argument("--timeout", type=float, help="Start no new trial after this many seconds.")
    tu.add_argument("--output", default="runs/tune", help="Folder for study.db, trials/, best.yaml and reports.")
    tu.set_defaults(func=cmd_tune)
