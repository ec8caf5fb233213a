"""Where the service keeps what every host that runs its workers must reach: the uploaded files and the jobs'
folders (run folders with their checkpoints, logs). By default inside the service's home; `--storage DIR` (or
TUNELAB_STORAGE, which the server passes to the workers it starts) puts them in DIR — a shared mount, NFS or any
volume every host mounts at the same path — while the home keeps what is each host's own (locks, logs of the
processes). Every path of a file or a job folder comes from here, so that another store can take its place
without touching the jobs."""
from __future__ import annotations

import os
from pathlib import Path

ENV = "TUNELAB_STORAGE"


def root(home: Path) -> Path:
    return Path(os.environ.get(ENV) or home)


def files_dir(home: Path) -> Path:
    """The uploaded files (and their unpacked archives)."""
    return root(home) / "files"


def job_dir(home: Path, job_id: str) -> Path:
    """A job's folder: its run folder (`run/`) and its training log."""
    return root(home) / "jobs" / job_id
