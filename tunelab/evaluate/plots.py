"""PNG plots of a run: the loss curve and the confusion matrix."""
from __future__ import annotations

import io
from pathlib import Path

from tunelab.io import atomic_write_bytes


def figure(size: tuple[float, float] = (6, 3.5)):
    """(fig, ax) on the headless Agg backend: plots are written on servers and in CI, never shown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=size)


def save_png(fig, path: Path) -> None:
    """Write the figure as a PNG atomically and free it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def loss_curve(history: list[dict], path: Path, title: str) -> None:
    fig, ax = figure()
    train = [h for h in history if "loss" in h]
    ax.plot([h["step"] for h in train], [h["loss"] for h in train], label="train loss", alpha=0.8)
    evals = [h for h in history if "eval_loss" in h]
    if evals:
        ax.plot([h["step"] for h in evals], [h["eval_loss"] for h in evals], "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy")
    ax.set_title(title)
    ax.legend()
    save_png(fig, path)


def confusion(matrix: list[list[int]], labels: list[str], path: Path, title: str) -> None:
    fig, ax = figure((1.2 * len(labels) + 2, 1.2 * len(labels) + 1.5))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", color="black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    save_png(fig, path)
