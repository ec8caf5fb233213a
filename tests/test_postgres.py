"""The service's state in a real PostgreSQL server (`--db`): workers that share nothing but the database and the
storage folder (each its own home) take jobs from one queue, each exactly once, and a worker that dies lets its
lease expire, after which another resumes the job from its checkpoint."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import make_rows, write_jsonl
from servicekit import Service, wait_until

pytestmark = pytest.mark.service

LEASE = 8  # seconds a job stays its worker's without a heartbeat (workers renew it every second while training)


@pytest.fixture
def cluster(postgres, tmp_path_factory, tiny_model, tiny_llama, slow_data, monkeypatch):
    """A server with no workers of its own, on a fresh database and a storage folder, and a way to start workers,
    each with its own home."""
    url = postgres.fresh()
    monkeypatch.setenv("TUNELAB_DB", url)  # (this process's key creation and lookups go there too)
    monkeypatch.setenv("TUNELAB_LEASE_SECONDS", str(LEASE))
    shared = tmp_path_factory.mktemp("shared")
    svc = Service(tmp_path_factory.mktemp("server"), {"tiny-bert": tiny_model, "tiny-llama": tiny_llama}, slow_data,
                  workers=0, args=("--db", url, "--storage", str(shared)))
    svc.start()
    workers: list[subprocess.Popen] = []

    def worker() -> subprocess.Popen:
        home = tmp_path_factory.mktemp("worker-home")
        proc = subprocess.Popen([sys.executable, "-m", "tunelab", "worker", "--home", str(home), "--db", url,
                                 "--storage", str(shared)], stdout=open(home / "worker.log", "ab"),
                                stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        workers.append(proc)
        return proc

    yield svc, worker, shared, postgres
    for proc in workers:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    svc.stop()


def _started(svc, job_id: str) -> int:
    return sum(1 for e in svc.events(job_id) if e["message"].startswith(("Fine-tuning job started",
                                                                          "Fine-tuning job restarted")))


def test_two_workers_with_their_own_homes_run_six_jobs_each_once(cluster, tmp_path):
    svc, worker, shared, _ = cluster
    worker(), worker()
    file_id = svc.upload(write_jsonl(tmp_path / "six.jsonl", make_rows(30, 4)))
    ids = [svc.create(model="tiny-bert", training_file=file_id, seed=i, hyperparameters={"n_epochs": 1},
                      config={"data": {"max_length": 32}, "eval": {"bootstrap": 0, "probe": False}})["id"]
           for i in range(6)]
    done = [svc.wait(j, ("succeeded", "failed"), 300) for j in ids]
    assert [d["status"] for d in done] == ["succeeded"] * 6, [d["error"] for d in done]
    assert [_started(svc, j) for j in ids] == [1] * 6 and [d["attempts"] for d in done] == [1] * 6
    import psycopg

    with psycopg.connect(os.environ["TUNELAB_DB"]) as con:
        ran_by = {row[0] for row in con.execute("SELECT worker_id FROM jobs")}
    assert len(ran_by) == 2  # both workers took jobs from the one queue
    assert all((shared / "jobs" / j / "run" / "model" / "config.json").is_file() for j in ids)
    assert svc.request("POST", "/v1/classifications", {"model": done[0]["fine_tuned_model"], "input": ["good"]})[0] \
        == 200


def test_a_dead_workers_lease_expires_and_another_worker_resumes_the_job(cluster):
    svc, worker, _, _ = cluster
    first = worker()
    job_id = svc.slow_job(epochs=3)
    wait_until(lambda: svc.request("GET", f"/v1/fine_tuning/jobs/{job_id}/checkpoints")[1]["data"], 240,
               "no checkpoint")
    first.send_signal(signal.SIGKILL)  # its training process dies with it (PR_SET_PDEATHSIG)
    first.wait()
    killed_at = time.monotonic()
    worker()
    done = svc.wait(job_id, ("succeeded", "failed"), 300)
    assert done["status"] == "succeeded" and done["attempts"] == 2, done
    messages = [e["message"] for e in svc.events(job_id)]
    assert any("worker running this job stopped" in m for m in messages)
    assert any(m.startswith("Resuming from the checkpoint at step ") for m in messages)
    assert time.monotonic() - killed_at >= LEASE - 1  # not before its lease ran out


def test_a_database_restarted_mid_job_loses_nothing(cluster):
    """The database server stops at once (every connection drops) while a job trains, and comes back: the server
    and the worker connect again and the job ends as if nothing happened, each step's metrics reported once."""
    svc, worker, _, postgres = cluster
    worker()
    job_id = svc.slow_job(epochs=3)
    wait_until(lambda: svc.request("GET", f"/v1/fine_tuning/jobs/{job_id}/checkpoints")[1]["data"], 240,
               "no checkpoint")
    postgres.restart()
    done = svc.wait(job_id, ("succeeded", "failed"), 300)
    assert done["status"] == "succeeded", done
    steps = [e["data"]["step"] for e in svc.events(job_id) if e["type"] == "metrics" and "train_loss" in e["data"]]
    assert len(steps) == len(set(steps)) and max(steps) == 3 * 135
    assert svc.request("GET", "/v1/files")[0] == 200
