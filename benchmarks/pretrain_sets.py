"""Which sets to pretrain on: all four shared sets at once, the target set alone, or the other three
(transfer to a set the encoder never saw). Judged on the target's big val set, in units of the noise
floor: the gap between two pretraining seeds of the four-set run.

For each target it pretrains the `tiny` preset with the recipe's tasks (mae, mae3d, rotation,
contrastive) on every set list, fine-tunes each pretraining and a from-scratch model on the target
at one label fraction, and writes a table (val AUC/ACC, test AUC/ACC) to benchmarks/results/.

    python benchmarks/pretrain_sets.py --data-root ../shared/data/medmnist --target bloodmnist

Run directories go to --work and are reused, so an interrupted benchmark resumes.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from medformer_core.api.datasets import default_data_root
from medformer_core.downstream.finetune import FinetuneConfig, Finetuner
from medformer_core.engine.config import RunConfig
from medformer_core.engine.trainer import Trainer

HERE = Path(__file__).resolve().parent
FOUR_SETS = ("retinamnist", "bloodmnist", "organamnist", "adrenalmnist3d")
TASKS = ("mae", "mae3d", "rotation", "contrastive")


def set_lists(target: str) -> dict[str, tuple[tuple[str, ...], int]]:
    """name -> (datasets, seed) of every pretraining the comparison needs for `target`."""
    others = tuple(name for name in FOUR_SETS if name != target)
    return {"four sets, seed 0": (FOUR_SETS, 0), "four sets, seed 1": (FOUR_SETS, 1),
            "target alone": ((target,), 0), "the other three (transfer)": (others, 0)}


def pretrain(datasets: tuple[str, ...], seed: int, steps: int, data_root: Path, work: Path) -> tuple[Path, float]:
    """Pretrain (or reuse) one encoder; returns its run directory and the minutes it took."""
    run_dir = work / f"pretrain-{'+'.join(datasets)}-seed{seed}-{steps}"
    done = run_dir / "seconds.json"
    if done.is_file():
        return run_dir, json.loads(done.read_text())["seconds"] / 60
    start = time.perf_counter()
    tasks = [task for task in TASKS if task != "mae3d" or "adrenalmnist3d" in datasets]
    if datasets == ("adrenalmnist3d",):
        tasks = ["mae3d", "rotation", "contrastive"]
    config = RunConfig(plugins=tasks, datasets=list(datasets), data_root=str(data_root), steps=steps,
                       batch_size=32, seed=seed, checkpoint_every=max(1, steps // 4), picture_every=steps,
                       knn_every=0).validate()
    summary = Trainer(config, run_dir, resume=(run_dir / "checkpoints").is_dir(), quiet=True).run()
    if summary.stopped_by is not None:
        sys.exit(f"pretraining stopped by {summary.stopped_by}; run the same command again to resume it")
    seconds = time.perf_counter() - start
    done.write_text(json.dumps({"seconds": seconds,
                                "verdicts": {f"{t} on {d}": v.status for (t, d), v in summary.verdicts.items()}}))
    return run_dir, seconds / 60


def finetune(target: str, source: Path | None, fraction: float, epochs: int, data_root: Path, out: Path) -> dict:
    """Fine-tune `source` (None: from scratch) on `target` (or reuse the finished run)."""
    if (out / "results.json").is_file():
        return json.loads((out / "results.json").read_text())
    config = FinetuneConfig(dataset=target, source=None if source is None else str(source), label_fraction=fraction,
                            epochs=epochs, batch_size=64, data_root=str(data_root))
    return Finetuner(config, out, quiet=True, resume=(out / "checkpoints").is_dir()).run()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=None, help="default: $MEDFORMER_DATA_ROOT or ~/.medmnist")
    parser.add_argument("--target", default="bloodmnist", choices=FOUR_SETS)
    parser.add_argument("--steps", type=int, default=600, help="pretraining steps of 32 samples")
    parser.add_argument("--fraction", type=float, default=0.01, help="the target's label fraction")
    parser.add_argument("--epochs", type=int, default=100, help="fine-tune epochs")
    parser.add_argument("--work", default="runs/pretrain-sets")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data_root, work = default_data_root(args.data_root), Path(args.work)
    missing = [name for name in FOUR_SETS if not (data_root / f"{name}.npz").is_file()]
    if missing:
        sys.exit(f"error: {', '.join(missing)} not found in {data_root}")
    rows = []
    for name, (datasets, seed) in set_lists(args.target).items():
        source, minutes = pretrain(datasets, seed, args.steps, data_root, work)
        out = work / f"finetune-{args.target}-{args.fraction:g}-from-{source.name}"
        rows.append((name, minutes, finetune(args.target, source, args.fraction, args.epochs, data_root, out)))
        print(f"{name}: val AUC {rows[-1][2]['val']['auc']:.3f}", flush=True)
    scratch = finetune(args.target, None, args.fraction, args.epochs, data_root,
                       work / f"finetune-{args.target}-{args.fraction:g}-scratch")
    rows.append(("from scratch", 0.0, scratch))
    floor = abs(rows[0][2]["val"]["auc"] - rows[1][2]["val"]["auc"])
    lines = [f"# Which sets to pretrain on: {args.target} at {args.fraction:.0%} labels", "",
             f"Command: `python benchmarks/pretrain_sets.py {' '.join(sys.argv[1:])}`  ",
             f"`tiny` preset, {args.steps} pretraining steps of 32, fine-tune {args.epochs} epochs, seed 0. "
             f"Noise floor: the val AUC gap between the two four-set pretraining seeds, {floor:.3f}.", "",
             "| pretrained on | pretraining min | val AUC | val ACC | test AUC | test ACC "
             "| val AUC - four sets (floors) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    reference = (rows[0][2]["val"]["auc"] + rows[1][2]["val"]["auc"]) / 2
    for name, minutes, r in rows:
        gap = r["val"]["auc"] - reference
        floors = f"{gap:+.3f} ({gap / floor:+.1f})" if floor > 0 else f"{gap:+.3f}"
        lines.append(f"| {name} | {minutes:.1f} | {r['val']['auc']:.3f} | {r['val']['acc']:.3f} | "
                     f"{r['test']['auc']:.3f} | {r['test']['acc']:.3f} | {floors} |")
    table = "\n".join(lines) + "\n"
    (HERE / "results" / f"pretrain_sets_{args.target}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
