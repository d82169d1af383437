"""`medformer bench attention|patch-embed`: time the fused kernels against torch baselines."""

import contextlib
import functools
import inspect
import json
import os
from pathlib import Path

import torch
import typer
from rich.table import Table

from medformer_cli.console import err, out
from medformer_core.api.errors import UsageError
from medformer_kernels import bench
from medformer_kernels.configs import AUTOTUNE_ENV, CACHE

app = typer.Typer(
    help="Benchmark the fused kernels against torch baselines: ms, TFLOP/s, GB/s and speedup, forward and "
    "forward+backward. On CPU only the torch implementations run (Triton needs a GPU).",
    no_args_is_help=True,
)

DEVICE_HELP = "auto (cuda when available), cpu or cuda[:i]."
DTYPE_HELP = "auto (bf16 on GPU, fp32 on CPU), fp32, fp16 or bf16."
JSON_HELP = "Also write the results (rows, per-shape summary, device and versions) as JSON to this file."
QUICK_HELP = "Small shapes and short timing (the default on CPU unless --shapes is given)."
BUDGET_HELP = "Seconds of repeats per measurement (default 0.25 on GPU, 0.2 on CPU, 0.1 with --quick)."
AUTOTUNE_HELP = ("Time every candidate launch config of each new shape class once and keep the fastest in the "
                 "config cache (MEDFORMER_KERNEL_CACHE, default ~/.cache/medformer/kernel_configs.json), which "
                 "later runs and training read. Without it the pinned or cached configs run.")
THREADS_HELP = "CPU threads for torch (torch.set_num_threads); 1 gives steadier numbers on a busy machine."


@contextlib.contextmanager
def _cpu_threads(threads: int | None):
    """torch's CPU thread count for the duration of a command, then back to what it was."""
    if threads is not None and threads < 1:
        raise UsageError(f"--threads {threads} must be at least 1")
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _setup(device: str, dtype: str, quick: bool, budget: float | None):
    """(device, dtype, budget) from the options."""
    dev = bench.resolve_device(device)
    if budget is not None and budget <= 0:
        raise UsageError(f"--budget {budget} must be positive")
    budget = budget or (0.1 if quick else 0.25 if dev.type == "cuda" else 0.2)
    return dev, bench.resolve_dtype(dtype, dev), budget


def _default_shapes(dev, quick: bool, full: str, small: str) -> str:
    if quick or dev.type != "cuda":
        out.print(f"[dim]Shapes: {small} (quick set; --shapes to choose)[/]")
        return small
    return full


def _fmt(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}g}" if value < 100 else f"{value:.0f}"


def _shape_table(title: str, rows: list[dict]) -> Table:
    """One shape: a row per implementation; speedup = how many times faster medformer is than that row."""
    gbps = "fwd_gbps" in rows[0]
    table = Table(title=title, title_justify="left")
    table.add_column("implementation")
    for phase in ("fwd", "fwd+bwd"):
        table.add_column(f"{phase} ms", justify="right")
        table.add_column(f"{phase} TFLOP/s", justify="right")
        if gbps:
            table.add_column(f"{phase} GB/s", justify="right")
        table.add_column(f"{phase} speedup", justify="right")
    for row in rows:
        cells = [row["impl"]]
        for key in ("fwd", "fwdbwd"):
            cells += [_fmt(row[f"{key}_ms"]), _fmt(row[f"{key}_tflops"])]
            if gbps:
                cells.append(_fmt(row[f"{key}_gbps"]))
            cells.append("-" if row["group"] == "medformer" else f"{row[f'{key}_speedup']:.2f}x")
        table.add_row(*cells, style="bold" if row["group"] == "medformer" else None)
    return table


def _summary_table(result: bench.BenchResult) -> Table:
    """Per shape, medformer's speedup against the fastest implementation of each baseline family."""
    means = bench.geomeans(result)
    table = Table(title=f"{result.op}: medformer speedup vs the best of each baseline (fwd / fwd+bwd)",
                  title_justify="left")
    table.add_column("shape")
    for group in means:
        table.add_column(f"vs {group}", justify="right")
    for entry in result.summary:
        cells = [entry["shape"]]
        for group in means:
            vs = entry["vs"].get(group)
            cells.append("n/a" if vs is None else f"{vs['fwd']:.2f}x / {vs['fwdbwd']:.2f}x")
        table.add_row(*cells)
    table.add_row("geometric mean", *(f"{m['fwd']:.2f}x / {m['fwdbwd']:.2f}x" for m in means.values()), style="bold")
    return table


def _report(result: bench.BenchResult, json_file: Path | None) -> None:
    out.print(_summary_table(result))
    for note in result.notes:
        out.print(f"[yellow]Note:[/] {note}")
    if json_file is not None:
        payload = {**result.to_json(), "geomeans": bench.geomeans(result)}
        json_file.parent.mkdir(parents=True, exist_ok=True)
        json_file.write_text(json.dumps(payload, indent=2) + "\n")
        err.print(f"Wrote {json_file}")


def _start(op: str, dev, dtype):
    """Print what runs where; returns the callback that prints each shape's table as it finishes."""
    where = f"{bench.dtype_name(dtype)} · {bench.device_name(dev)}"
    out.print(f"[bold]{op}[/]: {where}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")

    def on_shape(label: str, rows: list[dict]) -> None:
        out.print(_shape_table(f"{op} {label} · {where}", rows))

    return on_shape


SHARED_OPTIONS = [
    inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)
    for name, kind, option in [
        ("dtype", str, typer.Option("auto", help=DTYPE_HELP)),
        ("device", str, typer.Option("auto", help=DEVICE_HELP)),
        ("json_file", Path, typer.Option(None, "--json", help=JSON_HELP)),
        ("quick", bool, typer.Option(False, "--quick", help=QUICK_HELP)),
        ("budget", float, typer.Option(None, help=BUDGET_HELP)),
        ("threads", int, typer.Option(None, help=THREADS_HELP)),
        ("autotune", bool, typer.Option(False, "--autotune", help=AUTOTUNE_HELP)),
    ]
]


def _bench_command(name: str):
    """Register a benchmark command: its own options, then SHARED_OPTIONS, which reach it as `**shared`."""
    def register(command):
        own = [p for p in inspect.signature(command).parameters.values() if p.kind is not p.VAR_KEYWORD]
        command.__signature__ = inspect.Signature(own + SHARED_OPTIONS)
        return app.command(name)(command)
    return register


def _run(op: str, shapes: str | None, full: str, small: str, parse, run, *, dtype: str, device: str,
         json_file: Path | None, quick: bool, budget: float | None, threads: int | None, autotune: bool) -> None:
    """Parse `shapes` (default: `full` on GPU, else `small`), `run` the benchmark, report it."""
    dev, dt, budget = _setup(device, dtype, quick, budget)
    shape_list = parse(shapes or _default_shapes(dev, quick, full, small))
    with _cpu_threads(threads), _autotune(autotune):
        result = run(shape_list, dt, dev, budget, on_shape=_start(op, dev, dt))
    _report(result, json_file)


@contextlib.contextmanager
def _autotune(enabled: bool):
    """MEDFORMER_AUTOTUNE=1 for the duration of a command when asked (see medformer_kernels.configs)."""
    if not enabled:
        yield
        return
    before = os.environ.get(AUTOTUNE_ENV)
    os.environ[AUTOTUNE_ENV] = "1"
    CACHE.clear()
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(AUTOTUNE_ENV, None)
        else:
            os.environ[AUTOTUNE_ENV] = before
        CACHE.clear()


@_bench_command("attention")
def attention_cmd(
    shapes: str = typer.Option(None, help="Comma-separated BxHxNxd (self) or BxHxNqxNkxd (cross attention). "
                               f"Default on GPU: {bench.ATTENTION_SHAPES}."),
    **shared,
):
    """Fused attention vs torch SDPA (each backend) and naive softmax(QK^T)V."""
    _run("attention", shapes, bench.ATTENTION_SHAPES, bench.ATTENTION_QUICK, bench.parse_attention_shapes,
         bench.bench_attention, **shared)


@_bench_command("patch-embed")
def patch_embed_cmd(
    shapes: str = typer.Option(None, help="Comma-separated BxCx<2 or 3 sizes>:patch:E, patch P or PxPxP. "
                               f"Default on GPU: {bench.PATCH_SHAPES}."),
    keep: float = typer.Option(0.25, help="Also time embedding only this fraction of the patches (MAE); 0: skip."),
    **shared,
):
    """Fused patch embedding vs nn.Conv (kernel = stride), reshape+linear+add and embed-all-then-gather."""
    if not 0 <= keep < 1:
        raise UsageError(f"--keep {keep} must be in [0, 1)", hint="0.25 keeps a quarter of the patches")
    _run("patch-embed", shapes, bench.PATCH_SHAPES, bench.PATCH_QUICK, bench.parse_patch_shapes,
         functools.partial(bench.bench_patch_embed, keep_fraction=keep), **shared)
