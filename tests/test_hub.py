"""Models by Hub name (tunelab.models.hub), offline from a real huggingface_hub cache built in the test: a
safetensors repository trains by name and by revision, a pickled one is refused unless allowed, and then it is read
with weights_only into a safetensors copy."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from conftest import hub_cache, make_rows, write_jsonl

COMMIT = "0123456789abcdef0123456789abcdef01234567"
# One interpreter for every case: huggingface_hub reads HF_HOME and HF_HUB_OFFLINE when it is imported.
SCRIPT = textwrap.dedent("""
    import json, sys
    from tunelab.cli import main
    common = sys.argv[2:]
    out = {}
    for case, model, *extra in json.loads(sys.argv[1]):
        out[case] = main(["train", "--model", model, *common, "--output", f"runs/{case}", *extra])
    out["list"] = main(["models", "list"])
    print(json.dumps(out))
""")


def test_hub_names_train_offline_from_the_cache_and_pickles_need_an_opt_in(tiny_model, tmp_path):
    from safetensors.torch import load_file

    files = {p.name: p.read_bytes() for p in Path(tiny_model).iterdir() if p.is_file()}
    hub_cache(tmp_path / "hf", "tunelab-test/tiny-bert", files, COMMIT)
    weights = load_file(Path(tiny_model) / "model.safetensors")
    pickled = {k: v for k, v in files.items() if not k.endswith(".safetensors")}
    buf = tmp_path / "weights.bin"
    torch.save(weights, buf)
    pickled["pytorch_model.bin"] = buf.read_bytes()
    hub_cache(tmp_path / "hf", "tunelab-test/pickled", pickled, COMMIT)

    cases = [["name", "tunelab-test/tiny-bert"], ["revision", f"tunelab-test/tiny-bert@{COMMIT}"],
             ["pickled", "tunelab-test/pickled"], ["allowed", "tunelab-test/pickled", "--model.allow_pickle", "true"],
             ["absent", "tunelab-test/not-cached"], ["bad revision", "tunelab-test/tiny-bert@v9"]]
    data = write_jsonl(tmp_path / "train.jsonl", make_rows(48, 1))
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TUNELAB_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(cases), "--train", str(data), "--epochs", "1",
                           "--max-length", "16", "--train.progress", "false", "--eval.bootstrap", "0",
                           "--eval.probe", "false"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    codes = json.loads(done.stdout.strip().splitlines()[-1])
    assert codes == {"name": 0, "revision": 0, "pickled": 2, "allowed": 0, "absent": 2, "bad revision": 2,
                     "list": 0}, done.stderr[-3000:]
    assert f"tunelab-test/tiny-bert Hugging Face cache: {COMMIT[:12]} (main)" in done.stdout
    assert "tunelab-test/pickled has no safetensors weights" in done.stderr and "--model.allow_pickle true" in \
        done.stderr
    assert "tunelab-test/not-cached is not in the Hugging Face cache on this machine" in done.stderr
    assert "Traceback" not in done.stderr

    config = (tmp_path / "runs" / "name" / "config.yaml").read_text()
    assert "name: tunelab-test/tiny-bert" in config  # the run names the model as the user did
    copy = tmp_path / "cache" / "hub" / "tunelab-test--pickled" / COMMIT
    converted = load_file(copy / "model.safetensors")
    assert converted.keys() == weights.keys() and all(torch.equal(converted[k], weights[k]) for k in weights)
    assert not list(copy.glob("*.bin"))  # the pickle is not kept beside the safetensors copy
