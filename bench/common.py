"""What the benchmarks share: the machine they were measured on, its GEMM peak, and making a recipe's runs."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

# First, before anything imports transformers: PyPI's torchvision beside the CPU torch imports only once tunelab has
# declared its operators (tunelab.vision_ops), and transformers' Trainer reaches torchvision through `datasets`.
import tunelab  # noqa: F401,E402


def machine() -> str:
    import torch

    info = Path("/proc/cpuinfo")
    cpu = next((line.split(":", 1)[1].strip() for line in info.read_text().splitlines()
                if line.startswith("model name")), None) if info.exists() else None
    return (f"{cpu or platform.processor()}, {os.cpu_count()} logical CPUs, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}")


def gemm_peak(seconds: float = 1.0) -> dict[str, float]:
    """The best fp32 matrix-multiply rate (FLOP/s) of a few shapes, large and MiniLM-sized, on this machine now, by
    library: "torch.mm" (PyTorch's default BLAS, MKL in the x86 wheels) and "oneDNN" (the fp32 linear inside
    PyTorch that tunelab uses on the CPU; absent from builds without it)."""
    import time

    import torch

    libraries = {"torch.mm": lambda a, b, bt: torch.mm(a, b)}
    if hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        libraries["oneDNN"] = lambda a, b, bt: torch.ops.mkldnn._linear_pointwise(a, bt, None, "none", [], "")
    best = {}
    for name, multiply in libraries.items():
        best[name] = 0.0
        for m, k, n in ((2048, 2048, 2048), (1024, 384, 1536), (1024, 1536, 384), (1024, 384, 384)):
            a, b = torch.randn(m, k), torch.randn(k, n)
            bt = b.t().contiguous()  # oneDNN's linear takes the weight as [out, in]
            multiply(a, b, bt)
            reps, tic = 0, time.perf_counter()
            while time.perf_counter() - tic < seconds:
                multiply(a, b, bt)
                reps += 1
            best[name] = max(best[name], 2 * m * k * n * reps / (time.perf_counter() - tic))
    return best


def make(folder: Path, recipe: list[tuple[str, str]]) -> None:
    """Run a recipe's tunelab commands into `folder`, skipping each step whose output (the path beside it) exists."""
    for made, command in recipe:
        if (folder / made).exists():
            print(f"have {folder / made}")
            continue
        args = command.format(d=folder).split()
        print("tunelab " + " ".join(args), flush=True)
        subprocess.run([sys.executable, "-m", "tunelab", *args], check=True)


def timed(fn, inputs: list, single: int) -> dict:
    """What an inference arm costs: `fn` over all `inputs` at once (items/s, after a warm-up), then `single`
    one-item requests (p50 and p95 latency, ms)."""
    import time

    fn(inputs[:4])  # warm-up
    tic = time.perf_counter()
    fn(inputs)
    throughput = len(inputs) / (time.perf_counter() - tic)
    latencies = []
    for item in inputs[:single]:
        tic = time.perf_counter()
        fn([item])
        latencies.append((time.perf_counter() - tic) * 1000)
    q = statistics.quantiles(latencies, n=20)
    return {"throughput": throughput, "p50": statistics.median(latencies), "p95": q[18]}


def compare_arms(arms: dict, inputs: list, baseline: str, rounds: int, single: int, unit: str, what: str) -> None:
    """Time inference arms ({name: fn(inputs) -> labels}) in `rounds` interleaved rounds (`timed`), then print
    their medians against the `baseline` arm's, with how often each arm's labels agree with the baseline's."""

    labels = {name: fn(inputs) for name, fn in arms.items()}
    reference = labels[baseline]
    width = max(len(name) for name in arms)
    load_before = os.getloadavg()[0]
    figures: dict[str, list[dict]] = {name: [] for name in arms}
    for r in range(rounds):
        for name, fn in arms.items():
            figures[name].append(timed(fn, inputs, single))
            f = figures[name][-1]
            print(f"round {r + 1} {name:{width}} {f['throughput']:7.1f} {unit}  p50 {f['p50']:6.2f} ms  p95 "
                  f"{f['p95']:6.2f} ms", flush=True)
    load_after = os.getloadavg()[0]

    print(f"\nmachine: {machine()}; load average before {load_before:.2f}, after {load_after:.2f}")
    print(f"{len(inputs)} {what}; medians of {rounds} interleaved rounds ({single} single requests each)")
    medians = {name: {k: statistics.median(f[k] for f in figures[name]) for k in ("throughput", "p50", "p95")}
               for name in arms}
    base = medians[baseline]
    print(f"{'':{width}} {unit:>7} {'p50 ms':>7} {'p95 ms':>7}  {'batch ×':>7} {'p50 ×':>6}  {'agrees':>7}")
    for name, m in medians.items():
        agree = sum(a == b for a, b in zip(labels[name], reference)) / len(reference)
        print(f"{name:{width}} {m['throughput']:7.1f} {m['p50']:7.2f} {m['p95']:7.2f}  "
              f"{m['throughput'] / base['throughput']:6.2f}× {m['p50'] / base['p50']:5.2f}×  {agree:7.2%}")


def inference_arguments(argv, doc: str, recipe: list[tuple[str, str]], single: int, what: str):
    """The inference benchmarks' command line: RUN, or --make DIR to make DIR/run by `recipe` first; --rounds;
    --single (one-`what` requests timed per round). Returns the parsed arguments with `run` set."""
    import argparse

    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("run", nargs="?", type=Path)
    p.add_argument("--make", type=Path, help="make DIR/run first (see above), then measure it")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--single", type=int, default=single, help=f"one-{what} requests timed per round")
    args = p.parse_args(argv)
    if args.make:
        make(args.make, recipe)
        args.run = args.make / "run"
    if not args.run:
        p.error("give RUN, or --make DIR")
    return args


def median(rows: list[dict], key: str) -> float:
    """The median of `key` over the rows that have a value for it (a target never reached is None); nan if none."""
    values = [x[key] for x in rows if x.get(key) is not None]
    return statistics.median(values) if values else float("nan")


def peak_rss_mb() -> float:
    """This process's own peak (VmHWM; ru_maxrss would include what the parent had: tunelab.pipeline._peak_rss_mb)."""
    from tunelab.pipeline import _peak_rss_mb

    return _peak_rss_mb()


def in_process(script: str, argv: list[str], what: str) -> dict:
    """Run `script argv...` in its own process (so that its peak RSS is its own) and return the JSON of the line it
    prints starting "RESULT "; without one, print the end of its output and stop, naming `what` failed."""
    done = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        print(done.stdout[-2000:], done.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"{what} failed")
    return json.loads(line[7:])


def options(args, leave_out: tuple[str, ...]) -> list[str]:
    """The parsed options again as command-line words (a true switch as its flag, a false one left out), but
    those in `leave_out`: to give a run in its own process the same settings."""
    words = []
    for key, value in vars(args).items():
        flag = "--" + key.replace("_", "-")
        if key in leave_out or value is False:
            continue
        words.append(flag if value is True else f"{flag}={value}")
    return words


def eval_every(every: int, measure):
    """A transformers TrainerCallback that records (training seconds, `measure(model)`) every `every` optimizer
    steps in `.curve`, the measuring kept off the training clock (`.paused` holds its seconds); `.every` may be set
    again before training (once the trainer has packed its dataset)."""
    from transformers import TrainerCallback

    class EvalEvery(TrainerCallback):
        def __init__(self):
            self.curve, self.paused, self.start, self.every = [], 0.0, 0.0, every

        def on_train_begin(self, args_, state, control, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, args_, state, control, model=None, **kw):
            if state.global_step % self.every == 0:
                tic = time.perf_counter()
                value = measure(model)
                self.curve.append((tic - self.start - self.paused, value))
                self.paused += time.perf_counter() - tic

    return EvalEvery()
