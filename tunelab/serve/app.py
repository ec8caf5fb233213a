"""The HTTP API (OpenAI's fine-tuning, files, models and chat routes, plus tunelab's) and the dashboard.

Every route but /health needs a valid key (Bearer header; the dashboard page also takes the `tunelab_key`
cookie). Errors use OpenAI's shape: {"error": {"message", "type", "param", "code"}}. A housekeeping thread
validates new jobs' files and re-queues jobs whose worker died.
"""
from __future__ import annotations

import contextlib
import math
import threading
import time
import traceback
from pathlib import Path
from urllib.parse import unquote

from fastapi import APIRouter, BackgroundTasks, Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from tunelab.errors import UserError, cut
from tunelab.io import read_jsonl_prefix
from tunelab.rundir import RunDir, is_train_row, openai_train_metrics, openai_valid_metrics
from tunelab.serve import access, files, inference, job_request, jobs, keys, limits
from tunelab.serve.bodies import (UNION_TAGS, Chat, Classify, CreateJob, CreateKey, CreateProject, ErrorBody,
                                  Quotas, Score)
from tunelab.serve.db import connect, finite, transaction
from tunelab.serve.db import loads as db_loads

HERE = Path(__file__).parent
HOUSEKEEPING = 1.0  # seconds between checks for new jobs to validate and jobs whose worker died
MAX_LIMIT = 100


def error(status: int, message: str, param: str | None = None, code: str | None = None,
          kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


def _key_of(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    if request.url.path == "/" and request.method == "GET":  # the dashboard page; API calls need the header
        return unquote(request.cookies.get("tunelab_key", "")) or None
    return None


def _limit(limit: int) -> int:
    if not 1 <= limit <= MAX_LIMIT:
        raise UserError(f"must be between 1 and {MAX_LIMIT}", "limit")
    return limit


def _list(data: list, has_more: bool) -> dict:
    return {"object": "list", "data": data, "has_more": has_more,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}


def create_app(home: str | Path, max_upload_mb: float = 100, on_shutdown=None,
               body_timeout: float = limits.BODY_TIMEOUT, rate_limit: float = 0) -> FastAPI:
    """The app for one service home; a housekeeping thread runs while it serves, `on_shutdown()` at the end.
    `rate_limit`: requests a minute per key (limits.RateLimit; 0: none)."""
    home = Path(home)
    stop = threading.Event()

    def housekeeping() -> None:
        while not stop.wait(HOUSEKEEPING):
            try:
                jobs.validate_pending(home)
                jobs.reap(home)
            except Exception:  # noqa: BLE001 - e.g. a database busy past its timeout: logged, tried next round
                traceback.print_exc()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        connect(home)
        files.remove_partial_uploads(home)
        threading.Thread(target=housekeeping, daemon=True, name="housekeeping").start()
        yield
        stop.set()
        if on_shutdown:
            on_shutdown()

    app = FastAPI(title="tunelab", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible fine-tuning service; see docs/service.md")
    app.state.home, app.state.max_upload_mb = home, max_upload_mb
    app.add_exception_handler(UserError, user_error)
    app.add_exception_handler(LookupError, not_found)
    app.add_exception_handler(NotAdmin, not_admin)
    app.add_exception_handler(access.OverQuota, over_quota)
    app.add_exception_handler(RequestValidationError, bad_request)
    app.add_exception_handler(HTTPException, http_error)
    app.include_router(router)
    app.add_middleware(Authenticate, home=home, rate=limits.RateLimit(rate_limit) if rate_limit else None)
    app.add_middleware(limits.LimitBody, upload_bytes=_max_bytes(app), timeout=body_timeout)  # added last: runs first
    return app


def _home(request: Request) -> Path:
    return request.app.state.home


def _max_bytes(app) -> int:
    return int(app.state.max_upload_mb * 2**20)


Home = Depends(_home)


class Authenticate:
    """ASGI middleware: a valid key on every route but /health (the dashboard page may carry it as a cookie).
    Plain ASGI rather than Starlette's BaseHTTPMiddleware, which wraps errors raised while the body is read
    (limits.BodyTooLarge) in an ExceptionGroup."""

    def __init__(self, app, home: Path, rate=None):
        self.app, self.home, self.rate = app, home, rate

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] == "/health":
            return await self.app(scope, receive, send)
        request = Request(scope)
        caller = keys.verify(self.home, _key_of(request))
        if caller is None:
            if scope["path"] == "/" and scope["method"] == "GET":
                refused = HTMLResponse((HERE / "signin.html").read_text(encoding="utf-8"), 401)
            else:
                refused = error(401, "Missing or invalid API key: send 'Authorization: Bearer KEY' "
                                     "(keys come from `tunelab keys create`)", code="invalid_api_key",
                                kind="authentication_error")
            return await refused(scope, receive, send)
        wait = self.rate.take(caller.key_id) if self.rate else 0.0
        if wait > 0:
            refused = error(429, f"too many requests for this key: at most {self.rate.per_minute:g} a minute; "
                                 f"retry in {math.ceil(wait)} s", code="rate_limit_exceeded", kind="requests")
            refused.headers["Retry-After"] = str(math.ceil(wait))
            return await refused(scope, receive, send)
        token = access.CALLER.set(caller)  # (sync routes run in threads that copy this context)
        try:
            await self.app(scope, receive, send)
        finally:
            access.CALLER.reset(token)


async def user_error(request: Request, e: UserError):
    status = 409 if isinstance(e, jobs.Conflict) else 400
    return error(status, str(e), e.path, "conflict" if status == 409 else None)


async def http_error(request: Request, e: HTTPException):
    """Starlette's own errors (unknown route, wrong method, a body too large, slow or unreadable) in OpenAI's shape."""
    if e.status_code == 400:  # FastAPI's "error parsing the body": JSON too deep or a number too long, bad form data
        return error(400, "the request body could not be read as JSON (or as form data for uploads)",
                     code="invalid_body")
    return JSONResponse(limits.error_body(e), e.status_code, headers=getattr(e, "headers", None))


async def over_quota(request: Request, e: access.OverQuota):
    return error(e.status, str(e), e.quota, "quota_exceeded",
                 kind="rate_limit_error" if e.status == 429 else "invalid_request_error")


async def not_found(request: Request, e: LookupError):
    return error(404, f"no such object: {e.args[0] if e.args else request.url.path}", code="not_found")


async def bad_request(request: Request, e: RequestValidationError):
    """A body, query or path parameter its declaration refuses (bodies.py): the first problem, addressed by its
    place in the request (`hyperparameters.n_epochs`, `config.train.lr`), in OpenAI's shape."""
    first = e.errors()[0] if e.errors() else {}
    loc = list(first.get("loc", ()))[1:]
    # the tag of a field's form (texts or images) is pydantic's, not a place in the request
    loc = [p for i, p in enumerate(loc) if not (p in UNION_TAGS and i > 0 and loc[i - 1] == "input")]
    where = ".".join(cut(str(p)) for p in loc)  # a dict key in it is the client's text
    message = first.get("msg", "invalid request")
    if first.get("type") == "json_invalid":
        where, message = "", "the request body is not valid JSON"
    elif not where and first.get("type") in ("model_attributes_type", "dict_type", "missing"):
        message = "the request body must be a JSON object"
    return error(400, f"{where}: {message}" if where else message, where or None)


# Declared for /openapi.json: a bad body is answered 400 in this shape (bad_request), not FastAPI's 422.
router = APIRouter(responses={"4XX": {"model": ErrorBody, "description": "Refused, in OpenAI's error shape"}})


@router.get("/health")
def health():
    return {"status": "ok"}


@router.get("/", response_class=HTMLResponse)
def dashboard():
    return HTMLResponse((HERE / "dashboard.html").read_text(encoding="utf-8"))


# ---- files ---------------------------------------------------------------------------------------------------

@router.post("/v1/files")
def upload(request: Request, file: UploadFile = File(...), purpose: str = Form(...), task: str | None = Form(None),
           home: Path = Home):
    limit = _max_bytes(request.app)
    data = file.file.read(limit + 1)
    if len(data) > limit:
        return error(413, f"the file is larger than the limit of {request.app.state.max_upload_mb:g} MB", "file",
                     "file_too_large")
    row = files.store(home, data, file.filename, purpose, task)
    access.audit(connect(home), "file.created", row["id"], {"filename": row["filename"], "bytes": row["bytes"]})
    return files.public(row)


@router.get("/v1/files")
def list_files(purpose: str | None = None, limit: int = 20, after: str | None = None, home: Path = Home):
    sql, params = access.scoped("SELECT * FROM files WHERE (CAST(? AS TEXT) IS NULL OR purpose = ?)",
                                (purpose, purpose))
    rows = [files.public(dict(r)) for r in connect(home).execute(
        sql + " ORDER BY created_at DESC, rowid DESC", params).fetchall()]
    return _page(rows, after, limit, "file")


def _found(row: dict | None, name: str) -> dict:
    """`row`, or a 404 naming what was asked for."""
    if row is None:
        raise LookupError(name)
    return row


def _file(home: Path, file_id: str) -> dict:
    return _found(files.get(home, file_id), file_id)


@router.get("/v1/files/{file_id}")
def get_file(file_id: str, home: Path = Home):
    return files.public(_file(home, file_id))


@router.get("/v1/files/{file_id}/content")
def file_content(file_id: str, home: Path = Home):
    row = _file(home, file_id)
    return FileResponse(files.content_path(home, row), media_type="application/octet-stream",
                        filename=row["filename"])


@router.delete("/v1/files/{file_id}")
def delete_file(file_id: str, home: Path = Home):
    if not files.delete(home, file_id):
        raise LookupError(file_id)
    access.audit(connect(home), "file.deleted", file_id)
    return {"id": file_id, "object": "file", "deleted": True}


# ---- fine-tuning jobs --------------------------------------------------------------------------------------

def _job(home: Path, job_id: str) -> dict:
    return _found(jobs.get(home, job_id), job_id)


@router.post("/v1/fine_tuning/jobs")
def create_job(body: CreateJob, background: BackgroundTasks, home: Path = Home):
    job = job_request.create(home, body)
    access.audit(connect(home), "fine_tuning.job.created", job["id"], {"model": job["model"]})
    background.add_task(jobs.validate_pending, home)  # now, rather than at the next housekeeping round
    return jobs.public(job)


@router.get("/v1/fine_tuning/jobs")
def list_jobs(after: str | None = None, limit: int = 20, home: Path = Home):
    return _list(*jobs.listing(home, after, _limit(limit)))


@router.get("/v1/fine_tuning/jobs/{job_id}")
def get_job(job_id: str, home: Path = Home):
    return jobs.public(_job(home, job_id))


@router.post("/v1/fine_tuning/jobs/{job_id}/cancel")
def cancel_job(job_id: str, home: Path = Home):
    job = jobs.cancel(home, job_id)
    access.audit(connect(home), "fine_tuning.job.cancelled", job_id)
    deadline = time.monotonic() + 10  # a running job: its worker stops the training process within seconds
    while job["status"] == "running" and time.monotonic() < deadline:
        time.sleep(0.2)
        job = _job(home, job_id)
    return jobs.public(job)


@router.get("/v1/fine_tuning/jobs/{job_id}/events")
def job_events(job_id: str, after: str | None = None, limit: int = 20, home: Path = Home):
    _job(home, job_id)
    return _list(*jobs.events(home, job_id, after, _limit(limit)))


@router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
def job_checkpoints(job_id: str, after: str | None = None, limit: int = 10, home: Path = Home):
    return _page(checkpoints(home, _job(home, job_id)), after, limit, "checkpoint")


def checkpoints(home: Path, job: dict) -> list[dict]:
    """The run's kept resumable checkpoints, newest first, with the metrics logged at their step (OpenAI's names)."""
    run = RunDir(jobs.run_dir(home, job["id"]))
    history = run.history()
    out = []
    for step in reversed(run.checkpoint_steps()):
        metrics = {"step": step}
        for row in history:
            if row["step"] == step:
                named = openai_train_metrics(row) if is_train_row(row) else openai_valid_metrics(row)
                metrics.update({k: v for k, v in named.items() if k != "learning_rate"})
        out.append({"id": f"ftckpt-{job['id'].split('-', 1)[1][:12]}-{step}", "object": "fine_tuning.job.checkpoint",
                    "created_at": int(run.state_time(step)),
                    "fine_tuned_model_checkpoint": f"{jobs.model_name(job)}:ckpt-step-{step}",
                    "fine_tuning_job_id": job["id"], "step_number": step, "metrics": finite(metrics)})
    return out


@router.get("/v1/fine_tuning/jobs/{job_id}/metrics")
def job_metrics(job_id: str, home: Path = Home):
    """tunelab's addition for the dashboard: the run's history, its metrics.json, sample generations and, for an
    image classifier, its grid of the most confident mistakes (a PNG data URL)."""
    import base64

    run = RunDir(jobs.run_dir(home, _job(home, job_id)["id"]))
    samples, mistakes = run.path / "samples.jsonl", run.path / "mistakes.png"
    metrics = run.metrics()
    return finite({"history": run.history(), "metrics": metrics,
                   "samples": [{"prompt": r["prompt"], "answer": r["answer"]} for r in read_jsonl_prefix(samples)]
                   if samples.is_file() else None,
                   "mistakes": "data:image/png;base64," + base64.b64encode(mistakes.read_bytes()).decode()
                   if metrics and mistakes.is_file() else None})


# ---- models and inference ----------------------------------------------------------------------------------

def models(home: Path) -> list[dict]:
    base = [{"id": name, "object": "model", "created": 0, "owned_by": "tunelab", "task": None}
            for name in jobs.bundled_models()]
    base += [{"id": name, "object": "model", "created": int((home / "models" / name).stat().st_mtime),
              "owned_by": "local", "task": None} for name in jobs.local_models(home)]
    sql, params = access.scoped("SELECT fine_tuned_model, finished_at, task FROM jobs WHERE status = 'succeeded'")
    tuned = connect(home).execute(sql + " ORDER BY seq DESC", params).fetchall()
    return base + [{"id": r["fine_tuned_model"], "object": "model", "created": r["finished_at"], "owned_by": "user",
                    "task": r["task"]} for r in tuned]


@router.get("/v1/models")
def list_models(home: Path = Home):
    return {"object": "list", "data": models(home)}


@router.get("/v1/models/{model_id}")
def get_model(model_id: str, home: Path = Home):
    for m in models(home):
        if m["id"] == model_id:
            return m
    raise LookupError(model_id)


@router.post("/v1/chat/completions")
def chat(body: Chat, home: Path = Home):
    out = inference.chat(home, body)
    return out if isinstance(out, dict) else StreamingResponse(out, media_type="text/event-stream")


@router.post("/v1/classifications")
def classify(body: Classify, home: Path = Home):
    return inference.classify(home, body)


@router.post("/v1/scores")
def score(body: Score, home: Path = Home):
    return inference.score(home, body)


# ---- admin: projects, their keys, the audit log (OpenAI's /v1/organization routes) --------------------------------

class NotAdmin(Exception):
    """A normal key on an admin route: 403 (the routes themselves are documented; nothing is disclosed)."""


async def not_admin(request: Request, e: NotAdmin):
    return error(403, "this route needs an admin key (tunelab keys create --admin)", code="insufficient_permissions",
                 kind="permission_error")


def _admin() -> access.Caller:
    caller = access.current()
    if caller is None or not caller.admin:
        raise NotAdmin()
    return caller


Admin = Depends(_admin)


def _project_object(row: dict, home: Path) -> dict:
    """OpenAI's project object, plus tunelab's quotas (null: no limit) and what the project uses of them."""
    con = connect(home)
    return {"id": row["id"], "object": "organization.project", "name": row["name"], "created_at": row["created_at"],
            "archived_at": row["archived_at"], "status": "archived" if row["archived_at"] else "active",
            "quotas": {name: row[column] for name, column in access.QUOTAS.items()},
            "usage": {"running_jobs": access.running_jobs(con, row["id"]),
                      "queued_jobs": access.queued_jobs(con, row["id"]),
                      "file_bytes": access.stored_bytes(con, row["id"])}}


def _key_object(row: dict) -> dict:
    return {"id": row["id"], "object": "organization.project.api_key", "name": row["name"],
            "redacted_value": row["prefix"] + "…", "created_at": row["created_at"],
            "last_used_at": row["last_used_at"], "revoked_at": row["revoked_at"], "project_id": row["project"],
            "role": "admin" if row["admin"] else "member"}


def _project(home: Path, project_id: str) -> dict:
    return _found(keys.project(home, project_id), project_id)


@router.get("/v1/me")
def me(home: Path = Home):
    """tunelab's: the calling key's project (with its quotas and what it uses of them) and role."""
    caller = access.current()  # (every key's project exists: keys.create makes it, the migration makes default)
    return {"object": "tunelab.caller", "key_id": caller.key_id, "role": "admin" if caller.admin else "member",
            "project": _project_object(_project(home, caller.project), home)}


@router.get("/v1/organization/projects")
def list_projects(home: Path = Home, caller: access.Caller = Admin):
    return _list([_project_object(p, home) for p in keys.projects(home)], False)


@router.post("/v1/organization/projects")
def create_project(body: CreateProject, home: Path = Home, caller: access.Caller = Admin):
    if any(p["name"] == body.name for p in keys.projects(home)):
        raise jobs.Conflict(f"a project named {body.name!r} exists", "name")
    return _project_object(keys.ensure_project(home, body.name), home)


@router.post("/v1/organization/projects/{project_id}/quotas")
def set_quotas(project_id: str, body: Quotas, home: Path = Home, caller: access.Caller = Admin):
    """Set the quotas the body names (null: no limit); the others stay as they are."""
    _project(home, project_id)
    given = body.model_dump(exclude_unset=True)
    con = connect(home)
    with transaction(con):
        for name, value in given.items():
            con.execute(f"UPDATE projects SET {access.QUOTAS[name]} = ? WHERE id = ?", (value, project_id))
        access.audit(con, "project.quotas_set", project_id, given)
    return _project_object(_project(home, project_id), home)


@router.get("/v1/organization/projects/{project_id}/api_keys")
def list_keys(project_id: str, home: Path = Home, caller: access.Caller = Admin):
    _project(home, project_id)
    return _list([_key_object(k) for k in keys.listing(home, project_id)], False)


@router.post("/v1/organization/projects/{project_id}/api_keys")
def create_key(project_id: str, body: CreateKey, home: Path = Home, caller: access.Caller = Admin):
    project = _project(home, project_id)
    key_id, value = keys.create(home, body.name, project["name"], body.admin)
    row = next(k for k in keys.listing(home, project_id) if k["id"] == key_id)
    return {**_key_object(row), "value": value}


@router.delete("/v1/organization/projects/{project_id}/api_keys/{key_id}")
def revoke_key(project_id: str, key_id: str, home: Path = Home, caller: access.Caller = Admin):
    _project(home, project_id)
    if not any(k["id"] == key_id for k in keys.listing(home, project_id)):
        raise LookupError(key_id)
    keys.revoke(home, key_id)
    return {"object": "organization.project.api_key.deleted", "id": key_id, "deleted": True}


@router.get("/v1/organization/audit_logs")
def audit_logs(limit: int = 20, after: str | None = None, home: Path = Home, caller: access.Caller = Admin):
    """Who did what, newest first: the key's id and project, never the key."""
    rows = connect(home).execute("SELECT * FROM audit ORDER BY seq DESC").fetchall()
    data = [{"id": f"audit-{r['seq']}", "object": "organization.audit_log", "type": r["action"],
             "effective_at": r["created_at"], "actor": {"type": "api_key", "api_key": {"id": r["key_id"]}},
             "project": {"id": r["project"]}, "object_id": r["object"],
             "detail": finite(db_loads(r["detail"]))} for r in rows]
    return _page(data, after, limit, "audit log entry")


def _page(rows: list[dict], after: str | None, limit: int, what: str) -> dict:
    """One page of a newest-first list: the rows after the one with id `after`."""
    if after:
        ids = [r["id"] for r in rows]
        if after not in ids:
            raise UserError(f"no {what} {after!r}", "after")
        rows = rows[ids.index(after) + 1:]
    limit = _limit(limit)
    return _list(rows[:limit], len(rows) > limit)
