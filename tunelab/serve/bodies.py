"""The service's request bodies, declared once as pydantic models.

FastAPI validates every JSON body against its model before a route runs, answers a bad one 400 in OpenAI's error
shape (app.bad_request) and lists the fields, their types, ranges and help in /openapi.json. A model checks what a
body says by itself; what needs the server's state (does the model exist, is the file an upload, did the teacher's
job succeed) is checked where the job is made (job_request.create).

The settings a job may change through `config` are not repeated here: their models are built from tunelab.config's
dataclasses, each field with its type, help and range, its value checked by the very `coerce` the CLI uses.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from functools import partial
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Discriminator, Field,
                      StringConstraints, Tag, ValidationInfo, create_model, field_validator, model_validator)
from pydantic_core import PydanticCustomError

from tunelab import config as config_mod
from tunelab.errors import UserError, excerpt


def refuse(message: str, kind: str = "invalid") -> PydanticCustomError:
    """A validation error in the service's own words (pydantic would prefix a ValueError's with 'Value error, ')."""
    return PydanticCustomError(kind, "{message}", {"message": message})


class Strict(BaseModel):
    """A request object that refuses keys it does not declare, naming the key and the closest known one."""

    model_config = ConfigDict(extra="forbid")  # also in the schema: "additionalProperties": false
    what: ClassVar[str] = "key"  # how the error calls an unknown key

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                if key not in cls.model_fields:
                    raise refuse(cls.unknown(key), "unknown_key")
        return data

    @classmethod
    def unknown(cls, key: str) -> str:
        close = difflib.get_close_matches(key, list(cls.model_fields), n=1)
        return f"unknown {cls.what} {excerpt(key)}" + (f" (did you mean '{close[0]}'?)" if close else "")


class Error(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error or server_error.")
    param: str | None = Field(description="Where in the request the problem is, e.g. hyperparameters.n_epochs.")
    code: str | None = Field(description="e.g. not_found, conflict, file_too_large; null for most bad inputs.")


class ErrorBody(BaseModel):
    """Every refusal, in OpenAI's shape: 400 bad input, 401, 404, 408, 409, 413."""

    error: Error


# ---- hyperparameters --------------------------------------------------------------------------------------------

def _hyperparameter(kind: type, lo: float, hi: float, value: Any) -> Any:
    """'auto' (or null: the same), else a finite number of `kind` within [lo, hi]; an integral float is an int."""
    if value is None or value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (isinstance(value, float) and not math.isfinite(value)) or (kind is int and value != int(value)):
        raise refuse(f"must be 'auto' or a{'n integer' if kind is int else ' finite number'}, got {excerpt(value)}")
    if not lo <= value <= hi:
        raise refuse(f"must be between {lo} and {hi}, got {excerpt(value)}", "out_of_range")
    return kind(value)


def hyperparameter(kind: type, lo: float, hi: float, help: str) -> Any:
    """The type of a hyperparameter: 'auto' or a number in [lo, hi]. The range is declared for the schema; the
    validator refuses first, in words that give both ends."""
    return Annotated[Literal["auto"] | Annotated[kind, Field(ge=lo, le=hi)] | None,
                     BeforeValidator(partial(_hyperparameter, kind, lo, hi)), Field(description=help)]


Epochs = hyperparameter(int, 1, 100, "Passes over the training data; auto: the tuning method's default "
                                    "(full 3, lora 4, partial 3, scratch 3).")
BatchSize = hyperparameter(int, 1, 1024, "Examples per step; auto: 16.")
Multiplier = hyperparameter(float, 1e-4, 100.0, "Scales the tuning method's default learning rate, or "
                                                "config.train.lr; auto: 1.")
Beta = hyperparameter(float, 1e-4, 100.0, "dpo: how strongly the policy is held near the reference model "
                                          "(larger: closer); auto: 0.1.")


class Hyperparameters(Strict):
    """OpenAI's hyperparameters, with the service's limits (tighter than the CLI's: one job may not hold a worker
    for ever)."""

    what = "hyperparameter"
    n_epochs: Epochs = "auto"
    batch_size: BatchSize = "auto"
    learning_rate_multiplier: Multiplier = "auto"


class DpoHyperparameters(Hyperparameters):
    beta: Beta = "auto"


class Supervised(BaseModel):
    hyperparameters: Hyperparameters | None = None


class Dpo(BaseModel):
    hyperparameters: DpoHyperparameters | None = None


class Method(BaseModel):
    """OpenAI's `method`: the type, and the hyperparameters under the key of that type (the other is ignored)."""

    type: Literal["supervised", "dpo"]
    supervised: Supervised | None = None
    dpo: Dpo | None = None


# ---- config: the CLI's settings, by section ---------------------------------------------------------------------

# Settings a request may not set through `config`: the service decides them, or the request names them elsewhere
# (training_file, validation_file, model). Every other path-typed setting takes only an id the caller owns.
RESERVED = {("data", "train"), ("data", "eval"), ("model", "name"), ("model", "trust_remote_code"), ("model", "allow_pickle"),
            ("train", "device"), ("train", "strategy"), ("train", "reward"), ("train", "progress"), ("train", "lr_scale"), ("eval", "folds"), ("eval", "fold")}
SECTIONS = ("data", "tuning", "train", "eval")  # `model` is the request's own `model`
MAX_CHECKPOINTS = 5  # resumable checkpoints a job may keep (train.keep_checkpoints), so no job fills the disk
KEEP_CHECKPOINTS = 3  # checkpoints a job keeps unless config.train.keep_checkpoints says (the CLI keeps 2)
# Where the service's limit or default differs from the CLI's.
LIMITS = {"train.keep_checkpoints": config_mod.Range(1, MAX_CHECKPOINTS)}
DEFAULTS = {"train.keep_checkpoints": KEEP_CHECKPOINTS}
PATH_HELP = {"data": "The id of an uploaded fine-tune file (file-…): the service never reads a path a client names.",
             "run": "A fine-tuned model (ft:…) or the id of a succeeded job (ftjob-…): the service never reads a "
                    "path a client names."}


def _setting(key: str, tp: Any, valid: config_mod.Range | None, value: Any) -> Any:
    try:
        return config_mod.coerce(key, value, tp, "config", valid)
    except UserError as e:
        raise refuse(e.problem) from None


def _bounds(valid: config_mod.Range | None) -> dict:
    if valid is None:
        return {}
    return {"gt" if valid.lo_open else "ge": valid.lo, "lt" if valid.hi_open else "le": valid.hi}


def _field(key: str, f: dataclasses.Field, tp: Any) -> tuple[Any, Any]:
    """A config setting as a request field: the dataclass's type, default, help and range (the service's where
    they differ); its value checked by config.coerce, as a YAML file's or a flag's is ("1e-3" or "true" included)."""
    valid = LIMITS.get(key, f.metadata["range"])
    help = f.metadata["help"] + (f" {PATH_HELP[f.metadata['path']]}" if f.metadata["path"] in PATH_HELP else "")
    if key in DEFAULTS:
        default = {"default": DEFAULTS[key]}
    elif f.default is dataclasses.MISSING:
        default = {"default_factory": f.default_factory}
    else:
        default = {"default": f.default}
    return (Annotated[tp, Field(**_bounds(valid)), BeforeValidator(partial(_setting, key, tp, valid))],
            Field(description=help, **default))


class Section(Strict):
    section: ClassVar[str]

    @classmethod
    def unknown(cls, key: str) -> str:
        close = difflib.get_close_matches(key, list(cls.model_fields), n=1)
        hint = f" (did you mean '{cls.section}.{close[0]}'?)" if close else ""
        return f"unknown config key {excerpt(f'{cls.section}.{key}')}{hint}"


def _section(name: str) -> type[Section]:
    cls = config_mod.SECTIONS[name]
    fields = {key.split(".", 1)[1]: _field(key, f, tp) for key, f, tp in config_mod.iter_fields(cls, f"{name}.")
              if (name, key.split(".", 1)[1]) not in RESERVED}
    model = create_model(f"{name.capitalize()}Settings", __base__=Section, __doc__=cls.__doc__, **fields)
    model.section = name
    return model


DataSettings, TuningSettings, TrainSettings, EvalSettings = (_section(name) for name in SECTIONS)


class Settings(Strict):
    """Other settings of the run, by section, as in a `tunelab train` YAML file (e.g. {"data": {"max_length": 64}});
    those the service decides are refused."""

    data: DataSettings | None = None
    tuning: TuningSettings | None = None
    train: TrainSettings | None = None
    eval: EvalSettings | None = None

    @classmethod
    def unknown(cls, key: str) -> str:
        return f"unknown section {excerpt(key)} ({', '.join(SECTIONS[:-1])} or {SECTIONS[-1]})"

    @model_validator(mode="before")
    @classmethod
    def _not_reserved(cls, data: Any) -> Any:
        for section, values in (data.items() if isinstance(data, dict) else ()):
            for key in (values if isinstance(values, dict) else ()):
                if (section, key) in RESERVED:
                    raise refuse(f"{section}.{key} is set by the service", "reserved")
        return data

    def given(self) -> dict:
        """The settings the request gave, by section (a null section gives none)."""
        return {name: values.model_dump(exclude_unset=True) for name in SECTIONS
                if (values := getattr(self, name)) is not None}


# ---- POST /v1/fine_tuning/jobs ----------------------------------------------------------------------------------

TUNINGS = config_mod.choices(typing.get_type_hints(config_mod.TuningConfig)["name"])
TASKS = config_mod.choices(typing.get_type_hints(config_mod.Config)["task"])
Suffix = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
Metadata = Annotated[dict[Annotated[str, StringConstraints(max_length=64)],
                          Annotated[str, StringConstraints(max_length=512)]], Field(max_length=16)]


class CreateJob(BaseModel):
    """POST /v1/fine_tuning/jobs: OpenAI's fields, plus tunelab's `task`, `tuning` and `config`. Unknown keys are
    ignored, as they always were."""

    model: str = Field(description="A base model of GET /v1/models, or an earlier fine-tuned model (ft:…).")
    training_file: str = Field(description="The id of an uploaded fine-tune file (file-…).")
    validation_file: str | None = Field(None, description="The id of an uploaded fine-tune file (file-…) to "
                                                          "evaluate on; else a share of the training file is held out.")
    method: Method | None = Field(None, description="supervised (default) or dpo, with its hyperparameters.")
    hyperparameters: DpoHyperparameters | None = Field(
        None, description="The same hyperparameters as method.<type>.hyperparameters (which win), the older way; "
                          "beta only for dpo.")
    task: Literal[TASKS] | None = Field(
        None, description="What the model learns; by default dpo for method.type dpo, else from the training "
                          "file (chat for messages, clm for plain text, classification for text + label).")
    # Not a Literal: an unknown method is refused with the run's other settings (param "config"), as it always was.
    tuning: str = Field("full", description="How the weights adapt.", json_schema_extra={"enum": list(TUNINGS)})
    suffix: Suffix | None = Field(None, description="Up to 64 letters, digits, '-' or '_' in the model's name.")
    seed: Annotated[int, Field(strict=True, ge=0, lt=2**31)] | None = Field(
        None, description="Seed of the run; drawn at random when absent.")
    metadata: Metadata | None = Field(None, description="Up to 16 string keys (64 characters) with string values "
                                                        "(512), kept with the job.")
    config: Settings | None = None

    @field_validator("hyperparameters")
    @classmethod
    def _beta_for_dpo(cls, value: DpoHyperparameters | None, info: ValidationInfo):
        method = info.data.get("method")
        if value is not None and "beta" in value.model_fields_set and (method is None or method.type != "dpo"):
            raise refuse("unknown hyperparameter 'beta' (only method.type 'dpo' has it)", "unknown_key")
        return value

    @field_validator("task")
    @classmethod
    def _dpo_trains_dpo(cls, value: str | None, info: ValidationInfo):
        method = info.data.get("method")
        if value is not None and method is not None and method.type == "dpo" and value != "dpo":
            raise refuse(f"method.type 'dpo' trains the dpo task, not {value!r}")
        return value

    @property
    def kind(self) -> str:
        return self.method.type if self.method else "supervised"

    def raw_hyperparameters(self) -> dict:
        """The hyperparameters the request gave: `method.<type>.hyperparameters` over the top-level ones."""
        section = getattr(self.method, self.kind) if self.method else None
        inner = section.hyperparameters if section else None
        return {**(self.hyperparameters.model_dump(exclude_unset=True) if self.hyperparameters else {}),
                **(inner.model_dump(exclude_unset=True) if inner else {})}


# ---- POST /v1/chat/completions and /v1/classifications ----------------------------------------------------------

MAX_TOKENS = 2048
MAX_INPUTS = 256
# Characters of a conversation or of one text to classify, counted before anything is tokenized: tokenizing 200,000
# characters took 4 s of the server's time only to be refused for the model's context length.
MAX_CHARS = 32_768


# strict: true, 1.5 and "3" are no integers, and true and "1" no numbers; an integer is a number
Tokens = Annotated[int, Field(strict=True, ge=1, le=MAX_TOKENS)]
Temperature = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0, le=2)]
TopP = Annotated[float, Field(strict=True, allow_inf_nan=False, gt=0, le=1)]


class StreamOptions(BaseModel):
    include_usage: bool = Field(False, description="A last chunk with the token counts.")


def _texts(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


MAX_CHOICES = 8  # answers per chat request (n): each is a whole generation on the service's device
Stop = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class ResponseFormat(BaseModel):
    type: str = Field(description="text; json_object and json_schema are refused (not constrained here).")

    @field_validator("type")
    @classmethod
    def _text_only(cls, value):
        if value != "text":
            raise refuse(f"{value!r} is not supported: tunelab does not constrain answers to JSON; "
                         "use {\"type\": \"text\"} or leave response_format out")
        return value


class Chat(BaseModel):
    """POST /v1/chat/completions: the OpenAI fields tunelab serves. OpenAI's other options are ignored, as they
    always were; those it cannot honour (a JSON response format) are refused."""

    model: str = Field(description="A generator: a base model of GET /v1/models or a fine-tuned chat, clm or dpo "
                                   "model (ft:…).")
    messages: list[dict[str, Any]] = Field(
        min_length=1, description=f"OpenAI chat messages ({{role, content}}), read as the chat task reads its "
                                  f"records; at most {MAX_CHARS:,} characters in all.")
    max_tokens: Tokens | None = Field(None, description="Most tokens generated; default 128.")
    max_completion_tokens: Tokens | None = Field(None, description="The same as max_tokens, which it overrides.")
    temperature: Temperature | None = Field(None, description="0 always takes the most likely token; default 1.")
    top_p: TopP | None = Field(None, description="Sample only from the most likely tokens that together hold this "
                                                 "probability; default 1.")
    seed: Annotated[int, Field(strict=True, ge=0, lt=2**63)] | None = Field(
        None, description="Seed set before the answer, so a sampled answer can be reproduced; drawn when absent.")
    n: Annotated[int, Field(strict=True, ge=1, le=MAX_CHOICES)] | None = Field(
        None, description=f"Answers per request (1 to {MAX_CHOICES}), drawn one after another from seeds seed, "
                          "seed + 1, …; default 1.")
    stop: Annotated[list[Stop], Field(max_length=4), BeforeValidator(_texts)] | None = Field(
        None, description="A string, or up to 4, that end the answer; the answer stops before the first one.")
    logprobs: bool | None = Field(None, description="Return each answer token's log-probability (not streamed).")
    top_logprobs: Annotated[int, Field(strict=True, ge=0, le=20)] | None = Field(
        None, description="With logprobs: this many most likely alternatives at each position.")
    response_format: ResponseFormat | None = None
    stream: bool | None = Field(False, description="Send the answer as server-sent events of chat.completion.chunk.")
    stream_options: StreamOptions | None = None

    @model_validator(mode="after")
    def _logprobs_settings(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise refuse("top_logprobs needs logprobs: true")
        if self.logprobs and self.stream:
            raise refuse("logprobs are returned by non-streamed completions only (stream: false)")
        return self


def _not_blank(text: str) -> str:
    if not text.strip():
        raise refuse("is empty")
    return text


Text = Annotated[str, StringConstraints(max_length=MAX_CHARS), AfterValidator(_not_blank)]

MAX_IMAGE_BYTES = 10 << 20  # one image to classify, decoded from its base64
IMAGE_TYPES = ("png", "jpeg", "jpg", "webp", "bmp", "gif")


def _data_url(value: Any) -> bytes:
    """The bytes of a `data:image/<type>;base64,<data>` URL (what OpenAI's image inputs take), checked."""
    import base64
    import binascii

    if not isinstance(value, str):
        raise refuse("must be a data URL string: data:image/png;base64,...")
    head, comma, data = value.partition(",")
    kind = head.removeprefix("data:image/").removesuffix(";base64")
    if not comma or not head.startswith("data:image/") or not head.endswith(";base64") or kind not in IMAGE_TYPES:
        raise refuse(f"must be a data URL of an image: data:image/({'|'.join(IMAGE_TYPES)});base64,...")
    if len(data) > (MAX_IMAGE_BYTES * 4) // 3 + 4:
        raise refuse(f"is larger than {MAX_IMAGE_BYTES // 2**20} MiB")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise refuse("is not valid base64") from None


def _input_kind(value: Any) -> str:
    """Which form a classification's input has: images (objects with "image"), sentence pairs (other objects) or
    texts (everything else)."""
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return "images" if all("image" in v for v in value) else "pairs"
    return "texts"


# The tags of the input's forms: pydantic puts them in an error's location, where the client never wrote them
UNION_TAGS = ("texts", "images", "pairs")


class PairInput(BaseModel):
    """One sentence pair to classify (a model trained on pairs: entailment, similarity): {"text", "text_pair"}."""

    model_config = ConfigDict(extra="forbid")
    text: Text
    text_pair: Text


class ImageInput(BaseModel):
    """One image to classify: {"image": "data:image/png;base64,..."}."""

    model_config = ConfigDict(extra="forbid")
    image: Annotated[bytes, BeforeValidator(_data_url, json_schema_input_type=str)] = Field(
        description=f"The image as a data URL (data:image/png;base64,...; {', '.join(IMAGE_TYPES)}), at most "
                    f"{MAX_IMAGE_BYTES // 2**20} MiB.")


class Classify(BaseModel):
    """POST /v1/classifications (tunelab's): labels, values or entities from a fine-tuned classifier, regressor or
    tagger. Other keys are ignored, as they always were."""

    model: str = Field(description="A fine-tuned classification, multilabel, regression or ner model (ft:…).")
    input: Annotated[Annotated[list[Text], Field(min_length=1, max_length=MAX_INPUTS), Tag("texts")]
                     | Annotated[list[ImageInput], Field(min_length=1, max_length=MAX_INPUTS), Tag("images")]
                     | Annotated[list[PairInput], Field(min_length=1, max_length=MAX_INPUTS), Tag("pairs")],
                     Discriminator(_input_kind), BeforeValidator(_texts)] = Field(
        description=f"One text or a list of up to {MAX_INPUTS} (each non-empty, at most {MAX_CHARS:,} characters); "
                    "sentence pairs as [{\"text\": ..., \"text_pair\": ...}]; "
                    "for an image model, a list of images: [{\"image\": \"data:image/png;base64,...\"}].")


class ScoreInput(BaseModel):
    """One response to score: {"prompt": a text or chat messages, "response": a text}."""

    model_config = ConfigDict(extra="forbid")
    prompt: Annotated[str, StringConstraints(max_length=MAX_CHARS)] | list[dict] = Field(
        description="The prompt: a text (one user message) or a list of chat messages.")
    response: Text


class Score(BaseModel):
    """POST /v1/scores (tunelab's): a fine-tuned reward model's score of each prompt and response."""

    model: str = Field(description="A fine-tuned reward model (ft:…).")
    input: list[ScoreInput] = Field(min_length=1, max_length=MAX_INPUTS,
                                    description=f"Up to {MAX_INPUTS} prompts with a response each.")


# ---- the admin routes (projects and their keys) -----------------------------------------------------------------

class CreateProject(BaseModel):
    """POST /v1/organization/projects."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=64, description="Letters, digits, '_', '.' or '-', starting with a letter or digit.")


class CreateKey(BaseModel):
    """POST /v1/organization/projects/{project_id}/api_keys: the key's value is in the answer, and only there."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200, description="Who or what uses the key.")
    admin: bool = Field(False, description="An admin key sees every project and manages projects and keys.")


class Quotas(BaseModel):
    """POST /v1/organization/projects/{project_id}/quotas: the limits named are set (null: no limit)."""

    model_config = ConfigDict(extra="forbid")
    running_jobs: int | None = Field(None, ge=0, le=10**6, description="Jobs of the project that run at once; more wait queued.")
    queued_jobs: int | None = Field(None, ge=0, le=10**6, description="Jobs waiting to run; one more is refused (429).")
    file_bytes: int | None = Field(None, ge=0, le=2**62, description="Bytes of uploaded files stored; an upload past it is refused (409).")
