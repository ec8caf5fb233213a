"""What every benchmark prints beside its figures: the machine they were measured on."""
from __future__ import annotations

import os
import platform
from pathlib import Path


def machine() -> str:
    import torch

    info = Path("/proc/cpuinfo")
    cpu = next((line.split(":", 1)[1].strip() for line in info.read_text().splitlines()
                if line.startswith("model name")), None) if info.exists() else None
    return (f"{cpu or platform.processor()}, {os.cpu_count()} logical CPUs, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}")


def gemm_peak(seconds: float = 1.0) -> float:
    """The best fp32 matrix-multiply rate (FLOP/s) of a few shapes, large and MiniLM-sized, on this machine now."""
    import time

    import torch

    best = 0.0
    for m, k, n in ((2048, 2048, 2048), (1024, 384, 1536), (1024, 1536, 384), (1024, 384, 384)):
        a, b = torch.randn(m, k), torch.randn(k, n)
        torch.mm(a, b)
        reps, tic = 0, time.perf_counter()
        while time.perf_counter() - tic < seconds:
            torch.mm(a, b)
            reps += 1
        best = max(best, 2 * m * k * n * reps / (time.perf_counter() - tic))
    return best
