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
    return _save(fig, path, plt)


def plot_reliability(bins: dict[str, dict], path: str | Path, ece: dict[str, float] | None = None) -> Path:
    """Reliability diagram: accuracy vs mean confidence per confidence bin, one colour per
    model, the diagonal being perfect calibration; bins with no positions are left out.

    ``bins[name]`` holds equal-length lists ``confidence``, ``accuracy`` and ``count``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], color="0.5", linestyle="--", linewidth=1, label="perfect calibration")
    for i, (name, b) in enumerate(bins.items()):
        points = [(c, a) for c, a, n in zip(b["confidence"], b["accuracy"], b["count"]) if n > 0]
        label = name if not ece or name not in ece else f"{name} (ECE {ece[name]:.3f})"
        if points:
            ax.plot(*zip(*points), "o-", color=f"C{i}", label=label)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (max next-token probability)")
    ax.set_ylabel("accuracy (argmax = next token)")
    ax.set_title("calibration on the validation blocks")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path, plt)


def plot_gate_outcome(decision: dict, actual_student_loss: float, actual_teacher_loss: float,
                      path: str | Path, decision_map: str | Path | None = None) -> Path:
    """The gate's prediction against what happened: its decision map (when the PNG exists)
    beside the predicted loss of both branches, the chosen branch marked, and the actual
    student (and teacher) validation loss drawn over them."""
    plt = _pyplot()
    has_map = decision_map is not None and Path(decision_map).is_file()
    fig, axes = plt.subplots(1, 2 if has_map else 1, figsize=(13 if has_map else 6, 5.5),
                             gridspec_kw={"width_ratios": [1.6, 1]} if has_map else None)
    axes = list(axes) if has_map else [axes]
    if has_map:
        axes[0].imshow(plt.imread(str(decision_map)))
        axes[0].set_axis_off()
        axes[0].set_title("the gate's decision map (before training)", fontsize=10)
    ax = axes[-1]
    chosen = decision["decision"]
    branches = ["supervised", "distill"]
    # A branch the compute-limited budget cannot pay for has no predicted loss (None).
    predicted = [float("nan") if decision[b]["loss"] is None else decision[b]["loss"] for b in branches]
    colors = ["C2" if b == chosen else "0.7" for b in branches]
    ax.bar(branches, predicted, color=colors, alpha=0.8, label="predicted (gate)")
    for i, value in enumerate(predicted):
        if value != value:  # NaN
            ax.annotate("not feasible in the budget", (i, actual_student_loss), ha="center", fontsize=8)
    ax.plot([branches.index(chosen)], [actual_student_loss], marker="*", markersize=18,
            color="gold", markeredgecolor="k", linestyle="none",
            label=f"actual student ({chosen}): {actual_student_loss:.3f}")
    ax.axhline(actual_teacher_loss, color="C3", linestyle=":",
               label=f"actual teacher: {actual_teacher_loss:.3f}")
    gap = actual_student_loss - decision[chosen]["loss"]
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"gate chose {chosen}; actual − predicted = {gap:+.3f} nats\n"
                 f"coefficients {decision.get('coefficients')!r}, "
                 f"in support: {decision.get('in_support')}", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path, plt)


def plot_note(text: str, path: str | Path) -> Path:
    """A PNG that only says ``text`` (a stage's plot output when the stage had nothing to plot)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 2))
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=10)
    return _save(fig, path, plt)


def _save(fig, path: str | Path, plt) -> Path:
    """Lay out, write the PNG (creating its folder) and free the figure."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
