"""The MedMNIST benchmark in one command: pretrain, then fine-tune, probe and train from scratch
at 100%, 10% and 1% of the labels, 3 seeds; tables and a label-efficiency plot.

The GPU recipe pretrains once per seed; the CPU recipe (sized for 2 cores, < 90 min) pretrains once
and varies the fine-tuning seed (label subset, head init, order).

    python benchmarks/medmnist_recipe.py --data-root ../shared/data/medmnist            # CPU default
    python benchmarks/medmnist_recipe.py --recipe gpu --data-root ~/.medmnist --device cuda

Pretraining uses only the training splits, without labels. Model selection is on val; test is
evaluated once per fine-tune run, on the epoch chosen on val. Results go to benchmarks/results/.
"""

import argparse
import json
import math
import multiprocessing
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from cnn_baselines import train_resnet

from medformer_core.api.datasets import default_data_root
from medformer_core.api.errors import UsageError
from medformer_core.api.options import parse_options, split_pairs
from medformer_core.downstream.finetune import PRETRAINED_LAYER_DECAY, FinetuneConfig, Finetuner, read_finetune_config
from medformer_core.engine.config import RunConfig, load_config
from medformer_core.engine.trainer import Trainer
from medformer_core.model.medformer import ModelConfig

HERE = Path(__file__).resolve().parent
BASELINES = {  # published MedMNIST v2 test AUC / ACC (Yang et al. 2023), the strongest ResNet-18 column
    "retinamnist": ("ResNet-18 (28)", 0.717, 0.524),
    "adrenalmnist3d": ("ResNet-18 + 3D", 0.827, 0.721),
}
REQUIRED = ("retinamnist", "adrenalmnist3d")
MODES = ("finetune", "linear-probe", "scratch")
BASELINE = "resnet18"


@dataclass(frozen=True)
class Recipe:
    pretrain_steps: int
    pretrain_batch: int
    plugins: tuple[str, ...]
    model: str
    epochs: dict[float, int]  # fine-tune epochs per label fraction (fewer labels: more epochs, same budget)
    batch_size: int
    fractions: tuple[float, ...] = (1.0, 0.1, 0.01)
    seeds: tuple[int, ...] = (0, 1, 2)
    pretrain_per_seed: bool = True  # False: one pretraining (seed 0) serves every fine-tune seed
    jobs: int = 1  # runs trained at once, each with its share of the CPU threads
    layer_decay: float = PRETRAINED_LAYER_DECAY  # layer-wise LR decay when fine-tuning the pretrained encoder
    baseline_epochs: int = 0  # ResNet-18 beside every cell, MedMNIST protocol (100 epochs); 0: not run
    baseline_datasets: tuple[str, ...] = ()  # the datasets ResNet-18 runs on; empty: all
    baseline_fractions: tuple[float, ...] = ()  # the label fractions it runs at; empty: all
    model_options: tuple[tuple[str, object], ...] = ()  # overrides of the preset, e.g. (("adapter3d", "conv3d"),)

    def runs_baseline(self, dataset: str, fraction: float) -> bool:
        """Whether ResNet-18 is trained beside the cell (dataset, fraction)."""
        return bool(self.baseline_epochs) and (not self.baseline_datasets or dataset in self.baseline_datasets) \
            and (not self.baseline_fractions or fraction in self.baseline_fractions)

    def options_text(self) -> str:
        """The model options, for the table's header: " (adapter3d=conv3d)", or "" without any."""
        return f" ({', '.join(f'{k}={v}' for k, v in self.model_options)})" if self.model_options else ""

    def baseline_text(self) -> str:
        """How ResNet-18 was run, for the table's header."""
        if not self.baseline_epochs:
            return "not run"
        where = [", ".join(self.baseline_datasets)] if self.baseline_datasets else []
        where += [", ".join(f"{f:.0%}" for f in self.baseline_fractions) + " labels"] if self.baseline_fractions else []
        return f"{self.baseline_epochs} epochs" + (f" ({'; '.join(where)})" if where else "")


RECIPES = {
    "cpu": Recipe(pretrain_steps=2400, pretrain_batch=32, plugins=("mae", "mae3d", "rotation", "contrastive"),
                  model="tiny", epochs={1.0: 20, 0.1: 50, 0.01: 100}, batch_size=64, pretrain_per_seed=False,
                  baseline_epochs=100, baseline_datasets=("retinamnist",),
                  baseline_fractions=(0.1, 0.01),  # the ResNet-18 runs 2 cores afford: ~6 min a seed
                  jobs=2),  # two 1-thread runs at once train ~20% more per minute than one 2-thread run
    "gpu": Recipe(pretrain_steps=20000, pretrain_batch=256,
                  plugins=("mae", "mae3d", "rotation", "contrastive", "restoration"),
                  model="small", epochs={1.0: 100, 0.1: 200, 0.01: 400}, batch_size=128, baseline_epochs=100),
    "smoke": Recipe(pretrain_steps=4, pretrain_batch=8, plugins=("mae", "mae3d"), model="tiny",
                    epochs={1.0: 1, 0.1: 1}, batch_size=32, fractions=(1.0, 0.1), seeds=(0, 1)),
}


def local_medmnist(data_root: Path) -> list[str]:
    """The MedMNIST datasets (28 size) whose official file is in `data_root`; the required two first."""
    import medmnist

    found = [flag for flag in medmnist.INFO if (data_root / f"{flag}.npz").is_file()]
    missing = [flag for flag in REQUIRED if flag not in found]
    if missing:
        sys.exit(f"error: {', '.join(missing)} not found in {data_root} (run `medformer datasets download NAME`)")
    return list(REQUIRED) + sorted(set(found) - set(REQUIRED))


def pretrain(recipe: Recipe, datasets: list[str], data_root: Path, seed: int, out: Path, device: str) -> Path:
    """Pretrain (or find, in a resumed recipe) the encoder for `seed`; its run time goes to seconds.json."""
    run_dir = out / f"pretrain-seed{seed}"
    check_pretraining(recipe, run_dir)
    if (run_dir / "seconds.json").is_file():  # written only when the pretraining ran to its last step
        return run_dir
    start = time.perf_counter()
    config = RunConfig(plugins=list(recipe.plugins), datasets=datasets, data_root=str(data_root),
                       model=recipe.model, model_options=dict(recipe.model_options),
                       steps=recipe.pretrain_steps, batch_size=recipe.pretrain_batch,
                       seed=seed, device=device, checkpoint_every=max(1, recipe.pretrain_steps // 4),
                       picture_every=recipe.pretrain_steps, log_every=10).validate()
    summary = Trainer(config, run_dir, resume=(run_dir / "checkpoints").is_dir(), quiet=True).run()
    if summary.stopped_by is not None:
        sys.exit(f"pretraining stopped by {summary.stopped_by} at step {summary.steps}; run the same command "
                 "again to resume it")
    (run_dir / "seconds.json").write_text(json.dumps({"seconds": time.perf_counter() - start}))
    return run_dir


def check_pretraining(recipe: Recipe, run_dir: Path) -> None:
    """Exit with a clear error when `run_dir` holds a pretraining made with other settings."""
    if not (run_dir / "config.toml").is_file():
        return
    found = load_config(run_dir / "config.toml", {})
    if found.steps != recipe.pretrain_steps:
        sys.exit(f"error: {run_dir} holds a {found.steps}-step pretraining, not {recipe.pretrain_steps}; "
                 "pass another --work")
    if sorted(found.plugins) != sorted(recipe.plugins):
        sys.exit(f"error: {run_dir} was pretrained with tasks {', '.join(found.plugins)}, not "
                 f"{', '.join(recipe.plugins)}; pass another --work")
    if found.model_options != dict(recipe.model_options):
        sys.exit(f"error: {run_dir} was pretrained with model options {found.model_options}, not "
                 f"{dict(recipe.model_options)}; pass another --work")


def pretrain_seconds(run_dir: Path) -> float:
    """How long a pretraining took (NaN when it was made before times were recorded)."""
    path = run_dir / "seconds.json"
    return json.loads(path.read_text())["seconds"] if path.is_file() else math.nan


def finetune(recipe: Recipe, dataset: str, mode: str, fraction: float, seed: int, source: Path,
             data_root: Path, out: Path, device: str) -> dict:
    """One fine-tune, probe or from-scratch run at the mode's default learning rate; a finished run
    is reused. Fine-tune runs are named by their layer decay."""
    decay = layer_decay_of(recipe, mode)
    config = FinetuneConfig(
        dataset=dataset, source=None if mode == "scratch" else str(source), linear_probe=mode == "linear-probe",
        label_fraction=fraction, epochs=recipe.epochs[fraction], batch_size=recipe.batch_size, layer_decay=decay,
        model=recipe.model, model_options=dict(recipe.model_options), seed=seed, data_root=str(data_root),
        device=device,
    )
    run_dir = finetune_dir(recipe, dataset, mode, fraction, seed, out)
    check_epochs(run_dir, config.epochs)
    if (run_dir / "results.json").is_file():
        return json.loads((run_dir / "results.json").read_text())
    return Finetuner(config, run_dir, quiet=True, resume=(run_dir / "checkpoints").is_dir()).run()


def layer_decay_of(recipe: Recipe, mode: str) -> float:
    """The layer-wise LR decay of a cell: the recipe's for a fine-tune, none (1) otherwise."""
    return recipe.layer_decay if mode == "finetune" else 1.0


def finetune_dir(recipe: Recipe, dataset: str, mode: str, fraction: float, seed: int, out: Path) -> Path:
    """A cell's run directory; fine-tune runs are named by their layer decay."""
    decay = layer_decay_of(recipe, mode)
    suffix = "" if decay == 1.0 else f"-decay{decay:g}"
    return out / f"{dataset}-{mode}-{fraction:g}-seed{seed}{suffix}"


def check_epochs(run_dir: Path, epochs: int) -> None:
    """Exit with a clear error when `run_dir` holds a run of other epochs."""
    if (run_dir / "finetune.toml").is_file():
        found = read_finetune_config(run_dir / "finetune.toml").epochs
        if found != epochs:
            sys.exit(f"error: {run_dir} holds a {found}-epoch run, not {epochs}; pass another --work")


def run_all(recipe: Recipe, datasets: list[str], data_root: Path, work: Path, device: str, jobs: int,
            start: float) -> tuple[list[dict], set[Path]]:
    """Every pretraining and cell of the recipe, `jobs` runs at a time; finished runs are reused.
    Returns the cells' results and the pretraining runs they used."""
    pretrain_seeds = sorted({seed if recipe.pretrain_per_seed else 0 for seed in recipe.seeds})
    free, needs_encoder = [], []  # cells as (dataset, mode, fraction, seed)
    for seed in recipe.seeds:
        for dataset in datasets:
            for fraction in recipe.fractions:
                for mode in MODES:
                    (free if mode == "scratch" else needs_encoder).append((dataset, mode, fraction, seed))
                if recipe.runs_baseline(dataset, fraction):
                    free.append((dataset, BASELINE, fraction, seed))
    for seed in pretrain_seeds:  # a run made with other settings stops the recipe before anything trains
        check_pretraining(recipe, work / f"pretrain-seed{seed}")
    for dataset, mode, fraction, seed in free + needs_encoder:
        if mode != BASELINE:
            check_epochs(finetune_dir(recipe, dataset, mode, fraction, seed, work), recipe.epochs[fraction])
    arguments = (data_root, work, device)
    if jobs == 1:
        sources = {}
        for seed in pretrain_seeds:
            sources[seed] = pretrain(recipe, datasets, data_root, seed, work, device)
            print(f"[{(time.perf_counter() - start) / 60:.1f} min] pretrained seed {seed}", flush=True)
        results = []
        for cell in free + needs_encoder:
            results.append(run_cell(recipe, cell, sources, *arguments))
            report(results[-1], start)
        return results, set(sources.values())
    threads = max(1, torch.get_num_threads() // jobs)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=torch.set_num_threads, initargs=(threads,)) as pool:
        try:
            pretrainings = {seed: pool.submit(pretrain, recipe, datasets, data_root, seed, work, device)
                            for seed in pretrain_seeds}
            cells = [pool.submit(run_cell, recipe, cell, {}, *arguments) for cell in free]
            for future in cells:
                future.add_done_callback(lambda f: f.exception() or report(f.result(), start))
            sources = {seed: future.result() for seed, future in pretrainings.items()}
            print(f"[{(time.perf_counter() - start) / 60:.1f} min] pretrained", flush=True)
            for cell in needs_encoder:
                cells.append(pool.submit(run_cell, recipe, cell, sources, *arguments))
                cells[-1].add_done_callback(lambda f: f.exception() or report(f.result(), start))
            return [future.result() for future in cells], set(sources.values())
        except BaseException:  # a run failed or was interrupted: the runs in progress finish and are kept
            pool.shutdown(cancel_futures=True)
            raise


def run_cell(recipe: Recipe, cell: tuple, sources: dict[int, Path], data_root: Path, work: Path,
             device: str) -> dict:
    """One cell's run: ResNet-18, or a Medformer fine-tune, probe or from-scratch run."""
    dataset, mode, fraction, seed = cell
    if mode == BASELINE:
        return train_resnet(dataset, fraction, seed, recipe.baseline_epochs, data_root,
                            work / f"{dataset}-{BASELINE}-{fraction:g}-seed{seed}", device)
    source = sources.get(seed if recipe.pretrain_per_seed else 0)
    return finetune(recipe, dataset, mode, fraction, seed, source, data_root, work, device)


def report(r: dict, start: float) -> None:
    print(f"[{(time.perf_counter() - start) / 60:.1f} min] {r['dataset']} {r['mode']} {r['label_fraction']:g} "
          f"seed {r['seed']}: test AUC {r['test']['auc']:.3f} ACC {r['test']['acc']:.3f} "
          f"(best epoch {r['best_epoch']})",
          flush=True)


def summarise(results: list[dict]) -> dict:
    """(dataset, mode, fraction) -> mean and std of test AUC/ACC over seeds, and the mean val AUC."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["dataset"], r["mode"], r["label_fraction"]), []).append(r)
    summary = {}
    for key, runs in groups.items():
        auc = np.array([r["test"]["auc"] for r in runs])
        acc = np.array([r["test"]["acc"] for r in runs])
        summary[key] = {"auc": (float(np.nanmean(auc)), float(np.nanstd(auc))),
                        "acc": (float(acc.mean()), float(acc.std())),
                        "val_auc": float(np.nanmean([r["val"]["auc"] for r in runs])), "seeds": len(runs)}
    return summary


def selection_score(summary: dict) -> float:
    """Mean val AUC over the fine-tune cells: the one number recipe variants are compared on (never test)."""
    return float(np.nanmean([s["val_auc"] for (_, mode, _), s in summary.items() if mode == "finetune"]))


def markdown_table(summary: dict, datasets: list[str], recipe: Recipe, command: str, hardware: str,
                   minutes: float, jobs: int = 1) -> str:
    lines = [
        "# MedMNIST: pretrained Medformer vs from scratch (test AUC / ACC, mean +- std over seeds)",
        "",
        f"Command: `{command}`  ",
        f"Recipe: `{recipe.model}` model{recipe.options_text()}, {recipe.pretrain_steps} pretraining steps of "
        f"{recipe.pretrain_batch} "
        f"({', '.join(recipe.plugins)}), fine-tune epochs "
        f"{', '.join(f'{recipe.epochs[f]} at {f:.0%}' for f in recipe.fractions)} labels, layer decay "
        f"{recipe.layer_decay:g}, ResNet-18 "
        f"{recipe.baseline_text()}, seeds "
        f"{', '.join(map(str, recipe.seeds))}.  ",
        f"Hardware: {hardware}; compute time {minutes:.0f} min (pretraining plus every run, as each run "
        f"recorded it{f'; {jobs} runs at a time' if jobs > 1 else ''}).",
        "",
        "| dataset | labels | fine-tune (pretrained) | linear probe (pretrained) | from scratch "
        "| ResNet-18, this machine | published |",
        "|---|---|---|---|---|---|---|",
    ]
    for dataset in datasets:
        name, auc, acc = BASELINES.get(dataset, ("-", math.nan, math.nan))
        for fraction in recipe.fractions:
            cells = []
            for mode in (*MODES, BASELINE):
                s = summary.get((dataset, mode, fraction))
                cells.append("-" if s is None else
                             f"{s['auc'][0]:.3f} +- {s['auc'][1]:.3f} / {s['acc'][0]:.3f} +- {s['acc'][1]:.3f}")
            published = f"{name}: {auc:.3f} / {acc:.3f}" if fraction == 1.0 and name != "-" else ""
            lines.append(f"| {dataset} | {fraction:.0%} | " + " | ".join(cells) + f" | {published} |")
    lines += ["", f"Selection score (mean val AUC of the fine-tune cells; variants are compared on this, never on "
                  f"test): {selection_score(summary):.3f}", "",
              "Goals, checked on these numbers (ResNet-18 of this table where it was run, else published):", ""]
    for dataset in datasets:
        lines += goal_lines(summary, dataset, recipe.fractions)
    return "\n".join(lines) + "\n"


def goal_lines(summary: dict, dataset: str, fractions) -> list[str]:
    """The goals' verdicts for `dataset`: fine-tuned vs ResNet-18 at every label fraction (by more than
    the seeds' spread below 100%), and pretrained vs from scratch at 10%."""
    lines = []
    for fraction in fractions:
        ft, cnn = summary.get((dataset, "finetune", fraction)), summary.get((dataset, BASELINE, fraction))
        if cnn is not None:
            name, auc, spread = "ResNet-18 (this machine)", cnn["auc"][0], cnn["auc"][1]
        elif fraction == 1.0 and dataset in BASELINES:
            name, auc, spread = f"{BASELINES[dataset][0]} (published)", BASELINES[dataset][1], 0.0
        else:
            continue
        if ft:
            margin = ft["auc"][0] - auc
            needed = 0.0 if fraction == 1.0 else max(spread, ft["auc"][1])
            verdict = "met" if (margin >= 0 if fraction == 1.0 else margin > needed) else "missed"
            lines.append(f"- {dataset}, {fraction:.0%} labels: fine-tuned AUC {ft['auc'][0]:.3f} vs {name} {auc:.3f} "
                         f"({margin:+.3f}{f', spread {needed:.3f}' if fraction < 1.0 else ''}): {verdict}")
    pre, scratch = summary.get((dataset, "finetune", 0.1)), summary.get((dataset, "scratch", 0.1))
    if pre and scratch:
        margin = pre["auc"][0] - scratch["auc"][0]
        spread = max(pre["auc"][1], scratch["auc"][1])
        verdict = "met" if margin > spread else "missed"
        lines.append(f"- {dataset}, 10% labels: pretrained - scratch = {margin:+.3f} AUC vs seed spread "
                     f"{spread:.3f}: {verdict}")
    return lines


def label_efficiency_plot(summary: dict, datasets: list[str], fractions, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 4), dpi=100, squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        for mode in (*MODES, BASELINE):
            points = [(f, summary[(dataset, mode, f)]["auc"]) for f in fractions if (dataset, mode, f) in summary]
            if points:
                xs = [100 * f for f, _ in points]
                ax.errorbar(xs, [m for _, (m, _) in points], yerr=[s for _, (_, s) in points], marker="o",
                            capsize=3, label=mode)
        if dataset in BASELINES:
            ax.axhline(BASELINES[dataset][1], color="gray", linestyle="--", label=BASELINES[dataset][0])
        ax.set(xscale="log", title=dataset, xlabel="% of training labels", ylabel="test AUC")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def option_list(text: str, kind) -> tuple:
    """A comma-separated option as a tuple of `kind`; "all" is the empty tuple (no restriction)."""
    return () if text == "all" else tuple(kind(part) for part in text.split(","))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="cpu")
    parser.add_argument("--data-root", default=None, help="default: $MEDFORMER_DATA_ROOT or ~/.medmnist")
    parser.add_argument("--work", default="runs/medmnist-benchmark", help="run directories (resumable)")
    parser.add_argument("--results", default=str(HERE / "results"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--jobs", type=int, default=None,
                        help="runs trained at once, the CPU threads split between them (default: the recipe's; "
                             "cpu: 2, gpu and smoke: 1)")
    parser.add_argument("--layer-decay", type=float, default=None,
                        help="override the recipe's layer-wise LR decay for fine-tuning "
                             "(those runs get their own directories; the rest are reused)")
    parser.add_argument("--baseline-epochs", type=int, default=None,
                        help="train ResNet-18 beside the cells for this many epochs (MedMNIST: 100; 0: not at all). "
                             "Default: 100; the cpu recipe runs it on RetinaMNIST at 10%% and 1%% labels only "
                             "(100%% takes ~40 min a seed on 2 CPU cores, a 3D epoch ~10 min)")
    parser.add_argument("--baseline-datasets", default=None,
                        help="comma-separated datasets ResNet-18 runs on (default: the recipe's; 'all': every one)")
    parser.add_argument("--baseline-fractions", default=None,
                        help="comma-separated label fractions ResNet-18 runs at, e.g. 0.1,0.01 (default: the "
                             "recipe's; 'all': every one)")
    parser.add_argument("--pretrain-steps", type=int, default=None,
                        help="override the recipe's pretraining steps (use a fresh --work for it)")
    parser.add_argument("--plugin", action="append", default=[], metavar="TASK",
                        help="pretrain with these tasks instead of the recipe's (repeat), e.g. --plugin mae "
                             "--plugin mae3d (use a fresh --work for it)")
    parser.add_argument("--model-option", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a field of the recipe's model preset, e.g. adapter3d=conv3d (repeat; use a "
                             "fresh --work for it)")
    args = parser.parse_args()
    recipe = RECIPES[args.recipe]
    if args.model_option:
        try:
            options = parse_options(ModelConfig, split_pairs(args.model_option, "--model-option",
                                                             "--model-option adapter3d=conv3d"), "--model-option")
        except UsageError as exc:
            sys.exit(f"error: {exc}")
        recipe = replace(recipe, model_options=tuple(options.items()))
    if args.plugin:
        recipe = replace(recipe, plugins=tuple(args.plugin))
    if args.layer_decay is not None:
        recipe = replace(recipe, layer_decay=args.layer_decay)
    if args.pretrain_steps is not None:
        recipe = replace(recipe, pretrain_steps=args.pretrain_steps)
    if args.baseline_epochs is not None:
        recipe = replace(recipe, baseline_epochs=args.baseline_epochs)
    if args.baseline_datasets is not None:
        recipe = replace(recipe, baseline_datasets=option_list(args.baseline_datasets, str))
    if args.baseline_fractions is not None:
        recipe = replace(recipe, baseline_fractions=option_list(args.baseline_fractions, float))
    data_root = default_data_root(args.data_root)
    datasets = local_medmnist(data_root)
    work, results_dir = Path(args.work) / args.recipe, Path(args.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    if args.jobs is not None and args.jobs < 1:
        sys.exit(f"error: --jobs must be >= 1, got {args.jobs}")
    jobs = args.jobs or recipe.jobs
    start = time.perf_counter()
    results, sources = run_all(recipe, datasets, data_root, work, args.device, jobs, start)
    wall_minutes = (time.perf_counter() - start) / 60
    minutes = (sum(pretrain_seconds(s) for s in sources) + sum(r["seconds"] for r in results)) / 60
    summary = summarise(results)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else \
        f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    command = "python benchmarks/medmnist_recipe.py " + " ".join(sys.argv[1:])
    table = markdown_table(summary, datasets, recipe, command, device, minutes, jobs)
    (results_dir / f"medmnist_{args.recipe}.md").write_text(table)
    (results_dir / f"medmnist_{args.recipe}.json").write_text(json.dumps(
        {"recipe": args.recipe, "pretrain_steps": recipe.pretrain_steps, "layer_decay": recipe.layer_decay,
         "model": recipe.model, "model_options": dict(recipe.model_options),
         "selection_score": selection_score(summary), "minutes": minutes, "hardware": device, "jobs": jobs,
         "wall_minutes": wall_minutes,  # of the command that wrote this file (reused runs cost it nothing)
         "runs": [{k: v for k, v in r.items() if k != "history"} for r in results]}, indent=2))
    label_efficiency_plot(summary, datasets, recipe.fractions, results_dir / f"label_efficiency_{args.recipe}.png")
    print(table)


if __name__ == "__main__":
    main()
