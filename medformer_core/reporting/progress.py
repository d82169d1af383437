"""The training progress bar (rich, on stderr): step, per-task losses, samples/s, ETA."""

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class TrainingProgress:
    """A rich progress bar; a no-op when disabled (`--quiet`, or not rank 0)."""

    def __init__(self, total_steps: int, start_step: int, disable: bool = False):
        self.disable = disable
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[losses]}"),
            TextColumn("{task.fields[speed]}"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            disable=disable,
        )
        self.task = self.progress.add_task("train", total=total_steps, completed=start_step, losses="", speed="")

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def update(self, step: int, losses: dict[str, float], samples_per_s: float) -> None:
        if self.disable:
            return
        text = " ".join(f"{name} {value:.3f}" for name, value in losses.items())
        self.progress.update(self.task, completed=step, losses=text, speed=f"{samples_per_s:.0f} samples/s")


def print_note(text: str) -> None:
    """One line for the user on stderr, beside the progress bar (e.g. which tasks a run chose)."""
    print(text, file=sys.stderr, flush=True)
