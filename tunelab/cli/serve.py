"""Service commands: serve, worker, keys."""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from tunelab.errors import UserError
from tunelab.text import text_table


def cmd_serve(args) -> int:
    from tunelab.serve.server import serve

    if args.workers < 0:
        raise UserError("must be 0 or more", "--workers")
    _positive_hours(args.max_job_hours)
    if not 0 < args.body_timeout <= 3600:
        raise UserError("must be between 0 and 3600 seconds", "--body-timeout")
    if not 0 <= args.rate_limit <= 10**6:
        raise UserError("must be between 0 (off) and 1,000,000 requests a minute", "--rate-limit")
    from tunelab.models import device_for
    from tunelab.serve.server import need_service_stack

    device = str(device_for(args.device))  # checked before anything starts
    need_service_stack()  # (the extra first: the inference module needs it)
    from tunelab.serve import inference

    inference.DEVICE = device  # where the endpoints' models answer
    _use_db(args.db)
    _use_storage(args.storage)
    serve(Path(args.home), args.host, args.port, args.workers, args.max_upload_mb, args.max_job_hours,
          args.body_timeout, args.rate_limit)
    return 0


def cmd_worker(args) -> int:
    from tunelab.serve.server import need_service_stack

    need_service_stack()
    from tunelab.serve.worker import run_worker

    _positive_hours(args.max_job_hours)
    _use_storage(args.storage)
    _use_db(args.db)
    run_worker(Path(args.home), args.max_job_hours, args.server_id)
    return 0


def _use_db(address: str | None) -> None:
    """--db: the state in that PostgreSQL database (tunelab.serve.pg) instead of HOME/tunelab.db; the workers a server
    starts inherit it through the environment."""
    if address:
        if not address.startswith(("postgresql://", "postgres://")):
            raise UserError("must be a PostgreSQL URL (postgresql://USER@HOST/DB); without --db the state is "
                            "HOME/tunelab.db", "--db")
        from tunelab.serve.db import DB_ENV

        os.environ[DB_ENV] = address


def _use_storage(folder: str | None) -> None:
    """--storage: the uploads and job folders go there (tunelab.serve.storage); the workers a server starts inherit
    it through the environment."""
    if folder:
        from tunelab.serve import storage
        from tunelab.serve.db import private_dir

        os.environ[storage.ENV] = str(private_dir(Path(folder).resolve()))


def _positive_hours(hours: float | None) -> None:
    if hours is not None and not 0 < hours < 1e6:
        raise UserError("must be a positive number of hours", "--max-job-hours")


def cmd_keys(args) -> int:
    from tunelab.serve import keys

    home = Path(args.home)
    _use_db(args.db)
    if args.keys_command == "create":
        key_id, key = keys.create(home, args.name, args.project, args.admin)
        role = "an admin key" if args.admin else "a key"
        print(f"created {key_id} ({args.name}), {role} of project {args.project}. The key is shown only now; "
              f"store it safely:\n{key}")
    elif args.keys_command == "revoke":
        keys.revoke(home, args.id)
        print(f"revoked {args.id}")
    elif rows := keys.listing(home):
        def stamp(t):
            return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "-"
        header = ["id", "name", "project", "role", "starts", "created", "last used", "revoked"]
        print("\n".join(text_table([header] + [[r["id"], r["name"], r["project_name"], "admin" if r["admin"] else "-",
                                                r["prefix"] + "…", stamp(r["created_at"]), stamp(r["last_used_at"]),
                                                stamp(r["revoked_at"])] for r in rows])))
    else:
        print("no keys yet: tunelab keys create --home DIR --name NAME")
    return 0



def add_parsers(sub) -> None:
    """The service commands commands."""
    se = sub.add_parser("serve", help="The fine-tuning service: OpenAI-compatible API, workers and dashboard.")
    se.add_argument("--home", default="tunelab-service", help="Folder of the database, files and job runs.")
    se.add_argument("--host", default="127.0.0.1")
    se.add_argument("--port", type=int, default=8000)
    se.add_argument("--workers", type=int, default=1, help="Worker processes started (and restarted) with the server.")
    se.add_argument("--max-upload-mb", type=float, default=100, help="Largest file accepted by POST /v1/files.")
    se.add_argument("--device", default="cpu", help="Where the inference endpoints' models run: cpu, cuda, cuda:N or "
                    "auto (cuda when there is one). Training jobs choose their own (train.device).")
    se.add_argument("--body-timeout", type=float, default=30,
                    help="Seconds a client may pause while sending a request body; then 408 and the connection closes.")
    se.add_argument("--rate-limit", type=float, default=600,
                    help="Requests a minute each key may make (a token bucket: bursts of a tenth of it); past it 429 "
                         "with Retry-After. 0: no limit (default: 600).")
    se.set_defaults(func=cmd_serve)
    wo = sub.add_parser("worker", help="One more worker for a running `tunelab serve` on this host.")
    wo.add_argument("--home", default="tunelab-service")
    wo.add_argument("--server-id", help=argparse.SUPPRESS)  # given by `tunelab serve` to the workers it starts
    wo.set_defaults(func=cmd_worker)
    for service_parser in (se, wo):
        service_parser.add_argument("--max-job-hours", type=float, default=24,
                       help="A job whose attempts have run longer fails with time_limit_exceeded and keeps its "
                            "checkpoints (default: 24).")
        service_parser.add_argument("--storage", help="Folder for the uploaded files and the jobs' run folders "
                                    "(default: inside --home); a shared mount for workers on several hosts.")
    ke = sub.add_parser("keys", help="API keys of the service: create (shown once), list, revoke.")
    ksub = ke.add_subparsers(dest="keys_command", required=True)
    kc = ksub.add_parser("create", help="Make a key and print it once (only its hash is stored).")
    kc.add_argument("--name", required=True, help="Who or what uses the key.")
    kc.add_argument("--project", default="default",
                    help="The project the key belongs to (made if new): it sees and makes that project's files, "
                         "jobs and models only (default: default).")
    kc.add_argument("--admin", action="store_true",
                    help="An admin key: sees every project and manages projects and keys through the API.")
    kl = ksub.add_parser("list", help="Keys with their first characters, creation, last use and revocation.")
    kr = ksub.add_parser("revoke", help="Revoke a key by its id (key-…); it stops working at once.")
    kr.add_argument("id")
    for k in (kc, kl, kr):
        k.add_argument("--home", default="tunelab-service")
    for db_parser in (se, wo, kc, kl, kr):
        db_parser.add_argument("--db", help="postgresql://USER@HOST/DB: the service's state (keys, files, jobs, "
                               "events) in PostgreSQL, shared by every host's workers (default: HOME/tunelab.db).")
    ke.set_defaults(func=cmd_keys)
