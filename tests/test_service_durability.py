"""The service under SIGKILL: no job stays running, interrupted jobs resume from their checkpoint (an attempt
counted when their worker died, none when the whole server did) or fail with worker_lost after 3, each step's
metric event is written once however often a job resumes, no two workers run one job, cancel stops training in
seconds, and a job past the service's time limit fails with time_limit_exceeded and keeps its checkpoints."""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import time

import pytest

from conftest import make_rows, write_jsonl
from servicekit import wait_until

from tunelab.serve import jobs
from tunelab.serve.db import connect

pytestmark = pytest.mark.service


def _checkpointed(svc, job_id: str) -> bool:
    return any(e["message"].startswith("Checkpoint saved") for e in svc.events(job_id))


def _integrity(svc) -> str:
    return sqlite3.connect(svc.home / "tunelab.db").execute("PRAGMA integrity_check").fetchone()[0]


def _steps_once(svc, job_id: str, epochs: int = 3) -> None:
    """The finished run's history has every step exactly once (a resume rewinds to its checkpoint)."""
    history = [json.loads(line) for line in (jobs.run_dir(svc.home, job_id) / "history.jsonl").read_text()
               .splitlines()]
    steps = [r["step"] for r in history if "loss" in r]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) == epochs * 135  # 270 train rows, batch 2
    events = [e["data"]["step"] for e in svc.events(job_id) if e["type"] == "metrics" and "train_loss" in e["data"]]
    assert sorted(events) == steps  # one event per step: the steps an attempt redid after its resume are not
    # reported again (before the fix, every step between the checkpoint and the kill came twice)


def test_worker_killed_mid_training_resumes_from_its_checkpoint(make_service):
    svc = make_service()
    job_id = svc.slow_job(epochs=3)  # killed after the first epoch's checkpoint, two more to resume into
    wait_until(lambda: _checkpointed(svc, job_id), 240, lambda: svc.tail(job_id))
    assert svc.job(job_id)["estimated_finish"] > time.time()
    [worker] = svc.worker_pids()
    os.kill(worker, signal.SIGKILL)
    wait_until(lambda: not svc.training_pids(job_id), 10, "the training process outlived its worker")
    done = svc.wait(job_id, ("succeeded", "failed"), 300)
    assert done["status"] == "succeeded" and done["attempts"] == 2, done
    messages = [(e["level"], e["message"]) for e in svc.events(job_id)]
    assert any(level == "warn" and "worker running this job stopped" in m and "attempt 1 of 3" in m
               for level, m in messages)
    assert any(m.startswith("Resuming from the checkpoint at step ") for _, m in messages)
    _steps_once(svc, job_id)
    assert _integrity(svc) == "ok"


def test_whole_server_killed_then_restarted_leaves_no_job_running(make_service):
    svc = make_service()
    job_id = svc.slow_job(epochs=3)
    waiting = svc.create(model="tiny-bert", training_file=svc.upload(svc.slow_data), hyperparameters={"n_epochs": 1})
    wait_until(lambda: _checkpointed(svc, job_id), 240, lambda: svc.tail(job_id))
    svc.kill()
    assert not svc.worker_pids() and not svc.training_pids()
    assert _integrity(svc) == "ok"
    stale = sqlite3.connect(svc.home / "tunelab.db").execute("SELECT status FROM jobs WHERE id = ?",
                                                             (job_id,)).fetchone()[0]
    assert stale == "running"  # what the kill left behind; the restart must not leave it so
    svc.start()
    wait_until(lambda: svc.job(job_id)["status"] != "running" or svc.job(job_id)["started_at"] and any(
        "service stopped while this job ran" in e["message"] for e in svc.events(job_id)), 90,
        "the restarted server did not take the job back")
    done = svc.wait(job_id, ("succeeded", "failed"), 300)
    # the kill was the server's, not the job's: the job keeps all 3 of its attempts (before the fix: 2 used)
    assert done["status"] == "succeeded" and done["attempts"] == 1, done
    assert any(e["level"] == "warn" and "no attempt counted" in e["message"] for e in svc.events(job_id))
    _steps_once(svc, job_id)
    assert svc.wait(waiting["id"], ("succeeded", "failed"), 240)["status"] == "succeeded"
    assert _integrity(svc) == "ok"


def test_a_job_whose_worker_dies_three_times_fails_with_worker_lost(make_service):
    svc = make_service()
    job_id = svc.slow_job()
    for attempt in (1, 2, 3):
        wait_until(lambda: svc.job(job_id)["attempts"] == attempt and svc.training_pids(job_id), 180,
                   lambda: f"attempt {attempt} never started: {svc.job(job_id)}")
        for pid in svc.worker_pids():
            os.kill(pid, signal.SIGKILL)
    failed = svc.wait(job_id, ("failed", "succeeded"), 90)
    assert failed["status"] == "failed" and failed["attempts"] == 3
    assert failed["error"]["code"] == "worker_lost" and failed["finished_at"]
    warns = [e for e in svc.events(job_id) if e["level"] == "warn"]
    assert len(warns) == 2
    assert _integrity(svc) == "ok"


def test_cancel_stops_a_running_job_within_seconds(make_service):
    svc = make_service()
    job_id = svc.slow_job()
    history = jobs.run_dir(svc.home, job_id) / "history.jsonl"
    wait_until(lambda: history.is_file() and history.stat().st_size > 2000, 240, lambda: svc.tail(job_id))
    tic = time.monotonic()
    job = svc.client().fine_tuning.jobs.cancel(job_id)
    took = time.monotonic() - tic
    assert job.status == "cancelled" and took < 5, (job.status, took)
    assert not svc.training_pids(job_id)
    size = history.stat().st_size
    time.sleep(2)
    assert history.stat().st_size == size  # nothing trains any more
    assert any("cancelled at step" in e["message"] for e in svc.events(job_id))
    assert svc.job(job_id)["fine_tuned_model"] is None


def _claim_all(home: str, worker: str, start, out) -> None:
    start.wait()
    got = []
    while (job := jobs.claim(home, worker)) is not None:
        got.append(job["id"])
    out.put(got)


def test_concurrent_workers_never_claim_the_same_job(tmp_path):
    con = connect(tmp_path)
    for i in range(40):
        con.execute("INSERT INTO jobs (id, seq, created_at, model, training_file, request, task, tuning, "
                    "hyperparameters, method, seed, status) VALUES (?, ?, 0, 'm', 'f', '{}', 'classification', "
                    "'full', '{}', '{}', 0, 'queued')", (f"ftjob-{i}", i + 1))
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(str(tmp_path), f"wrk-{i}", start, out)) for i in range(6)]
    for p in procs:
        p.start()
    start.set()
    claimed = [job for _ in procs for job in out.get(timeout=60)]
    for p in procs:
        p.join(30)
    assert sorted(claimed) == sorted(f"ftjob-{i}" for i in range(40))  # each exactly once
    rows = con.execute("SELECT attempts, status FROM jobs").fetchall()
    assert {tuple(r) for r in rows} == {(1, "running")}


def test_several_workers_share_the_queue_one_job_each(make_service, tmp_path):
    svc = make_service(workers=3)
    file_id = svc.upload(write_jsonl(tmp_path / "small.jsonl", make_rows(120, 7)))
    ids = [svc.create(model="tiny-bert", training_file=file_id, hyperparameters={"n_epochs": 2, "batch_size": 8},
                      config={"eval": {"bootstrap": 0, "probe": False}})["id"] for _ in range(4)]
    most = 0
    while any(svc.job(i)["status"] not in ("succeeded", "failed") for i in ids):
        most = max([most] + [len(svc.training_pids(i)) for i in ids])
        time.sleep(0.3)
    assert most == 1
    workers = set()
    for job_id in ids:
        job = svc.job(job_id)
        assert job["status"] == "succeeded" and job["attempts"] == 1, job
        started = [e for e in svc.events(job_id) if e["message"].startswith("Fine-tuning job started")]
        assert len(started) == 1
        workers.add(connect(svc.home).execute("SELECT worker_id FROM jobs WHERE id = ?", (job_id,)).fetchone()[0])
    assert len(workers) >= 2  # the queue was shared out


def test_a_stopped_server_gives_its_job_back_without_counting_an_attempt(make_service):
    svc = make_service()
    job_id = svc.slow_job()
    wait_until(lambda: _checkpointed(svc, job_id), 240, lambda: svc.tail(job_id))
    svc.stop()  # SIGTERM: uvicorn shuts down and terminates its workers, which put their job back
    row = connect(svc.home).execute("SELECT status, attempts, worker_id FROM jobs WHERE id = ?", (job_id,)).fetchone()
    assert tuple(row) == ("queued", 0, None)
    assert not svc.training_pids(job_id)
    svc.start()
    wait_until(lambda: svc.job(job_id)["status"] == "running", 90, "the job did not start again")
    assert svc.job(job_id)["attempts"] == 1
    assert any("worker was stopped" in e["message"] and e["level"] == "warn" for e in svc.events(job_id))


def test_a_job_past_the_time_limit_fails_and_keeps_its_checkpoints(make_service):
    # 25 s: the job would train for a minute or more (40 epochs of 135 steps: 12 took 21 s on a fast day, so 12
    # could finish within the limit), and its first checkpoints come even when the machine is busy (starting the
    # training process took up to 12 s with two test workers and a build beside them)
    svc = make_service(args=("--max-job-hours", str(25 / 3600)))
    job_id = svc.create(model="tiny-bert", training_file=svc.upload(svc.slow_data), seed=0,
                        hyperparameters={"n_epochs": 40, "batch_size": 2},
                        config={"data": {"max_length": 32}, "train": {"checkpoint_every": 10},
                                "eval": {"bootstrap": 0, "probe": False}})["id"]
    failed = svc.wait(job_id, ("failed", "succeeded"), 120)
    assert failed["status"] == "failed" and failed["error"]["code"] == "time_limit_exceeded", failed
    assert "longer than the service's limit" in failed["error"]["message"]
    assert failed["finished_at"] - failed["started_at"] < 60
    assert not svc.training_pids(job_id)
    kept = svc.request("GET", f"/v1/fine_tuning/jobs/{job_id}/checkpoints")[1]["data"]
    # the last checkpoints (every 10 steps and at epoch ends) stay, for a look or a resume; training did not finish.
    # The service keeps 3, plus the one being written when the stop came (the kill can fall before the pruning).
    assert 1 <= len(kept) <= 4 and max(c["step_number"] for c in kept) < 40 * 135, kept


def test_a_job_is_forgiven_a_dead_server_three_times_then_counted(tmp_path):
    """A job whose worker died with its server is queued again at no cost, but only 3 times: a job that takes its
    whole host down each time must still end."""
    con = connect(tmp_path)
    con.execute("INSERT INTO jobs (id, seq, created_at, model, training_file, request, task, tuning, "
                "hyperparameters, method, seed, status) VALUES ('ftjob-x', 1, 0, 'm', 'f', '{}', 'classification', "
                "'full', '{}', '{}', 0, 'queued')")
    for round in range(5):
        worker = f"wrk-{round}"  # a worker of a server that is gone: neither holds its lock
        con.execute("INSERT INTO workers (id, pid, started_at, server_id) VALUES (?, 1, 0, 'srv-gone')", (worker,))
        assert jobs.claim(tmp_path, worker)["status"] == "running"
        jobs.reap(tmp_path)
        job = jobs.get(tmp_path, "ftjob-x")
        assert (job["status"], job["attempts"], job["free_restarts"]) == (
            ("queued", 0, round + 1) if round < 3 else ("queued", round - 2, 3)), (round, dict(job))


def test_a_worker_without_the_training_stack_starts_jobs_as_new_processes(monkeypatch, tmp_path, caplog):
    """Jobs are forked from a worker that imported the training stack (the tests above find them by the child's
    name); where that import fails, the worker says so and starts each job as `python -m tunelab` instead."""
    from tunelab.serve import worker

    monkeypatch.setattr(worker, "PRELOAD", ("tunelab.cli", "no_such_module_xyz"))
    monkeypatch.setattr(worker.Preloaded, "done", False)
    worker.Preloaded.load()
    assert not worker.Preloaded.done and "jobs start as new processes" in caplog.text
    child = worker.start(["data", "check", str(tmp_path / "missing.jsonl")], tmp_path / "train.log")
    assert isinstance(child, subprocess.Popen) and child.wait(120) == 2
    assert "missing.jsonl" in (tmp_path / "train.log").read_text()
