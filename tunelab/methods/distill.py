"""Knowledge distillation (Hinton, Vinyals & Dean 2015): a student learns a finished teacher run's soft targets.

loss = α · T² · KL(softmax(teacher / T) ‖ softmax(student / T)) + (1 − α) · cross-entropy(student, gold)

(the soft terms are in tunelab.losses; a task's `outputs_are` says which applies). Everything distillation does
lives here: the teacher, the student built from it, the soft targets on the training and transfer texts and the
loss; the pipeline and the loop only call the Method hooks. Multilabel
students match each label's sigmoid(teacher / T) the same way (against binary cross-entropy); regression students
the teacher's number (mean squared error in the standardised units they train in; T does not apply). Soft
targets are per example, so the teacher may have another tokenizer and architecture: it reads the raw texts with
its own (an image teacher: the pictures with its own pre-processing, so a larger network at a larger input size
teaches EfficientNet-Lite0 as well). They are computed once and cached under $TUNELAB_CACHE/teacher-logits, keyed
by the teacher's weights, its max length and the texts (or the pictures' pixels). Unlabelled transfer examples
(`--transfer`) get only the soft term. With image augmentation the student sees random views of a picture but
learns the teacher's outputs on the picture itself, computed once; Beyer et al. (2022, "a good teacher is patient
and consistent") show the teacher seeing the very same views distils better, at the cost of a teacher forward pass
per step, which this method does not pay.
The student trains every weight (as `full`); with `tuning.student_layers` it is the teacher itself with fewer
layers, initialised from evenly spaced teacher layers (0, 2, 4 of 6 for 3: DistilBERT's every other layer).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import nn

from tunelab.config import Config, TuningConfig
from tunelab.errors import UserError
from tunelab.io import atomic_write_bytes
from tunelab.losses import sigmoid_kl, softmax_kl
from tunelab.methods.full import Full
from tunelab.models import load_tokenizer, set_dropout


class Distill(Full):
    def __init__(self):
        self.teacher: Teacher | LanguageModelTeacher | None = None
        self.answers: Path | None = None  # sequence-level distillation: the teacher's answers (chat JSONL)
        self.transfer: list = []  # unlabelled examples: the teacher's soft targets only
        self.tuning: TuningConfig | None = None  # the run's, for T and α (set by `build`)

    def build(self, cfg: Config, task, space, train: list) -> tuple[nn.Module, object]:
        """The student: the teacher itself with `tuning.student_layers` of its layers (and its tokenizer), or
        `--model`; with `tuning.prune_vocab`, shrunk to the vocabulary of the training and transfer texts."""
        if task.judged_by_start:
            return self._build_language_model(cfg, task, space, train)
        self.teacher = Teacher(cfg.tuning.teacher)
        self.teacher.check(task, space)
        self.tuning = cfg.tuning
        if task.modality != "text" and (cfg.tuning.student_layers or cfg.tuning.prune_vocab):
            raise UserError("tuning.student_layers and tuning.prune_vocab shrink a transformer's layers and "
                            "vocabulary; an image student is the network --model names", "--tuning")
        if cfg.tuning.student_layers:
            cfg.model.name = str(self.teacher.run / "model")
            model = self.teacher.student(cfg.tuning.student_layers)
            cfg.model.pooling = getattr(model.config, "pooling", "auto")  # the teacher's
            task.unfinalize(model, space)
            if cfg.model.dropout is not None:
                set_dropout(model, cfg.model.dropout)
            tokenizer = load_tokenizer(cfg.model)
        else:
            model, tokenizer = super().build(cfg, task, space, train)
        self.transfer = task.read(cfg.data.transfer, cfg.data, need_label=False) if cfg.data.transfer else []
        if cfg.tuning.prune_vocab:
            tokenizer = prune_vocabulary(model, tokenizer, [t for e in train + self.transfer
                                                            for t in (e.text, e.text_pair) if t])
        return model, tokenizer

    def _build_language_model(self, cfg: Config, task, space, train: list) -> tuple[nn.Module, object]:
        """A language-model student (see LanguageModelTeacher): token level keeps the teacher for the loss;
        sequence level replaces each training conversation's last answer by the teacher's (in `train`, in place)
        and then trains as `full` does."""
        self.tuning = cfg.tuning
        if cfg.data.transfer or cfg.tuning.prune_vocab:
            raise UserError("--transfer and tuning.prune_vocab are for classifier distillation", "--tuning")
        teacher = LanguageModelTeacher(cfg.tuning.teacher)
        if cfg.tuning.student_layers:
            cfg.model.name = str(teacher.run / "model")
            model = fewer_layers("AutoModelForCausalLM", teacher.run / "model", cfg.tuning.student_layers)
            tokenizer = load_tokenizer(cfg.model)
        else:
            model, tokenizer = super().build(cfg, task, space, train)
        level = cfg.tuning.kd_level
        shared = teacher.tokenizer.get_vocab() == tokenizer.get_vocab()
        if level == "auto":
            level = "token" if shared else "sequence"
        if level == "token" and not shared:
            raise UserError("token-level distillation compares next-token distributions, so the teacher must use "
                            "the student's tokenizer; this one does not: use tuning.kd_level sequence", "--teacher")
        if level == "sequence":
            if task.name != "chat":
                raise UserError("sequence-level distillation trains on the teacher's answers to the training "
                                "prompts: a chat task (clm texts have no prompts)", "tuning.kd_level")
            train[:], self.answers = teacher.answer(train, cfg.tuning.kd_max_new_tokens)
        else:
            self.teacher = teacher
        cfg.tuning.kd_level = level  # config.yaml says which ran
        return model, tokenizer

    def save_extra(self, model: nn.Module, folder: Path) -> None:
        """Sequence-level distillation: the teacher's answers the student trained on, as RUN/distill/
        teacher_answers.jsonl (chat JSONL, reusable as --train)."""
        if self.answers is not None:
            atomic_write_bytes(folder / "distill" / "teacher_answers.jsonl", self.answers.read_bytes())

    def extra_items(self, cfg: Config, task, space, tokenizer, train: list, train_items: list[dict]) -> list[dict]:
        if task.judged_by_start:
            return []  # a language model's teacher answers at each step (token) or already wrote its data (sequence)
        return self._classifier_extra_items(cfg, task, space, tokenizer, train, train_items)

    def _classifier_extra_items(self, cfg: Config, task, space, tokenizer, train: list,
                                train_items: list[dict]) -> list[dict]:
        """The teacher's outputs on every training item; the transfer texts as items of their own, with a
        placeholder label of the right shape that the `_unlabelled` mark keeps out of the loss."""
        # Transfer pictures are augmented as the training split's are (the item's transform); texts were already.
        same_views = {"transform": train_items[0]["_transform"]} if task.modality == "image" else {}
        transfer_items = task.encode(tokenizer, self.transfer, space, cfg.data.max_length, **same_views) \
            if self.transfer else []
        for item in transfer_items:
            item["labels"], item["_unlabelled"] = train_items[0]["labels"], True
        for item, outputs in zip(train_items + transfer_items, self.teacher.logits(train + self.transfer)):
            item["_teacher"] = soft_targets_of(task, outputs, space)
        return transfer_items

    def collate(self, task, items: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
        batch = task.collate(items, pad_id)
        if task.judged_by_start:
            return batch
        batch["teacher_logits"] = torch.tensor([it["_teacher"] for it in items])
        batch["labelled"] = torch.tensor([not it.get("_unlabelled") for it in items])
        return batch

    def forward(self, task, model: nn.Module, batch: dict, space) -> tuple[torch.Tensor, dict[str, float]]:
        if task.judged_by_start:
            if not isinstance(self.teacher, LanguageModelTeacher):  # sequence level: plain fine-tuning
                return task.forward(model, batch, space)
            teacher = self.teacher.model.to(batch["input_ids"].device)  # (loaded on the CPU; a no-op there)
            return token_distill_loss(task, model, teacher, batch, self.tuning.kd_temperature, self.tuning.kd_alpha)
        teacher, labelled, labels = batch.pop("teacher_logits"), batch.pop("labelled"), batch.pop("labels")
        logits = model(**batch).logits.float()
        return distill_loss(task, logits, teacher, labels, labelled, self.tuning.kd_temperature,
                            self.tuning.kd_alpha), {}

    def before_training(self, loop) -> str | None:
        if loop.task.judged_by_start:
            return None  # a language model has no new head to solve first
        return self._warm_head(loop)

    def _warm_head(self, loop) -> str | None:
        """A student built from --model gets its new head solved on the labelled examples first (LP-FT, as
        `full`): a random head at fine-tuning's learning rate would barely move (EfficientNet-Lite0 on the digits
        example, 60 labelled and 540 transfer pictures: accuracy 0.54 without, against `full`'s 0.67 on the 60
        alone). A shortened teacher keeps its own, trained head."""
        return None if loop.cfg.tuning.student_layers else super().before_training(loop)


def token_distill_loss(task, model: nn.Module, teacher: nn.Module, batch: dict, temperature: float,
                       alpha: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Summed over the labelled tokens: α · T² · KL(softmax(teacher / T) ‖ softmax(student / T)) + (1 − α) ·
    cross-entropy of the token, the teacher's distribution at every position the task's loss counts."""
    from tunelab.data.chat import IGNORE

    labels = batch.pop("labels")
    logits = model(**batch, use_cache=False).logits.float()  # (no cache: packed rows are masked as packed)
    with torch.no_grad():
        target = teacher(**batch, use_cache=False).logits.float()
    hard = task.loss(logits, labels)  # the task's own summed token loss
    if task.shift:  # position t predicts token t + 1
        logits, target, labels = logits[:, :-1], target[:, :-1], labels[:, 1:]
    mask = labels != IGNORE
    s, t = logits[mask], target[mask]  # [labelled tokens, vocabulary]
    soft = torch.nn.functional.kl_div((s / temperature).log_softmax(-1), (t / temperature).log_softmax(-1),
                                      log_target=True, reduction="sum") * temperature ** 2
    return alpha * soft + (1 - alpha) * hard, {"correct": float((s.argmax(-1) == labels[mask]).sum()),
                                               "tokens": float(mask.sum())}


def soft_targets_of(task, outputs: list[float], space) -> list[float]:
    """What the student learns from the teacher's outputs on one example: its logits as they are, or (a number)
    in the units the student trains in (the teacher's exported model answers in the target's own units)."""
    return [task.target(v, space) for v in outputs] if task.outputs_are == "value" else outputs


# The soft term for each kind of output (Task.outputs_are); a number's is the task's own loss against the teacher's.
SOFT_TERMS = {"softmax": softmax_kl, "sigmoid": sigmoid_kl}


def distill_loss(task, logits: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, labelled: torch.Tensor,
                 temperature: float, alpha: float) -> torch.Tensor:
    """α · the soft term against the teacher's outputs on every row + (1 − α) · the task's loss on the rows with a
    gold label (transfer texts have none); summed over the rows like every loss the loop sees."""
    teacher = teacher.float()
    if task.outputs_are == "value":  # T does not apply to a number: mean squared error in standardised units
        soft = task.loss(logits, teacher.squeeze(-1))
    else:
        soft = SOFT_TERMS[task.outputs_are](logits, teacher, temperature)
    hard = task.loss(logits[labelled], labels[labelled]) if labelled.any() else logits.new_zeros(())
    return alpha * soft + (1 - alpha) * hard


def evenly_spaced(total: int, keep: int) -> list[int]:
    """`keep` of `total` layer indices, evenly spaced from the bottom: every other one when keep = total / 2."""
    if not 1 <= keep <= total:
        raise UserError(f"must be between 1 and the teacher's {total} layers, got {keep}", "tuning.student_layers")
    return [i * total // keep for i in range(keep)]


def layer_list(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """(parent, attribute, list) of the model's stack of transformer layers: the ModuleList as long as the
    config's num_hidden_layers (encoder.layer for BERT, layers for Llama-style models)."""
    n = model.config.num_hidden_layers
    for name, module in model.named_modules():
        for attr, child in module.named_children():
            if isinstance(child, nn.ModuleList) and len(child) == n:
                return module, attr, child
    raise UserError(f"cannot find the {n} transformer layers of a {type(model).__name__}", "tuning.student_layers")


def fewer_layers(model_class: str, folder: Path, n_layers: int) -> nn.Module:
    """The finished model in `folder` with `n_layers` of its layers, evenly spaced (its embeddings and head as they
    are): a teacher shortened into its own student."""
    from tunelab.models import load_trained

    model = load_trained(model_class, folder)
    return keep_layers(model, evenly_spaced(model.config.num_hidden_layers, n_layers))


def keep_layers(model: nn.Module, keep: list[int]) -> nn.Module:
    """The same model with only the layers at `keep` (in order), its config updated to match."""
    parent, attr, layers = layer_list(model)
    setattr(parent, attr, nn.ModuleList([layers[i] for i in keep]))
    # Every config inside the model says so (a pooled classifier's backbone has its own).
    for config in {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}.values():
        if getattr(config, "layer_types", None):  # per-layer attention kinds (some decoders) follow their layer
            config.layer_types = [config.layer_types[i] for i in keep]
        if hasattr(config, "num_hidden_layers"):
            config.num_hidden_layers = len(keep)
    for new, layer in enumerate(getattr(parent, attr)):  # layers that know their index (KV caches) get the new one
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new
    return model


def prune_vocabulary(model: nn.Module, tokenizer, texts: list[str]):
    """Keep only the vocabulary that `texts` use, every single character (with and without the word-piece
    prefix, so that any later word still splits into known pieces) and the special tokens; shrink the model's input
    embeddings to match. Returns the matching tokenizer. For WordPiece tokenizers (BERT's family), whose pieces do
    not depend on each other (BPE's merges do). The student then trains on the smaller vocabulary: words it has not
    seen split into smaller pieces, the same way at training and at inference."""
    import tempfile

    from transformers import AutoTokenizer

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "WordPiece":
        raise UserError(f"vocabulary pruning needs a WordPiece tokenizer (BERT's family); this one is "
                        f"{spec['model']['type']}", "tuning.prune_vocab")
    vocab, prefix = spec["model"]["vocab"], spec["model"].get("continuing_subword_prefix", "##")
    keep = set(tokenizer.all_special_ids) | {t["id"] for t in spec.get("added_tokens", [])}
    keep |= {i for token, i in vocab.items() if len(token.removeprefix(prefix)) == 1}
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        keep.update(ids)
    keep = sorted(keep)
    new_id = {old: new for new, old in enumerate(keep)}
    spec["model"]["vocab"] = {token: new_id[i] for token, i in vocab.items() if i in new_id}
    for token in spec.get("added_tokens", []):
        token["id"] = new_id[token["id"]]
    _renumber_post_processor(spec.get("post_processor"), new_id)

    old = model.get_input_embeddings()
    embeddings = nn.Embedding(len(keep), old.embedding_dim, padding_idx=new_id.get(old.padding_idx))
    with torch.no_grad():
        embeddings.weight.copy_(old.weight[keep])
    model.set_input_embeddings(embeddings)
    model.config.vocab_size = len(keep)
    if model.config.pad_token_id is not None:
        model.config.pad_token_id = new_id[model.config.pad_token_id]
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        Path(tmp, "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
        Path(tmp, "vocab.txt").unlink(missing_ok=True)  # the slow tokenizer's copy of the old vocabulary
        return AutoTokenizer.from_pretrained(tmp)


def _renumber_post_processor(post: dict | None, new_id: dict[int, int]) -> None:
    """The special-token ids that the tokenizer's post-processor inserts ([CLS], [SEP]), renumbered in place."""
    if post is None:
        return
    if post["type"] == "TemplateProcessing":
        for token in post["special_tokens"].values():
            token["ids"] = [new_id[i] for i in token["ids"]]
    elif post["type"] in ("BertProcessing", "RobertaProcessing"):
        post["sep"][1], post["cls"][1] = new_id[post["sep"][1]], new_id[post["cls"][1]]
    elif post["type"] == "Sequence":
        for part in post["processors"]:
            _renumber_post_processor(part, new_id)
    elif post["type"] != "ByteLevel":
        raise UserError(f"cannot renumber a {post['type']} post-processor", "tuning.prune_vocab")


class Teacher:
    """A finished classifier run (classification, multilabel or regression; of texts or images) that labels
    examples softly."""

    def __init__(self, run_dir: str):
        from tunelab.tasks.runs import load_run

        run = Path(run_dir)
        self.run = run
        self.cfg, self.task, self.model, self.tokenizer, self.space = load_run(run)

    def check(self, task, space) -> None:
        """The teacher must answer the student's question: the same task, the same labels in the same order."""
        if self.task.name != task.name:
            raise UserError(f"the teacher is a {self.task.name} run; a {task.name} student needs a {task.name} "
                            "teacher", "--teacher")
        if space.labels != self.space.labels:
            raise UserError(f"the student's labels {space.labels} differ from the teacher's {self.space.labels}",
                            "--teacher")

    def student(self, n_layers: int) -> nn.Module:
        """A copy of the teacher with `n_layers` of its layers (its embeddings and head as they are)."""
        return fewer_layers(self.task.model_class, self.run / "model", n_layers)

    def logits(self, examples) -> list[list[float]]:
        """The teacher's outputs for each example (its text and text pair), cached on disk: logits, or the number
        in the target's units for regression."""
        from tunelab.evaluate import predict_outputs
        from tunelab.models.gguf import cache_root

        key = hashlib.sha256()
        key.update(_file_digest(self.run / "model" / "model.safetensors").encode())
        key.update(json.dumps([self.cfg.data.max_length, [self.task.content_key(e) for e in examples]]).encode())
        path = cache_root().parent / "teacher-logits" / f"{key.hexdigest()}.safetensors"
        if path.is_file():
            return load_file(str(path))["logits"].tolist()
        unlabelled = [dataclasses.replace(e, label=None) for e in examples]  # the teacher needs only the texts
        items = self.task.encode(self.tokenizer, unlabelled, self.space, self.cfg.data.max_length)
        out = torch.stack(predict_outputs(self.task, self.model, items, self.tokenizer.pad_token_id or 0,
                                          torch.device("cpu")))
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, save({"logits": out.contiguous()}))
        return out.tolist()


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class LanguageModelTeacher:
    """A finished clm or chat run that teaches a language model: at every labelled token (its next-token
    distribution, kd_level token) or by its own greedy answers to the training prompts (kd_level sequence: Kim &
    Rush 2016, "Sequence-Level Knowledge Distillation"; any tokenizer and architecture)."""

    def __init__(self, run_dir: str):
        from tunelab.generate import load_generator

        self.run = Path(run_dir)
        if not (self.run / "config.yaml").is_file():
            raise UserError("not a run folder (no config.yaml): the teacher is a finished clm or chat run",
                            str(run_dir))
        self.model, self.tokenizer = load_generator(str(self.run), "cpu")
        self.model.requires_grad_(False)

    def answer(self, examples: list, max_new_tokens: int) -> tuple[list, Path]:
        """The conversations with each last assistant turn replaced by the teacher's greedy answer to what came
        before it, and the chat JSONL file that holds them: $TUNELAB_CACHE/teacher-answers, keyed by the teacher's
        weights, the length and the prompts, so a resumed or repeated run does not generate them again."""
        from tunelab.data.load import Example
        from tunelab.generate import complete
        from tunelab.io import atomic_write_jsonl
        from tunelab.models.gguf import cache_root

        prompts = []
        for e in examples:
            last = max(i for i, m in enumerate(e.label) if m["role"] == "assistant")
            prompts.append([{"role": m["role"], "content": m["content"]} for m in e.label[:last]])
        key = hashlib.sha256(json.dumps([_file_digest(self.run / "model" / "model.safetensors"), max_new_tokens,
                                         prompts]).encode()).hexdigest()
        path = cache_root().parent / "teacher-answers" / f"{key}.jsonl"
        if path.is_file():
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        else:
            rows = [{"messages": p + [{"role": "assistant", "content": complete(self.model, self.tokenizer, p,
                                                                               max_new_tokens=max_new_tokens).text}]}
                    for p in prompts]
            atomic_write_jsonl(path, rows)
        return [Example("", r["messages"], where=f"{path}:{i + 1}") for i, r in enumerate(rows)], path
