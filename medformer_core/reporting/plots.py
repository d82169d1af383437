"""PNG plots from a run's metrics.jsonl (matplotlib, headless)."""

import json
import math
from pathlib import Path

import matplotlib

from medformer_core.api.interfaces import Chance
from medformer_core.reporting.verdicts import Window, as_float, read_history

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl file (a torn last line from a killed run is skipped)."""
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_task_losses(metrics_path: Path, out_dir: Path) -> list[Path]:
    """One PNG per task: its loss (left) and its metrics (right) against step, a line per dataset,
    each with its chance level dashed; plus `losses.png` with every task's loss together."""
    records = read_metrics(metrics_path)
    windows, levels = read_history(records)
    tasks = sorted({task for task, _ in windows})
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [_plot_task(task, {d: w for (t, d), w in windows.items() if t == task},
                          {d: c for (t, d), c in levels.items() if t == task}, out_dir / f"loss_{task}.png")
               for task in tasks]
    overall: dict[str, tuple[list[int], list[float]]] = {}
    for record in records:
        for task, loss in record.get("losses", {}).items():
            steps, values = overall.setdefault(task, ([], []))
            steps.append(record["step"])
            values.append(as_float(loss))
    if overall:
        written.append(_plot(overall, "task losses", out_dir / "losses.png", log=True))
    return written


def _plot_task(task: str, windows: dict[str, list[Window]], levels: dict[str, Chance], path: Path) -> Path:
    """loss_TASK.png: the loss per dataset beside the metrics per dataset, chance levels dashed."""
    names = sorted({name for history in windows.values() for w in history for name in w.metrics})
    fig, axes = plt.subplots(1, 2 if names else 1, figsize=(11 if names else 6, 4), dpi=100, squeeze=False)
    loss_axis = axes[0][0]
    for i, (dataset, history) in enumerate(sorted(windows.items())):
        color = f"C{i}"
        steps = [w.step for w in history]
        loss_axis.plot(steps, [w.loss for w in history], color=color, marker="o" if len(steps) < 5 else None,
                       label=dataset)
        chance = levels.get(dataset)
        if chance is not None:
            loss_axis.axhline(chance.loss, color=color, linestyle="--", linewidth=1, label=f"{dataset} chance")
        if names:
            for j, name in enumerate(names):
                points = [(w.step, w.metrics[name]) for w in history if name in w.metrics]
                if points:
                    axes[0][1].plot(*zip(*points), color=color, linestyle=("-", ":", "-.")[j % 3],
                                    marker="o" if len(points) < 5 else None, label=f"{dataset} {name}")
            if chance is not None and chance.metric in names:
                axes[0][1].axhline(chance.value, color=color, linestyle="--", linewidth=1,
                                   label=f"{dataset} chance {chance.metric}")
    loss_axis.set(title=f"{task} loss", xlabel="step", ylabel="loss")
    if names:
        axes[0][1].set(title=f"{task} metrics", xlabel="step", ylabel=", ".join(names))
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_knn(metrics_path: Path, out_dir: Path) -> list[Path]:
    """`knn.png`: the kNN monitor's val AUC and ACC of each dataset against step, from the records
    that carry {"knn": {dataset: {"auc": ..., "acc": ...}}}; nothing when none do."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for record in read_metrics(metrics_path):
        for dataset, scores in record.get("knn", {}).items():
            for metric, value in scores.items():
                steps, values = series.setdefault(f"{dataset} {metric}", ([], []))
                steps.append(record["step"])
                values.append(as_float(value))
    if not series:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    return [_plot(series, "kNN on val", out_dir / "knn.png", ylabel="score")]


def _plot(series: dict, title: str, path: Path, log: bool = False, ylabel: str = "loss") -> Path:
    """One line per series (points marked when there are few); a log axis only when `log` and the
    values span more than a decade, its ticks in plain numbers."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for label, (steps, values) in sorted(series.items()):
        ax.plot(steps, values, label=label, marker="o" if len(steps) < 5 else None)
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    finite = [v for _, values in series.values() for v in values if math.isfinite(v)]
    if log and finite and min(finite) > 0 and max(finite) > 10 * min(finite):
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
