"""Real-size scans: does the crop loader feed the model, and does memory stay flat?

    python benchmarks/crop_loader.py --work /tmp/crop-bench [--scans 50] [--shape 512x512x300] [--crop 96]

Writes `--scans` synthetic CT scans once into WORK/scans (int16 HU, x*y*z voxels of 0.7 x 0.7 x
1.5 mm, a body ellipse with organs, bone and noise, as .nii.gz), then, in one fresh process:
1. prepares them as `folder:WORK/scans,spacing=1.5,crop=96` into an empty cache (wall time);
2. times the crop loader: the engine's sampler -> `CropSplit.batch` -> the engine's augmentation;
3. times a training step of the `tiny` Medformer on the same crops (the default tasks that accept
   them: forward, backward, AdamW);
and reports that process's peak resident memory. Goals: peak RSS under 4 GB for 50 full-size scans,
loader at >= 3x the model's samples/s. `--json FILE` writes the numbers.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SPACING = (0.7, 0.7, 1.5)  # mm, x y z: a typical abdominal CT


def write_scans(folder: Path, count: int, shape: tuple[int, int, int]) -> None:
    """`count` synthetic CT scans of `shape` (x, y, z voxels) as int16 HU NIfTI, written if missing."""
    import nibabel as nib
    import torch
    import torch.nn.functional as F

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        path = folder / f"scan_{i:03d}.nii.gz"
        if path.exists():
            continue
        rng = np.random.default_rng(i)
        coarse = [max(4, n // 8) for n in shape]
        grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in coarse], indexing="ij"))  # [3, *coarse]
        body = (grid[0] / 0.85) ** 2 + (grid[1] / 0.65) ** 2 < 1
        hu = np.where(body, 40.0, -1000.0)
        for _ in range(6):  # organs and bone
            centre, radius = rng.uniform(-0.5, 0.5, 3), rng.uniform(0.08, 0.25)
            inside = ((grid - centre[:, None, None, None]) ** 2).sum(0) < radius**2
            hu = np.where(inside & body, rng.choice([-100.0, 60.0, 300.0, 900.0]), hu)
        volume = F.interpolate(torch.from_numpy(hu)[None, None].float(), size=shape, mode="trilinear")[0, 0]
        volume = volume.numpy() + rng.normal(0, 20, shape).astype(np.float32)
        image = nib.Nifti1Image(volume.astype(np.int16), np.diag([*SPACING, 1.0]))
        temp = path.with_name(f"tmp_{path.name}")  # nibabel picks the format from the name's suffix
        nib.save(image, temp)
        os.replace(temp, path)


def measure(work: Path, crop: int, batch_size: int, batches: int, steps: int) -> dict:
    """Prepare, load and train in this process; returns the numbers."""
    import torch
    from loader import loader_rate, model_rate  # benchmarks/loader.py, beside this script

    from medformer_core.api.datasets import resolve_dataset
    from medformer_core.engine.trainer import base_augment

    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    os.environ["MEDFORMER_CACHE_DIR"] = str(cache)
    factory, options = resolve_dataset(f"folder:{work / 'scans'},spacing=1.5,crop={crop},val=0,test=0",
                                       labeled=False)
    start = time.perf_counter()
    split = factory.build("train", options)
    prepare_seconds = time.perf_counter() - start
    prepare_rss = peak_rss_gb()
    loader = loader_rate(split, base_augment(3), batch_size, batches)
    loader_rss = peak_rss_gb()
    model, tasks = model_rate(split, batch_size, steps)
    return {
        "scans": len(split.volumes), "prepared_grid_zyx": list(split.volumes[0].spatial), "crop": crop,
        "batch_size": batch_size, "threads": torch.get_num_threads(), "prepare_seconds": round(prepare_seconds, 1),
        "loader_samples_per_s": round(loader, 1), "model_samples_per_s": round(model, 2), "tasks": tasks,
        "ratio": round(loader / model, 1), "peak_rss_gb_after_prepare": prepare_rss,
        "peak_rss_gb_after_loader": loader_rss, "peak_rss_gb": peak_rss_gb(),
    }


def peak_rss_gb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the scans and the cache")
    parser.add_argument("--scans", type=int, default=50)
    parser.add_argument("--shape", default="512x512x300", help="x, y, z voxels per scan")
    parser.add_argument("--crop", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=20, help="loader batches timed")
    parser.add_argument("--steps", type=int, default=3, help="model steps timed")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--measure-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_only:
        print(json.dumps(measure(args.work, args.crop, args.batch_size, args.batches, args.steps)))
        return
    shape = tuple(int(n) for n in args.shape.split("x"))
    start = time.perf_counter()
    write_scans(args.work / "scans", args.scans, shape)
    print(f"{args.scans} scans of {args.shape} voxels in {args.work / 'scans'} ({time.perf_counter() - start:.0f} s)")
    # A fresh process, so that its peak memory is the loader's and the model's, not the scan writer's.
    command = [sys.executable, __file__, "--measure-only", *sys.argv[1:]]
    result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    for key, value in result.items():
        print(f"{key:22} {value}")
    verdict = "meets" if result["peak_rss_gb"] < 4 and result["ratio"] >= 3 else "misses"
    print(f"goal (peak RSS < 4 GB, loader >= 3x model): {verdict}")
    if args.json:
        args.json.write_text(json.dumps({"shape_xyz": args.shape, **result}, indent=2) + "\n")


if __name__ == "__main__":
    main()
