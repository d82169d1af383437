"""`medformer train`: multitask self-supervised pretraining from plugins on the command line."""

import time
import tomllib
from dataclasses import replace
from pathlib import Path

import typer
from rich.table import Table

from medformer_cli.console import err, out
from medformer_core.api.errors import RunStopped, UsageError
from medformer_core.api.interfaces import option_text
from medformer_core.api.options import split_pairs
from medformer_core.engine.config import RunConfig, load_config
from medformer_core.engine.loop import RunSummary
from medformer_core.engine.trainer import Trainer
from medformer_core.reporting.verdicts import DIVERGING, LEARNING

VERDICT_STYLES = {LEARNING: "green", DIVERGING: "red"}  # the rest (at chance, flat, too short) yellow
# What --resume may change; anything else would make the checkpoint continue another run.
RESUMABLE_TRAIN = {"steps", "epochs", "device", "data_root", "knn_every", "tensorboard", "checkpoint_every",
                   "chance_patience"}
RESUMABLE_FINETUNE = {"epochs", "device", "data_root", "tensorboard"}


def check_resume_keeps(saved, given: dict, out_dir: Path, resumable: set[str]) -> None:
    """Refuse --resume options that would change how the run in `out_dir` was made (before anything
    is written): `saved` is its config, `given` the options passed (None: not passed)."""
    changed = [name for name, value in given.items()
               if value is not None and name not in resumable and not _same(value, getattr(saved, name))]
    if changed:
        listed = ", ".join(f"--{name.replace('_', '-')} ({_text(given[name])}; the run has "
                           f"{_text(getattr(saved, name))})" for name in changed)
        raise UsageError(f"--resume continues {out_dir} as it was made, but {listed}",
                         hint="drop those options to continue the run, or start a new run with another --out")


def _same(given, saved) -> bool:
    """Whether a value given on the command line equals the run's (text against typed values too)."""
    return given == saved or _text(given) == _text(saved)


def _text(value) -> str:
    """A value as the command line writes it (tables as key=value lists)."""
    if isinstance(value, dict):
        return ", ".join(f"{k}={_text(v)}" for k, v in sorted(value.items()))
    if isinstance(value, list):
        return ", ".join(map(_text, value))
    return option_text(value)


def _toml_values(pairs: dict[str, str]) -> dict:
    """Parse each value as a TOML scalar (0.8, 3, true, [1, 2]); anything else stays a string."""
    parsed = {}
    for key, value in pairs.items():
        try:
            parsed[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            parsed[key] = value
    return parsed


def _task_weights(pairs: list[str] | None) -> dict[str, float]:
    """`--task-weight mae=2` -> {"mae": 2.0}."""
    weights = {}
    for task, text in split_pairs(pairs, "--task-weight", "--task-weight mae=2").items():
        try:
            weights[task] = float(text)
        except ValueError:
            raise UsageError(f"--task-weight: the weight of '{task}' must be a number, got '{text}'") from None
    return weights


def _task_options(pairs: list[str] | None) -> dict[str, dict]:
    """`--task-option mae.mask_ratio=0.8` -> {"mae": {"mask_ratio": "0.8"}}; the task converts each
    value to its option's type."""
    options: dict[str, dict] = {}
    for key, value in split_pairs(pairs, "--task-option", "--task-option mae.mask_ratio=0.8").items():
        task, dot, name = key.partition(".")
        if not dot:
            raise UsageError(f"--task-option '{key}={value}' needs TASK.OPTION=VALUE", hint="e.g. mae.mask_ratio=0.8")
        options.setdefault(task, {})[name] = value
    return options


def train(
    plugin: list[str] = typer.Option(None, "--plugin", "-p",
                                     help="A pretext task (repeat). Default: those of mae, mae3d, rotation, "
                                          "contrastive that accept a dataset of the run."),
    dataset: list[str] = typer.Option(None, "--dataset", "-d",
                                      help="A dataset name, NAME:ARG or a folder (repeat). "
                                           "Default: phantoms2d, phantoms3d."),
    data_root: Path = typer.Option(None,
                                   help="Where MedMNIST files live (default $MEDFORMER_DATA_ROOT or ~/.medmnist)."),
    config: Path = typer.Option(None, "--config", help="A run config in TOML; options given here override it."),
    steps: int = typer.Option(None, min=1, help="Optimizer steps (default 120)."),
    epochs: float = typer.Option(None, min=0.0, help="Epochs over all train splits; overrides --steps."),
    batch_size: int = typer.Option(None, min=1, help="Samples per batch (default 32)."),
    lr: float = typer.Option(None, min=0.0, help="Peak learning rate (default 1e-3)."),
    model: str = typer.Option(None, help="Model preset: tiny, small or base (default tiny)."),
    model_option: list[str] = typer.Option(None, help="OPTION=VALUE overriding the preset (repeat), e.g. depth=2."),
    weighting: str = typer.Option(None, help="Loss weighting: fixed or uncertainty."),
    task_weight: list[str] = typer.Option(None, help="TASK=WEIGHT (repeat)."),
    task_option: list[str] = typer.Option(None, help="TASK.OPTION=VALUE (repeat), e.g. mae.mask_ratio=0.8."),
    accumulate: int = typer.Option(None, min=1, help="Gradient accumulation steps."),
    out_dir: Path = typer.Option(None, "--out", help="Run directory (default runs/train-DATE-TIME)."),
    seed: int = typer.Option(None, help="Random seed (default 0)."),
    device: str = typer.Option(None, help="auto, cpu or cuda[:N]."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    knn_every: int = typer.Option(None, min=0,
                                  help="Steps between kNN val AUC/ACC of each labeled dataset (default 200; 0: off)."),
    checkpoint_every: int = typer.Option(None, min=1, help="Steps between checkpoints (default 50)."),
    chance_patience: int = typer.Option(None, min=0,
                                        help="Warn when a task is still at chance on a dataset after this many of "
                                             "its batches (default 50; 0: never)."),
    tensorboard: bool = typer.Option(None, "--tensorboard/--no-tensorboard", help="Also write TensorBoard events."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """Pretrain one Medformer on several datasets with several pretext tasks at once."""
    if resume and out_dir is None:
        raise UsageError("--resume needs --out DIR, the run to continue")
    if resume and config is None and (out_dir / "config.toml").is_file():
        config = out_dir / "config.toml"
    overrides = {
        "plugins": plugin or None, "datasets": dataset or None,
        "data_root": str(data_root) if data_root else None, "steps": steps, "epochs": epochs,
        "batch_size": batch_size, "lr": lr, "model": model, "weighting": weighting,
        "model_options": _toml_values(split_pairs(model_option, "--model-option", "--model-option depth=2")) or None,
        "task_weights": _task_weights(task_weight) or None,
        "tasks": _task_options(task_option) or None, "accumulate": accumulate, "seed": seed,
        "device": device, "knn_every": knn_every, "tensorboard": tensorboard,
        "checkpoint_every": checkpoint_every, "chance_patience": chance_patience,
    }
    if resume and (out_dir / "config.toml").is_file():
        check_resume_keeps(load_config(out_dir / "config.toml", {}), overrides, out_dir, RESUMABLE_TRAIN)
    try:
        run_config = load_config(config, overrides)
    except ValueError as exc:
        raise UsageError(f"bad value in the run config: {exc}") from None
    run_dir = out_dir or Path("runs") / time.strftime("train-%Y%m%d-%H%M%S")
    summary = Trainer(run_config, run_dir, resume=resume, quiet=quiet).run()
    if summary.stopped_by is None or not quiet:
        print_summary(summary, run_config)
    if summary.stopped_by is not None:
        err.print(f"Stopped by {summary.stopped_by} at step {summary.steps}; checkpoint saved. "
                  f"Continue with: medformer train --out {run_dir} --resume")
        raise typer.Exit(130 if summary.stopped_by == "SIGINT" else 143)


def print_summary(summary: RunSummary, config: RunConfig) -> None:
    """Per (task, dataset): its first and recent loss, its chance level, its recent metrics and
    whether it learned."""
    table = Table(title=f"run {summary.run_dir}",
                  caption="loss: first logged -> mean of the last quarter of the row's batches; chance: what a "
                          "head that ignores the image scores, loss and (metric)")
    for column in ("task", "dataset", "loss", "chance", "metrics", "verdict"):
        table.add_column(column, no_wrap=column in ("task", "dataset", "loss", "verdict"))
    for (task, dataset), judged in summary.verdicts.items():
        metrics = ", ".join(f"{name} {value:.3f}" + (f" ({judged.chance.value:.3f})" if judged.chance is not None
                                                    and name == judged.chance.metric else "")
                            for name, value in judged.metrics.items())
        chance = "-" if judged.chance is None else f"{judged.chance.loss:.3f}"
        table.add_row(task, dataset, f"{judged.first_loss:.3f} -> {judged.loss:.3f}", chance, metrics,
                      f"[{VERDICT_STYLES.get(judged.status, 'yellow')}]{judged.status}")
    out.print(table)
    rate = summary.samples / max(summary.seconds, 1e-9)
    out.print(f"{summary.steps} steps, {summary.samples} samples, {summary.seconds:.1f} s ({rate:.0f} samples/s); "
              f"encoder: {summary.run_dir / 'encoder'}")


def finetune(
    dataset: str = typer.Option(None, "--dataset", "-d",
                                help="A labeled dataset, e.g. retinamnist (required unless --resume)."),
    task: str = typer.Option(None, "--task",
                             help="classification or segmentation (default: classification when the dataset "
                                  "has class labels, else segmentation of its masks)."),
    source: str = typer.Option(None, "--from",
                               help="A `medformer train` run directory or an exported encoder. "
                                    "Omit to train from scratch."),
    linear_probe: bool = typer.Option(False, "--linear-probe", help="Freeze the encoder; train only the head."),
    label_fraction: float = typer.Option(None, min=0.0, max=1.0,
                                         help="Fraction of training labels, stratified and seeded (default 1)."),
    epochs: int = typer.Option(None, min=1, help="Epochs over the labeled train split (default 30; segmentation 8)."),
    batch_size: int = typer.Option(None, min=1, help="Samples per batch (default 64; segmentation 16)."),
    lr: float = typer.Option(None, min=0.0, help="Learning rate (default 1e-3; 1e-2 for a linear probe)."),
    layer_decay: float = typer.Option(None, min=0.0, max=1.0,
                                      help="Layer-wise LR decay from the head down; 1 turns it off "
                                           "(default 0.75 with --from, 1 from scratch)."),
    head_epochs: int = typer.Option(None, min=0,
                                    help="With --from: epochs that train the head alone on the frozen encoder "
                                         "(at the linear probe's LR) before --epochs of the whole model "
                                         "(default 0)."),
    eval_every: int = typer.Option(None, min=1, help="Epochs between validations (default: about 20 per run)."),
    label_smoothing: float = typer.Option(None,
                                          help="Label smoothing of the supervised targets, e.g. 0.1 (default 0: off)."),
    head_batch_norm: bool = typer.Option(None, "--head-batch-norm/--no-head-batch-norm",
                                         help="Batch-normalise the pooled feature before the classifier "
                                              "(default: off)."),
    ema: float = typer.Option(None, help="EMA decay of the weights, e.g. 0.999; "
                                         "validation and the saved model use the EMA (default 0: off)."),
    mixup: float = typer.Option(None, help="Mixup alpha, e.g. 0.2 (default 0: off)."),
    model: str = typer.Option(None, help="Model preset when training from scratch (default tiny)."),
    model_option: list[str] = typer.Option(None,
                                           help="OPTION=VALUE overriding the model (repeat), e.g. latent_pool=false."),
    data_root: Path = typer.Option(None, help="Where MedMNIST files live."),
    out_dir: Path = typer.Option(None, "--out", help="Run directory (default runs/finetune-DATASET-DATE-TIME)."),
    seed: int = typer.Option(None, help="Random seed (default 0)."),
    device: str = typer.Option(None, help="auto, cpu or cuda[:N] (default auto)."),
    tensorboard: bool = typer.Option(None, "--tensorboard/--no-tensorboard", help="Also write TensorBoard events."),
    resume: bool = typer.Option(False, "--resume", help="Continue the fine-tune in --out from its last checkpoint."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
):
    """Fine-tune (or linear-probe) a pretrained encoder on a labeled dataset; report test AUC and ACC
    (classification) or per-class Dice (segmentation)."""
    from medformer_core.downstream.finetune import FinetuneConfig, Finetuner, read_finetune_config

    given = {
        "dataset": dataset, "task": task, "source": source, "linear_probe": linear_probe or None,
        "label_fraction": label_fraction,
        "epochs": epochs, "batch_size": batch_size, "lr": lr, "layer_decay": layer_decay, "head_epochs": head_epochs,
        "eval_every": eval_every,
        "label_smoothing": label_smoothing, "head_batch_norm": head_batch_norm, "ema": ema, "mixup": mixup,
        "model": model,
        "model_options": _toml_values(split_pairs(model_option, "--model-option", "--model-option depth=2")) or None,
        "data_root": str(data_root) if data_root else None, "seed": seed, "device": device, "tensorboard": tensorboard,
    }
    given = {k: v for k, v in given.items() if v is not None}
    if resume:
        if out_dir is None:
            raise UsageError("--resume needs --out DIR, the fine-tune to continue")
        saved = read_finetune_config(out_dir / "finetune.toml")
        check_resume_keeps(saved, given, out_dir, RESUMABLE_FINETUNE)
        config = replace(saved, **given)
    elif dataset is None:
        raise UsageError("--dataset is required",
                         hint="e.g. --dataset retinamnist; or --resume --out RUN to continue a fine-tune")
    else:
        config = FinetuneConfig(**given)
    run_dir = out_dir or Path("runs") / time.strftime(f"finetune-{dataset.replace(':', '-')}-%Y%m%d-%H%M%S")
    try:
        results = Finetuner(config, run_dir, quiet=quiet, resume=resume).run()
    except RunStopped as stop:
        err.print(f"Stopped by {stop.signal_name} at step {stop.step}; checkpoint saved. "
                  f"Continue with: medformer finetune --out {run_dir} --resume")
        raise typer.Exit(stop.exit_code) from None
    print_results([results], f"{results['mode']} on {results['dataset']} ({results['label_fraction']:.0%} labels), "
                            f"best val epoch {results['best_epoch']}: {run_dir / 'results.json'}")


def evaluate(
    run: Path = typer.Argument(..., help="A `medformer finetune` run directory."),
    split: str = typer.Option("test", help="train, val or test."),
    data_root: Path = typer.Option(None, help="Where MedMNIST files live."),
    out_file: Path = typer.Option(None, "--out", help="Where to write the metrics (default RUN/eval_SPLIT.json)."),
    device: str = typer.Option("auto"),
):
    """Evaluate a fine-tuned model: AUC and ACC exactly as MedMNIST's evaluator computes them."""
    import json

    from medformer_core.downstream.finetune import evaluate_run

    if split not in ("train", "val", "test"):
        raise UsageError(f"--split must be train, val or test, got '{split}'")
    metrics = evaluate_run(run, split, str(data_root) if data_root else None, device)
    path = out_file or run / f"eval_{split}.json"
    path.write_text(json.dumps(metrics, indent=2))
    print_results([{**metrics, "test": metrics}], f"{split} metrics: {path}")


def print_results(results: list[dict], caption: str) -> None:
    if "mean_dice" in results[0]["test"]:
        return print_dice(results, caption)
    table = Table(title=caption)
    for column in ("dataset", "mode", "AUC", "ACC"):
        table.add_column(column)
    for r in results:
        table.add_row(r["dataset"], r["mode"], f"{r['test']['auc']:.4f}", f"{r['test']['acc']:.4f}")
    out.print(table)


def print_dice(results: list[dict], caption: str) -> None:
    """Segmentation results: mean foreground Dice and each class's Dice."""
    table = Table(title=caption)
    for column in ("dataset", "mode", "mean Dice", "per-class Dice"):
        table.add_column(column)
    for r in results:
        classes = " ".join(f"{name} {value:.4f}" for name, value in r["test"]["dice"].items())
        table.add_row(r["dataset"], r["mode"], f"{r['test']['mean_dice']:.4f}", classes)
    out.print(table)
