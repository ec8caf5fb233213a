"""Projects: every key belongs to one; files, jobs, fine-tuned models and events belong to the project that made
them, and another project's are "no such object" (404) on every route; an admin key sees every project and
manages projects and keys; an audit log records who did what; a home from before projects migrates into
`default`."""
from __future__ import annotations

import json
import sqlite3

import pytest
from conftest import make_rows, write_jsonl

from tunelab.serve import db, keys


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model, tiny_llama, slow_data):
    """One service; the tests' key (project default) owns a file and a finished job; a key of another project
    and an admin key."""
    from servicekit import Service

    svc = Service(tmp_path_factory.mktemp("service"), {"tiny-bert": tiny_model, "tiny-llama": tiny_llama}, slow_data)
    svc.start()
    data = write_jsonl(tmp_path_factory.mktemp("data") / "small.jsonl", make_rows(40, 5))
    file_id = svc.upload(data)
    job = svc.create(model="tiny-bert", training_file=file_id, seed=0, hyperparameters={"n_epochs": 1, "batch_size": 8},
                     config={"data": {"max_length": 32}, "eval": {"bootstrap": 0, "probe": False}})
    done = svc.wait(job["id"], ("succeeded", "failed"), 300)
    assert done["status"] == "succeeded", done["error"]
    _, other = keys.create(svc.home, "rival", "rival")
    _, admin = keys.create(svc.home, "root", "ops", admin=True)
    yield {"svc": svc, "file": file_id, "job": done["id"], "model": done["fine_tuned_model"], "other": other,
           "admin": admin, "results": done["result_files"][0]}
    svc.stop()


def routes(w: dict) -> list[tuple[str, str, dict | None]]:
    """Every route that names one object of the owner's project."""
    f, j, m = w["file"], w["job"], w["model"]
    return [("GET", f"/v1/files/{f}", None), ("GET", f"/v1/files/{f}/content", None),
            ("GET", f"/v1/fine_tuning/jobs/{j}", None), ("GET", f"/v1/fine_tuning/jobs/{j}/events", None),
            ("GET", f"/v1/fine_tuning/jobs/{j}/checkpoints", None), ("GET", f"/v1/fine_tuning/jobs/{j}/metrics", None),
            ("GET", f"/v1/models/{m}", None), ("GET", f"/v1/files/{w['results']}/content", None),
            ("POST", "/v1/classifications", {"model": m, "input": ["good great love"]}),
            ("POST", "/v1/chat/completions", {"model": m, "messages": [{"role": "user", "content": "hi"}]})]


@pytest.mark.service
def test_another_projects_objects_are_not_found_on_every_route_and_an_admin_sees_them(world):
    svc = world["svc"]
    for method, path, body in routes(world):
        owner = svc.request(method, path, body)
        other = svc.request(method, path, body, auth=world["other"])
        admin = svc.request(method, path, body, auth=world["admin"])
        # chat on a classifier is the owner's 400 ("use /v1/classifications"): still an answer about the object
        assert owner[0] in (200, 400) and admin[0] == owner[0], (path, owner, admin)
        assert other[0] == 404 and other[1]["error"]["code"] == "not_found", (path, other)
        missing = svc.request(method, path.replace(world["job"], "ftjob-0").replace(world["file"], "file-0"),
                              body and {**body, "model": "ft:tiny-bert:000000000000"}, auth=world["other"])
        assert missing[0] == 404  # the same answer as for an id that does not exist: nothing is disclosed

    # lists hold the caller's own objects only (an admin's every project's)
    for path, field, own in (("/v1/files", "id", world["file"]), ("/v1/fine_tuning/jobs", "id", world["job"]),
                             ("/v1/models", "id", world["model"])):
        assert own in [o[field] for o in svc.request("GET", path)[1]["data"]]
        assert own not in [o[field] for o in svc.request("GET", path, auth=world["other"])[1]["data"]]
        assert own in [o[field] for o in svc.request("GET", path, auth=world["admin"])[1]["data"]]
    assert "tiny-bert" in [o["id"] for o in svc.request("GET", "/v1/models", auth=world["other"])[1]["data"]]

    # another project can neither train on the file, start from the model, cancel the job nor delete the file
    status, out = svc.request("POST", "/v1/fine_tuning/jobs", {"model": "tiny-bert", "training_file": world["file"]},
                              auth=world["other"])
    assert status == 400 and "no uploaded fine-tune file" in out["error"]["message"]
    status, out = svc.request("POST", "/v1/fine_tuning/jobs", {"model": world["model"], "training_file": "file-0"},
                              auth=world["other"])
    assert status == 400 and "no succeeded job made the model" in out["error"]["message"]
    assert svc.request("POST", f"/v1/fine_tuning/jobs/{world['job']}/cancel", auth=world["other"])[0] == 404
    assert svc.request("DELETE", f"/v1/files/{world['file']}", auth=world["other"])[0] == 404
    assert svc.request("GET", f"/v1/files/{world['file']}")[0] == 200  # still there


@pytest.mark.service
def test_only_an_admin_manages_projects_and_keys_and_reads_the_audit_log(world):
    svc = world["svc"]
    for key in (True, world["other"]):
        status, out = svc.request("GET", "/v1/organization/projects", auth=key)
        assert status == 403 and out["error"]["code"] == "insufficient_permissions"
    status, out = svc.request("POST", "/v1/organization/projects", {"name": "labs"}, auth=world["admin"])
    assert status == 200 and out["name"] == "labs"
    names = [p["name"] for p in svc.request("GET", "/v1/organization/projects", auth=world["admin"])[1]["data"]]
    assert {"default", "rival", "ops", "labs"} <= set(names)

    status, made = svc.request("POST", f"/v1/organization/projects/{out['id']}/api_keys", {"name": "ci"},
                               auth=world["admin"])
    assert status == 200 and made["value"].startswith("tl-") and made["role"] == "member"
    assert svc.request("GET", "/v1/files", auth=made["value"])[1]["data"] == []  # a new project: nothing of others'
    listed = svc.request("GET", f"/v1/organization/projects/{out['id']}/api_keys", auth=world["admin"])[1]["data"]
    assert [k["id"] for k in listed] == [made["id"]] and "value" not in listed[0]
    assert svc.request("DELETE", f"/v1/organization/projects/{out['id']}/api_keys/{made['id']}",
                       auth=world["admin"])[0] == 200
    assert svc.request("GET", "/v1/files", auth=made["value"])[0] == 401  # revoked at once

    status, log = svc.request("GET", "/v1/organization/audit_logs?limit=100", auth=world["admin"])
    assert status == 200
    done = {(e["type"], e["object_id"]) for e in log["data"]}
    assert {("file.created", world["file"]), ("fine_tuning.job.created", world["job"]),
            ("api_key.created", made["id"]), ("api_key.deleted", made["id"])} <= done
    created = next(e for e in log["data"] if e["object_id"] == world["job"])
    assert created["actor"]["api_key"]["id"] == svc.key_id and created["project"]["id"] == "proj-default"
    text = json.dumps(log)
    assert svc.key not in text and made["value"] not in text and world["admin"] not in text  # never a key


def test_a_home_from_before_projects_opens_with_everything_in_default(tmp_path):
    """A database as the previous version left it (no projects, user_version 0) migrates on open."""
    home = tmp_path / "home"
    key_id, key = keys.create(home, "old")
    con = db.connect(home)
    con.execute("INSERT INTO files (id, filename, bytes, created_at, purpose, path, format, records) "
                "VALUES ('file-1', 'a.jsonl', 3, 0, 'fine-tune', 'file-1.jsonl', 'jsonl', 1)")
    db._local.connections.clear()
    con.close()
    old = sqlite3.connect(home / "tunelab.db")  # back to the previous version's shape
    old.executescript("DROP INDEX jobs_project; DROP INDEX files_project; DROP TABLE projects; DROP TABLE audit;"
                      "PRAGMA user_version = 0;")
    for table in ("keys", "files", "jobs"):
        old.execute(f"ALTER TABLE {table} DROP COLUMN project")
    old.execute("ALTER TABLE keys DROP COLUMN admin")
    old.commit()
    old.close()

    con = db.connect(home)
    assert con.execute("PRAGMA user_version").fetchone()[0] == db.VERSION
    assert [dict(r) for r in con.execute("SELECT id, name FROM projects")] == [{"id": "proj-default",
                                                                                "name": "default"}]
    assert con.execute("SELECT project FROM files WHERE id = 'file-1'").fetchone()[0] == "proj-default"
    caller = keys.verify(home, key)
    assert (caller.key_id, caller.project, caller.admin) == (key_id, "proj-default", False)
    db._local.connections.clear()


@pytest.mark.service
def test_quotas_refuse_past_their_limit_and_say_which(world, tmp_path):
    svc, admin, other = world["svc"], world["admin"], world["other"]
    rival = next(p for p in svc.request("GET", "/v1/organization/projects", auth=admin)[1]["data"]
                 if p["name"] == "rival")
    small = write_jsonl(tmp_path / "small.jsonl", make_rows(40, 6))

    def upload(key):
        with open(small, "rb") as f:
            body = f.read()
        boundary = "x" * 16
        data = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n--{boundary}\r\n"
                f"Content-Disposition: form-data; name=\"file\"; filename=\"small.jsonl\"\r\n\r\n").encode() + body + \
            f"\r\n--{boundary}--\r\n".encode()
        return svc.request("POST", "/v1/files", auth=key, data=data,
                           headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})

    status, first = upload(other)
    assert status == 200, first
    status, out = svc.request("POST", f"/v1/organization/projects/{rival['id']}/quotas",
                              {"file_bytes": first["bytes"] + 10, "queued_jobs": 0}, auth=admin)
    assert status == 200 and out["quotas"] == {"running_jobs": None, "queued_jobs": 0,
                                               "file_bytes": first["bytes"] + 10}
    assert out["usage"]["file_bytes"] == first["bytes"]
    status, out = upload(other)
    assert status == 409 and out["error"]["param"] == "file_bytes" and "quota" in out["error"]["message"]
    assert [f["id"] for f in svc.request("GET", "/v1/files", auth=other)[1]["data"]] == [first["id"]]  # none kept
    job = {"model": "tiny-bert", "training_file": first["id"], "hyperparameters": {"n_epochs": 1},
           "config": {"data": {"max_length": 32}, "eval": {"bootstrap": 0, "probe": False}}}
    status, out = svc.request("POST", "/v1/fine_tuning/jobs", job, auth=other)
    assert status == 429 and out["error"]["param"] == "queued_jobs" and out["error"]["code"] == "quota_exceeded"
    assert svc.request("POST", "/v1/fine_tuning/jobs", job)[0] == 400  # (the owner's project has no such file)

    # running jobs: a job past the quota waits in the queue until the quota allows it
    svc.request("POST", f"/v1/organization/projects/{rival['id']}/quotas", {"queued_jobs": None, "running_jobs": 0},
                auth=admin)
    status, queued = svc.request("POST", "/v1/fine_tuning/jobs", job, auth=other)
    assert status == 200, queued
    import time

    time.sleep(4)  # the idle worker looks for work every second
    assert svc.request("GET", f"/v1/fine_tuning/jobs/{queued['id']}", auth=other)[1]["status"] == "queued"
    svc.request("POST", f"/v1/organization/projects/{rival['id']}/quotas", {"running_jobs": 1}, auth=admin)
    from servicekit import wait_until

    wait_until(lambda: svc.request("GET", f"/v1/fine_tuning/jobs/{queued['id']}", auth=other)[1]["status"]
               in ("running", "succeeded"), 60, "the job never started once its quota allowed it")

    # the finished job's result file is its project's, like the job
    wait_until(lambda: svc.request("GET", f"/v1/fine_tuning/jobs/{queued['id']}", auth=other)[1]["status"]
               == "succeeded", 120, "the job did not succeed")
    results = svc.request("GET", f"/v1/fine_tuning/jobs/{queued['id']}", auth=other)[1]["result_files"][0]
    assert svc.request("GET", f"/v1/files/{results}/content", auth=other)[0] == 200
    assert svc.request("GET", f"/v1/files/{results}/content")[0] == 404


def test_the_rate_limit_is_a_token_bucket_per_key():
    from tunelab.serve.limits import RateLimit

    limit = RateLimit(60)  # one a second, bursts of 6
    assert [limit.take("a", at=100.0) for _ in range(6)] == [0.0] * 6
    assert limit.take("a", at=100.0) == pytest.approx(1.0)  # empty: a token comes back in a second
    assert limit.take("b", at=100.0) == 0.0  # another key has its own bucket
    assert limit.take("a", at=101.5) == 0.0 and limit.take("a", at=101.5) == pytest.approx(0.5)


@pytest.mark.service
def test_past_the_rate_limit_a_key_gets_429_with_retry_after(make_service):
    import urllib.error
    import urllib.request

    svc = make_service(workers=0, args=("--rate-limit", "60"))
    codes, retry = [], None
    for _ in range(10):
        req = urllib.request.Request(svc.url + "/v1/files", headers={"Authorization": f"Bearer {svc.key}"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                codes.append(r.status)
        except urllib.error.HTTPError as e:
            codes.append(e.code)
            retry = e.headers.get("Retry-After")
            body = json.loads(e.read())
    assert codes[:6] == [200] * 6 and 429 in codes[6:]
    assert retry is not None and int(retry) >= 1 and body["error"]["code"] == "rate_limit_exceeded"
    assert svc.request("GET", "/health", auth=False)[0] == 200  # (not counted)


def test_a_new_job_validates_every_projects_pending_jobs_not_only_its_own(tmp_path):
    """The validation a job creation sets off runs as the service: another project's pending job (whose file the
    creating key cannot see) is validated, not failed for a 'deleted' file."""
    from tunelab.serve import access, files, jobs

    home = tmp_path / "home"
    db.connect(home)
    others = access.Caller("key-b", keys.ensure_project(home, "b")["id"])
    token = access.CALLER.set(others)
    try:
        data = "".join(json.dumps(r) + "\n" for r in make_rows(20, 1)).encode()
        file_id = files.store(home, data, "b.jsonl", "fine-tune")["id"]
        db.connect(home).execute(
            "INSERT INTO jobs (id, seq, created_at, model, training_file, request, task, tuning, hyperparameters, "
            "method, seed, status, project) VALUES ('ftjob-b', 1, 0, 'tiny', ?, '{}', 'classification', 'full', "
            "'{}', ?, 0, 'validating_files', ?)", (file_id, '{"type": "supervised"}', others.project))
    finally:
        access.CALLER.reset(token)
    token = access.CALLER.set(access.Caller("key-a", "proj-default"))  # a request of another project
    try:
        jobs.validate_pending(home)
    finally:
        access.CALLER.reset(token)
    assert jobs.get(home, "ftjob-b")["status"] == "queued"
    db._local.connections.clear()
