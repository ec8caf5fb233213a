"""`tunelab data check`: what is wrong with a data file, found before any compute is spent on it.

Every record is read by the reader `tunelab train` uses for the task, so check and train never disagree about what
is valid: in one pass, each bad record's error (which carries its line and its code) is noted and the reader goes
on to the next record. Then the examples are looked at as a whole: duplicates (exact after Unicode NFKC, case and
whitespace folding; near by MinHash over character 5-grams, which needs no word segmenter and so works for
Japanese too, each pair confirmed by its true Jaccard similarity), duplicates with conflicting labels, leakage into
an eval file, the label distribution and labels that look like misspellings of others, spam and noise, lengths in
the model's tokens, likely label errors (confident learning, `cleanlab`, on cross-validated probabilities of a
character n-gram classifier) and, with `--model`, a training-time estimate from a few measured steps.

Findings are errors (the file cannot be trained on as it is: exit code 2), warnings (exit code 1) or notes.
"""
from __future__ import annotations

import dataclasses
import json
import re
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.config import DataConfig
from tunelab.data import encoding as enc
from tunelab.data.load import Example, Problems, where_parts
from tunelab.errors import UserError
from tunelab.extras import need

LISTED = 10  # lines listed per finding in the table; --json lists them all
MAX_PROBLEMS = 1000  # format problems collected before giving up on a file
LABELLED = ("classification", "multilabel", "regression")
STRONG = 0.1  # out-of-fold probability of the given label under which a label error is reported as likely
NEAR = 0.8  # Jaccard similarity of character 5-grams from which two texts are near duplicates


@dataclass
class Finding:
    level: str  # "error", "warning" or "note"
    code: str
    message: str
    lines: list[int] = field(default_factory=list)
    file: str = ""


@dataclass
class Report:
    file: str
    task: str
    encoding: str
    examples: int = 0
    findings: list[Finding] = field(default_factory=list)
    stats: dict = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        levels = {f.level for f in self.findings}
        return 2 if "error" in levels else 1 if "warning" in levels else 0

    def add(self, level: str, code: str, message: str, lines=(), file: str | None = None) -> None:
        self.findings.append(Finding(level, code, message, sorted(set(lines)), file or self.file))

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "exit_code": self.exit_code}


# --- reading every record ---------------------------------------------------------------------------------------
def read_all(path: Path, task, cfg: DataConfig, report: Report) -> list[Example]:
    """The file's valid examples; each format problem becomes an error finding (with its line and its code, both
    from the reader's error). The task's reader reads the file once, noting every bad record and reading on."""
    if not path.is_file() and not (path.is_dir() and task.modality == "image"):
        report.add("error", "not-found", "file not found" if not path.exists() else "not a file")
        return []
    codec = enc.detect(path.read_bytes()) if path.is_file() else "utf-8"
    report.encoding = enc.name(codec) if codec else "unknown"
    problems = Problems(MAX_PROBLEMS)
    try:
        examples, failure = task.read(path, cfg, problems=problems), None
    except UserError as e:  # the whole file: its encoding, a CSV header, no examples, or too many bad records
        examples, failure = [], e
    if failure is not None and failure.code == "encoding":  # training's own decoding, and its message
        report.add("error", "encoding", failure.problem, [failure.line] if failure.line else [])
        return []
    if codec not in ("utf-8", "utf-8-sig", None):
        report.add("note", "encoding", f"read as {enc.name(codec)} (--encoding {cfg.encoding})")
    if failure is not None and not (problems.errors and failure.line is None):  # not "no examples" after bad ones
        report.add("error", code_of(failure), failure.problem, [failure.line] if failure.line else [])
    for e in problems.errors:  # (an image in a class folder has no line: the finding names its file)
        report.add("error", code_of(e), e.problem, [e.line] if e.line else [], None if e.line else e.path)
    return examples


def code_of(error: UserError) -> str:
    """A reader's error as a finding's code: the one given where it was raised."""
    return error.code or "invalid-record"


# --- looking at the examples as a whole -------------------------------------------------------------------------
def text_of(e: Example) -> str:
    """What a person reads of one example: its text (and pair), or a conversation's message contents."""
    if e.text:
        return e.text if e.text_pair is None else f"{e.text}\n{e.text_pair}"
    if isinstance(e.label, list) and e.label and isinstance(e.label[0], dict):
        return "\n".join(str(m.get("content", "")) for m in e.label)
    if isinstance(e.label, dict) and isinstance(e.label.get("prompt"), list):  # an rl prompt
        return "\n".join(str(m.get("content", "")) for m in e.label["prompt"])
    if isinstance(e.label, dict):
        return json.dumps(e.label, ensure_ascii=False, sort_keys=True)
    return e.text or ""


def normal(text: str) -> str:
    """NFKC, case-folded, whitespace collapsed: what exact duplicates are compared on."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def line_of(e: Example) -> int:
    return where_parts(e.where)[1] or 0


def label_key(label):
    """A label in hashable form: a multilabel list as a sorted tuple; a record (a conversation's messages, an rl
    prompt and its record) as its JSON."""
    if isinstance(label, list) and all(isinstance(x, str) for x in label):
        return tuple(sorted(label))
    if isinstance(label, (list, dict)):
        return json.dumps(label, ensure_ascii=False, sort_keys=True)
    return label


def shingles(text: str, n: int = 5) -> set[str]:
    t = normal(text)
    return {t[i:i + n] for i in range(max(len(t) - n + 1, 1))}


def minhashes(sets: list[set[str]]):
    datasketch = need("datasketch", "check")
    out = []
    for pieces in sets:
        m = datasketch.MinHash(num_perm=64, seed=1)
        m.update_batch([s.encode("utf-8") for s in pieces])
        out.append(m)
    return out


def near_pairs(texts: list[str], others: list[str] | None = None) -> list[tuple[int, int, float]]:
    """(i, j, Jaccard) of near-duplicate texts: within `texts` (i < j), or between `texts` (i) and `others` (j).
    MinHash LSH proposes candidates; each is confirmed by the true Jaccard similarity of the 5-gram sets."""
    datasketch = need("datasketch", "check")
    sets = [shingles(t) for t in texts]
    hashes = minhashes(sets)
    lsh = datasketch.MinHashLSH(threshold=NEAR, num_perm=64)
    for i, m in enumerate(hashes):
        lsh.insert(i, m)
    pairs = []
    query_sets = sets if others is None else [shingles(t) for t in others]
    queries = hashes if others is None else minhashes(query_sets)
    for j, m in enumerate(queries):
        for i in lsh.query(m):
            if others is None and i >= j:
                continue
            a, b = sets[i], query_sets[j]
            jaccard = len(a & b) / max(len(a | b), 1)
            if jaccard >= NEAR:
                pairs.append((i, j, jaccard))
    return pairs


def groups(pairs, n: int) -> list[list[int]]:
    """Connected groups of indices joined by pairs (union-find)."""
    parent = list(range(n))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i
    for i, j, *_ in pairs:
        parent[root(i)] = root(j)
    out = defaultdict(list)
    for i in range(n):
        out[root(i)].append(i)
    return [sorted(g) for g in out.values() if len(g) > 1]


def check_duplicates(examples: list[Example], report: Report) -> None:
    texts = [text_of(e) for e in examples]
    by_text = defaultdict(list)
    for i, t in enumerate(texts):
        by_text[normal(t)].append(i)
    exact = [g for g in by_text.values() if len(g) > 1]
    for g in exact:
        labels = {label_key(examples[i].label) for i in g}
        lines = [line_of(examples[i]) for i in g]
        if len(labels) > 1 and examples[g[0]].label is not None:
            report.add("warning", "conflicting-labels", f"the same text with different labels "
                       f"({', '.join(map(str, sorted(labels, key=str)))}): {_quote(texts[g[0]])}", lines)
        else:
            report.add("warning", "exact-duplicate", f"{len(g)} copies of {_quote(texts[g[0]])}", lines)
    firsts = sorted(g[0] for g in by_text.values())  # near duplicates among texts that are not exact copies
    pairs = near_pairs([texts[i] for i in firsts])
    for g in groups(pairs, len(firsts)):
        members = [firsts[i] for i in g]
        labels = {label_key(examples[i].label) for i in members}
        lines = [line_of(examples[i]) for i in members]
        if len(labels) > 1 and examples[members[0]].label is not None:
            report.add("warning", "near-duplicate-conflict", f"{len(members)} nearly identical texts with "
                       f"different labels ({', '.join(map(str, sorted(labels, key=str)))}), e.g. "
                       f"{_quote(texts[members[0]])}", lines)
        else:
            report.add("warning", "near-duplicate", f"{len(members)} nearly identical texts (≥ {NEAR:.0%} of "
                       f"5-character pieces shared), e.g. {_quote(texts[members[0]])}", lines)


def check_leakage(train: list[Example], evaluation: list[Example], eval_path: str, report: Report) -> None:
    train_keys = [normal(text_of(e)) for e in train]
    eval_keys = [normal(text_of(e)) for e in evaluation]
    seen, eval_texts = set(train_keys), set(eval_keys)
    exact = [e for e, k in zip(evaluation, eval_keys) if k in seen]
    leaked = {line_of(e) for e, k in zip(train, train_keys) if k in eval_texts}
    if exact:
        report.add("warning", "leak-exact", f"{_n(len(exact), 'eval example')} also in the training file: the "
                   "eval score would reward memorising them", [line_of(e) for e in exact], eval_path)
    rest = [e for e, k in zip(evaluation, eval_keys) if k not in seen]
    pairs = near_pairs([text_of(e) for e in train], [text_of(e) for e in rest])
    near = sorted({j for _, j, _ in pairs})
    leaked |= {line_of(train[i]) for i, _, _ in pairs}
    report.stats["leaked_training_lines"] = sorted(leaked)  # what `tunelab data clean --drop-leaked` drops
    if near:
        report.add("warning", "leak-near", f"{_n(len(near), 'eval example')} nearly identical to training examples",
                   [line_of(rest[j]) for j in near], eval_path)


def check_labels(examples: list[Example], task: str, report: Report) -> None:
    if task not in ("classification", "multilabel"):
        if task == "regression":
            values = sorted(e.label for e in examples)
            report.stats["target"] = {"min": values[0], "median": values[len(values) // 2], "max": values[-1]}
        return
    counts = Counter(n for e in examples for n in (e.label if task == "multilabel" else [e.label]))
    report.stats["labels"] = dict(counts.most_common())
    most, least = counts.most_common()[0], counts.most_common()[-1]
    if len(counts) > 1 and most[1] >= 10 * least[1]:
        report.add("warning", "imbalance", f"'{most[0]}' has {most[1]} examples, {most[1] / least[1]:.0f}× "
                   f"'{least[0]}' ({least[1]}): consider more data for the rare classes, or judge by macro-F1")
    import difflib

    for rare, n in counts.items():
        for common, m in counts.items():
            if m < 5 * n or rare == common:
                continue
            same = normal(rare) == normal(common)
            if same or difflib.SequenceMatcher(None, rare.casefold(), common.casefold()).ratio() >= 0.8:
                lines = [line_of(e) for e in examples if rare in (e.label if task == "multilabel" else [e.label])]
                report.add("warning", "label-typo", f"label '{rare}' ({n}) looks like a misspelling of "
                           f"'{common}' ({m})", lines)
                break


SPAM = [("url-only", re.compile(r"^\s*(?:(?:https?://|www\.)\S+\s*)+$"), "only a URL"),
        ("repeated-characters", re.compile(r"(\S)\1{9,}"), "a character repeated 10 times or more")]


def check_noise(examples: list[Example], report: Report) -> None:
    texts = [text_of(e) for e in examples]
    for code, pattern, what in SPAM:
        hits = [line_of(e) for e, t in zip(examples, texts) if pattern.search(t)]
        if hits:
            report.add("warning", code, f"{_n(len(hits), 'text')} with {what}", hits)
    short = [line_of(e) for e, t in zip(examples, texts) if len(normal(t)) < 3]
    if short:
        report.add("warning", "too-short", f"{_n(len(short), 'text')} shorter than 3 characters", short)
    # boilerplate: the same sentence or line (15+ characters) in many texts, e.g. a signature or a template
    where = defaultdict(set)
    for i, t in enumerate(texts):
        t = unicodedata.normalize("NFKC", t)
        words = t.split()
        sentences = re.split(r"\n|[。！？]+|[.!?]+(?=\s|$)", t)  # a URL's dots do not end a sentence
        pieces = sentences + [" ".join(words[:5]), " ".join(words[-5:])]  # and each text's opening and ending
        for piece in pieces:
            piece = " ".join(piece.split())
            if len(piece) >= 15:
                where[piece].add(i)
    floor = max(3, len(texts) // 200)  # 0.5% of the texts, at least 3
    for piece, rows in sorted(where.items(), key=lambda kv: -len(kv[1])):
        if len(rows) >= floor and len(rows) < len(texts):
            report.stats.setdefault("boilerplate", []).append(piece)
            report.add("warning", "boilerplate", f"{_quote(piece)} appears in {len(rows)} texts: boilerplate (a "
                       "template or signature) or a stock phrase",
                       [line_of(examples[i]) for i in rows])


def check_lengths(examples: list[Example], tokenizer, model_name: str, max_length: int, report: Report) -> None:
    texts = [e.text or text_of(e) for e in examples]
    pairs = [e.text_pair for e in examples]
    both = all(p is not None for p in pairs)
    ids = tokenizer(texts, pairs if both else None, add_special_tokens=True)["input_ids"]
    lengths = sorted(len(x) for x in ids)
    pick = lambda q: lengths[min(int(q * len(lengths)), len(lengths) - 1)]  # noqa: E731
    report.stats["tokens"] = {"model": model_name, "min": lengths[0], "median": pick(0.5), "p95": pick(0.95),
                              "max": lengths[-1], "total": sum(lengths), "max_length": max_length}
    over = [line_of(e) for e, x in zip(examples, ids) if len(x) > max_length]
    if over:
        report.add("warning", "truncated", f"{len(over)} texts are longer than --max-length {max_length} tokens "
                   f"of {model_name} and would be cut (longest: {lengths[-1]})", over)


def check_language(examples: list[Example], tokenizer, model_name: str, report: Report) -> None:
    """The share of the texts' tokens that the model's tokenizer cannot read (tunelab.models.coverage)."""
    from tunelab.models.coverage import examples_coverage

    found = examples_coverage(tokenizer, examples, model_name)
    report.stats["language"] = found.stats()
    if found.warning():
        report.add("warning", "language", found.warning())


def check_label_errors(examples: list[Example], report: Report, folds: int = 5) -> None:
    """Confident learning (Northcutt et al. 2021, via cleanlab) on out-of-fold probabilities of a TF-IDF
    character n-gram logistic regression: examples whose given label the others say is unlikely."""
    counts = Counter(e.label for e in examples)
    labels = sorted(n for n, c in counts.items() if c >= folds)
    if len(labels) < len(counts):
        report.add("note", "label-errors-skipped", f"classes with fewer than {folds} examples are left out of the "
                   f"label-error search: {', '.join(sorted(set(counts) - set(labels)))}")
    examples = [e for e in examples if e.label in labels]
    if len(labels) < 2:
        return
    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline

    find_label_issues = need("cleanlab.filter", "check").find_label_issues

    y = np.array([labels.index(e.label) for e in examples])
    model = make_pipeline(TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 4), sublinear_tf=True, min_df=2),
                          LogisticRegression(max_iter=2000, C=4.0))
    probs = cross_val_predict(model, [normal(text_of(e)) for e in examples], y, method="predict_proba",
                              cv=StratifiedKFold(folds, shuffle=True, random_state=0))
    issues = find_label_issues(y, probs, return_indices_ranked_by="self_confidence")
    accuracy = float((probs.argmax(1) == y).mean())
    report.stats["label_error_probe"] = {"accuracy": accuracy, "folds": folds}
    report.stats["label_errors"] = [{"line": line_of(examples[i]), "label": examples[i].label,
                                     "suggested": labels[probs[i].argmax()], "p_label": float(probs[i][y[i]])}
                                    for i in issues]
    strong = [i for i in issues if probs[i][y[i]] < STRONG]
    if strong:
        listed = [f"{line_of(examples[i])}: '{examples[i].label}' → '{labels[probs[i].argmax()]}' "
                  f"(p = {probs[i][y[i]]:.2f})" for i in strong[:LISTED]]
        report.add("warning", "label-error", f"{_n(len(strong), 'example')} whose label the rest of the data finds "
                   f"very unlikely (p < {STRONG}; the probe classifier is {accuracy:.0%} accurate out of fold; most "
                   f"doubtful first: {'; '.join(listed)})", [line_of(examples[i]) for i in strong])
    if len(issues) > len(strong):
        report.add("note", "label-doubt", f"{len(issues) - len(strong)} more examples whose label is doubtful but "
                   f"not very unlikely (confident learning; --json lists them)",
                   [line_of(examples[i]) for i in issues if probs[i][y[i]] >= STRONG])


def estimate_time(examples: list[Example], task, model_name: str, tokenizer, max_length: int, batch_size: int,
                  epochs: int, report: Report, steps: int = 3) -> None:
    """Seconds per example of a few real training steps (forward, backward, AdamW) on this data, times the
    examples and epochs: what `tunelab train` would spend, give or take evaluation."""
    import time

    import torch

    from tunelab.config import ModelConfig
    from tunelab.models import build_model

    sample = examples[:batch_size * (steps + 1)]
    space = task.space(examples, report.file)
    model = build_model(ModelConfig(name=model_name), task, space, True)
    model.config.pad_token_id = tokenizer.pad_token_id or 0
    items = task.encode(tokenizer, sample, space, max_length)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model.train()
    seconds = []
    for start in range(0, len(items), batch_size):
        batch = task.collate(items[start:start + batch_size], tokenizer.pad_token_id or 0)
        tic = time.perf_counter()
        loss, _ = task.forward(model, batch, space)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        seconds.append((time.perf_counter() - tic) / len(items[start:start + batch_size]))
    per = sorted(seconds[1:] or seconds)[len(seconds[1:] or seconds) // 2]  # the first step warms up
    report.stats["estimate"] = {"model": model_name, "seconds_per_example": per, "batch_size": batch_size,
                                "epochs": epochs, "training_seconds": per * len(examples) * epochs,
                                "measured_steps": len(seconds)}


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _quote(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= width else text[:width - 1] + "…")


# --- the whole check ----------------------------------------------------------------------------------------------
def check(path: str | Path, task_name: str | None = None, eval_path: str | None = None, model: str | None = None,
          cfg: DataConfig | None = None, epochs: int = 3, batch_size: int = 16, label_errors: bool = True) -> Report:
    from tunelab.data.formats import FORMAT_TASK, detect_format
    from tunelab.tasks import TASKS

    cfg = cfg or DataConfig()
    path = Path(path)
    if task_name is None and path.is_dir():  # class folders of images, or of .txt files
        from tunelab.data.images import EXTENSIONS

        images = any(f.suffix.lower() in EXTENSIONS for d in path.iterdir() if d.is_dir() for f in d.iterdir())
        task_name = "image-classification" if images else "classification"
    if task_name is None:
        try:
            head = path.read_bytes()[:65536]
            codec = enc.detect(head) or "utf-8"
            task_name = FORMAT_TASK[detect_format(head.decode(codec, errors="replace"), path.suffix.lower(),
                                                  str(path))]
        except (OSError, UserError):
            task_name = "classification"
    if task_name not in TASKS:
        raise UserError(f"unknown task {task_name!r} (one of {', '.join(TASKS)})", "--task")
    task = TASKS[task_name]
    report = Report(str(path), task_name, "not read")
    examples = read_all(path, task, cfg, report)
    report.examples = len(examples)
    if not examples:
        return report
    if task.modality == "image":
        return check_images(examples, task, eval_path, cfg, report)
    check_duplicates(examples, report)
    if task_name in LABELLED:
        check_labels(examples, task_name, report)
    if not eval_path and not any(f.level == "error" for f in report.findings):
        # what `tunelab train` would hold out of this file (refused there in the same words); after format errors
        # the count of the records that survived them would mislead
        from tunelab.data import split_problem

        problem = split_problem(task.strata(examples), len(examples), cfg.eval_split, "data.eval_split")
        if problem:
            report.add("error", "too-few", problem)
    check_noise(examples, report)
    if eval_path:
        eval_report = Report(str(eval_path), task_name, "")
        evaluation = read_all(Path(eval_path), task, cfg, eval_report)
        report.findings += eval_report.findings
        if evaluation:
            check_leakage(examples, evaluation, str(eval_path), report)
    if task_name not in ("chat", "dpo"):
        from tunelab.config import ModelConfig
        from tunelab.models import load_tokenizer

        name = model or ModelConfig().name
        tokenizer = load_tokenizer(ModelConfig(name=name))
        check_lengths(examples, tokenizer, name, cfg.max_length, report)
        check_language(examples, tokenizer, name, report)
    if label_errors and task_name == "classification":
        check_label_errors(examples, report)
    if model and task_name in LABELLED:
        estimate_time(examples, task, model, tokenizer, cfg.max_length, batch_size, epochs, report)  # model's tokens
    return report


# --- images -------------------------------------------------------------------------------------------------------
NEAR_BITS = 6  # perceptual hashes (64 bits) this close or closer: near-duplicate images


def check_images(examples: list[Example], task, eval_path, cfg: DataConfig, report: Report) -> Report:
    """Bad image files (already noted by the reader), exact and near-duplicate images, the label distribution,
    and leakage of training images into an eval set."""
    report.encoding = "images"
    hashes = image_hashes(examples)
    check_image_duplicates(examples, hashes, report)
    check_labels(examples, task.name.removeprefix("image-").replace("-", ""), report)
    if eval_path:
        eval_report = Report(str(eval_path), task.name, "images")
        evaluation = read_all(Path(eval_path), task, cfg, eval_report)
        report.findings += eval_report.findings
        if evaluation:
            check_image_leakage(examples, hashes, evaluation, image_hashes(evaluation), str(eval_path), report)
    return report


def image_hashes(examples: list[Example]):
    """(exact keys, perceptual hashes): a digest of each decoded image's pixels, and its 64-bit pHash (DCT of a
    32x32 grey version; robust to resizing, re-compression and small edits) as an unsigned integer."""
    import hashlib

    import numpy as np

    imagehash = need("imagehash", "vision", "near-duplicate images")
    exact = [hashlib.sha1(repr(e.image.size).encode() + e.image.tobytes()).hexdigest() for e in examples]
    perceptual = np.array([int(str(imagehash.phash(e.image)), 16) for e in examples], dtype=np.uint64)
    return exact, perceptual


def _close_pairs(a, b=None) -> list[tuple[int, int]]:
    """(i, j) with Hamming distance <= NEAR_BITS between hashes a[i] and b[j] (within a when b is None: i < j)."""
    import numpy as np

    other = a if b is None else b
    pairs = []
    for i in range(len(a)):
        distance = np.bitwise_count(np.bitwise_xor(other, a[i]))
        for j in np.flatnonzero(distance <= NEAR_BITS).tolist():
            if b is not None or j > i:
                pairs.append((i, j))
    return pairs


def _named(examples: list[Example], members: list[int]) -> tuple[list[int], str]:
    """Lines (CSV or JSONL data) and a short list of the image files, for a finding."""
    lines = [line_of(examples[i]) for i in members if line_of(examples[i])]
    files = [Path(examples[i].text).name for i in members]
    return lines, ", ".join(files[:4]) + (f" (+{len(files) - 4} more)" if len(files) > 4 else "")


def check_image_duplicates(examples: list[Example], hashes, report: Report) -> None:
    exact, perceptual = hashes
    by_key = defaultdict(list)
    for i, key in enumerate(exact):
        by_key[key].append(i)
    for g in (g for g in by_key.values() if len(g) > 1):
        lines, files = _named(examples, g)
        labels = {label_key(examples[i].label) for i in g}
        if len(labels) > 1:
            report.add("warning", "conflicting-labels", f"the same image with different labels "
                       f"({', '.join(map(str, sorted(labels, key=str)))}): {files}", lines)
        else:
            report.add("warning", "exact-duplicate", f"{len(g)} copies of one image: {files}", lines)
    firsts = sorted(g[0] for g in by_key.values())
    for g in groups(_close_pairs(perceptual[firsts]), len(firsts)):
        members = [firsts[i] for i in g]
        lines, files = _named(examples, members)
        labels = {label_key(examples[i].label) for i in members}
        conflict = len(labels) > 1
        report.add("warning", "near-duplicate-conflict" if conflict else "near-duplicate",
                   f"{len(members)} nearly identical images (perceptual hashes within {NEAR_BITS} of 64 bits)"
                   f"{' with different labels' if conflict else ''}: {files}", lines)


def check_image_leakage(train: list[Example], train_hashes, evaluation: list[Example], eval_hashes, eval_path: str,
                        report: Report) -> None:
    seen = set(train_hashes[0])
    exact = [j for j, key in enumerate(eval_hashes[0]) if key in seen]
    if exact:
        lines, files = _named(evaluation, exact)
        report.add("warning", "leak-exact", f"{_n(len(exact), 'eval image')} also in the training data: {files}",
                   lines, eval_path)
    rest = [j for j in range(len(evaluation)) if j not in set(exact)]
    near = sorted({rest[j] for _, j in _close_pairs(train_hashes[1], eval_hashes[1][rest])}) if rest else []
    if near:
        lines, files = _named(evaluation, near)
        report.add("warning", "leak-near", f"{_n(len(near), 'eval image')} nearly identical to training images: "
                   f"{files}", lines, eval_path)


def render(report: Report) -> str:
    """The report as a person reads it: what was read, then one line per finding (worst first), then figures."""
    lines = [f"{report.file}: {report.examples} examples read as {report.task} data ({report.encoding})"]
    order = {"error": 0, "warning": 1, "note": 2}
    findings = sorted(report.findings, key=lambda f: order[f.level])
    shown_format = 0
    hidden_format = 0
    for f in findings:
        if f.level == "error" and len(f.lines) == 1 and f.code not in ("not-found",):
            shown_format += 1
            if shown_format > 20:
                hidden_format += 1
                continue
        where = f.file if f.file != report.file else Path(f.file).name
        at = ", ".join(str(n) for n in f.lines[:LISTED]) + (f" (+{len(f.lines) - LISTED} more)"
                                                            if len(f.lines) > LISTED else "")
        lines.append(f"{f.level:7}  {f.code:24} {where}{':' + at if at else ''}  {f.message}")
    if hidden_format:
        lines.append(f"error    … and {hidden_format} more format problems (--json lists them all)")
    stats = report.stats
    if "labels" in stats:
        total = sum(stats["labels"].values())
        lines.append("labels: " + ", ".join(f"{k} {v} ({v / total:.0%})" for k, v in stats["labels"].items()))
    if "tokens" in stats:
        t = stats["tokens"]
        lines.append(f"tokens ({t['model']}): median {t['median']}, 95% ≤ {t['p95']}, max {t['max']}; "
                     f"--max-length {t['max_length']}")
    if "language" in stats:
        g = stats["language"]
        lines.append(f"language ({g['model']}): {g['unknown_share']:.1%} of the tokens unknown, "
                     f"{g['byte_share']:.1%} single bytes")
    if "estimate" in stats:
        e = stats["estimate"]
        lines.append(f"training time ({e['model']}, batch {e['batch_size']}, {e['epochs']} epochs): about "
                     f"{e['training_seconds'] / 60:.1f} min on this machine ({e['seconds_per_example'] * 1000:.0f} ms "
                     f"per example over {e['measured_steps']} measured steps)")
    verdict = {0: "clean", 1: "warnings", 2: "errors: fix them before training"}[report.exit_code]
    lines.append(f"result: {verdict} (exit code {report.exit_code})")
    return "\n".join(lines)
