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



MISTAKES = 16  # thumbnails in the grid of the most confident mistakes


def grid(rows: int, cols: int, size: float):
    """(fig, axes as a rows x cols array, axis lines off) on the headless Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * 1.1 * rows), squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    return fig, axes


def mistakes(task, outputs, items: list[dict], examples, space, path: Path, title: str) -> int:
    """A grid of the eval images the model got wrong with the highest confidence, each with its gold and
    predicted labels and the probability it gave: a person looks at these faster than at a table. Returns how many
    it shows (the PNG is written even with none, saying so)."""
    import torch

    preds = task.decode(outputs, items, space)
    wrong = []
    for i, (out, item, pred) in enumerate(zip(outputs, items, preds)):
        if pred == item["_gold"]:
            continue
        if task.outputs_are == "softmax":
            confidence = float(torch.softmax(out.float(), -1)[pred])
            said, gold = f"{space.labels[pred]} ({confidence:.0%})", space.labels[item["_gold"]]
        else:  # multilabel: ranked by its most confident decision
            confidence = float((torch.sigmoid(out.float()) - 0.5).abs().max()) + 0.5
            said = ", ".join(space.labels[j] for j in sorted(pred)) or "(none)"
            gold = ", ".join(space.labels[j] for j in sorted(item["_gold"])) or "(none)"
        wrong.append((confidence, i, gold, said))
    wrong.sort(key=lambda w: -w[0])
    shown = wrong[:MISTAKES]
    fig, axes = grid(max(1, -(-len(shown) // 4)), 4, 3.0)
    for ax, (_c, i, gold, said) in zip(axes.flat, shown):
        ax.imshow(examples[i].image)
        ax.set_title(f"true: {gold}\npredicted: {said}", fontsize=8, color="firebrick")
    fig.suptitle(f"{title}: the most confident mistakes ({len(shown)} of {len(wrong)})" if wrong
                 else f"{title}: no mistakes on the eval set")
    save_png(fig, path)
    return len(shown)


def augmented(items: list[dict], mean, std, path: Path, ops: str, views: int = 4) -> None:
    """Training images (rows) and augmented views of each (columns) as the model sees them, un-normalised back to
    pixels: what train.augment does to the data. Draws from its own seeded random state, leaving the run's as it
    was."""
    import torch

    mean, std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    fig, axes = grid(len(items), views + 1, 2.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for r, item in enumerate(items):
            axes[r][0].imshow(item["_image"])
            for c in range(1, views + 1):
                x = (item["_transform"](item["_image"]).float() * std + mean).clamp(0, 1)
                axes[r][c].imshow(x.permute(1, 2, 0).numpy())
    axes[0][0].set_title("original", fontsize=8)
    fig.suptitle(f"augment: {ops}")
    save_png(fig, path)
