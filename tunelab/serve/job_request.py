"""A POST /v1/fine_tuning/jobs body checked into a job row, and the `tunelab train` config a job runs with.

Every setting a request gives is typed and range-checked by the config classes the CLI uses. No setting may name a
server path: a path-typed setting (declared with `path=` in tunelab.config) takes only an id the caller owns, and
the service resolves it to the path.
"""
from __future__ import annotations

import math
import re
import secrets
from pathlib import Path

from tunelab import config as config_mod
from tunelab.errors import UserError, excerpt
from tunelab.serve import files
from tunelab.serve.db import connect, dumps, loads, new_id, now, transaction
from tunelab.serve.jobs import add_event, bundled_models, get, local_models, run_dir, tuned
from tunelab.validate import validate

# "auto" n_epochs is the method's own default (resolved when the job trains); learning_rate_multiplier scales the
# method's default learning rate, or train.lr where `config` gives one.
AUTO = {"n_epochs": "auto", "batch_size": 16, "learning_rate_multiplier": 1.0, "beta": 0.1}
LIMITS = {"n_epochs": (int, 1, 100), "batch_size": (int, 1, 1024), "learning_rate_multiplier": (float, 1e-4, 100.0),
          "beta": (float, 1e-4, 100.0)}
# Settings a request may not set through `config`: the service decides them, or the request names them elsewhere
# (training_file, validation_file, model). Every other path-typed setting takes only an id the caller owns.
RESERVED = {("data", "train"), ("data", "eval"), ("model", "name"), ("model", "trust_remote_code"),
            ("train", "device"), ("train", "progress"), ("train", "lr_scale"), ("eval", "folds"), ("eval", "fold")}
SUFFIX = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_CHECKPOINTS = 5  # resumable checkpoints a job may keep (train.keep_checkpoints), so no job fills the disk


def model_source(home: Path, name: str) -> str:
    """What `model.name` gets for a base model: an alias, a folder under HOME/models, or a fine-tuned model's folder."""
    if not isinstance(name, str) or not name:
        raise UserError("'model' is required", "model")
    if name.startswith("ft:"):
        job = tuned(home, name)
        if job is None:
            raise UserError(f"no succeeded job made the model {name!r}", "model")
        return str(run_dir(home, job["id"]) / "model")
    if name in bundled_models():
        return name
    if name in local_models(home):
        return str(Path(home) / "models" / name)
    raise UserError(f"unknown model {name!r}: GET /v1/models lists the models this service has", "model")


# ---- creating a job -------------------------------------------------------------------------------------------

def _number(key: str, value, where: str):
    kind, lo, hi = LIMITS[key]
    if value == "auto" or value is None:
        return AUTO[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (isinstance(value, float) and not math.isfinite(value)) or (kind is int and value != int(value)):
        raise UserError(f"must be 'auto' or a{'n integer' if kind is int else ' finite number'}, got "
                        f"{excerpt(value)}", where)
    if not lo <= value <= hi:
        raise UserError(f"must be between {lo} and {hi}, got {value}", where)
    return kind(value)


def _method(body: dict) -> tuple[str, dict]:
    """(method type, its raw hyperparameters): `method.<type>.hyperparameters` over the legacy top-level ones."""
    method = body.get("method") or {"type": "supervised"}
    if not isinstance(method, dict) or method.get("type") not in ("supervised", "dpo"):
        kind = method.get("type") if isinstance(method, dict) else method
        raise UserError(f"method.type must be 'supervised' or 'dpo', got {kind!r}", "method.type")
    legacy = body.get("hyperparameters") or {}
    section = method.get(method["type"]) or {}
    if not isinstance(section, dict):
        raise UserError("must be an object", f"method.{method['type']}")
    inner = section.get("hyperparameters") or {}
    for where, hp in (("hyperparameters", legacy), (f"method.{method['type']}.hyperparameters", inner)):
        if not isinstance(hp, dict):
            raise UserError("must be an object", where)
        unknown = set(hp) - set(LIMITS) - ({"beta"} if method["type"] == "dpo" else set())
        if unknown or (method["type"] != "dpo" and "beta" in hp):
            raise UserError(f"unknown hyperparameter {sorted(unknown or {'beta'})[0]!r}", where)
    return method["type"], {**legacy, **inner}


def _overrides(body: dict) -> dict:
    """The request's `config`: sections of settings, none reserved, each typed and in range. Its path-typed
    settings are checked to be ids the caller owns when `training_config` resolves them."""
    extra = body.get("config") or {}
    if not isinstance(extra, dict) or not all(isinstance(v, dict) for v in extra.values()):
        raise UserError("must be an object of sections, e.g. {\"data\": {\"max_length\": 64}}", "config")
    for section, values in extra.items():
        if section not in ("data", "tuning", "train", "eval"):
            raise UserError(f"unknown section {excerpt(section)} (data, tuning, train or eval)", "config")
        for key in values:
            if (section, key) in RESERVED:
                raise UserError(f"{section}.{key} is set by the service", "config")
    config_mod.from_dict(extra, "config")  # every value typed and in range now: NaN would be stored as null
    return extra


def _path_settings(extra: dict):
    """(section, key, kind, value) of each path-typed setting in a request's `config`; a null names no path."""
    kinds = {key: f.metadata["path"] for key, f, _ in config_mod.iter_fields()}
    for section, values in extra.items():
        for key, value in values.items():
            if kinds.get(f"{section}.{key}") and value is not None:
                yield section, key, kinds[f"{section}.{key}"], value


def resolve_path(home: Path, kind: str, value, where: str) -> str:
    """The server path behind an id the caller gave for a path-typed setting: an uploaded file (`file-…`) for
    data, a succeeded job (`ftjob-…`) or its model (`ft:…`) for a run. Anything else is refused without looking
    at the file system, so a refusal says nothing about which paths exist on the server."""
    if kind == "data":
        row = files.get(home, value) if isinstance(value, str) and value.startswith("file-") else None
        if row is None or row["purpose"] != "fine-tune":
            raise UserError(f"must be the id of an uploaded fine-tune file (file-…), got {excerpt(value)}; "
                            "the service never reads a path a client names", where)
        return str(files.path_of(home, row))
    if kind == "run":
        job = None
        if isinstance(value, str) and value.startswith("ft:"):
            job = tuned(home, value)
        elif isinstance(value, str) and value.startswith("ftjob-"):
            job = get(home, value)
        if job is None or job["status"] != "succeeded":
            raise UserError(f"must be a fine-tuned model (ft:…) or the id of a succeeded job, got {excerpt(value)}; "
                            "the service never reads a path a client names", where)
        return str(run_dir(home, job["id"]))
    raise UserError("is set by the service", where)


def _file(home: Path, body: dict, key: str, required: bool) -> dict | None:
    file_id = body.get(key)
    if file_id is None and not required:
        return None
    row = files.get(home, file_id) if isinstance(file_id, str) else None
    if row is None or row["purpose"] != "fine-tune":
        raise UserError(f"no uploaded fine-tune file {file_id!r}", key)
    return row


def _labels(body: dict) -> dict:
    """suffix, seed (drawn when absent, as OpenAI does) and metadata, checked."""
    suffix, seed, metadata = body.get("suffix"), body.get("seed"), body.get("metadata")
    if suffix is not None and (not isinstance(suffix, str) or not SUFFIX.fullmatch(suffix)):
        raise UserError("at most 64 letters, digits, '-' or '_'", "suffix")
    if seed is None:
        seed = secrets.randbelow(2**31)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise UserError(f"must be an integer in [0, 2^31), got {seed!r}", "seed")
    if metadata is not None and (not isinstance(metadata, dict) or len(metadata) > 16 or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512 for k, v in metadata.items())):
        raise UserError("at most 16 string keys (≤ 64 characters) with string values (≤ 512)", "metadata")
    return {"suffix": suffix, "seed": seed, "metadata": dumps(metadata)}


def create(home: Path, body: dict) -> dict:
    """Check a POST /v1/fine_tuning/jobs body and record the job as validating_files."""
    from tunelab.tasks import TASKS

    if not isinstance(body, dict):
        raise UserError("the request body must be a JSON object")
    source = model_source(home, body.get("model"))
    train_file = _file(home, body, "training_file", True)
    valid_file = _file(home, body, "validation_file", False)
    kind, raw = _method(body)
    hp = {k: _number(k, raw.get(k), f"hyperparameters.{k}") for k in ("n_epochs", "batch_size",
                                                                      "learning_rate_multiplier")}
    beta = _number("beta", raw.get("beta"), "method.dpo.hyperparameters.beta") if kind == "dpo" else None
    task = body.get("task") or ("dpo" if kind == "dpo" else files.FORMAT_TASK[train_file["format"]])
    if not isinstance(task, str) or task not in TASKS:
        raise UserError(f"unknown task {excerpt(task)} (one of {', '.join(TASKS)})", "task")
    tuning = body.get("tuning") or "full"
    if not isinstance(tuning, str):
        raise UserError(f"must be the name of a tuning method, got {excerpt(tuning)}", "tuning")
    if kind == "dpo" and task != "dpo":
        raise UserError(f"method.type 'dpo' trains the dpo task, not {task!r}", "task")
    job_id = new_id("ftjob")
    row = {"id": job_id, "created_at": now(), "model": body["model"], "training_file": train_file["id"],
           "validation_file": valid_file["id"] if valid_file else None, "task": task,
           "tuning": tuning,
           "hyperparameters": dumps({**hp, **({"beta": beta} if beta is not None else {})}),
           "method": dumps({"type": kind}), **_labels(body),
           "request": dumps({"config": _overrides(body), "source": source})}
    # refuses bad settings now (paths that are not the caller's ids included), with the request's names
    cfg = training_config(home, row)
    cfg.output = "unused"
    try:
        validate(cfg)
    except UserError as e:
        raise UserError(e.problem, "config") from None
    if cfg.train.keep_checkpoints > MAX_CHECKPOINTS:
        raise UserError(f"the service keeps at most {MAX_CHECKPOINTS} checkpoints per job", "config.train.keep_checkpoints")
    con = connect(home)
    with transaction(con):
        row["seq"] = (con.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()[0])
        con.execute("INSERT INTO jobs (id, seq, created_at, model, training_file, validation_file, request, task, "
                    "tuning, hyperparameters, method, seed, suffix, metadata, status) VALUES (:id, :seq, "
                    ":created_at, :model, :training_file, :validation_file, :request, :task, :tuning, "
                    ":hyperparameters, :method, :seed, :suffix, :metadata, 'validating_files')", row)
        add_event(con, job_id, f"Validating training file: {train_file['id']}"
                  + (f" and validation file: {valid_file['id']}" if valid_file else ""))
    return get(home, job_id)


def training_config(home: Path, job: dict) -> config_mod.Config:
    """The `tunelab train` config a job runs with."""
    request = loads(job["request"])
    hp = loads(job["hyperparameters"])
    extra = {section: dict(values) for section, values in request["config"].items()}
    for section, key, kind, value in list(_path_settings(extra)):  # ids of uploads and finished jobs → paths
        extra[section][key] = resolve_path(home, kind, value, f"config.{section}.{key}")
    train_file = files.get(home, job["training_file"])
    valid_file = files.get(home, job["validation_file"]) if job["validation_file"] else None
    d = {"task": job["task"], "output": str(run_dir(home, job["id"])), "overwrite": True,
         "model": {"name": request["source"]},
         "data": {**extra.get("data", {}), "train": str(files.path_of(home, train_file)),
                  "eval": str(files.path_of(home, valid_file)) if valid_file else None},
         "tuning": {**extra.get("tuning", {}), "name": job["tuning"]},
         "train": {"keep_checkpoints": 3, **extra.get("train", {}), "epochs": None if hp["n_epochs"] == "auto" else hp["n_epochs"],
                   "batch_size": hp["batch_size"], "lr_scale": hp["learning_rate_multiplier"], "seed": job["seed"],
                   "progress": False, **({"beta": hp["beta"]} if "beta" in hp else {})},
         "eval": extra.get("eval", {})}
    return config_mod.from_dict(d, "config")


def job_files(job: dict) -> dict[str, str]:
    """The uploaded files a job reads, by the request field that names them: training_file, validation_file and
    path-typed settings such as config.data.transfer."""
    out = {key: job[key] for key in ("training_file", "validation_file") if job[key]}
    for section, key, kind, value in _path_settings(loads(job["request"])["config"]):
        if kind == "data":
            out[f"config.{section}.{key}"] = value
    return out
