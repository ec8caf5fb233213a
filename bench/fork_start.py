"""One `tunelab train` run started as a fresh interpreter and as `compare` starts it (a child of its forkserver),
interleaved, wall time of each: what forking saves (the imports), and a check that it costs no training speed.

    .venv/bin/python bench/fork_start.py [--config demo/compare/lora-frac-0.1.config.yaml] [--rounds 2]

The default config is one `make demo` writes. The first forked run includes the forkserver's own start (it imports
the training stack once); later ones do not.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tunelab import compare  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="demo/compare/lora-frac-0.1.config.yaml")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="fork-start-"))
    cfg = yaml.safe_load(Path(args.config).read_text(encoding="utf-8"))
    cfg["output"], cfg["overwrite"] = str(folder / "run"), True
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    for r in range(args.rounds):
        tic = time.perf_counter()
        subprocess.run([sys.executable, "-m", "tunelab", "train", str(path)], capture_output=True, check=True)
        fresh = time.perf_counter() - tic
        tic = time.perf_counter()
        child = compare._runs().Process(target=compare._train_process, args=(str(path), dict(os.environ), os.getcwd()))
        child.start()
        child.join()
        forked = time.perf_counter() - tic
        assert child.exitcode == 0, child.exitcode
        print(f"round {r}: fresh interpreter {fresh:.1f} s, forked {forked:.1f} s, forked/fresh {forked / fresh:.2f}",
              file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
