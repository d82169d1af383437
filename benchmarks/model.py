"""Model benchmark: samples/s and peak memory of one forward + backward of the `tiny` encoder.

    python benchmarks/model.py                 # CUDA when present, else CPU
    python benchmarks/model.py --device cpu --threads 2

Inputs: 128 images 28x28x1, 128 images 28x28x3, 32 volumes 28^3, 8 volumes 64^3 (4x4(x4) patches).
Models, same width (192), depth (4), heads (3) and MLP ratio (4):
- vit:                 a plain ViT written with torch.nn (Conv patch embedding, fixed sin-cos
                       positions, nn.TransformerEncoder with pre-norm, final LayerNorm) over all tokens;
- medformer-latents0:  the Medformer encoder with latents=0 (our input adapter through the kernels'
                       dispatch, dataset embedding, body over all tokens): the adapters' overhead at
                       equal token counts;
- medformer:           the `tiny` preset, 32 latents: the body sees 32 latents, whatever the input.
Each measurement runs in its own process. The loss is the mean square of the encoder output; the
time is the fastest step after one warm-up step (steps until 3 s have passed, at least one), and
the best of `--rounds` runs: the CPU may be shared, and contention only ever slows a step.
Peak memory: on CUDA torch.cuda.max_memory_allocated over the steps; on CPU the process's peak
resident set (VmHWM, reset through /proc/self/clear_refs before the first step) minus its resident
set then: what forward + backward add, allocator caching included.

Last, a training step of the whole multitask model (`tiny`, the default tasks mae, mae3d, rotation
and contrastive, AdamW) on batches of 32 phantoms 28^2 and 28^3: the engine's main job.
"""

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from medformer_core.api.data import DatasetOptions
from medformer_core.api.interfaces import InputSpec
from medformer_core.api.plugins import registries
from medformer_core.engine.builders import build_model
from medformer_core.model.medformer import PRESETS, Medformer, model_config
from medformer_core.model.patches import sincos_position_embedding

CONFIGS = [
    ("128 images 28x28x1", 128, 1, (28, 28)),
    ("128 images 28x28x3", 128, 3, (28, 28)),
    ("32 volumes 28^3", 32, 1, (28, 28, 28)),
    ("8 volumes 64^3", 8, 1, (64, 64, 64)),
]
MODELS = ("vit", "medformer-latents0", "medformer")
TRAINING_TASKS = ("mae", "mae3d", "rotation", "contrastive")
TRAINING_STEPS = 3
MIN_SECONDS = 3.0
MAX_STEPS = 20


class PlainViT(nn.Module):
    """x [B, C, *S] -> tokens [B, N, E]: Conv patch embedding + sin-cos positions + pre-norm encoder."""

    def __init__(self, channels: int, size: tuple[int, ...], width: int, depth: int, heads: int, mlp_ratio: float,
                 patch: int):
        super().__init__()
        conv = nn.Conv2d if len(size) == 2 else nn.Conv3d
        self.patch_embed = conv(channels, width, kernel_size=patch, stride=patch)
        grid = tuple(s // patch for s in size)
        self.register_buffer("pos", sincos_position_embedding(grid, width), persistent=False)
        layer = nn.TransformerEncoderLayer(width, heads, int(width * mlp_ratio), dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos
        return self.norm(self.encoder(tokens))


def build(name: str, channels: int, size: tuple[int, ...]) -> nn.Module:
    tiny = PRESETS["tiny"]
    if name == "vit":
        patch = tiny.patch2d if len(size) == 2 else tiny.patch3d
        return PlainViT(channels, size, tiny.embed_dim, tiny.depth, tiny.heads, tiny.mlp_ratio, patch)
    config = model_config(tiny, latents=0) if name == "medformer-latents0" else tiny
    encoder = Medformer(config, [InputSpec(len(size), channels, size)], ["bench"], registries().input_adapters)
    return _BoundEncoder(encoder)


class _BoundEncoder(nn.Module):
    """The encoder with its one dataset bound, so every model is called as model(x)."""

    def __init__(self, encoder: Medformer):
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x, "bench")


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(name: str, config_index: int, device: torch.device) -> dict:
    """Time and memory of forward + backward steps of model `name` on CONFIGS[config_index]."""
    _, batch, channels, size = CONFIGS[config_index]
    torch.manual_seed(0)
    model = build(name, channels, size).to(device)
    x = torch.rand(batch, channels, *size, device=device)

    def step():
        model.zero_grad(set_to_none=True)
        out = model(x)
        out.float().square().mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out.shape[1]

    if device.type == "cuda":
        step()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
        base = _rss_kib("VmRSS") * 1024
        step()
    times = []
    while not times or (sum(times) < MIN_SECONDS and len(times) < MAX_STEPS):
        start = time.perf_counter()
        tokens = step()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _rss_kib("VmHWM") * 1024
    seconds = min(times)
    return {"model": name, "config": config_index, "tokens": tokens, "steps": len(times),
            "samples_per_s": batch / seconds, "peak_mib": (peak - base) / 2**20}


def measure_training(device: torch.device) -> dict:
    """Seconds per AdamW step of the `tiny` multitask model on a 2D and on a 3D phantom batch of 32."""
    datasets = registries().datasets
    options = DatasetOptions(argument="size=28,count=32")
    infos = [datasets.get(name).info(options) for name in ("phantoms2d", "phantoms3d")]
    torch.manual_seed(0)
    model = build_model("tiny", infos, [registries().tasks.get(name) for name in TRAINING_TASKS]).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    seconds = {}
    for info in infos:
        batch = datasets.get(info.name).build("train", options).batch(range(32))
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        times = []
        for _ in range(1 + TRAINING_STEPS):
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            sum(result.loss for result in model(batch, generator).values()).backward()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        seconds[info.name] = min(times[1:])
    return seconds


def run_isolated(name: str, config_index: int, device: str, threads: int | None) -> dict:
    command = [sys.executable, __file__, "--one", name, str(config_index), "--device", device]
    if threads:
        command += ["--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    lines = ["| input | model | tokens in body | samples/s | peak MiB | vs vit: speed | vs vit: memory |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for i, (label, *_) in enumerate(CONFIGS):
        vit = next(r for r in rows if r["config"] == i and r["model"] == "vit")
        for r in (r for r in rows if r["config"] == i):
            lines.append(f"| {label} | {r['model']} | {r['tokens']} | {r['samples_per_s']:.1f} | "
                         f"{r['peak_mib']:.0f} | {r['samples_per_s'] / vit['samples_per_s']:.2f}x | "
                         f"{r['peak_mib'] / vit['peak_mib']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=2, help="measure every case this often, keep the fastest")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "CONFIG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one and args.one[0] == "training":
        print(json.dumps(measure_training(torch.device(args.device))))
        return
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), torch.device(args.device))))
        return
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"{platform.processor() or platform.machine()}, {args.threads or torch.get_num_threads()} threads"
    memory = "torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else "peak RSS added (VmHWM)"
    print(f"tiny encoder, forward + backward; {args.device} ({where}), torch {torch.__version__}; memory: {memory}")
    best = {}
    for _ in range(args.rounds):
        for i in range(len(CONFIGS)):
            for name in MODELS:
                row = run_isolated(name, i, args.device, args.threads)
                print(f"  {CONFIGS[i][0]:>20} {name:>20}: {row['samples_per_s']:8.1f} samples/s "
                      f"{row['peak_mib']:8.0f} MiB", flush=True)
                if (name, i) not in best or row["samples_per_s"] > best[name, i]["samples_per_s"]:
                    best[name, i] = row
    print(table(list(best.values())))
    runs = [run_isolated("training", 0, args.device, args.threads) for _ in range(args.rounds)]
    step = {name: min(run[name] for run in runs) for name in runs[0]}
    mean = sum(step.values()) / len(step)
    print(f"\nmultitask training step, tiny, tasks {' + '.join(TRAINING_TASKS)}, batch 32: "
          f"{step['phantoms2d']:.2f} s on 28^2, {step['phantoms3d']:.2f} s on 28^3; "
          f"100 steps half of each: {100 * mean:.0f} s")


if __name__ == "__main__":
    main()
