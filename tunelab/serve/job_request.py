"""A POST /v1/fine_tuning/jobs body (a bodies.CreateJob, checked by FastAPI) made into a job row, and the `tunelab
train` config a job runs with.

The body's model checked its shape, types and ranges; here come the checks that need the server's state: the model
exists, the files are uploads, every path-typed setting (declared with `path=` in tunelab.config) is an id the caller
owns, which the service resolves to the path. No setting may name a server path.
"""
from __future__ import annotations

import secrets
from pathlib import Path

from tunelab import config as config_mod
from tunelab.errors import UserError, excerpt
from tunelab.serve import access, files
from tunelab.serve.bodies import KEEP_CHECKPOINTS, CreateJob
from tunelab.serve.db import connect, dumps, loads, new_id, now, transaction
from tunelab.serve.jobs import add_event, bundled_models, get, local_models, run_dir, tuned
from tunelab.validate import validate

# "auto" n_epochs is the method's own default (resolved when the job trains); learning_rate_multiplier scales the
# method's default learning rate, or train.lr where `config` gives one.
AUTO = {"n_epochs": "auto", "batch_size": 16, "learning_rate_multiplier": 1.0, "beta": 0.1}


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


def _file(home: Path, file_id: str | None, key: str) -> dict:
    row = files.get(home, file_id) if file_id is not None else None
    if row is None or row["purpose"] != "fine-tune":
        raise UserError(f"no uploaded fine-tune file {excerpt(file_id)}", key)
    return row


def _hyperparameters(body: CreateJob) -> dict:
    """The job's hyperparameters, "auto" resolved (beta for dpo only)."""
    given = body.raw_hyperparameters()
    keys = ("n_epochs", "batch_size", "learning_rate_multiplier") + (("beta",) if body.kind == "dpo" else ())
    return {k: AUTO[k] if given.get(k) in (None, "auto") else given[k] for k in keys}


def create(home: Path, body: CreateJob) -> dict:
    """Record a POST /v1/fine_tuning/jobs body as a job in validating_files, once what it names is checked."""
    source = model_source(home, body.model)
    train_file = _file(home, body.training_file, "training_file")
    valid_file = _file(home, body.validation_file, "validation_file") if body.validation_file is not None else None
    task = body.task or ("dpo" if body.kind == "dpo" else files.task_of(train_file["format"]))
    for key, row in (("training_file", train_file), ("validation_file", valid_file)):
        if row is not None and task.startswith("image-") != (row["format"] in files.IMAGE_TASK):
            raise UserError(f"task {task!r} cannot train on {row['filename']!r}: " + (
                "image tasks train on an uploaded .zip of images" if task.startswith("image-") else
                "it holds images (tasks image-classification, image-multilabel)"), key)
    job_id = new_id("ftjob")
    row = {"id": job_id, "created_at": now(), "model": body.model, "training_file": train_file["id"],
           "validation_file": valid_file["id"] if valid_file else None, "task": task,
           "tuning": body.tuning or "full", "hyperparameters": dumps(_hyperparameters(body)),
           "method": dumps({"type": body.kind}), "suffix": body.suffix,
           "seed": secrets.randbelow(2**31) if body.seed is None else body.seed,  # drawn when absent, as OpenAI does
           "metadata": dumps(body.metadata),
           "request": dumps({"config": body.config.given() if body.config else {}, "source": source}),
           "project": access.project_of_caller()}
    # refuses bad settings now (paths that are not the caller's ids included), with the request's names
    cfg = training_config(home, row)
    cfg.output = "unused"
    if task.startswith("image-") and (cfg.data.image_column, cfg.data.label_column) != ("image", None):
        # the upload was checked (every path inside its archive) with these columns: another would be unchecked
        raise UserError("image jobs read the columns their upload was checked with: data.image_column and "
                        "data.label_column cannot be set", "config")
    try:
        validate(cfg)
    except UserError as e:
        raise UserError(e.problem, "config") from None
    con = connect(home)
    with transaction(con):
        access.check_queued_jobs(con, row["project"])
        row["seq"] = (con.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()[0])
        con.execute("INSERT INTO jobs (id, seq, created_at, model, training_file, validation_file, request, task, "
                    "tuning, hyperparameters, method, seed, suffix, metadata, status, project) VALUES (:id, :seq, "
                    ":created_at, :model, :training_file, :validation_file, :request, :task, :tuning, "
                    ":hyperparameters, :method, :seed, :suffix, :metadata, 'validating_files', :project)", row)
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
         "train": {"keep_checkpoints": KEEP_CHECKPOINTS, **extra.get("train", {}), "epochs": None if hp["n_epochs"] == "auto" else hp["n_epochs"],
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
