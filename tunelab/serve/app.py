"""The HTTP API (OpenAI's fine-tuning, files, models and chat routes, plus tunelab's) and the dashboard.

Every route but /health needs a valid key (Bearer header; the dashboard page also takes the `tunelab_key`
cookie). Errors use OpenAI's shape: {"error": {"message", "type", "param", "code"}}. A housekeeping thread
validates new jobs' files and re-queues jobs whose worker died.
"""
from __future__ import annotations

import contextlib
import json
import threading
import time
from pathlib import Path
from urllib.parse import unquote

from fastapi import BackgroundTasks, Body, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse

from tunelab.errors import UserError
from tunelab.serve import files, inference, jobs, keys
from tunelab.serve.db import connect, finite

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


def create_app(home: str | Path, max_upload_mb: float = 100) -> FastAPI:
    home = Path(home)
    max_bytes = int(max_upload_mb * 2**20)
    stop = threading.Event()

    def housekeeping() -> None:
        while not stop.wait(HOUSEKEEPING):
            with contextlib.suppress(Exception):  # a locked or busy database: try again next round
                jobs.validate_pending(home)
                jobs.reap(home)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        connect(home)
        files.remove_partial_uploads(home)
        thread = threading.Thread(target=housekeeping, daemon=True, name="housekeeping")
        thread.start()
        yield
        stop.set()

    app = FastAPI(title="tunelab", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible fine-tuning service; see docs/service.md")

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if request.url.path == "/health":
            return await call_next(request)
        if keys.verify(home, _key_of(request)) is None:
            if request.url.path == "/" and request.method == "GET":
                return HTMLResponse((HERE / "signin.html").read_text(encoding="utf-8"), 401)
            return error(401, "Missing or invalid API key: send 'Authorization: Bearer KEY' "
                              "(keys come from `tunelab keys create`)", code="invalid_api_key",
                         kind="authentication_error")
        if request.url.path == "/v1/files" and request.method == "POST":
            size = request.headers.get("content-length")
            if size is None or not size.isdigit():
                return error(411, "uploads need a Content-Length header")
            if int(size) > max_bytes + 64 * 1024:  # the file plus the multipart envelope
                return error(413, f"the upload is larger than the limit of {max_upload_mb:g} MB", "file",
                             "file_too_large")
        return await call_next(request)

    @app.exception_handler(UserError)
    async def user_error(request: Request, e: UserError):
        status = 409 if isinstance(e, jobs.Conflict) else 400
        return error(status, str(e), e.path, "conflict" if status == 409 else None)

    @app.exception_handler(LookupError)
    async def not_found(request: Request, e: LookupError):
        return error(404, f"no such object: {e.args[0] if e.args else request.url.path}", code="not_found")

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:])
        return error(400, f"{where or 'request'}: {first.get('msg', 'invalid request')}", where or None)

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/", response_class=HTMLResponse)
    def dashboard():
        return HTMLResponse((HERE / "dashboard.html").read_text(encoding="utf-8"))

    # ---- files -----------------------------------------------------------------------------------------------

    @app.post("/v1/files")
    def upload(file: UploadFile = File(...), purpose: str = Form(...), task: str | None = Form(None)):
        data = file.file.read(max_bytes + 1)
        if len(data) > max_bytes:
            return error(413, f"the file is larger than the limit of {max_upload_mb:g} MB", "file", "file_too_large")
        return files.public(files.store(home, data, file.filename, purpose, task))

    @app.get("/v1/files")
    def list_files(purpose: str | None = None, limit: int = 20, after: str | None = None):
        rows = [dict(r) for r in connect(home).execute(
            "SELECT * FROM files WHERE (? IS NULL OR purpose = ?) ORDER BY created_at DESC, rowid DESC",
            (purpose, purpose)).fetchall()]
        if after:
            ids = [r["id"] for r in rows]
            if after not in ids:
                raise UserError(f"no file {after!r}", "after")
            rows = rows[ids.index(after) + 1:]
        limit = _limit(limit)
        return _list([files.public(r) for r in rows[:limit]], len(rows) > limit)

    def _file(file_id: str) -> dict:
        row = files.get(home, file_id)
        if row is None:
            raise LookupError(file_id)
        return row

    @app.get("/v1/files/{file_id}")
    def get_file(file_id: str):
        return files.public(_file(file_id))

    @app.get("/v1/files/{file_id}/content")
    def file_content(file_id: str):
        row = _file(file_id)
        return FileResponse(files.path_of(home, row), media_type="application/octet-stream",
                            filename=row["filename"])

    @app.delete("/v1/files/{file_id}")
    def delete_file(file_id: str):
        if not files.delete(home, file_id):
            raise LookupError(file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    # ---- fine-tuning jobs ----------------------------------------------------------------------------------

    def _job(job_id: str) -> dict:
        job = jobs.get(home, job_id)
        if job is None:
            raise LookupError(job_id)
        return job

    @app.post("/v1/fine_tuning/jobs")
    def create_job(background: BackgroundTasks, body: dict = Body(...)):
        job = jobs.create(home, body)
        background.add_task(jobs.validate_pending, home)
        return jobs.public(job)

    @app.get("/v1/fine_tuning/jobs")
    def list_jobs(after: str | None = None, limit: int = 20):
        return _list(*jobs.listing(home, after, _limit(limit)))

    @app.get("/v1/fine_tuning/jobs/{job_id}")
    def get_job(job_id: str):
        return jobs.public(_job(job_id))

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    def cancel_job(job_id: str):
        job = jobs.cancel(home, job_id)
        deadline = time.monotonic() + 10  # a running job: its worker stops the training process within a second
        while job["status"] == "running" and time.monotonic() < deadline:
            time.sleep(0.2)
            job = _job(job_id)
        return jobs.public(job)

    @app.get("/v1/fine_tuning/jobs/{job_id}/events")
    def job_events(job_id: str, after: str | None = None, limit: int = 20):
        _job(job_id)
        return _list(*jobs.events(home, job_id, after, _limit(limit)))

    @app.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    def job_checkpoints(job_id: str, after: str | None = None, limit: int = 10):
        rows = checkpoints(_job(job_id))
        if after:
            ids = [r["id"] for r in rows]
            if after not in ids:
                raise UserError(f"no checkpoint {after!r}", "after")
            rows = rows[ids.index(after) + 1:]
        limit = _limit(limit)
        return _list(rows[:limit], len(rows) > limit)

    def checkpoints(job: dict) -> list[dict]:
        """The run's kept resumable checkpoints, newest first, with the metrics logged at their step."""
        run = jobs.run_dir(home, job["id"])
        history = _history(run)
        out = []
        for state in sorted((run / "checkpoints").glob("step-*/state.json"), reverse=True):
            step = int(state.parent.name.split("-")[1])
            metrics = {"step": step}
            for row in history:
                if row["step"] == step:
                    metrics.update({("train_loss" if k == "loss" else "valid_" + k[5:] if k.startswith("eval_")
                                     else k): v for k, v in row.items() if k == "loss" or k.startswith("eval_")})
            out.append({"id": f"ftckpt-{job['id'].split('-', 1)[1][:12]}-{step}",
                        "object": "fine_tuning.job.checkpoint", "created_at": int(state.stat().st_mtime),
                        "fine_tuned_model_checkpoint": f"{jobs.model_name(job)}:ckpt-step-{step}",
                        "fine_tuning_job_id": job["id"], "step_number": step, "metrics": metrics})
        return out

    @app.get("/v1/fine_tuning/jobs/{job_id}/metrics")
    def job_metrics(job_id: str):
        run = jobs.run_dir(home, _job(job_id)["id"])
        metrics = run / "metrics.json"
        samples = run / "samples.jsonl"
        return finite({"history": _history(run),
                       "metrics": json.loads(metrics.read_text()) if metrics.is_file() else None,
                       "samples": [{"prompt": r["prompt"], "answer": r["answer"]} for r in _jsonl(samples)]
                       if samples.is_file() else None})

    # ---- models and inference ------------------------------------------------------------------------------

    def models() -> list[dict]:
        base = [{"id": name, "object": "model", "created": 0, "owned_by": "tunelab", "task": None}
                for name in jobs.bundled_models()]
        base += [{"id": name, "object": "model", "created": int((home / "models" / name).stat().st_mtime),
                  "owned_by": "local", "task": None} for name in jobs.local_models(home)]
        tuned = connect(home).execute("SELECT fine_tuned_model, finished_at, task FROM jobs WHERE status = "
                                      "'succeeded' ORDER BY seq DESC").fetchall()
        return base + [{"id": r["fine_tuned_model"], "object": "model", "created": r["finished_at"],
                        "owned_by": "user", "task": r["task"]} for r in tuned]

    @app.get("/v1/models")
    def list_models():
        return {"object": "list", "data": models()}

    @app.get("/v1/models/{model_id}")
    def get_model(model_id: str):
        for m in models():
            if m["id"] == model_id:
                return m
        raise LookupError(model_id)

    @app.post("/v1/chat/completions")
    def chat(body: dict = Body(...)):
        out = inference.chat(home, body)
        if isinstance(out, dict):
            return out
        return StreamingResponse(out, media_type="text/event-stream")

    @app.post("/v1/classifications")
    def classify(body: dict = Body(...)):
        return inference.classify(home, body)

    return app


def _jsonl(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # the last line of a file being written
            break
    return rows


def _history(run: Path) -> list[dict]:
    path = run / "history.jsonl"
    return _jsonl(path) if path.is_file() else []

