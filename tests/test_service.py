"""`tunelab serve` through the official `openai` client: files, jobs, events, checkpoints, models, inference;
keys and authentication; uploads that must be refused."""
from __future__ import annotations

import json
import math
import sqlite3
import subprocess
import sys

import openai
import pytest
import yaml
import forkrun
from conftest import digit_images, make_chat_rows, make_preference_rows, make_rows, write_folder, write_jsonl
from servicekit import wait_until


def test_openai_client_trains_a_classifier_and_calls_it(service, tmp_path):
    client = service.client()
    train = write_jsonl(tmp_path / "train.jsonl", make_rows(240, 1))
    valid = write_jsonl(tmp_path / "valid.jsonl", make_rows(60, 2))
    with open(train, "rb") as f:
        uploaded = client.files.create(file=f, purpose="fine-tune")
    assert (uploaded.filename, uploaded.purpose, uploaded.bytes) == ("train.jsonl", "fine-tune", train.stat().st_size)
    assert client.files.retrieve(uploaded.id).id == uploaded.id
    assert client.files.content(uploaded.id).read() == train.read_bytes()
    valid_id = service.upload(valid)

    # lr 80 × 5e-5: the tiny random BERT's validation accuracy after 4 epochs, seeds 0-7, ranged 0.72-1.0 (mean 0.91);
    # at 20 × it was 0.33-0.73 (mean 0.57), so a bar of 0.6 passed or failed by the seed
    job = client.fine_tuning.jobs.create(
        model="tiny-bert", training_file=uploaded.id, validation_file=valid_id, seed=3, suffix="toy",
        method={"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": 4, "batch_size": 16, "learning_rate_multiplier": 80}}},
        extra_body={"tuning": "full", "config": {"data": {"max_length": 32}}})
    assert job.status == "validating_files" and job.fine_tuned_model is None and job.finished_at is None
    assert job.hyperparameters.n_epochs == 4 and job.seed == 3
    seen = set()
    wait_until(lambda: seen.add(client.fine_tuning.jobs.retrieve(job.id).status) or
               client.fine_tuning.jobs.retrieve(job.id).status in ("succeeded", "failed"), 300,
               lambda: service.tail(job.id))
    done = client.fine_tuning.jobs.retrieve(job.id)
    assert done.status == "succeeded", done.error
    assert seen <= {"validating_files", "queued", "running", "succeeded"}
    assert done.fine_tuned_model.startswith("ft:tiny-bert:toy:") and done.finished_at >= done.created_at
    assert done.trained_tokens > 0 and len(done.result_files) == 1
    assert b"step" in client.files.content(done.result_files[0]).read().splitlines()[0]

    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    metrics = [e for e in events if e.type == "metrics" and "train_loss" in (e.data or {})]
    valid_events = [e for e in events if e.type == "metrics" and "valid_accuracy" in (e.data or {})]
    assert len(metrics) == 4 * 15 and len(valid_events) == 4
    assert metrics[0].data["total_steps"] == 60 and {e.level for e in events} == {"info"}
    first, last = valid_events[-1].data, valid_events[0].data  # newest first
    assert last["valid_loss"] < first["valid_loss"] and last["valid_accuracy"] > 0.6  # it learned

    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [60, 45, 30]  # one per epoch, the last 3 kept
    assert checkpoints[0].metrics.valid_loss == pytest.approx(last["valid_loss"])
    assert checkpoints[0].fine_tuned_model_checkpoint == done.fine_tuned_model + ":ckpt-step-60"

    assert done.fine_tuned_model in [m.id for m in client.models.list()]
    status, out = service.request("POST", "/v1/classifications",
                                  {"model": done.fine_tuned_model, "input": ["good great love", "awful sad hate"]})
    assert status == 200, out
    assert [d["label"] for d in out["data"]] == ["positive", "negative"]
    assert sum(out["data"][0]["probabilities"].values()) == pytest.approx(1, abs=1e-4)
    status, out = service.request("POST", "/v1/chat/completions", {"model": done.fine_tuned_model, "messages": [
        {"role": "user", "content": "hi"}]})
    assert status == 400 and "/v1/classifications" in out["error"]["message"]


def test_openai_client_chat_sft_then_completions_streamed_and_not(service, tmp_path):
    client = service.client()
    file_id = service.upload(write_jsonl(tmp_path / "chat.jsonl", make_chat_rows(96, 1)))
    job = client.fine_tuning.jobs.create(model="tiny-llama", training_file=file_id, seed=0,
                                         hyperparameters={"batch_size": 8},
                                         extra_body={"task": "chat", "config": {"data": {"max_length": 64},
                                                                                "train": {"lr": 1e-2}}})
    assert job.method.type == "supervised" and job.hyperparameters.n_epochs == "auto"
    done = service.wait(job.id, ("succeeded", "failed"), 300)
    assert done["status"] == "succeeded", done["error"]
    steps = [e["data"] for e in service.events(job.id) if e["type"] == "metrics" and "train_loss" in e["data"]]
    # "auto" epochs are full tuning's default (3), resolved when the job ran: the progress counts them
    assert steps[-1]["step"] == steps[-1]["total_steps"] and round(steps[-1]["epoch"]) == 3
    losses = [d["train_loss"] for d in steps]
    assert sum(losses[-3:]) < sum(losses[:3]) / 2  # the training loss fell
    samples = service.request("GET", f"/v1/fine_tuning/jobs/{job.id}/metrics")[1]["samples"]
    assert len(samples) == 3 and all(s["prompt"].startswith("name a") for s in samples)

    model = done["fine_tuned_model"]
    ask = [{"role": "user", "content": "name a color"}]
    answer = client.chat.completions.create(model=model, messages=ask, temperature=0, max_tokens=12)
    assert answer.choices[0].message.role == "assistant" and answer.usage.completion_tokens <= 12
    assert "blue" in answer.choices[0].message.content
    stream = client.chat.completions.create(model=model, messages=ask, temperature=0, max_tokens=12, stream=True)
    chunks = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len(chunks) > 2 and "".join(chunks).strip() == answer.choices[0].message.content
    for bad, param in (({"temperature": -1}, "temperature"), ({"n": 9}, "n"), ({"max_tokens": 0}, "max_tokens"),
                       ({"stop": [""]}, "stop.0"), ({"top_p": 0}, "top_p"),
                       ({"response_format": {"type": "json_object"}}, "response_format.type")):
        status, out = service.request("POST", "/v1/chat/completions", {"model": model, "messages": ask, **bad})
        assert status == 400 and out["error"]["param"] == param, (bad, out)

    # OpenAI's other sampling fields: stop strings, n answers, log-probabilities, usage streamed and not
    cut = client.chat.completions.create(model=model, messages=ask, temperature=0, max_tokens=12, stop=["u", "zz"])
    assert cut.choices[0].message.content == answer.choices[0].message.content.split("u")[0]
    assert cut.choices[0].finish_reason == "stop"
    many = client.chat.completions.create(model=model, messages=ask, temperature=1.0, max_tokens=6, n=3, seed=5,
                                          logprobs=True, top_logprobs=2)
    assert [c.index for c in many.choices] == [0, 1, 2]
    again = client.chat.completions.create(model=model, messages=ask, temperature=1.0, max_tokens=6, n=3, seed=5)
    assert [c.message.content for c in many.choices] == [c.message.content for c in again.choices]  # seeded
    assert many.usage.completion_tokens == again.usage.completion_tokens <= 18
    assert many.usage.total_tokens == many.usage.prompt_tokens + many.usage.completion_tokens
    scored = many.choices[0].logprobs.content
    assert scored and all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in scored)
    assert "".join(t.token for t in scored).strip() == many.choices[0].message.content
    assert again.choices[0].logprobs is None
    stream = client.chat.completions.create(model=model, messages=ask, temperature=1.0, max_tokens=6, n=3, seed=5,
                                            stream=True, stream_options={"include_usage": True})
    texts, used = ["", "", ""], None
    for c in stream:
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
        used = c.usage or used
    assert [t.strip() for t in texts] == [c.message.content for c in again.choices]
    assert used.completion_tokens == again.usage.completion_tokens
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="ft:nope:1", messages=ask)
    with pytest.raises(openai.BadRequestError, match="unknown role"):
        client.chat.completions.create(model=model, messages=[{"role": "robot", "content": "x"}])


def test_dpo_method_trains_the_dpo_task_with_its_beta(service, tmp_path):
    client = service.client()
    file_id = service.upload(write_jsonl(tmp_path / "pairs.jsonl", make_preference_rows(48, 1)))
    assert client.files.retrieve(file_id).to_dict()["format"] == "preference"
    job = client.fine_tuning.jobs.create(
        model="tiny-llama", training_file=file_id, seed=0,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 2, "batch_size": 8}}},
        extra_body={"config": {"train": {"lr": 1e-2}, "data": {"max_length": 64}}})
    done = service.wait(job.id, ("succeeded", "failed"), 300)
    assert done["status"] == "succeeded" and done["task"] == "dpo" and done["method"]["type"] == "dpo", done
    run = yaml.safe_load((service.home / "jobs" / job.id / "run" / "config.yaml").read_text())
    assert run["train"]["beta"] == 0.2 and run["train"]["epochs"] == 2 and run["task"] == "dpo"
    steps = [e["data"] for e in service.events(job.id) if e["type"] == "metrics" and "train_loss" in e["data"]]
    assert abs(steps[0]["train_loss"] - math.log(2)) < 1e-3  # policy = reference at the first step
    assert any(k.startswith("train_reward") for k in steps[0])
    status, out = service.request("POST", "/v1/fine_tuning/jobs", {
        "model": "tiny-llama", "training_file": file_id, "task": "chat", "method": {"type": "dpo"}})
    assert status == 400 and out["error"]["param"] == "task"


def test_jobs_list_pages_and_cancel_and_bad_requests(service, tmp_path):
    client = service.client()
    file_id = service.upload(service.slow_data)  # long enough that none ends before it is cancelled
    queued = [client.fine_tuning.jobs.create(model="tiny-bert", training_file=file_id,
                                             hyperparameters={"n_epochs": 5, "batch_size": 2}).id for _ in range(3)]
    for job_id in queued:
        assert client.fine_tuning.jobs.cancel(job_id).status in ("cancelled",)
    first = client.fine_tuning.jobs.list(limit=2)
    assert [j.id for j in first.data] == queued[::-1][:2] and first.has_more
    rest = client.fine_tuning.jobs.list(limit=2, after=first.data[-1].id)
    assert rest.data[0].id == queued[0]
    with pytest.raises(openai.ConflictError, match="already cancelled"):
        client.fine_tuning.jobs.cancel(queued[0])
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-nope")

    bad = [({"model": "gpt-9", "training_file": file_id}, "model", "unknown model"),
           ({"model": "tiny-bert", "training_file": "file-nope"}, "training_file", "no uploaded"),
           ({"model": "tiny-bert", "training_file": file_id, "hyperparameters": {"n_epochs": 0}},
            "hyperparameters.n_epochs", "between"),
           ({"model": "tiny-bert", "training_file": file_id, "method": {"type": "reinforcement"}}, "method.type", ""),
           ({"model": "tiny-bert", "training_file": file_id, "suffix": "a b"}, "suffix", ""),
           ({"model": "tiny-bert", "training_file": file_id, "tuning": "magic"}, "config", "tuning"),
           ({"model": "tiny-bert", "training_file": file_id, "config": {"data": {"train": "/etc/passwd"}}},
            "config", "set by the service")]
    for body, param, words in bad:
        status, out = service.request("POST", "/v1/fine_tuning/jobs", body)
        assert status == 400 and out["error"]["param"] == param and words in out["error"]["message"], (body, out)


def test_a_file_that_fails_its_task_fails_the_job_with_the_line(service, tmp_path):
    rows = make_rows(20, 5)
    rows[6] = {"text": "no label here"}
    file_id = service.upload(write_jsonl(tmp_path / "mixed.jsonl", [{"text": "x"}] + rows))  # looks like clm
    job = service.create(model="tiny-bert", training_file=file_id, task="classification")
    failed = service.wait(job["id"], "failed", 90)
    assert failed["error"]["code"] == "invalid_training_file" and failed["error"]["param"] == "training_file"
    assert failed["error"]["message"].startswith("mixed.jsonl:1:")  # named as uploaded, with the line
    assert failed["finished_at"] and failed["fine_tuned_model"] is None


def test_every_route_but_health_needs_a_valid_key(service):
    routes = [("GET", "/"), ("GET", "/v1/models"), ("GET", "/v1/files"), ("POST", "/v1/files"),
              ("GET", "/v1/fine_tuning/jobs"), ("POST", "/v1/fine_tuning/jobs"), ("POST", "/v1/chat/completions"),
              ("POST", "/v1/classifications"), ("GET", "/v1/fine_tuning/jobs/x/events"), ("GET", "/docs")]
    for method, path in routes:
        for key in (False, "tl-wrong", "not-even-the-prefix"):
            status, body = service.request(method, path, auth=key)
            assert status == 401, (method, path, key)
            if path == "/":
                assert 'data-testid="sign-in"' in body and "ftjob" not in body
            else:
                assert body["error"]["code"] == "invalid_api_key"
    assert service.request("GET", "/health", auth=False) == (200, {"status": "ok"})
    assert service.request("GET", "/v1/models")[0] == 200
    assert service.request("GET", "/", auth=False, headers={"Cookie": f"tunelab_key={service.key}"})[0] == 200
    assert service.request("GET", "/v1/models", auth=False, headers={"Cookie": f"tunelab_key={service.key}"})[0] == 401


def test_keys_are_shown_once_stored_hashed_never_logged_and_revocable(service):
    def cli(*args):
        return forkrun.run(["keys", *args, "--home", service.home])

    made = cli("create", "--name", "ci bot")
    assert made.returncode == 0
    key = made.stdout.strip().splitlines()[-1]
    key_id = made.stdout.split()[1]
    assert key.startswith("tl-") and len(key) > 40
    assert service.request("GET", "/v1/models", auth=key)[0] == 200
    listed = cli("list").stdout
    assert "ci bot" in listed and key_id in listed and key not in listed and key[:7] in listed
    raw = b"".join(p.read_bytes() for p in service.home.glob("tunelab.db*"))
    assert key.encode() not in raw and service.key.encode() not in raw
    assert cli("revoke", key_id).returncode == 0
    assert service.request("GET", "/v1/models", auth=key)[0] == 401
    again = cli("revoke", key_id)
    assert again.returncode == 2 and "already revoked" in again.stderr
    logs = b"".join(p.read_bytes() for p in service.home.rglob("*.log"))
    assert key.encode() not in logs and service.key.encode() not in logs


def _multipart(name: str, data: bytes, purpose: str = "fine-tune") -> tuple[bytes, str]:
    boundary = "tunelabboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n{purpose}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def test_upload_abuse_is_refused_and_names_never_become_paths(make_service, tmp_path):
    svc = make_service(max_upload_mb=0.05)
    good = write_jsonl(tmp_path / "ok.jsonl", make_rows(10, 1)).read_bytes()

    def upload(name, data, purpose="fine-tune"):
        body, kind = _multipart(name, data, purpose)
        return svc.request("POST", "/v1/files", data=body, headers={"Content-Type": kind})

    status, out = upload("../../../../tmp/evil.jsonl", good)
    assert status == 200 and out["filename"] == "evil.jsonl"
    stored = list((svc.home / "files").iterdir())
    assert [p.name for p in stored] == [out["id"] + ".jsonl"]  # the server's id, inside HOME/files
    assert not (svc.home.parent / "evil.jsonl").exists()
    for name in ("..", "a/../../b.jsonl", "..\\..\\c.jsonl", "/etc/passwd.jsonl"):
        status, out = upload(name, good)
        assert status in (200, 400) and "/" not in out.get("filename", "") and "\\" not in out.get("filename", "")
    assert all(p.parent == svc.home / "files" for p in (svc.home / "files").rglob("*"))

    big = good * 200  # > 0.05 MB
    status, out = upload("big.jsonl", big)
    assert status == 413 and out["error"]["code"] == "file_too_large"
    cases = [("model.exe", good, "unsupported file type"), ("bin.jsonl", b"\x00\x01\x02" * 10, "binary"),
             ("latin.jsonl", '{"text": "caf\xe9", "label": "a"}\n'.encode("latin-1"), "not UTF-8"),
             ("empty.jsonl", b"", "empty"),
             ("broken.jsonl", good + b'{"text": "x", "label": \n', "broken.jsonl:11: "),
             ("chat.jsonl", b'{"messages": [{"role": "robot", "content": "hi"}]}\n', "chat.jsonl:1: ")]
    for name, data, words in cases:
        status, out = upload(name, data)
        assert status == 400 and words in out["error"]["message"], (name, out)
    status, out = upload("ok.jsonl", good, purpose="assistants")
    assert status == 400 and "purpose" in out["error"]["message"]
    assert len(svc.request("GET", "/v1/files")[1]["data"]) == 4  # only the accepted ones were recorded
    assert not list((svc.home / "files").glob(".upload-*"))


@pytest.mark.parametrize("codec, reported", [("cp932", "cp932"), ("euc_jp", "euc_jp"), ("utf-16", "utf-16"),
                                             ("utf-8-sig", "utf-8")])
def test_japanese_and_utf16_uploads_are_detected_and_stored_as_utf8(codec, reported, service):
    """What Excel (Shift_JIS), older Unix tools (EUC-JP) and Windows (UTF-16, a UTF-8 byte-order mark) save is read
    as the CLI's --encoding auto reads it, and kept as UTF-8."""
    rows = [{"text": t, "label": lab} for t, lab in (("とても良い映画でした", "pos"), ("最悪の一日だった", "neg"),
                                                     ("素晴らしい体験", "pos"), ("二度と行かない", "neg"))]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    file = service.client().files.create(file=("ja.jsonl", text.encode(codec)), purpose="fine-tune")
    status, out = service.request("GET", f"/v1/files/{file.id}")
    assert status == 200 and out["encoding"] == reported and out["records"] == 4
    status, content = service.request("GET", f"/v1/files/{file.id}/content")
    assert content == text and out["bytes"] == len(text.encode("utf-8"))


def test_a_file_a_job_needs_cannot_be_deleted_until_the_job_ends(service, tmp_path):
    file_id = service.upload(write_jsonl(tmp_path / "d.jsonl", make_rows(30, 6)))
    job = service.create(model="tiny-bert", training_file=file_id, hyperparameters={"n_epochs": 1})
    status, out = service.request("DELETE", f"/v1/files/{file_id}")
    assert status == 409 and job["id"] in out["error"]["message"]
    service.request("POST", f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    service.wait(job["id"], "cancelled", 90)
    assert service.request("DELETE", f"/v1/files/{file_id}") == (200, {"id": file_id, "object": "file",
                                                                       "deleted": True})
    assert service.request("GET", f"/v1/files/{file_id}")[0] == 404


@pytest.mark.slow
def test_the_api_process_never_imports_the_training_loop(tmp_path):
    code = ("import sys; from tunelab.serve.app import create_app; import tunelab.serve.inference, "
            "tunelab.predict, tunelab.generate, tunelab.serve.server; create_app(sys.argv[1]); "
            "bad = [m for m in ('tunelab.loop', 'tunelab.pipeline') if m in sys.modules]; print(bad); "
            "sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_database_is_wal_and_sound(service):
    con = sqlite3.connect(service.home / "tunelab.db")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


# ---- images ------------------------------------------------------------------------------------------------------
def zip_of(folder, path, extra: dict | None = None):
    """A zip of `folder`'s files under their relative names (plus `extra` {name: bytes} entries)."""
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                z.write(f, f.relative_to(folder).as_posix())
        for name, data in (extra or {}).items():
            z.writestr(name, data)
    return path


def test_an_image_classifier_from_a_zip_trains_and_answers_base64_images(service, tmp_path):
    import base64
    import io

    train = zip_of(write_folder(tmp_path / "train" / "digits", digit_images(16, 0)), tmp_path / "digits.zip",
                   {"__MACOSX/._junk": b"x"})
    valid = zip_of(write_folder(tmp_path / "valid", digit_images(6, 100)), tmp_path / "valid.zip")
    client = service.client()
    with open(train, "rb") as f:
        uploaded = client.files.create(file=f, purpose="fine-tune")
    assert uploaded.records == 48 and uploaded.format == "image_folder"
    assert client.files.content(uploaded.id).read() == train.read_bytes()  # the archive, as it was sent
    job = client.fine_tuning.jobs.create(model="tiny-cnn", training_file=uploaded.id,
                                         validation_file=service.upload(valid), extra_body={"tuning": "head"})
    wait_until(lambda: client.fine_tuning.jobs.retrieve(job.id).status in ("succeeded", "failed"), 300,
               lambda: service.tail(job.id))
    done = client.fine_tuning.jobs.retrieve(job.id)
    assert done.status == "succeeded", done.error
    images = digit_images(2, 150)
    inputs = []
    for img, _ in images:
        buf = io.BytesIO()
        img.save(buf, "PNG")
        inputs.append({"image": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()})
    status, out = service.request("POST", "/v1/classifications", {"model": done.fine_tuned_model, "input": inputs})
    assert status == 200, out
    assert len(out["data"]) == 6 and {r["label"] for r in out["data"]} <= {"0", "1", "7"}
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-4 for r in out["data"])
    status, metrics = service.request("GET", f"/v1/fine_tuning/jobs/{job.id}/metrics")
    assert status == 200 and metrics["mistakes"].startswith("data:image/png;base64,")  # the dashboard's grid
    bad = [{"image": "data:image/png;base64," + base64.b64encode(b"not a png").decode()}]
    status, err = service.request("POST", "/v1/classifications", {"model": done.fine_tuned_model, "input": bad})
    assert status == 400 and err["error"]["param"] == "input[0]" and "not a readable image" in err["error"]["message"]
    status, err = service.request("POST", "/v1/classifications", {"model": done.fine_tuned_model, "input": ["text"]})
    assert status == 400 and "classifies images" in err["error"]["message"]


@pytest.mark.parametrize("attack", ["traversal", "absolute", "symlink", "bomb", "bad image", "table escape"])
def test_a_hostile_zip_is_refused_and_leaves_nothing_behind(attack, service, tmp_path):
    import stat
    import zipfile

    path = tmp_path / "x.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        img, _ = digit_images(1, 0)[0]
        import io

        buf = io.BytesIO()
        img.save(buf, "PNG")
        for c in ("a", "b"):
            z.writestr(f"{c}/ok.png", buf.getvalue())
        if attack == "traversal":
            z.writestr("a/../../evil.png", buf.getvalue())
        elif attack == "absolute":
            z.writestr("/tmp/evil.png", buf.getvalue())
        elif attack == "symlink":
            link = zipfile.ZipInfo("a/link.png")
            link.external_attr = (stat.S_IFLNK | 0o777) << 16
            z.writestr(link, "/etc/passwd")
        elif attack == "bomb":
            z.writestr("a/zeros.png", b"\0" * (64 << 20))  # 64 MiB of zeros deflate to ~64 KiB
        elif attack == "table escape":  # a table naming an image outside the archive: another upload's, say
            z.writestr("data.csv", "image,label\na/ok.png,a\n../../tunelab.db,b\n")
        else:
            z.writestr("b/broken.png", b"\x89PNG not really")
    before = sorted(p.name for p in (service.home / "files").iterdir()) if (service.home / "files").exists() else []
    body, kind = _multipart(path.name, path.read_bytes())
    status, err = service.request("POST", "/v1/files", data=body, headers={"Content-Type": kind})
    assert status == 400, err
    expected = {"traversal": "'..' part", "absolute": "absolute path", "symlink": "symbolic link",
                "bomb": "zip bomb", "bad image": "x.zip/b/broken.png", "table escape": "leads outside the archive"}[attack]
    assert expected in err["error"]["message"] or expected in (err["error"]["param"] or ""), err
    assert str(service.home) not in json.dumps(err)
    assert sorted(p.name for p in (service.home / "files").iterdir()) == before
    assert not (tmp_path.parent / "evil.png").exists()


def test_image_tasks_never_read_a_table_uploaded_on_its_own(service, tmp_path):
    """A CSV or JSONL of image paths uploaded alone would name files of the service (other uploads' images): image
    data comes only as a zip, whose paths were checked to stay inside it, and a job cannot point it elsewhere."""
    table = tmp_path / "t.jsonl"
    table.write_text('{"image": "../files/x/cat.png", "label": "cat"}\n{"image": "y.png", "label": "dog"}\n')
    body, kind = _multipart(table.name, table.read_bytes())
    task_field = b'--tunelabboundary\r\nContent-Disposition: form-data; name="task"\r\n\r\nimage-classification\r\n'
    status, err = service.request("POST", "/v1/files", data=task_field + body, headers={"Content-Type": kind})
    assert status == 400 and "upload them as a .zip" in err["error"]["message"], err
    text_id = service.upload(write_jsonl(tmp_path / "text.jsonl", make_rows(20, 1)))
    status, err = service.request("POST", "/v1/fine_tuning/jobs", {"model": "tiny-cnn", "training_file": text_id,
                                                                   "task": "image-classification"})
    assert status == 400 and "image tasks train on an uploaded .zip" in err["error"]["message"], err
    images = zip_of(write_folder(tmp_path / "pics", digit_images(4, 0)), tmp_path / "pics.zip")
    zip_id = service.upload(images)
    status, err = service.request("POST", "/v1/fine_tuning/jobs", {
        "model": "tiny-cnn", "training_file": zip_id, "config": {"data": {"image_column": "other"}}})
    assert status == 400 and "data.image_column" in err["error"]["message"], err
    status, err = service.request("POST", "/v1/fine_tuning/jobs", {"model": "tiny-bert", "training_file": zip_id,
                                                                   "task": "classification"})
    assert status == 400 and "it holds images" in err["error"]["message"], err


def test_scores_from_a_reward_model_and_sentence_pairs_to_a_classifier(service, tmp_path):
    """POST /v1/scores answers a reward model's score per prompt and response; /v1/classifications passes a
    sentence pair's second text to the model instead of dropping it."""
    prefs = service.upload(write_jsonl(tmp_path / "prefs.jsonl", make_preference_rows(48, 1)))
    reward = service.create(model="tiny-llama", training_file=prefs, task="reward", seed=0,
                            hyperparameters={"n_epochs": 4, "batch_size": 8, "learning_rate_multiplier": 100},
                            config={"eval": {"bootstrap": 0}})
    rows = [{**r, "text_pair": r["text"][::-1]} for r in make_rows(40, 7)]
    pairs = service.upload(write_jsonl(tmp_path / "pairs.jsonl", rows))
    classifier = service.create(model="tiny-bert", training_file=pairs, seed=0, hyperparameters={"n_epochs": 1},
                                config={"data": {"max_length": 32}, "eval": {"bootstrap": 0, "probe": False}})
    reward, classifier = (service.wait(j["id"], ("succeeded", "failed"), 300) for j in (reward, classifier))
    assert reward["status"] == classifier["status"] == "succeeded", (reward["error"], classifier["error"])

    body = {"model": reward["fine_tuned_model"], "input": [
        {"prompt": "name a fruit", "response": "a apple of course"},
        {"prompt": [{"role": "user", "content": "name a fruit"}], "response": "a cat of course"}]}
    status, out = service.request("POST", "/v1/scores", body)
    assert status == 200, out
    assert [d["index"] for d in out["data"]] == [0, 1] and out["data"][0]["score"] > out["data"][1]["score"]
    status, out = service.request("POST", "/v1/scores", {**body, "model": classifier["fine_tuned_model"]})
    assert status == 400 and "only reward models score responses" in out["error"]["message"]
    status, out = service.request("POST", "/v1/scores", {**body, "input": [{"prompt": "x"}]})
    assert status == 400 and out["error"]["param"] == "input.0.response"

    text = "good great love today"
    status, paired = service.request("POST", "/v1/classifications", {
        "model": classifier["fine_tuned_model"], "input": [{"text": text, "text_pair": "awful sad hate"}]})
    assert status == 200, paired
    single = service.request("POST", "/v1/classifications", {"model": classifier["fine_tuned_model"],
                                                             "input": [text]})[1]
    assert paired["data"][0]["probabilities"] != single["data"][0]["probabilities"]  # the pair reached the model
    status, out = service.request("POST", "/v1/classifications", {"model": classifier["fine_tuned_model"],
                                                                  "input": [{"text": text, "pair": "x"}]})
    assert status == 400


def test_checkpoint_models_answer_chat_completions_and_classifications(service, tmp_path):
    """`ft:…:ckpt-step-N`, as GET …/checkpoints names them, are callable as OpenAI's are: the checkpoint's own
    weights, exported once the way the run's model is."""
    data = service.upload(write_jsonl(tmp_path / "c.jsonl", make_rows(48, 8)))
    clf = service.create(model="tiny-bert", training_file=data, seed=0, hyperparameters={"n_epochs": 2},
                         config={"data": {"max_length": 32}, "eval": {"bootstrap": 0, "probe": False}})
    chats = service.upload(write_jsonl(tmp_path / "chat.jsonl", make_chat_rows(48, 8)))
    gen = service.create(model="tiny-llama", training_file=chats, seed=0, tuning="lora",
                         hyperparameters={"n_epochs": 2, "learning_rate_multiplier": 10})
    clf, gen = (service.wait(j["id"], ("succeeded", "failed"), 300) for j in (clf, gen))
    assert clf["status"] == gen["status"] == "succeeded", (clf["error"], gen["error"])

    def first_checkpoint(job):
        listed = service.request("GET", f"/v1/fine_tuning/jobs/{job['id']}/checkpoints")[1]["data"]
        return listed[-1]["fine_tuned_model_checkpoint"]  # newest first: the first epoch's is last

    early = first_checkpoint(clf)
    texts = ["good great love", "awful sad hate"]
    status, at_ckpt = service.request("POST", "/v1/classifications", {"model": early, "input": texts})
    assert status == 200, at_ckpt
    final = service.request("POST", "/v1/classifications", {"model": clf["fine_tuned_model"], "input": texts})[1]
    assert at_ckpt["data"][0]["probabilities"] != final["data"][0]["probabilities"]  # its own, earlier weights
    status, out = service.request("POST", "/v1/chat/completions", {"model": first_checkpoint(gen), "max_tokens": 4,
                                                                   "messages": [{"role": "user", "content": "name a color"}]})
    assert status == 200 and out["choices"][0]["message"]["role"] == "assistant", out
    for missing in (early.replace("ckpt-step-", "ckpt-step-9"), early.rsplit(":", 2)[0] + ":000000000000:ckpt-step-1"):
        assert service.request("POST", "/v1/classifications", {"model": missing, "input": texts})[0] == 404


@pytest.mark.parametrize("data", [b"\xff\xfea", b"\x00\xd8a\x00b\x00c\x00d\x00"])
def test_what_looks_like_utf16_but_is_not_is_a_400(data, service):
    status, out = service.request("POST", "/v1/files", data=(
        b"--b\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n--b\r\n"
        b"Content-Disposition: form-data; name=\"file\"; filename=\"x.jsonl\"\r\n\r\n" + data + b"\r\n--b--\r\n"),
        headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert status == 400 and "x.jsonl" in out["error"]["message"], out


def test_a_running_jobs_checkpoint_model_answers_while_it_trains(service):
    job_id = service.slow_job(epochs=6)
    service.wait(job_id, "running", 120)
    from servicekit import wait_until

    listed = []

    def has_checkpoint():
        listed[:] = service.request("GET", f"/v1/fine_tuning/jobs/{job_id}/checkpoints")[1]["data"]
        return bool(listed)
    wait_until(has_checkpoint, 120, "no checkpoint while the job ran")
    status, out = service.request("POST", "/v1/classifications", {
        "model": listed[-1]["fine_tuned_model_checkpoint"], "input": ["good great love"]})
    assert status == 200 and out["data"][0]["label"] in ("positive", "negative", "neutral"), out
    assert service.job(job_id)["status"] == "running"  # answered from the checkpoint, not the final model
    service.request("POST", f"/v1/fine_tuning/jobs/{job_id}/cancel")


def test_storage_holds_the_files_and_run_folders_apart_from_the_home(make_service, tmp_path):
    """--storage DIR: uploads and job folders go to DIR (a mount every worker host reaches); the home keeps the
    rest. The workers the server starts inherit it."""
    shared = tmp_path / "shared"
    svc = make_service(args=("--storage", str(shared)))
    file_id = svc.upload(write_jsonl(tmp_path / "s.jsonl", make_rows(30, 9)))
    job = svc.create(model="tiny-bert", training_file=file_id, seed=0, hyperparameters={"n_epochs": 1},
                     config={"data": {"max_length": 32}, "eval": {"bootstrap": 0, "probe": False}})
    done = svc.wait(job["id"], ("succeeded", "failed"), 300)
    assert done["status"] == "succeeded", done["error"]
    assert (shared / "files" / f"{file_id}.jsonl").is_file()
    assert (shared / "jobs" / job["id"] / "run" / "model" / "config.json").is_file()
    assert not (svc.home / "files").exists() and not (svc.home / "jobs").exists()
    assert svc.request("POST", "/v1/classifications", {"model": done["fine_tuned_model"], "input": ["good"]})[0] == 200
    assert svc.request("GET", f"/v1/files/{file_id}/content")[1].startswith('{"text"')
