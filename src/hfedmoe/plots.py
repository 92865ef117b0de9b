"""Plots of a run (matplotlib Agg canvas: no pyplot state, no display)."""

from __future__ import annotations

import math
import numbers
from pathlib import Path
from typing import Any, Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def is_finite_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def plot_accuracy(rounds: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Write a PNG of test accuracy against round number."""
    _save_line_plot(path, "Test accuracy", "accuracy",
                    {"test accuracy": _series(rounds, "accuracy")})


def plot_loss(rounds: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Write a PNG of test loss, and train loss where recorded, against round number."""
    series = {"test loss": _series(rounds, "loss"), "train loss": _series(rounds, "train_loss")}
    _save_line_plot(path, "Loss", "loss", series)


def _series(rounds: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = sorted((rec["round"], rec[key]) for rec in rounds if is_finite_number(rec.get(key)))
    return [r for r, _ in points], [v for _, v in points]


def _save_line_plot(path: Path, title: str, ylabel: str,
                    series: Mapping[str, tuple[list[int], list[float]]]) -> None:
    figure = Figure(figsize=(6.0, 4.0), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for label, (xs, ys) in series.items():
        if xs:
            axes.plot(xs, ys, marker="o", label=label)
    axes.set_title(title)
    axes.set_xlabel("round")
    axes.set_ylabel(ylabel)
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.grid(True, alpha=0.3)
    if any(xs for xs, _ in series.values()):
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, format="png")


def expert_training_counts(rounds: Sequence[Mapping[str, Any]]
                           ) -> tuple[list[int], list[list[int]]]:
    """(client ids, counts[client][expert]): rounds in which each client trained each expert.

    Experts are flattened row-major (layer, expert) as in the records' ``trained_experts``.
    """
    counts: dict[int, list[int]] = {}
    for record in rounds:
        for client in record.get("clients", []):
            trained = client.get("trained_experts")
            if not trained:
                continue
            row = counts.setdefault(client["client_id"], [0] * len(trained))
            for index, flag in enumerate(trained):
                row[index] += int(flag)
    ids = sorted(counts)
    return ids, [counts[i] for i in ids]


def plot_expert_heatmap(rounds: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Write a heatmap (clients x experts) of how many rounds each client trained each expert."""
    ids, counts = expert_training_counts(rounds)
    figure = Figure(figsize=(9.0, 1.2 + 0.35 * max(len(ids), 1)), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    if ids:
        image = axes.imshow(counts, aspect="auto", cmap="viridis", interpolation="nearest")
        figure.colorbar(image, ax=axes, label="rounds trained")
        axes.set_yticks(range(len(ids)), [str(i) for i in ids])
    axes.set_title("Experts trained per client (flattened layer-major: layer * S + expert)")
    axes.set_xlabel("expert")
    axes.set_ylabel("client")
    figure.tight_layout()
    figure.savefig(path, format="png")


def plot_comparison(comparison: Mapping[str, Any], out_dir: Path) -> None:
    """accuracy_by_method.png, bytes_up_by_method.png, budget_use_by_method.png."""
    methods = comparison["methods"]
    figure = Figure(figsize=(7.0, 4.0), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for name, m in methods.items():
        curve = m["accuracy_by_round_mean"]
        axes.plot(range(len(curve)), curve, marker="o", label=name)
    axes.set(title="Test accuracy (mean over seeds)", xlabel="round", ylabel="accuracy")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out_dir / "accuracy_by_method.png", format="png")

    figure = Figure(figsize=(7.0, 4.0), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    names = list(methods)
    axes.bar(names, [methods[n]["bytes_up"]["mean"] / 2**20 for n in names])
    axes.set(title="Bytes uploaded over the run (mean over seeds)", ylabel="MiB")
    axes.tick_params(axis="x", labelrotation=30, labelsize=8)
    figure.tight_layout()
    figure.savefig(out_dir / "bytes_up_by_method.png", format="png")

    figure = Figure(figsize=(8.0, 4.0), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    width = 0.8 / max(len(names), 1)
    for index, name in enumerate(names):
        clients = methods[name]["clients"]
        use = [c["max_active_experts_per_batch"] / c["budget_experts"] for c in clients]
        axes.bar([c["client_id"] + index * width for c in clients], use, width, label=name)
    ids = [c["client_id"] for c in methods[names[0]]["clients"]] if names else []
    axes.set_xticks([i + width * (len(names) - 1) / 2 for i in ids], [str(i) for i in ids])
    axes.axhline(1.0, color="black", linewidth=1, linestyle="--")
    axes.set(title="Budget use per client (max active experts / budget; > 1 violates)",
             xlabel="client", ylabel="max active / budget")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out_dir / "budget_use_by_method.png", format="png")
