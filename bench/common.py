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
