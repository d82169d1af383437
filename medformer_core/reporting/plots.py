"""PNG plots from a run's metrics.jsonl (matplotlib, headless)."""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


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
    """One PNG per task (loss against step; a line per dataset too when it runs on several), plus
    `losses.png` with every task together."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    per_dataset: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for record in read_metrics(metrics_path):
        for task, loss in record.get("losses", {}).items():
            steps, values = series.setdefault(task, ([], []))
            steps.append(record["step"])
            values.append(loss)
        for task, datasets in record.get("per_dataset", {}).items():
            for dataset, named in datasets.items():
                steps, values = per_dataset.setdefault(task, {}).setdefault(dataset, ([], []))
                steps.append(record["step"])
                values.append(named["loss"])
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for task, (steps, values) in sorted(series.items()):
        lines = {f"{task} (all)": (steps, values), **per_dataset[task]} if len(per_dataset.get(task, {})) > 1 else {}
        written.append(_plot(lines or {task: (steps, values)}, f"{task} loss", out_dir / f"loss_{task}.png"))
    if series:
        written.append(_plot(series, "task losses", out_dir / "losses.png", log=True))
    return written


def plot_knn(metrics_path: Path, out_dir: Path) -> list[Path]:
    """`knn.png`: the kNN monitor's val AUC and ACC of each dataset against step, from the records
    that carry {"knn": {dataset: {"auc": ..., "acc": ...}}}; nothing when none do."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for record in read_metrics(metrics_path):
        for dataset, scores in record.get("knn", {}).items():
            for metric, value in scores.items():
                steps, values = series.setdefault(f"{dataset} {metric}", ([], []))
                steps.append(record["step"])
                values.append(value)
    if not series:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    return [_plot(series, "kNN on val", out_dir / "knn.png", ylabel="score")]


def _plot(series: dict, title: str, path: Path, log: bool = False, ylabel: str = "loss") -> Path:
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for label, (steps, values) in sorted(series.items()):
        ax.plot(steps, values, label=label)
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    if log and all(v > 0 for _, values in series.values() for v in values):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
