"""The training engine: one loop for pretraining and every downstream mode.

Each step the engine draws a batch from the run's sampler, prepares it (augmentation), runs every
task of the model on it, combines the losses, steps the optimizer, logs and checkpoints. What every
run needs is done here once: exact resume from the last checkpoint, SIGINT/SIGTERM (finish the
step, checkpoint, exit), a stop on a non-finite loss, DDP under torchrun, the progress bar,
`metrics.jsonl`, TensorBoard and the loss plots.

What differs between runs comes from a subclass (`Trainer` for pretraining, `Finetuner` for
fine-tuning): `build()` makes the model, data, sampler and optimizer, and a few hooks add periodic
work (pictures, validation) and resumable state of their own.
"""

import fcntl
import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from medformer_core.api.errors import TrainingError, UsageError
from medformer_core.api.files import atomic_write, clean_interrupted_writes
from medformer_core.api.interfaces import Chance
from medformer_core.engine.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from medformer_core.engine.devices import resolve_device
from medformer_core.engine.distributed import DistInfo, any_rank, init_distributed, shutdown_distributed
from medformer_core.reporting.plots import plot_task_losses, read_metrics
from medformer_core.reporting.progress import TrainingProgress, print_note
from medformer_core.reporting.verdicts import AT_CHANCE, Verdict, Window, chance_record, read_history, verdict, verdicts

METRICS_FILE = "metrics.jsonl"
LOCK_FILE = ".lock"  # held (fcntl) by the run writing the directory
# What a run directory may hold (a new run may reuse a folder holding only these, e.g. of a run that
# failed before its first checkpoint; anything else means the folder is not a run's).
RUN_FILES = {LOCK_FILE, METRICS_FILE, "config.toml", "finetune.toml", "checkpoints", "encoder", "plots", "pictures",
             "tensorboard", "model.safetensors", "results.json", "seconds.json"}

# One batch's outcome: its dataset and each task's loss and metrics, {task: {"loss": ..., "accuracy": ...}}.
Outcome = tuple[str, dict[str, dict[str, float]]]


@dataclass(frozen=True)
class LoopSettings:
    """How the engine steps, logs and checkpoints; each kind of run maps its config onto these."""

    seed: int = 0
    device: str = "auto"
    accumulate: int = 1  # batches per optimizer step
    grad_clip: float = 1.0  # max gradient norm; 0 turns clipping off
    augment: bool = True  # apply the run's `augment` to every training batch
    log_every: int = 10  # steps between metrics.jsonl records
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    tensorboard: bool = False
    chance_patience: int = 50  # warn when a (task, dataset) is still at chance after this many batches; 0: never


@dataclass
class RunSummary:
    """What a finished (or interrupted) run did. `verdicts`: {(task, dataset): Verdict}, whether
    each task learned on each dataset, judged on the whole logged history (a resumed run's too)."""

    run_dir: Path
    steps: int  # the step reached
    samples: int  # samples seen in this session (not before a resume)
    seconds: float
    verdicts: dict[tuple[str, str], Verdict] = field(default_factory=dict)
    stopped_by: str | None = None


class MetricWindow:
    """Running sums of each task's loss and metrics per dataset since the last log line:
    sums[task][dataset][name] = [sum, count]."""

    def __init__(self):
        self.sums: dict[str, dict[str, dict[str, list]]] = {}

    def add(self, outcome: Outcome) -> None:
        dataset, values = outcome
        for task, named in values.items():
            slot = self.sums.setdefault(task, {}).setdefault(dataset, {})
            for name, value in named.items():
                total = slot.setdefault(name, [0.0, 0])
                total[0] += value
                total[1] += 1

    def per_dataset(self) -> dict[str, dict[str, dict[str, float]]]:
        """{task: {dataset: {name: mean}}}."""
        return {task: {dataset: {name: s / n for name, (s, n) in named.items()}
                       for dataset, named in sorted(datasets.items())}
                for task, datasets in sorted(self.sums.items())}

    def overall(self) -> dict[str, dict[str, float]]:
        """{task: {name: mean over the batches of every dataset}}."""
        means = {}
        for task, datasets in sorted(self.sums.items()):
            totals: dict[str, list] = {}
            for named in datasets.values():
                for name, (s, n) in named.items():
                    total = totals.setdefault(name, [0.0, 0])
                    total[0] += s
                    total[1] += n
            means[task] = {name: s / n for name, (s, n) in totals.items()}
        return means

    def losses(self) -> dict[str, float]:
        """{task: mean loss over the batches of every dataset}."""
        return {task: named["loss"] for task, named in self.overall().items()}

    def batches(self) -> dict[str, dict[str, int]]:
        """{task: {dataset: batches since the last log line}}."""
        return {task: {dataset: named["loss"][1] for dataset, named in sorted(datasets.items())}
                for task, datasets in sorted(self.sums.items())}

    def clear(self) -> None:
        self.sums.clear()

    def state_dict(self) -> dict:
        return {"sums": self.sums}

    def load_state_dict(self, state: dict) -> None:
        self.sums = state["sums"]


def step_losses(outcomes: list[Outcome]) -> dict[str, float]:
    """Each task's mean loss over the batches of one step it ran on."""
    sums: dict[str, list] = {}
    for _, values in outcomes:
        for task, named in values.items():
            total = sums.setdefault(task, [0.0, 0])
            total[0] += named["loss"]
            total[1] += 1
    return {task: s / n for task, (s, n) in sums.items()}


class Engine:
    """The training loop shared by every run. A subclass's `build()` sets

        splits      {dataset name: ImageSplit}, what the sampler's indices point into
        sampler     an endless iterator of (dataset name, indices), with state_dict/load_state_dict
        model       the MultitaskModel: model(batch, generator) -> {task name: TaskResult}
        weighting   combines the task losses into one (`make_weighting`)
        augment     {spatial dims: Augment} for training batches (used when settings.augment)
        optimizer, scheduler, total_steps

    and may override the hooks `save_config`, `prepare_batch`, `train_mode`, `after_step`,
    `extra_state`/`load_extra_state` and `save`. `build()` may also refine `self.settings` once
    the data is known (e.g. checkpoint at every validation).
    """

    def __init__(self, run_dir: Path, settings: LoopSettings, *, resume: bool = False, quiet: bool = False):
        self.run_dir = run_dir
        self.settings = settings
        self.resume = resume
        self.quiet = quiet
        self.stop_requested: str | None = None
        self.metrics_file = None
        self.writer = None
        self.lock = None  # the open lock file while this run writes its directory

    # -- what a run supplies --------------------------------------------------------------------

    def build(self) -> None:
        """Make the data, sampler, model, weighting, augmentation and optimizer (see the class)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement build")

    def save_config(self) -> None:
        """Write how the run was made into the run directory (rank 0, before `build`)."""

    def prepare_batch(self, batch: dict) -> dict:
        """The training batch the tasks see: augmented when `settings.augment`."""
        if self.settings.augment:
            batch["image"] = self.augment[batch["spatial_dims"]](batch["image"], self.generator)
        return batch

    def train_mode(self) -> None:
        """Put the model in training mode before each step."""
        self.forward_model.train()

    def after_step(self, losses: dict[str, float]) -> None:
        """Periodic work after each optimizer step, before its checkpoint (if any) is written."""

    def extra_state(self) -> dict:
        """The run's own resumable state (tensors, numbers, strings, lists and dicts of them)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Restore what `extra_state` returned."""

    # -- set-up ---------------------------------------------------------------------------------

    def setup(self) -> None:
        """Resolve the device, join DDP, check the run directory, build the run, take the run
        directory, and restore its last checkpoint when resuming. Nothing is written into the run
        directory before every check has passed (a failed start leaves no folder, a failed resume
        leaves the run as it was)."""
        settings = self.settings
        self.device = resolve_device(settings.device)
        self.dist: DistInfo = init_distributed(self.device.type)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self._check_run_dir()
        torch.manual_seed(settings.seed)
        self.build()
        # Task and augmentation randomness (CPU generator: the same stream on any device).
        self.generator = torch.Generator().manual_seed(settings.seed * 1000 + self.dist.rank)
        self.forward_model = self.model
        if self.dist.enabled:
            self.forward_model = DistributedDataParallel(self.model, find_unused_parameters=True)
        self.step = 0
        self.samples = 0
        self.window = MetricWindow()
        self.chance = self.chance_levels()
        self.task_history: dict[tuple[str, str], list[Window]] = {}
        self.warned: set[tuple[str, str]] = set()
        if self.dist.is_main:
            self._take_run_dir()
        if self.resume:
            self._restore()
            if self.dist.is_main:
                self.task_history = read_history(read_metrics(self.run_dir / METRICS_FILE))[0]
        elif self.dist.is_main:
            (self.run_dir / METRICS_FILE).unlink(missing_ok=True)  # from a run killed before any checkpoint
        if self.dist.is_main:
            self.save_config()
        self.writer = self._tensorboard() if self.dist.is_main else None

    def chance_levels(self) -> dict[tuple[str, str], Chance]:
        """Each (task, dataset)'s chance level on its training split, where the task declares one."""
        levels = {}
        for dataset, split in self.splits.items():
            for task in self.model.tasks_for(dataset):
                level = task.chance(split, self.sampler.batch_size)
                if level is not None:
                    levels[task.name, dataset] = level
        return levels

    def _check_run_dir(self) -> None:
        """Refuse a run directory this run must not write into; writes nothing."""
        has_checkpoint = latest_checkpoint(self.checkpoint_root) is not None
        if self.resume and not has_checkpoint:
            raise UsageError(f"--resume: no checkpoint in {self.checkpoint_root}",
                             hint="start without --resume, or point --out at the run to continue")
        if not self.resume and has_checkpoint:
            raise UsageError(f"run directory {self.run_dir} already holds checkpoints",
                             hint="pass --resume to continue it, or choose another --out")
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise UsageError(f"--out {self.run_dir} is a file", hint="choose a folder for the run")
        if self.run_dir.is_dir() and not self.resume:
            foreign = sorted(p.name for p in self.run_dir.iterdir()
                             if p.name not in RUN_FILES and not p.name.startswith((".", "eval_")))
            if foreign:
                raise UsageError(f"--out {self.run_dir} is a folder that is not a medformer run (it holds "
                                 f"{', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''})",
                                 hint="choose a new or empty folder for the run")

    def _take_run_dir(self) -> None:
        """Make the run directory, lock it for this process (a second run on it is refused) and tidy
        what a killed run left there (rank 0)."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.lock = (self.run_dir / LOCK_FILE).open("a")
        except OSError as exc:
            raise UsageError(f"cannot write the run directory {self.run_dir}: {exc.strerror}",
                             hint="choose a folder you can write to with --out") from None
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.lock.close()
            raise UsageError(f"run directory {self.run_dir} is in use by another medformer run",
                             hint="wait for it to finish, or choose another --out") from None
        clean_interrupted_writes(self.run_dir)
        clean_interrupted_writes(self.checkpoint_root)

    def _tensorboard(self):
        if not self.settings.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UsageError("--tensorboard needs the tensorboard package",
                             hint="pip install 'medformer[tensorboard]'") from None
        return SummaryWriter(str(self.run_dir / "tensorboard"))

    @property
    def checkpoint_root(self) -> Path:
        return self.run_dir / "checkpoints"

    # -- checkpoints ------------------------------------------------------------------------------

    def _training_state(self) -> dict:
        state = {
            "step": self.step,
            "samples": self.samples,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "weighting": self.weighting.state_dict(),
            "sampler": self.sampler.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "metric_window": self.window.state_dict(),
            "splits": {name: split.state_dict() for name, split in self.splits.items()},
            "run": self.extra_state(),
        }
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def save(self) -> Path | None:
        """Checkpoint the model and the training state (rank 0); returns the checkpoint directory."""
        if not self.dist.is_main:
            return None
        return save_checkpoint(self.checkpoint_root, self.step, self.model, self._training_state(),
                               keep=self.settings.keep_checkpoints)

    def _restore(self) -> None:
        path = latest_checkpoint(self.checkpoint_root)
        state = load_checkpoint(path, self.model)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.weighting.load_state_dict(state["weighting"])
        self.sampler.load_state_dict(state["sampler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.step, self.samples = state["step"], state["samples"]
        if "metric_window" in state:
            self.window.load_state_dict(state["metric_window"])
        for name, split_state in state.get("splits", {}).items():
            if split_state and name in self.splits:
                self.splits[name].load_state_dict(split_state)
        self.load_extra_state(state.get("run", {}))
        if self.dist.is_main:
            keep_records_until(self.run_dir / METRICS_FILE, self.step)

    # -- the loop ---------------------------------------------------------------------------------

    def train_step(self) -> list[Outcome]:
        """One optimizer step over `accumulate` batches; returns each batch's dataset and each task's
        loss and metrics."""
        self.train_mode()
        accumulate = self.settings.accumulate
        outcomes = []
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        for _ in range(accumulate):
            dataset, indices = next(self.sampler)
            batch = self.prepare_batch(self._to_device(self.splits[dataset].batch(indices)))
            with autocast:
                results = self.forward_model(batch, self.generator)
            losses = {name: result.loss.float() for name, result in results.items()}
            self._check_finite(losses, dataset)
            total = self.weighting(losses) / accumulate
            total.backward()
            values = {name: {"loss": loss.item(), **{k: float(v) for k, v in results[name].metrics.items()}}
                      for name, loss in losses.items()}
            outcomes.append((dataset, values))
            self.samples += len(indices) * self.dist.world_size
        if self.settings.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return outcomes

    def _check_finite(self, losses: dict[str, torch.Tensor], dataset: str) -> None:
        bad = {name: float(loss.detach()) for name, loss in losses.items() if not torch.isfinite(loss)}
        if any_rank(bool(bad), self.dist, self.device):
            name, value = next(iter(bad.items())) if bad else ("(another rank)", float("nan"))
            last = latest_checkpoint(self.checkpoint_root)
            kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
            raise TrainingError(
                f"task '{name}' gave a non-finite loss ({value}) at step {self.step + 1} on dataset '{dataset}'",
                hint=f"{kept}; lower --lr or check the data",
            )

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _handle_signal(self, signum, frame) -> None:
        self.stop_requested = signal.Signals(signum).name

    def run(self) -> RunSummary:
        try:
            self.setup()
            previous = {s: signal.signal(s, self._handle_signal) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                return self._loop()
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
        finally:
            if self.writer is not None:
                self.writer.close()
            if self.lock is not None:
                self.lock.close()
                self.lock = None
            if hasattr(self, "dist"):
                shutdown_distributed(self.dist)

    def _loop(self) -> RunSummary:
        settings = self.settings
        window = self.window
        self.metrics_file = (self.run_dir / METRICS_FILE).open("a") if self.dist.is_main else None
        if not self.resume:
            self.write_record(chance_record(self.chance), {})
        progress = TrainingProgress(self.total_steps, self.step, disable=self.quiet or not self.dist.is_main)
        start, start_samples = time.perf_counter(), self.samples
        try:
            with progress:
                while self.step < self.total_steps:
                    tick = time.perf_counter()
                    outcomes = self.train_step()
                    for outcome in outcomes:
                        window.add(outcome)
                    rate = (self.samples - start_samples) / max(1e-9, time.perf_counter() - start)
                    progress.update(self.step, window.losses(), rate)
                    if self.step % settings.log_every == 0 or self.step == self.total_steps:
                        self._log(outcomes[-1][0], rate, time.perf_counter() - tick)
                        window.clear()
                    self.after_step(step_losses(outcomes))
                    stop = any_rank(self.stop_requested is not None, self.dist, self.device)
                    if stop or self.step % settings.checkpoint_every == 0 or self.step == self.total_steps:
                        self.save()
                    if stop:
                        break
        finally:
            if self.metrics_file is not None:
                self.metrics_file.close()
                self.metrics_file = None
        if self.dist.is_main:
            plot_task_losses(self.run_dir / METRICS_FILE, self.run_dir / "plots")
        judged = verdicts(self.task_history, self.chance, self.sampler.batch_size)
        return RunSummary(self.run_dir, self.step, self.samples - start_samples, time.perf_counter() - start,
                          judged, stopped_by=self.stop_requested)

    def write_record(self, record: dict, scalars: dict[str, float]) -> None:
        """Append `record` to metrics.jsonl (strict JSON: a non-finite number is written as null) and
        `scalars` to TensorBoard at this step (rank 0 only)."""
        if self.metrics_file is not None:
            self.metrics_file.write(json.dumps(finite_json(record), allow_nan=False) + "\n")
            self.metrics_file.flush()
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, self.step)

    def _log(self, dataset: str, rate: float, step_seconds: float) -> None:
        """Write the window's means: each task's loss and metrics over every dataset ("losses",
        "metrics") and per dataset ("per_dataset": {task: {dataset: {"loss": ..., metric: ...}}})."""
        overall, per_dataset = self.window.overall(), self.window.per_dataset()
        record = {
            "step": self.step,
            "samples": self.samples,
            "lr": self.scheduler.get_last_lr()[0],
            "dataset": dataset,
            "losses": {task: named["loss"] for task, named in overall.items()},
            "metrics": {task: metrics for task, named in overall.items()
                        if (metrics := {k: v for k, v in named.items() if k != "loss"})},
            "per_dataset": per_dataset,
            "weights": self.weighting.current_weights(),
            "batches": self.window.batches(),
            "samples_per_s": rate,
            "step_seconds": step_seconds,
        }
        scalars = {"lr": record["lr"], "samples_per_s": rate}
        for task, named in overall.items():  # TensorBoard: loss/mae, accuracy/rotation, loss/mae/phantoms2d, ...
            scalars.update({f"{name}/{task}": value for name, value in named.items()})
            for dataset, values in per_dataset[task].items():
                scalars.update({f"{name}/{task}/{dataset}": value for name, value in values.items()})
        self.write_record(record, scalars)
        for pair, windows in read_history([record])[0].items():
            self.task_history.setdefault(pair, []).extend(windows)
        self._warn_at_chance()

    def _warn_at_chance(self) -> None:
        """Warn once per (task, dataset) still at chance after `chance_patience` of its batches."""
        patience = self.settings.chance_patience
        if not patience or not self.dist.is_main:
            return
        for pair, windows in self.task_history.items():
            if pair in self.warned or pair not in self.chance or sum(w.batches for w in windows) < patience:
                continue
            self.warned.add(pair)
            judged = verdict(windows, self.chance[pair], self.sampler.batch_size)
            if judged.status == AT_CHANCE:
                task, dataset = pair
                text = (f"task '{task}' is still at chance on '{dataset}' after {sum(w.batches for w in windows)} "
                        f"batches: {judged.detail()}, loss {judged.loss:.3g} (chance {judged.chance.loss:.3g})")
                self.write_record({"step": self.step, "warning": text}, {})
                if not self.quiet:
                    print_note(f"warning: {text}. See 'When a task stays at chance' in docs/tasks.md.")


def finite_json(value):
    """`value` with every non-finite float (NaN, inf) replaced by None, so json.dumps writes strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(item) for item in value]
    return value


def keep_records_until(path: Path, step: int) -> None:
    """Keep the records of a metrics.jsonl up to `step` (a resumed run writes the later ones again);
    a torn line from a killed run is dropped. Written atomically."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", 0) <= step:
            kept.append(line + "\n")
    with atomic_write(path) as tmp:
        tmp.write_text("".join(kept))
