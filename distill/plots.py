"""PNG plots people would rather look at than numbers (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display here; chosen at call time, not import time
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curves(histories: dict[str, list[dict]], path: str | Path,
                     title: str = "training loss") -> Path:
    """Training loss (solid) and validation loss (dots) per step, one colour per run."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, history) in enumerate(histories.items()):
        color = f"C{i}"
        steps = [h["step"] for h in history if "loss" in h]
        ax.plot(steps, [h["loss"] for h in history if "loss" in h], color=color, label=f"{name} train")
        val = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
        if val:
            ax.plot(*zip(*val), "o--", color=color, label=f"{name} val NTP")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
