"""`tunelab data check` on a file with many bad records: this checkout against another (`--base`), each in its own
process, on the same file.

    python bench/check_speed.py [--lines 100000] [--bad 1000] [--rounds 3] [--base DIR] [--base-rounds 1]
    python bench/check_speed.py --base /work/wt-check-base   # a worktree of the commit before the one-pass reading

The file: a JSONL classification file of `--lines` records (3 classes, 4-14 words drawn from a made-up vocabulary
of 3,000 words), `--bad` of them bad and spread evenly through it, seven kinds in turn: broken JSON, a list instead
of an object, no text field, no label field, a list as the label, an empty label, a number as the text.

Measured per checkout, in a child process whose `tunelab` is that checkout's (PYTHONPATH): `check(FILE,
"classification", label_errors=False)` (what `tunelab data check --no-label-errors` runs: reading, duplicates,
labels, noise, token lengths) and, inside it, `read_all` (reading every record and listing the bad ones: the part
that re-read the file once per bad record before). Rounds run this checkout and the base in turn; the base's
rounds are capped by `--base-rounds` (its reading is quadratic in the bad records). Printed: every round, then
the medians and the ratios base / this, the machine and its load (a shared machine: other jobs move the figures),
and whether both checkouts found the same findings and examples (they must).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine  # bench/common.py, beside this script

HERE = Path(__file__).resolve().parents[1]  # this checkout
LABELS = ("negative", "neutral", "positive")
BAD = [  # (kind, the bad line for record i)
    ("broken JSON", lambda i: f'{{"text": "cut off {i}", "label": '),
    ("not an object", lambda i: f'["a list", {i}]'),
    ("no text", lambda i: json.dumps({"label": "neutral", "id": i})),
    ("no label", lambda i: json.dumps({"text": f"unlabelled {i}"})),
    ("label a list", lambda i: json.dumps({"text": f"listed {i}", "label": ["neutral"]})),
    ("empty label", lambda i: json.dumps({"text": f"blank {i}", "label": " "})),
    ("text a number", lambda i: json.dumps({"text": i, "label": "positive"})),
]


def write_file(path: Path, lines: int, bad: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    vocabulary = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(3, 9))) for _ in range(3000)]
    bad_at = {(k * lines) // bad + lines // (2 * bad): BAD[k % len(BAD)][1] for k in range(bad)}
    out = []
    for i in range(lines):
        if i in bad_at:
            out.append(bad_at[i](i))
        else:
            words = " ".join(rng.choices(vocabulary, k=rng.randint(4, 14)))
            out.append(json.dumps({"text": words, "label": LABELS[rng.randrange(3)]}))
    path.write_text("\n".join(out) + "\n", encoding="utf-8")


def child(path: Path) -> None:
    """Time check() and read_all() of the importable tunelab on `path`; print one JSON line."""
    import tunelab
    import tunelab.check as check_module

    spent = []
    read_all = check_module.read_all

    def timed_read_all(*args):
        tic = time.perf_counter()
        out = read_all(*args)
        spent.append(time.perf_counter() - tic)
        return out
    check_module.read_all = timed_read_all  # check() calls it by its module name
    tic = time.perf_counter()
    report = check_module.check(path, "classification", label_errors=False)
    total = time.perf_counter() - tic
    findings = [[f.level, f.code, f.lines, f.message] for f in report.findings]
    digest = hashlib.sha256(json.dumps([report.examples, findings]).encode()).hexdigest()[:16]
    print(json.dumps({"tunelab": str(Path(tunelab.__file__).parent), "read_all": spent[0], "check": total,
                      "examples": report.examples, "errors": sum(f.level == "error" for f in report.findings),
                      "digest": digest}))


def measure(repo: Path, path: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run([sys.executable, __file__, "--child", str(path)], env=env, capture_output=True, text=True,
                          cwd=repo)
    if done.returncode:
        raise SystemExit(f"{repo}: {done.stderr}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    if Path(figures["tunelab"]) != repo / "tunelab":
        raise SystemExit(f"{repo}: imported tunelab from {figures['tunelab']}, not this checkout")
    return figures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lines", type=int, default=100_000)
    p.add_argument("--bad", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=3, help="rounds of this checkout")
    p.add_argument("--base", type=Path, help="another checkout (e.g. a worktree of main) to compare with")
    p.add_argument("--base-rounds", type=int, default=1, help="rounds of the base (its reading is slow)")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child)
        return 0
    arms = {"this": HERE} | ({"base": args.base.resolve()} if args.base else {})
    figures: dict[str, list[dict]] = {name: [] for name in arms}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "many-bad.jsonl"
        write_file(path, args.lines, args.bad)
        load_before = os.getloadavg()
        for r in range(max(args.rounds, args.base_rounds)):
            for name, repo in arms.items():
                if r >= (args.base_rounds if name == "base" else args.rounds):
                    continue
                f = measure(repo, path)
                figures[name].append(f)
                print(f"round {r + 1} {name:5} read_all {f['read_all']:8.2f} s  check {f['check']:8.2f} s  "
                      f"{f['examples']} examples, {f['errors']} errors, findings {f['digest']}", flush=True)
        load_after = os.getloadavg()

    print(f"\nmachine: {machine()}; load average (1, 5, 15 min) before {load_before}, after {load_after}")
    print(f"{args.lines:,} lines, {args.bad:,} bad ({len(BAD)} kinds in turn); medians of "
          + ", ".join(f"{len(figures[n])} round(s) of {n} ({arms[n]})" for n in arms))
    medians = {n: {k: statistics.median(f[k] for f in figures[n]) for k in ("read_all", "check")} for n in arms}
    for name in arms:
        m = medians[name]
        ratio = (f"   base / this: read_all {medians['base']['read_all'] / m['read_all']:.1f}×, check "
                 f"{medians['base']['check'] / m['check']:.1f}×") if "base" in arms and name == "this" else ""
        print(f"{name:5} read_all {m['read_all']:8.2f} s  check {m['check']:8.2f} s{ratio}")
    if "base" in arms:
        same = {f["digest"] for fs in figures.values() for f in fs}
        print("same findings and examples in both: " + ("yes" if len(same) == 1 else f"NO ({sorted(same)})"))
        return 0 if len(same) == 1 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
