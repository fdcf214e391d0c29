"""Training curves from a run's log.jsonl: loss and learning rate, and each evaluation number."""

from __future__ import annotations

import json
from pathlib import Path

from ..io import atomic_write_figure


def training_curves(log_path: Path, out: Path) -> Path | None:
    if not log_path.is_file():
        return None
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval" in r]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    headline = sorted({k for r in evals for k, v in r["eval"].items() if "/" not in k and v is not None})
    panels = 1 + bool(headline)
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    ax = axes[0][0]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], color="tab:blue", label="train loss")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    lr_axis = ax.twinx()
    lr_axis.plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:gray", alpha=0.5, label="lr")
    lr_axis.set_ylabel("learning rate")
    ax.set_title("training")
    if headline:
        ax = axes[0][1]
        for key in headline:
            points = [(r["step"], r["eval"][key]) for r in evals if r["eval"].get(key) is not None]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=key)
        ax.set_xlabel("step")
        ax.set_title("evaluation")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    atomic_write_figure(out, fig)
    return out
