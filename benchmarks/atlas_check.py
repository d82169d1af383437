"""A real-data segmentation check: the Colin27 T1 brain and its AAL atlas, end to end.

    python benchmarks/atlas_check.py            # the study: 3 seeds, 100% and 10% labels (about 10 min, one thread,
                                                # reusing the 10% runs of the val screen)
    python benchmarks/atlas_check.py --val-only --variant NAME   # a candidate, 10% labels, scored on val only
    python benchmarks/atlas_check.py --quick    # one short run per arm, as the tests run it (under a minute)

1. Data (atlas_data.prepare): the AAL regions grouped into 3 classes on the 1 mm T1; training
   blocks from the left hemisphere outside a held-out val slab, the slab kept whole for val, the
   right hemisphere kept whole as the disjoint test part.
2. `medformer train` pretrains (mae3d) on crops of unlabeled T1 volumes at SPACING mm.
3. `medformer finetune --task segmentation` on the training blocks, pretrained (`--from`) and from
   scratch, at each label fraction and seed, the same number of optimizer steps for every run.
4. `medformer predict` segments the val slab and the right hemisphere at their native 1 mm grid;
   each mask must have the input's shape and affine. Dice per class against the atlas in that
   grid, and each class's centroid in world mm against the atlas's.

Choices (VARIANTS: options of the pretrained arm, pretraining steps) are made on val with
`--val-only`, which never reads the test part; FINAL is the one chosen, and the study reads test
once for it. The medformer commands run in this process (one start of torch). Finished runs in
--work are reused: delete it after changing the data. Results go to RESULTS/atlas_check[_quick].md
and .json, the val screens to RESULTS/atlas_check_val_NAME.json.
"""

import argparse
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import atlas_data
import numpy as np

HERE = Path(__file__).resolve().parent
SPACING = 2  # mm per voxel the model sees
CROP = 24  # voxels per side: 48 mm, one training block
ARMS = ("pretrained", "scratch")


@dataclass(frozen=True)
class Plan:
    pretrain_steps: int
    pretrain_batch: int
    pretrain_crops: int  # crops per volume and epoch
    epochs: dict[float, int]  # per label fraction: the same number of optimizer steps for every fraction
    batch_size: int
    seeds: tuple[int, ...]
    pretrain_volumes: tuple[str, ...]
    pretrained_args: tuple[str, ...] = ()  # extra `medformer finetune` options of the pretrained arm


PLANS = {
    "full": Plan(pretrain_steps=600, pretrain_batch=16, pretrain_crops=64, epochs={1.0: 23, 0.1: 138}, batch_size=16,
                 seeds=(0, 1, 2), pretrain_volumes=atlas_data.COLIN27_T1 + atlas_data.OTHER_T1),
    "quick": Plan(pretrain_steps=4, pretrain_batch=8, pretrain_crops=8, epochs={1.0: 4}, batch_size=16, seeds=(0,),
                  pretrain_volumes=("ch2bet.nii.gz",)),
}
# Options of the pretrained arm tried on val (`--val-only --variant NAME`); FINAL is the one chosen there.
VARIANTS = {
    "plain": {"pretrained_args": ("--layer-decay", "1")},
    "layer-decay": {"pretrained_args": ("--layer-decay", "0.75")},
    "low-lr": {"pretrained_args": ("--lr", "0.0003", "--layer-decay", "1")},
    "long-pretrain": {"pretrain_steps": 1800, "pretrained_args": ("--layer-decay", "1")},
}
FINAL = "layer-decay"


def dataset_refs(data: atlas_data.Prepared, plan: Plan) -> tuple[str, str]:
    """(pretraining, fine-tuning) dataset references: the one place that says how the check reads
    its data. Both resample to SPACING mm and read CROP^3 crops; a training block is one crop."""
    crops = f"spacing={SPACING},crop={CROP}"
    return (f"folder:{data.pretrain},{crops},crops={plan.pretrain_crops},foreground=0.5,val=0,test=0",
            f"folder:{data.seg},{crops},crops=1,intensity=none")


def medformer(*args: str) -> float:
    """Run one medformer command in this process; returns its wall time in seconds."""
    from medformer_cli.app import main

    print("$ medformer " + " ".join(args), flush=True)
    start = time.perf_counter()
    try:
        main(list(args))
    except SystemExit as exc:
        if exc.code:
            raise RuntimeError(f"`medformer {args[0]}` exited with {exc.code}") from None
    return time.perf_counter() - start


def pretrain(plan: Plan, dataset: str, out: Path) -> dict:
    """Pretrain once (or reuse a finished run): {"run", "command", "wall_s"}."""
    args = ("train", "--dataset", dataset, "--plugin", "mae3d", "--steps", str(plan.pretrain_steps),
            "--batch-size", str(plan.pretrain_batch), "--knn-every", "0", "--seed", "0", "--out", str(out), "--quiet")
    record = out / "atlas_check.json"
    if not record.is_file():
        shutil.rmtree(out, ignore_errors=True)  # an unfinished run starts again
        wall = medformer(*args)
        record.write_text(json.dumps({"run": str(out), "command": "medformer " + " ".join(args), "wall_s": wall}))
    return json.loads(record.read_text())


def pretrain_name(plan: Plan, base: Plan) -> str:
    """The pretraining run's folder: "pretrain", with its steps when they differ from `base`'s."""
    return "pretrain" if plan.pretrain_steps == base.pretrain_steps else f"pretrain-{plan.pretrain_steps}"


def run_name(plan: Plan, base: Plan, arm: str, fraction: float, seed: int) -> str:
    """The run folder of one fine-tune, named by what sets it apart (so variants share runs)."""
    extra = ""
    if arm == "pretrained":
        extra = "".join(a.lstrip("-") for a in plan.pretrained_args)
        if plan.pretrain_steps != base.pretrain_steps:
            extra += f"p{plan.pretrain_steps}"
    return f"{arm}{'-' + extra if extra else ''}-{fraction:g}-e{plan.epochs[fraction]}-seed{seed}"


def finetune(plan: Plan, dataset: str, arm: str, fraction: float, seed: int, source: Path, out: Path) -> dict:
    """Fine-tune one arm (or reuse a finished run): its command, times, training blocks and block Dice."""
    epochs = plan.epochs[fraction]
    args = ["finetune", "--task", "segmentation", "--dataset", dataset, "--label-fraction", f"{fraction:g}",
            "--epochs", str(epochs), "--eval-every", str(epochs), "--batch-size", str(plan.batch_size),
            "--seed", str(seed), "--out", str(out), "--quiet"]
    if arm == "pretrained":
        args += ["--from", str(source), *plan.pretrained_args]
    record = out / "atlas_check.json"
    if not record.is_file():
        shutil.rmtree(out, ignore_errors=True)  # an unfinished run starts again
        wall = medformer(*args)
        results = json.loads((out / "results.json").read_text())
        record.write_text(json.dumps({"command": "medformer " + " ".join(args), "wall_s": wall,
                                      "train_seconds": results["seconds"], "train_blocks": results["train_samples"],
                                      "block_test_dice": results["test"]["mean_dice"]}))
    return json.loads(record.read_text())


def predict(run: Path, images: Path, out: Path) -> dict:
    """Segment the volumes in `images` with `run` into `out`; its command and wall time."""
    args = ("predict", str(run), "--input", str(images), "--out", str(out))
    wall = medformer(*args)
    return {"command": "medformer " + " ".join(args), "wall_s": wall}


def score(mask_path: Path, image_path: Path, labels_path: Path) -> dict:
    """Dice per class and mean of the predicted mask against the atlas classes (same grid), and each
    class's centroid offset (predicted - atlas) in world mm. The mask must have the image's shape
    and affine."""
    import nibabel as nib

    mask, image, labels = (nib.load(p) for p in (mask_path, image_path, labels_path))
    if mask.shape != image.shape or not np.allclose(mask.affine, image.affine, atol=1e-4):
        raise RuntimeError(f"{mask_path}: shape {mask.shape} and affine\n{mask.affine}\ndiffer from the input's "
                           f"{image.shape}\n{image.affine}")
    predicted, truth = np.asarray(mask.dataobj), np.asarray(labels.dataobj)  # [X, Y, Z] classes
    names = {c: name for c, (name, _) in atlas_data.CLASSES.items()}
    dice = {names[c]: dice_score(predicted == c, truth == c) for c in names}
    found, expected = (atlas_data.centroids(m, a.affine, names) for m, a in ((predicted, mask), (truth, labels)))
    offsets = {names[c]: None if found[c] is None else np.round(np.subtract(found[c], expected[c]), 1).tolist()
               for c in names}
    return {"dice": dice, "mean_dice": float(np.mean(list(dice.values()))), "centroid_offset_mm": offsets}


def dice_score(predicted: np.ndarray, truth: np.ndarray) -> float:
    total = predicted.sum() + truth.sum()
    return float(2.0 * (predicted & truth).sum() / total) if total else float("nan")


def baselines(image_path: Path, labels_path: Path) -> dict:
    """Mean Dice of two predictions that need no model: background everywhere, and the largest class
    (cerebral cortex) on every brain voxel (what knowing the brain outline alone gives)."""
    import nibabel as nib

    image = np.asarray(nib.load(image_path).dataobj)
    truth = np.asarray(nib.load(labels_path).dataobj)
    brain = np.where(image > 0, 1, 0)
    means = {}
    for name, guess in (("background everywhere", np.zeros_like(truth)), ("cortex on every brain voxel", brain)):
        means[name] = float(np.mean([dice_score(guess == c, truth == c) for c in atlas_data.CLASSES]))
    return means


def summary_rows(plan: Plan, runs: list[dict], key: str) -> list[dict]:
    """Per (fraction, arm) on part `key` ("val" or "test"): mean Dice per seed, their mean, std and
    range, and per-class means."""
    rows = []
    for fraction in sorted({r["fraction"] for r in runs}, reverse=True):
        for arm in ARMS:
            cell = [r for r in runs if r["fraction"] == fraction and r["arm"] == arm and key in r]
            if not cell:
                continue
            means = np.array([r[key]["mean_dice"] for r in cell])
            classes = {name: float(np.mean([r[key]["dice"][name] for r in cell])) for name in cell[0][key]["dice"]}
            rows.append({"fraction": fraction, "arm": arm, "seeds": {r["seed"]: r[key]["mean_dice"] for r in cell},
                         "mean": float(means.mean()), "std": float(means.std(ddof=1)) if len(means) > 1 else 0.0,
                         "range": float(means.max() - means.min()), "classes": classes,
                         "blocks": cell[0]["train_blocks"]})
    return rows


def verdicts(rows: list[dict]) -> dict[str, dict]:
    """Per label fraction: pretrained mean - scratch mean against the seeds' spread (the larger std
    and the larger range of the two arms); met when the gain exceeds the larger std."""
    out = {}
    for fraction in sorted({r["fraction"] for r in rows}, reverse=True):
        cell = {r["arm"]: r for r in rows if r["fraction"] == fraction}
        if set(cell) != set(ARMS):
            continue
        gain = cell["pretrained"]["mean"] - cell["scratch"]["mean"]
        std = max(c["std"] for c in cell.values())
        spread = max(c["range"] for c in cell.values())
        out[f"{fraction:.0%}"] = {"gain": gain, "larger_std": std, "larger_range": spread, "met": gain > std,
                                  "beyond_range": gain > spread}
    return out


def table(rows: list[dict], seeds) -> list[str]:
    head = " | ".join(f"seed {s}" for s in seeds)
    lines = [f"| labels | training blocks | arm | {head} | mean +- std | range |",
             "|---|---:|---|" + "---:|" * len(seeds) + "---:|---:|"]
    for row in rows:
        cells = [f"{row['seeds'][s]:.3f}" if s in row["seeds"] else "-" for s in seeds]
        lines.append(f"| {row['fraction']:.0%} | {row['blocks']} | {row['arm']} | " + " | ".join(cells)
                     + f" | {row['mean']:.3f} +- {row['std']:.3f} | {row['range']:.3f} |")
    return lines


def verdict_lines(found: dict) -> list[str]:
    return [f"- {fraction} labels: pretrained - scratch = {v['gain']:+.3f}; larger std {v['larger_std']:.3f}, "
            f"larger range {v['larger_range']:.3f}: **{'met' if v['met'] else 'missed'}**"
            + (" (also beyond the range)" if v["met"] and v["beyond_range"] else "") for fraction, v in found.items()]


def markdown(report: dict) -> str:
    plan, rows = report["plan"], report["summary"]
    seeds = plan["seeds"]
    lines = [
        "# Colin27 atlas check: pretrained vs from scratch (Dice on the unseen right hemisphere)",
        "",
        f"Command: `{report['command']}`  ",
        f"Data: {report['data']}  ",
        f"Machine: {report['machine']}; wall time {report['wall_s'] / 60:.1f} min for this command "
        f"(pretraining {report['pretrain']['wall_s']:.0f} s; finished runs are reused).  ",
        f"Variant `{report['variant']}`: pretraining {plan['pretrain_steps']} steps; pretrained arm options "
        f"`{' '.join(plan['pretrained_args']) or '(none)'}`.",
        "",
        "Goal: pretrained beats scratch at 10% of the labeled blocks by more than the seeds' spread (test):",
        "",
        *verdict_lines(report["verdicts"]["test"]),
        "",
        "Test: mean Dice over the 3 classes of `medformer predict` on the right hemisphere (1 mm grid, "
        f"{report['test_shape']} voxels) against the atlas, read once for this configuration:",
        "",
        *table(rows["test"], seeds),
        "",
        f"Val: the same on the left hemisphere's val slab ({report['val_shape']} voxels; no training block "
        "touches it), where choices were made:",
        "",
        *table(rows["val"], seeds),
        "",
        *verdict_lines(report["verdicts"]["val"]),
    ]
    names = list(rows["test"][0]["classes"])
    lines += ["", "Per class on test (mean over seeds):", "",
              "| labels | arm | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
    for row in rows["test"]:
        lines.append(f"| {row['fraction']:.0%} | {row['arm']} | "
                     + " | ".join(f"{row['classes'][n]:.3f}" for n in names) + " |")
    lines += ["", "Without a model (test; val): " + "; ".join(
        f"{k}: mean Dice {v:.3f}; {report['val_baselines'][k]:.3f}" for k, v in report["baselines"].items()) + "."]
    if report["screens"]:
        lines += ["", "Choices made on val (10% labels; val mean Dice per seed, mean +- std):", "",
                  "| variant | arm | options | seeds | mean +- std |", "|---|---|---|---|---:|"]
        for screen in report["screens"]:
            for row in screen["summary"]:
                steps = screen["plan"]["pretrain_steps"]
                opts = " ".join([*screen["plan"]["pretrained_args"], f"(pretraining {steps} steps)"])
                opts = f"`{opts}`" if row["arm"] == "pretrained" else "-"
                lines.append(f"| {screen['variant']} | {row['arm']} | {opts} | "
                             + " ".join(f"{v:.3f}" for v in row["seeds"].values())
                             + f" | {row['mean']:.3f} +- {row['std']:.3f} |")
    lines += ["", "Runs (wall seconds of fine-tuning and of predict on test; centroid offsets on test, "
              "predicted - atlas, world mm, x y z):", "",
              "| labels | arm | seed | val Dice | test Dice | fine-tune s | predict s | "
              + " | ".join(f"{n} offset" for n in names) + " |",
              "|---|---|---:|---:|---:|---:|---:|" + "---|" * len(names)]
    for r in report["runs"]:
        offsets = [" ".join(f"{v:+.1f}" for v in o) if o else "-" for o in r["test"]["centroid_offset_mm"].values()]
        lines.append(f"| {r['fraction']:.0%} | {r['arm']} | {r['seed']} | {r['val']['mean_dice']:.3f} | "
                     f"{r['test']['mean_dice']:.3f} | {r['wall_s']:.0f} | {r['predict']['wall_s']:.0f} | "
                     + " | ".join(offsets) + " |")
    first = {arm: next(r for r in report["runs"] if r["arm"] == arm) for arm in ARMS}
    lines += ["", "Commands (seed 0; the other runs differ in `--seed`, `--label-fraction`, `--epochs`, `--out`):", "",
              "```", report["pretrain"]["command"], first["pretrained"]["command"], first["scratch"]["command"],
              first["pretrained"]["predict"]["command"], "```"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny pretraining, one short run per arm")
    parser.add_argument("--variant", default=FINAL, choices=sorted(VARIANTS), help="options of the pretrained arm")
    parser.add_argument("--val-only", action="store_true",
                        help="10%% labels only, scored on val only: a candidate for the choices (the test part is "
                             "not read)")
    parser.add_argument("--work", default="runs/atlas-check", help="data and runs (finished runs are reused)")
    parser.add_argument("--results", default=str(HERE / "results"))
    args = parser.parse_args()
    base = PLANS["quick" if args.quick else "full"]
    plan = replace(base, **VARIANTS[args.variant])
    if args.val_only:
        plan = replace(plan, epochs={f: e for f, e in plan.epochs.items() if f < 1.0} or plan.epochs)
    started = time.perf_counter()
    templates, where = atlas_data.locate_templates()
    if templates is None:
        sys.exit(f"error: {where}")
    work = Path(args.work)
    data = atlas_data.prepare(templates, work / "data", pretrain_volumes=plan.pretrain_volumes)
    print(f"data: templates {where}; blocks {data.counts}", flush=True)
    pretrain_ref, finetune_ref = dataset_refs(data, plan)
    source = work / pretrain_name(plan, base)
    pretrained = pretrain(plan, pretrain_ref, source)
    parts = {"val": (data.val_images, data.val_labels, "val.nii.gz")}
    if not args.val_only:
        parts["test"] = (data.test_images, data.test_labels, "right.nii.gz")
    runs = []
    for fraction in plan.epochs:
        for seed in plan.seeds:
            for arm in ARMS:
                run = work / run_name(plan, base, arm, fraction, seed)
                record = finetune(plan, finetune_ref, arm, fraction, seed, source, run)
                for key, (images, labels, name) in parts.items():
                    record["predict"] = predict(run, images, run / f"predict-{key}")
                    record[key] = score(run / f"predict-{key}" / name, images / name, labels / name)
                runs.append({"fraction": fraction, "seed": seed, "arm": arm, **record})
                print(f"{arm} {fraction:.0%} seed {seed}: "
                      + "; ".join(f"{k} mean Dice {record[k]['mean_dice']:.3f}" for k in parts), flush=True)
    import nibabel as nib
    import torch

    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    name = "atlas_check_quick" if args.quick else "atlas_check"
    report = {
        "command": "python benchmarks/atlas_check.py" + (" --quick" if args.quick else "")
                   + (f" --variant {args.variant}" if args.variant != FINAL else "")
                   + (" --val-only" if args.val_only else ""),
        "variant": args.variant, "plan": asdict(plan), "spacing_mm": SPACING, "crop": CROP,
        "datasets": [pretrain_ref, finetune_ref], "val_y_mm": atlas_data.VAL_Y_MM,
        "data": f"Colin27 `ch2bet` + AAL, {atlas_data.PACKAGE} ({where}); blocks {data.counts}",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} thread(s)",
        "val_shape": "x".join(map(str, nib.load(data.val_images / "val.nii.gz").shape)),
        "val_baselines": baselines(data.val_images / "val.nii.gz", data.val_labels / "val.nii.gz"),
        "pretrain": pretrained, "runs": runs, "wall_s": None,
    }
    if args.val_only:
        report["summary"] = summary_rows(plan, runs, "val")
        report["wall_s"] = time.perf_counter() - started
        path = results / f"{name}_val_{args.variant}.json"
        path.write_text(json.dumps(report, indent=2))
        print(f"wrote {path} ({report['wall_s']:.0f} s)")
        return
    report["test_shape"] = "x".join(map(str, nib.load(data.test_images / "right.nii.gz").shape))
    report["baselines"] = baselines(data.test_images / "right.nii.gz", data.test_labels / "right.nii.gz")
    report["summary"] = {key: summary_rows(plan, runs, key) for key in parts}
    report["verdicts"] = {key: verdicts(rows) for key, rows in report["summary"].items()}
    report["screens"] = [json.loads(p.read_text()) for p in sorted(results.glob(f"{name}_val_*.json"))]
    for screen in report["screens"]:
        screen.pop("runs", None)
    report["wall_s"] = time.perf_counter() - started
    (results / f"{name}.json").write_text(json.dumps(report, indent=2))
    (results / f"{name}.md").write_text(markdown(report))
    print(f"wrote {results / name}.md and .json ({report['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
