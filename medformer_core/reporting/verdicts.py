"""Did each task learn? A verdict per (task, dataset) from a run's logged history and its chance level.

The engine logs, every `log_every` steps, each (task, dataset)'s mean loss and metrics over the
batches since the last record, and how many batches that was. A verdict reads the pair's last
quarter of batches (at least one record) against:

- its chance level (`PretextTask.chance`), when the task declares one:
  learning   the loss is 10% or more below chance, or the metric beats chance by more than four
             binomial standard errors (over the samples of that quarter) with the loss below chance;
  at chance  otherwise;
- the loss of its first record, when it declares none: learning (10% or more below it), or flat.

Either way it is diverging when the loss is not finite, or has risen to 1.5 times its best record,
giving back more than half of what it had gained.
"""

import math
from dataclasses import dataclass

from medformer_core.api.interfaces import Chance

LEARNING, AT_CHANCE, DIVERGING, FLAT, TOO_SHORT = "learning", "at chance", "diverging", "flat", "too short"
LOSS_DROP = 0.9  # learning: the recent loss at most this share of chance's (or of the first record's)
STANDARD_ERRORS = 4.0  # learning: the metric beats chance by this many binomial standard errors
RISE = 1.5  # diverging: the recent loss this many times the best record's


@dataclass(frozen=True)
class Window:
    """One logged record of a (task, dataset): the means over `batches` batches up to `step`."""

    step: int
    batches: int
    loss: float
    metrics: dict[str, float]


@dataclass(frozen=True)
class Verdict:
    """What a (task, dataset) did: `status` (learning, at chance, diverging, flat, too short); the
    loss of its first record; its recent loss and metrics (the last quarter of its batches); the
    chance level they were judged against."""

    status: str
    first_loss: float
    loss: float
    metrics: dict[str, float]
    chance: Chance | None = None

    def detail(self) -> str:
        """E.g. "accuracy 0.91 (chance 0.25)", or "loss 0.41" for a task without a chance level."""
        if self.chance is None:
            return f"loss {self.loss:.3g}"
        if self.chance.metric is None or self.chance.metric not in self.metrics:
            return f"loss {self.loss:.3g} (chance {self.chance.loss:.3g})"
        return f"{self.chance.metric} {self.metrics[self.chance.metric]:.3g} (chance {self.chance.value:.3g})"


def chance_record(levels: dict[tuple[str, str], Chance]) -> dict:
    """The metrics.jsonl record of a run's chance levels: {"step": 0, "chance": {task: {dataset: ...}}}."""
    tables: dict[str, dict] = {}
    for (task, dataset), chance in sorted(levels.items()):
        tables.setdefault(task, {})[dataset] = {"loss": chance.loss, "metric": chance.metric, "value": chance.value,
                                                "higher_is_better": chance.higher_is_better}
    return {"step": 0, "chance": tables}


def read_history(records: list[dict]) -> tuple[dict[tuple[str, str], list[Window]], dict[tuple[str, str], Chance]]:
    """Each (task, dataset)'s logged windows, and the chance levels, from metrics.jsonl records."""
    windows: dict[tuple[str, str], list[Window]] = {}
    levels: dict[tuple[str, str], Chance] = {}
    for record in records:
        for task, datasets in record.get("chance", {}).items():
            for dataset, level in datasets.items():
                levels[task, dataset] = Chance(**level)
        counts = record.get("batches", {})
        for task, datasets in record.get("per_dataset", {}).items():
            for dataset, named in datasets.items():
                metrics = {k: v for k, v in named.items() if k != "loss"}
                batches = counts.get(task, {}).get(dataset, 1)
                windows.setdefault((task, dataset), []).append(
                    Window(record["step"], batches, as_float(named.get("loss")), metrics))
    return windows, levels


def as_float(value) -> float:
    """A logged number (None stands for a non-finite value) as a float."""
    return math.nan if value is None else float(value)


def recent(windows: list[Window]) -> list[Window]:
    """The last records that hold at least a quarter of the pair's batches (at least one record)."""
    total, kept, counted = sum(w.batches for w in windows), [], 0
    for window in reversed(windows):
        kept.append(window)
        counted += window.batches
        if counted * 4 >= total:
            break
    return kept


def weighted_mean(windows: list[Window], value) -> float:
    """The batch-weighted mean of `value(window)` over the windows where it is not None."""
    pairs = [(w.batches, v) for w in windows if (v := value(w)) is not None]
    return sum(n * v for n, v in pairs) / sum(n for n, _ in pairs) if pairs else math.nan


def verdict(windows: list[Window], chance: Chance | None, batch_size: int) -> Verdict:
    """The verdict of one (task, dataset) from its logged `windows` (see the module)."""
    last = recent(windows)
    loss = weighted_mean(last, lambda w: w.loss)
    names = dict.fromkeys(name for w in last for name in w.metrics)
    metrics = {name: weighted_mean(last, lambda w, name=name: w.metrics.get(name)) for name in names}
    first = windows[0].loss

    def judged(status: str) -> Verdict:
        return Verdict(status, first, loss, metrics, chance)

    if not math.isfinite(loss) or diverging(windows, loss):
        return judged(DIVERGING)
    if chance is None:
        if len(windows) < 2:
            return judged(TOO_SHORT)
        return judged(LEARNING if loss <= LOSS_DROP * first else FLAT)
    if loss <= LOSS_DROP * chance.loss:
        return judged(LEARNING)
    metric = metrics.get(chance.metric) if chance.metric else None
    if metric is not None and chance.value is not None and loss < chance.loss:
        samples = max(1, sum(w.batches for w in last) * batch_size)
        p = min(max(chance.value, 1e-6), 1 - 1e-6)
        better = metric - chance.value if chance.higher_is_better else chance.value - metric
        if better > STANDARD_ERRORS * math.sqrt(p * (1 - p) / samples):
            return judged(LEARNING)
    return judged(AT_CHANCE)


def diverging(windows: list[Window], loss: float) -> bool:
    """The recent `loss` has risen to RISE times the best record's, giving back more than half of
    what it had gained on the first record."""
    finite = [w.loss for w in windows if math.isfinite(w.loss)]
    if len(finite) < 2:
        return False
    best, first = min(finite), windows[0].loss
    return loss > RISE * best and loss - best > 0.5 * max(first - best, 0.0)


def verdicts(windows: dict[tuple[str, str], list[Window]], levels: dict[tuple[str, str], Chance],
             batch_size: int) -> dict[tuple[str, str], Verdict]:
    """The verdict of every logged (task, dataset)."""
    return {pair: verdict(history, levels.get(pair), batch_size) for pair, history in sorted(windows.items())}
