"""The language check (tunelab.models.coverage): an English vocabulary meets Japanese with [UNK] (WordPiece) or stray
bytes (byte-level BPE); `tunelab data check --model` reports it and `tunelab train` warns."""
from __future__ import annotations

import json
import logging

from conftest import write_jsonl
from tunelab.cli import main
from tunelab.models import resolve
from tunelab.models.coverage import coverage

JAPANESE = ["東京都の渋谷駅で友人と待ち合わせをしました。", "今日は雨が降っているので、傘を持って出かけます。",
            "株式会社サンプルは新しい製品を発表した。", "彼女はピアノを弾くのがとても上手です。",
            "来週の会議は午後三時から始まる予定です。", "このラーメン屋はいつも行列ができている。"] * 4
ENGLISH = ["the meeting starts at three next week", "she plays the piano very well",
           "it is raining today so I take an umbrella"] * 8


def minilm_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve("minilm"))


def test_minilm_reads_english_but_japanese_is_mostly_unknown_to_it():
    tok = minilm_tokenizer()
    english, japanese = coverage(tok, ENGLISH, "minilm"), coverage(tok, JAPANESE, "minilm")
    assert english.unknown_share == 0 and english.warning() is None
    # By hand, the first sentence: BERT's basic tokenizer cuts each kanji apart and keeps kana runs whole; uncased, it
    # strips the voicing marks (で → て). 東 京 都 の [渋] 谷 [駅] て [友] 人 と [待] ち 合 [わせをしました] 。: 16 pieces,
    # the 5 in brackets missing from the English vocabulary ([UNK]; a kana run it cannot split is one [UNK]).
    first = coverage(tok, JAPANESE[:1], "minilm")
    assert (first.tokens, first.unknown) == (16, 5)
    assert japanese.unknown_share > 0.05
    line = japanese.warning()
    assert line.startswith(f"{japanese.unknown_share:.0%} of the tokens are [UNK] for minilm: this model does not "
                           "read this language") and "gemma3-270m" in line and "bert-base-japanese" in line


def test_a_byte_level_vocabulary_breaks_japanese_into_bytes():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(ENGLISH * 10, trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.
                                                              ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe)
    assert coverage(tok, ENGLISH, "bpe").byte_share == 0
    japanese = coverage(tok, JAPANESE, "bpe")
    assert japanese.unknown == 0 and japanese.byte_share > 0.9  # every kana and kanji is three stray bytes
    assert "single bytes for bpe: its vocabulary lacks this script" in japanese.warning()


def test_data_check_reports_it_and_train_warns_at_its_start(tiny_model, tmp_path, capsys, caplog):
    rows = [{"text": t, "label": ["a", "b"][i % 2]} for i, t in enumerate(JAPANESE)]
    data = write_jsonl(tmp_path / "ja.jsonl", rows)
    assert main(["data", "check", str(data), "--model", "minilm", "--no-label-errors"]) == 1
    out = capsys.readouterr().out
    assert "of the tokens are [UNK] for minilm: this model does not read this language" in out
    assert "language (minilm):" in out and "of the tokens unknown" in out
    assert main(["data", "check", str(data), "--model", "minilm", "--no-label-errors", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["stats"]["language"]["unknown_share"] > 0.05
    with caplog.at_level(logging.WARNING):
        assert main(["train", "--model", tiny_model, "--train", str(data), "--epochs", "1", "--output",
                     str(tmp_path / "run"), "--train.progress", "false", "--eval.bootstrap", "0",
                     "--eval.probe", "false"]) == 0
    assert any("of the tokens are [UNK]" in r.getMessage() and "does not read this language" in r.getMessage()
               for r in caplog.records)
