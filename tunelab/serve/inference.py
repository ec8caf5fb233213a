"""Calling models through the API: chat completions for generators, labels and probabilities for classifiers.

Loaded models are kept in a small LRU cache; one request at a time uses a given model (a lock per model).
Uses tunelab.generate and tunelab.predict, never the training loop.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import secrets
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path

from tunelab.errors import UserError, cut
from tunelab.serve import job_request, jobs
from tunelab.serve.bodies import MAX_CHARS, Chat, Classify, ImageInput, PairInput, Score

CACHED = 2  # models kept loaded
# The service's names for what the command line calls by its flags.
PARAMS = {"--temperature": "temperature", "--top-p": "top_p", "--max-new-tokens": "max_tokens", "--prompt": "messages"}


class Loaded:
    def __init__(self, objects):
        self.objects = objects
        self.lock = threading.Lock()


_cache: OrderedDict[str, Loaded] = OrderedDict()
_cache_lock = threading.Lock()


DEVICE = "cpu"  # where loaded models answer: `tunelab serve --device` sets it before the server starts


def _load(key: str, loader) -> Loaded:
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    loaded = Loaded(loader())
    with _cache_lock:
        _cache[key] = loaded
        while len(_cache) > CACHED:
            _cache.popitem(last=False)
    return loaded


def locate(home: Path, model: str) -> tuple[str, str | None]:
    """(what to load, task): a fine-tuned model's run folder and its task, or a base model (task None)."""
    if not isinstance(model, str) or not model:
        raise UserError("'model' is required", "model")
    if model.startswith("ft:") and ":ckpt-step-" in model:
        return _checkpoint(home, model)
    if model.startswith("ft:"):
        job = jobs.tuned(home, model)
        if job is None:
            raise LookupError(model)
        return str(jobs.run_dir(home, job["id"])), job["task"]
    try:
        return job_request.model_source(home, model), None
    except UserError:
        raise LookupError(model) from None


def _checkpoint(home: Path, model: str) -> tuple[str, str]:
    """A checkpoint model `ft:…:ckpt-step-N` (GET …/checkpoints names them, for running jobs too): its job's kept
    checkpoint, exported once as a run's model is (tunelab.export.export_checkpoint)."""
    from tunelab.export import export_checkpoint, exported_checkpoint

    name, _, step = model.rpartition(":ckpt-step-")
    job = jobs.by_model_name(home, name)
    if job is None or not (step.isascii() and step.isdigit()):
        raise LookupError(model)
    run = jobs.run_dir(home, job["id"])
    folder = exported_checkpoint(run, int(step))
    if folder is None:
        try:
            with _EXPORTING:  # one export of a checkpoint at a time (a second request finds it made)
                folder = export_checkpoint(run, int(step))
        except OSError:  # the training process rotated the checkpoint away meanwhile
            raise LookupError(model) from None
        except UserError as e:  # (its own words, without the run's server paths)
            raise UserError(f"checkpoint {model} cannot be served: {e.problem}", "model") from None
    return str(folder), job["task"]


_EXPORTING = threading.Lock()


# ---- chat completions ----------------------------------------------------------------------------------------

def _sampling(body: Chat) -> dict:
    """The request's sampling settings (types and ranges checked by its model), OpenAI's defaults for those absent."""
    from tunelab.generate import Sampling

    def given(value, default):  # OpenAI clients send null for "the default"
        return default if value is None else value

    out = {"max_new_tokens": given(body.max_completion_tokens, given(body.max_tokens, Sampling.max_new_tokens)),
           "temperature": float(given(body.temperature, 1.0)), "top_p": float(given(body.top_p, 1.0)),
           "seed": given(body.seed, secrets.randbelow(2**31))}
    with _service_names():
        Sampling(**out).check()
    return {**out, "stop": tuple([body.stop] if isinstance(body.stop, str) else body.stop or ())}


@contextlib.contextmanager
def _service_names():
    """A UserError from the CLI's code names the request's field, not the command-line flag."""
    try:
        yield
    except UserError as e:
        raise UserError(e.problem, PARAMS.get(e.path, e.path), e.line) from None


def _within(texts: list[str], param: str) -> None:
    chars = sum(len(t) for t in texts)
    if chars > MAX_CHARS:
        raise UserError(f"{chars:,} characters; at most {MAX_CHARS:,} are read", param)


def chat(home: Path, body: Chat):
    """A chat.completion dict, or (stream=True) an iterator of server-sent-event lines. `n` answers are drawn one
    after another from seeds seed, seed + 1, …; usage counts the prompt once and every answer's tokens."""
    from tunelab.data.chat import parse_messages
    from tunelab.generate import encode, load_generator

    source, task = locate(home, body.model)
    if task is not None and task not in ("clm", "chat", "dpo"):
        raise UserError(f"{body.model} is a {task} model: call /v1/classifications", "model")
    messages = parse_messages(body.messages, "messages", None, need_assistant=False)
    _within([m["content"] for m in messages], "messages")
    sampling = _sampling(body)
    loaded = _load("generator:" + source, lambda: load_generator(source, DEVICE))
    model, tokenizer = loaded.objects
    with _service_names():
        prompt_tokens = len(encode(tokenizer, messages))
    head = {"id": "chatcmpl-" + secrets.token_hex(12), "created": int(time.time()), "model": body.model}
    n = body.n or 1
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return _stream(loaded, messages, sampling, head, prompt_tokens, usage, n)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    with loaded.lock, _service_names():
        answers = [_complete(loaded, messages, _nth(sampling, i), logprobs=logprobs) for i in range(n)]
    return {**head, "object": "chat.completion",
            "choices": [{"index": i, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish,
                         "logprobs": {"content": c.logprobs, "refusal": None} if logprobs is not None else None}
                        for i, c in enumerate(answers)],
            "usage": _usage(prompt_tokens, answers)}


def _usage(prompt_tokens: int, answers: list) -> dict:
    """OpenAI's token counts: the prompt once, every answer's tokens."""
    completion_tokens = sum(c.new_tokens for c in answers)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _nth(sampling: dict, i: int) -> dict:
    """The sampling settings of the i-th answer: its own seed."""
    return {**sampling, "seed": sampling["seed"] + i}


def _complete(loaded: Loaded, messages, sampling, streamer=None, logprobs: int | None = None):
    from tunelab.generate import complete

    model, tokenizer = loaded.objects
    return complete(model, tokenizer, messages, streamer=streamer, logprobs=logprobs, **sampling)


def _deltas(streamer, stop: tuple[str, ...]):
    """The streamed text pieces, cut before the first stop string: text that could still turn out to begin one
    is held back until it does not."""
    from tunelab.generate import cut_at_stop

    hold = max((len(s) for s in stop), default=1) - 1
    buffer, sent, stopped = "", 0, False
    for piece in streamer:
        buffer += piece
        if stopped:
            continue  # (drained: the model stops at the stop string by itself)
        cut = cut_at_stop(buffer, stop)
        upto = cut if cut < len(buffer) else len(buffer) - hold
        stopped = cut < len(buffer)
        if upto > sent:
            yield buffer[sent:upto]
            sent = upto
    if not stopped and sent < len(buffer):
        yield buffer[sent:]


def _stream(loaded: Loaded, messages, sampling, head, prompt_tokens, usage: bool, n: int = 1):
    from transformers import TextIteratorStreamer

    streamers = [TextIteratorStreamer(loaded.objects[1], skip_prompt=True, skip_special_tokens=True, timeout=600)
                 for _ in range(n)]
    result = {"completions": []}

    def work():
        with loaded.lock:
            try:
                for i, streamer in enumerate(streamers):
                    with _service_names():
                        result["completions"].append(_complete(loaded, messages, _nth(sampling, i), streamer))
            except UserError as e:  # e.g. a prompt longer than the model's context: the client's to fix
                result["error"] = {"message": cut(e.problem, 500), "type": "invalid_request_error",
                                   "param": e.path, "code": None}
            except Exception as e:  # noqa: BLE001 - reported to the client as the stream's last event
                result["error"] = {"message": f"generation failed ({type(e).__name__})", "type": "server_error",
                                   "param": None, "code": None}
                raise  # and logged with its traceback, which the client does not see
            finally:
                for streamer in streamers[len(result["completions"]):] if "error" in result else ():
                    streamer.end()  # the failed answer's and the ones never started: their readers stop

    def chunk(index: int, delta: dict, finish=None, **extra) -> str:
        return "data: " + json.dumps({**head, "object": "chat.completion.chunk", "choices": [
            {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}) + "\n\n"

    def events():
        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        for i, streamer in enumerate(streamers):
            yield chunk(i, {"role": "assistant", "content": ""})
            for text in _deltas(streamer, sampling.get("stop", ())):
                if text:
                    yield chunk(i, {"content": text})
            # the answer's text is all out; its record follows as soon as generate returns
            while len(result["completions"]) <= i and "error" not in result and thread.is_alive():
                time.sleep(0.005)
            if len(result["completions"]) <= i:
                break
            yield chunk(i, {}, result["completions"][i].finish)
        thread.join()
        if "error" in result:
            yield "data: " + json.dumps({"error": result["error"]}) + "\n\n"
        elif usage:
            yield "data: " + json.dumps({**head, "object": "chat.completion.chunk", "choices": [],
                                         "usage": _usage(prompt_tokens, result["completions"])}) + "\n\n"
        yield "data: [DONE]\n\n"
    return events()


# ---- classifiers ---------------------------------------------------------------------------------------------

def classify(home: Path, body: Classify) -> dict:
    """Predictions of a fine-tuned classifier, regressor or tagger for one text or a list of texts."""
    from tunelab.predict import load_run, predict_examples

    source, task = locate(home, body.model)
    if task is None or task in ("clm", "mlm", "nsp", "chat", "dpo", "reward", "rl"):
        raise UserError(f"{body.model} does not predict labels: use /v1/chat/completions for generators",
                        "model")
    texts = body.input  # each a non-empty text within MAX_CHARS (or an image), at most MAX_INPUTS of them
    loaded = _load("run:" + source, lambda: load_run(source, "auto", DEVICE))
    cfg, task_obj = loaded.objects[0], loaded.objects[1]
    images = isinstance(texts[0], ImageInput)
    if images != (task_obj.modality == "image"):
        raise UserError(f"{body.model} classifies {'images' if not images else 'texts'}: send "
                        + ('[{"image": "data:image/png;base64,..."}]' if not images else "texts"), "input")
    if images:
        examples = _image_examples(texts)
        with loaded.lock:
            rows = predict_examples(loaded.objects, examples)
        data = [{"object": "classification", "index": i, **{k: v for k, v in r.items() if k != "image"}}
                for i, r in enumerate(rows)]
        return {"object": "list", "model": body.model, "task": task, "data": data}
    pairs = isinstance(texts[0], PairInput)
    if pairs and task != "classification" and task != "regression" and task != "multilabel":
        raise UserError(f"{body.model} is a {task} model: sentence pairs are for classifiers and regressors", "input")
    rows = [{cfg.data.text_column: t.text, cfg.data.text_pair_column: t.text_pair} if pairs
            else {cfg.data.text_column: t} for t in texts]
    with tempfile.TemporaryDirectory() as tmp:  # the task's own reader (segmentation for ner, …)
        path = Path(tmp) / "input.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        # every input is answered, in order: no record skipped, no group column asked for
        data = dataclasses.replace(cfg.data, skip_invalid=False, group_column=None)
        examples = task_obj.read(path, data, need_label=False)
    with loaded.lock:
        rows = predict_examples(loaded.objects, examples)
    data = [{"object": "classification", "index": i, **{k: v for k, v in r.items() if k != "text"}}
            for i, r in enumerate(rows)]
    return {"object": "list", "model": body.model, "task": task, "data": data}


def score(home: Path, body: Score) -> dict:
    """A fine-tuned reward model's score of each prompt and response."""
    from tunelab.predict import load_run, score_records
    from tunelab.tasks.preference import RewardModel

    source, task = locate(home, body.model)
    if task != "reward":
        raise UserError(f"{body.model} is {'a base model' if task is None else 'a ' + task + ' model'}: only "
                        "reward models score responses", "model")
    records = []
    for i, item in enumerate(body.input):
        try:
            records.append(RewardModel.parse_scored(item.model_dump(), Path("input"), i))
        except UserError as e:
            raise UserError(e.problem, f"input[{i}]") from None
    loaded = _load("run:" + source, lambda: load_run(source, "torch", DEVICE))
    with loaded.lock:
        scores = score_records(loaded.objects, records)
    return {"object": "list", "model": body.model,
            "data": [{"object": "score", "index": i, "score": s} for i, s in enumerate(scores)]}


def _image_examples(inputs: list[ImageInput]) -> list:
    """The request's images decoded as training reads image files; a bad one is a 400 naming its index."""
    from tunelab.data.images import ImageError, image_from_bytes
    from tunelab.data.load import Example

    examples = []
    for i, item in enumerate(inputs):
        try:
            examples.append(Example(f"input[{i}]", None, where=f"input[{i}]", image=image_from_bytes(item.image)))
        except ImageError as e:
            raise UserError(str(e), f"input[{i}]") from None
    return examples
