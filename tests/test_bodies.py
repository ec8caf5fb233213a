"""The service's request bodies (tunelab/serve/bodies.py): declared as pydantic models, listed in /openapi.json,
refused in OpenAI's error shape. In-process calls of the ASGI app: no server, no model loaded."""
from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest
from conftest import make_rows

from tunelab import config as config_mod
from tunelab.serve import bodies, files, jobs, keys
from tunelab.serve.app import create_app
from tunelab.serve.db import loads


def call(app, key: str, path: str, body) -> tuple[int, dict]:
    """POST `body` (JSON, or bytes as they are) to the app in this process: (status, JSON answer)."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    sent, pending = [], [{"type": "http.request", "body": raw, "more_body": False}]

    async def receive():
        return pending.pop(0) if pending else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "path": path,
             "raw_path": path.encode(), "query_string": b"", "root_path": "", "scheme": "http",
             "server": ("test", 80), "client": ("127.0.0.1", 1),
             "headers": [(b"authorization", f"Bearer {key}".encode()), (b"content-type", b"application/json"),
                         (b"content-length", str(len(raw)).encode())]}
    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], json.loads(b"".join(m.get("body", b"") for m in sent[1:]))


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    """(app, key, a training file's id) in a fresh service home."""
    home = tmp_path_factory.mktemp("bodies")
    app = create_app(home)
    _, key = keys.create(home, "tests")
    data = "".join(json.dumps(r) + "\n" for r in make_rows(40, 1)).encode()
    return app, key, files.store(home, data, "train.jsonl", "fine-tune")["id"], home


def _job(api, **fields) -> tuple[int, dict]:
    app, key, file_id, _ = api
    return call(app, key, "/v1/fine_tuning/jobs", {"model": "minilm", "training_file": file_id, **fields})


def _refused(status: int, out: dict, param: str | None, *words: str) -> None:
    assert status == 400, out
    assert set(out) == {"error"} and set(out["error"]) == {"message", "type", "param", "code"}, out
    assert out["error"]["type"] == "invalid_request_error" and out["error"]["param"] == param, out
    for word in words:
        assert word in out["error"]["message"], (word, out)


# ---- the schema ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def schema(tmp_path_factory):
    return create_app(tmp_path_factory.mktemp("schema")).openapi()


def _body_schema(schema: dict, path: str) -> dict:
    ref = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    return schema["components"]["schemas"][ref.rsplit("/", 1)[1]]


def test_openapi_lists_the_job_body_and_its_limits(schema):
    job = _body_schema(schema, "/v1/fine_tuning/jobs")
    assert set(job["properties"]) == {"model", "training_file", "validation_file", "method", "hyperparameters",
                                      "task", "tuning", "suffix", "seed", "metadata", "config"}
    assert set(job["required"]) == {"model", "training_file"}
    defs = schema["components"]["schemas"]
    epochs = defs["Hyperparameters"]["properties"]["n_epochs"]["anyOf"]
    assert {"const": "auto", "type": "string"} in epochs and {"type": "integer", "minimum": 1, "maximum": 100} in epochs
    assert defs["Hyperparameters"]["additionalProperties"] is False and "beta" in defs["DpoHyperparameters"]["properties"]
    assert defs["Method"]["properties"]["type"]["enum"] == ["supervised", "dpo"]
    assert job["properties"]["tuning"]["enum"] == list(config_mod.choices(_type("tuning.name")))


def _type(key: str):
    return {k: tp for k, _, tp in config_mod.iter_fields()}[key]


def test_config_settings_in_the_schema_come_from_the_typed_config(schema):
    """Every setting a job may change, with the CLI's help and range; the ones the service decides are absent."""
    defs = schema["components"]["schemas"]
    assert set(defs["Settings"]["properties"]) == {"data", "tuning", "train", "eval"}
    for section in bodies.SECTIONS:
        props = defs[f"{section.capitalize()}Settings"]["properties"]
        fields = {f.name: f for f in dataclasses.fields(config_mod.SECTIONS[section])}
        assert set(props) == {name for name in fields if (section, name) not in bodies.RESERVED}, section
        for name, prop in props.items():
            assert prop["description"].startswith(fields[name].metadata["help"]), (section, name)
    train = defs["TrainSettings"]["properties"]
    assert train["lr"]["anyOf"][0] == {"type": "number", "exclusiveMinimum": 0, "maximum": 10}
    assert train["keep_checkpoints"]["maximum"] == bodies.MAX_CHECKPOINTS  # the service's limit, not the CLI's 100
    assert train["keep_checkpoints"]["default"] == bodies.KEEP_CHECKPOINTS
    assert "file-" in defs["DataSettings"]["properties"]["transfer"]["description"]  # a path setting takes an id
    assert defs["TrainSettings"]["properties"]["schedule"]["enum"] == ["linear", "cosine", "constant"]


def test_openapi_documents_the_openai_error_shape_not_422(schema):
    for path in ("/v1/fine_tuning/jobs", "/v1/chat/completions", "/v1/classifications", "/v1/files"):
        responses = schema["paths"][path]["post"]["responses"]
        assert "422" not in responses and responses["4XX"]["content"]["application/json"]["schema"]["$ref"] \
            .endswith("/ErrorBody"), path
    assert set(schema["components"]["schemas"]["Error"]["properties"]) == {"message", "type", "param", "code"}
    chat = _body_schema(schema, "/v1/chat/completions")["properties"]
    assert chat["max_tokens"]["anyOf"][0]["maximum"] == bodies.MAX_TOKENS
    assert chat["n"]["anyOf"][0]["maximum"] == bodies.MAX_CHOICES
    forms = _body_schema(schema, "/v1/classifications")["properties"]["input"]["oneOf"]  # texts, images, pairs
    assert [f["maxItems"] for f in forms] == [bodies.MAX_INPUTS] * 3


# ---- refusals, in OpenAI's shape -------------------------------------------------------------------------------

def test_unknown_keys_are_refused_naming_the_closest(api):
    _refused(*_job(api, hyperparameters={"n_epoch": 3}), "hyperparameters",
             "unknown hyperparameter 'n_epoch' (did you mean 'n_epochs'?)")
    _refused(*_job(api, method={"type": "supervised", "supervised": {"hyperparameters": {"beta": 0.1}}}),
             "method.supervised.hyperparameters", "unknown hyperparameter 'beta'")
    _refused(*_job(api, hyperparameters={"beta": 0.1}), "hyperparameters", "unknown hyperparameter 'beta'")
    _refused(*_job(api, config={"train": {"batchsize": 8}}), "config.train",
             "unknown config key 'train.batchsize' (did you mean 'train.batch_size'?)")
    _refused(*_job(api, config={"model": {"pooling": "cls"}}), "config", "unknown section 'model'")
    _refused(*_job(api, config={"data": {"train": "/etc/passwd"}}), "config", "data.train is set by the service")


def test_bodies_that_are_no_json_object_are_400(api):
    app, key, _, _ = api
    for body in (None, [], "text", 3):
        _refused(*call(app, key, "/v1/fine_tuning/jobs", body), None, "must be a JSON object")
    for raw in (b"{bad", b""):
        status, out = call(app, key, "/v1/fine_tuning/jobs", raw)
        assert status == 400 and out["error"]["param"] is None, out


@pytest.mark.parametrize("fields, param, words", [
    ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs", "between 1 and 100"),
    ({"hyperparameters": {"batch_size": True}}, "hyperparameters.batch_size", "must be 'auto' or an integer"),
    ({"hyperparameters": {"learning_rate_multiplier": "2"}}, "hyperparameters.learning_rate_multiplier", "finite"),
    ({"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 1e9}}}}, "method.dpo.hyperparameters.beta",
     "between"),
    ({"method": {"type": "ppo"}}, "method.type", "'supervised' or 'dpo'"),
    ({"method": {"type": "dpo"}, "task": "chat"}, "task", "trains the dpo task"),
    ({"task": "poetry"}, "task", "classification"),
    ({"suffix": "toy\n"}, "suffix", "pattern"),
    ({"seed": 2**31}, "seed", ""),
    ({"seed": 1.0}, "seed", ""),
    ({"metadata": {str(i): "x" for i in range(17)}}, "metadata", "16"),
    ({"config": {"train": {"lr": "fast"}}}, "config.train.lr", "setting 'train.lr' must be float"),
    ({"config": {"train": {"keep_checkpoints": bodies.MAX_CHECKPOINTS + 1}}}, "config.train.keep_checkpoints",
     "[1, 5]"),
    ({"config": {"tuning": {"teacher": "/srv/runs/x"}}, "tuning": "distill"}, "config.tuning.teacher",
     "never reads a path"),
    ({"tuning": "magic"}, "config", "tuning.name"),
    ({"model": "gpt-9"}, "model", "unknown model"),
    ({"training_file": "file-nope"}, "training_file", "no uploaded fine-tune file"),
])
def test_each_rule_answers_400_with_its_param(api, fields, param, words):
    _refused(*_job(api, **fields), param, words)


def test_a_long_key_is_cut_in_the_answer(api):
    status, out = _job(api, metadata={"k" * 5000: "v"})
    _refused(status, out, out["error"]["param"], "64 characters")
    assert out["error"]["param"].startswith("metadata.kkk") and len(json.dumps(out)) < 300


def test_config_values_are_read_as_the_cli_reads_them(api):
    """A YAML file's or a flag's spelling ("64", "false") is a setting's value here too; the job stores it typed."""
    _, _, _, home = api
    status, job = _job(api, seed=7, config={"data": {"max_length": "64"}, "eval": {"probe": "false"},
                                            "tuning": {"lora_targets": "query,value"}, "train": None})
    assert status == 200, job
    request = loads(jobs.get(home, job["id"])["request"])
    assert request["config"] == {"data": {"max_length": 64}, "eval": {"probe": False},
                                 "tuning": {"lora_targets": ["query", "value"]}}
    assert job["seed"] == 7 and job["hyperparameters"] == {"n_epochs": "auto", "batch_size": 16,
                                                          "learning_rate_multiplier": 1.0}


def test_method_hyperparameters_win_over_the_top_level_ones(api):
    status, job = _job(api, hyperparameters={"n_epochs": 2, "batch_size": 4.0},
                       method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3}}})
    assert status == 200 and job["hyperparameters"] == {"n_epochs": 3, "batch_size": 4,
                                                        "learning_rate_multiplier": 1.0}, job


def test_unknown_top_level_keys_are_ignored_as_before(api):
    status, job = _job(api, integrations=[], user="someone")
    assert status == 200, job


# ---- chat completions and classifications ----------------------------------------------------------------------

CHAT = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("fields, param", [
    ({"temperature": 2.5}, "temperature"), ({"temperature": True}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"), ({"max_completion_tokens": 5000}, "max_completion_tokens"),
    ({"max_tokens": 1.5}, "max_tokens"), ({"seed": -1}, "seed"), ({"n": 9}, "n"), ({"n": 0}, "n"),
    ({"stop": ""}, "stop.0"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"response_format": {"type": "json_object"}}, "response_format.type"),
    ({"top_logprobs": 2}, None), ({"logprobs": True, "stream": True}, None), ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ({"stream": True, "stream_options": "x"}, "stream_options"), ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
])
def test_chat_bodies_are_checked_before_any_model_loads(api, fields, param):
    app, key, _, _ = api
    _refused(*call(app, key, "/v1/chat/completions", {**CHAT, **fields}), param)


@pytest.mark.parametrize("texts, param, words", [
    ([], "input", "at least 1"), (["a"] * (bodies.MAX_INPUTS + 1), "input", f"at most {bodies.MAX_INPUTS}"),
    (["fine", "  "], "input.1", "is empty"), ("x" * (bodies.MAX_CHARS + 1), "input.0", "at most"),
    (5, "input", "list"),
])
def test_classification_bodies_are_checked_before_any_model_loads(api, texts, param, words):
    app, key, _, _ = api
    _refused(*call(app, key, "/v1/classifications", {"model": "ft:x", "input": texts}), param, words)


def test_a_valid_body_reaches_the_route(api):
    """Past its model, a body's model name is looked up: an unknown one is a 404, as before."""
    app, key, _, _ = api
    assert call(app, key, "/v1/classifications", {"model": "ft:none", "input": "fine"})[0] == 404
    assert call(app, key, "/v1/chat/completions", {**CHAT, "model": "ft:none", "temperature": 2})[0] == 404
