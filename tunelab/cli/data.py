"""Data commands: check and clean a file, and write the bundled datasets."""
from __future__ import annotations

import json
from pathlib import Path

from tunelab.cli.flags import add_section_flags, section_from_args


def _print_written(info: dict, unit: str, rest: str) -> None:
    """One line about a train/eval pair of files written by tunelab.data.bundled; `rest` follows the eval count."""
    print(f"wrote {info['train']} ({info['train_examples']} {unit}) and {info['eval']} ({info['eval_examples']}{rest}")


def _print_pairs(info: dict) -> None:
    _print_written(info, "pairs", f", other conversation starters); available: {info['available']} pairs over "
                                  f"{info['prompts']} starters")


def cmd_data_topics(args) -> int:
    from tunelab.data.bundled import topics

    info = topics(Path(args.output), args.train_size, args.eval_size, args.seed, args.language)
    _print_written(info, "statements", f") from {info['source']}")
    return 0


def cmd_data_digits(args) -> int:
    from tunelab.data.bundled import digits

    info = digits(Path(args.output), args.train_size, args.eval_size, args.seed, args.size)
    _print_written(info, "images", f") from {info['source']}, {args.size}x{args.size} PNG, a folder per digit")
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


# The settings that say how a data file reads, as `tunelab train` takes them (flags generated from DataConfig).
READING = ("max_length", "encoding", "text_column", "text_pair_column", "label_column")


def _data_file_parser(dsub, name: str, help: str, func, eval_help: str):
    """`tunelab data check|clean FILE`: the file, its task, an eval file and how to read them (DataConfig's
    reading settings, `READING`)."""
    parser = dsub.add_parser(name, help=help)
    parser.add_argument("file")
    parser.add_argument("--task", default=None, help="The task the file is for (default: from its records).")
    parser.add_argument("--eval", default=None, help=eval_help)
    add_section_flags(parser, "data", READING)
    parser.set_defaults(func=func)
    return parser


def cmd_data_check(args) -> int:
    from tunelab.check import check, render

    report = check(args.file, args.task, args.eval, args.model, section_from_args(args, "data"), epochs=args.epochs,
                   batch_size=args.batch_size, label_errors=not args.no_label_errors)
    print(json.dumps(report.to_json(), ensure_ascii=False, indent=1) if args.json else render(report))
    return report.exit_code


def cmd_data_clean(args) -> int:
    from tunelab.clean import FIXES, clean

    result = clean(args.file, args.output, args.task, args.eval, section_from_args(args, "data"),
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


def cmd_data_arithmetic(args) -> int:
    from tunelab.data.bundled import arithmetic

    info = arithmetic(Path(args.output), args.train_size, args.eval_size, args.seed)
    _print_written(info, "prompts", f" other sums); available: {info['available']}")
    return 0


def cmd_data_chatterbot_ja(args) -> int:
    from tunelab.data.bundled import chatterbot_japanese

    info = chatterbot_japanese(Path(args.output), args.eval_size, args.seed)
    _print_written(info, "conversations", f"); usable: {info['available']}")
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



def add_parsers(sub) -> None:
    """The data commands commands."""
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
    tp = _data_parser(dsub, "topics", "Write balanced train/eval JSONL from the bundled chatterbot dialogues: in "
                      "English 5 topics (ai, coding, emotion, psychology, trivia), in Japanese 3 (ai, emotion, "
                      "psychology).", cmd_data_topics, 200, train_size=400)
    tp.add_argument("--language", choices=("english", "japanese"), default="english")
    dg = _data_parser(dsub, "digits", "Write train/eval image folders (a sub-folder per digit) from scikit-learn's "
                      "bundled 8x8 handwritten digits, up-sampled.", cmd_data_digits, 300, train_size=600)
    dg.add_argument("--size", type=int, default=64, help="Side of the written images in pixels (default 64).")
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
    _data_parser(dsub, "arithmetic", "Write {prompt, answer} JSONL of two-digit sums for rl with a verifiable "
                 "reward (--train.reward tunelab.rewards:number_answer).", cmd_data_arithmetic, 100, train_size=400)
    _data_parser(dsub, "chatterbot-ja", "Write chat JSONL ({messages}) from chatterbot's Japanese dialogues.",
                 cmd_data_chatterbot_ja, 20)
