"""`medformer datasets list|info|download|verify|preview`: find, fetch, check and look at datasets."""

import json
from pathlib import Path

import numpy as np
import typer
from rich import box
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
from rich.table import Table

from medformer_cli.console import err, out
from medformer_cli.datasets_preview import label_text, montage
from medformer_core.api.data import DatasetOptions
from medformer_core.api.datasets import default_data_root, resolve_dataset
from medformer_core.api.errors import DataError, MedformerError, UsageError
from medformer_core.api.lookup import unknown_name
from medformer_core.api.plugins import registries
from medformer_plugins.medmnist import MedMNIST
from medformer_plugins.medmnist_download import download as download_file
from medformer_plugins.medmnist_files import SPLITS, Variant, info_table, sizes_offered, verify_file

app = typer.Typer(help="List, download, verify and preview datasets (MedMNIST, your folders, phantoms).",
                  no_args_is_help=True)

SHORT_TASKS = {"multi-label, binary-class": "multi-label", "ordinal-regression": "ordinal", "binary-class": "binary"}
DATA_ROOT = typer.Option(None, "--data-root",
                         help="Folder of MedMNIST files [env MEDFORMER_DATA_ROOT; default ~/.medmnist].")


def _variant(name: str, size: int | None) -> Variant:
    """`retinamnist` + size, or `retinamnist_64` -> the file to fetch or check."""
    table = info_table()
    flag, _, suffix = name.partition("_")
    if flag not in table:
        raise unknown_name(f"unknown MedMNIST dataset '{name}'", flag, table,
                           hint="see all with `medformer datasets list`")
    if suffix and not suffix.isdigit():
        raise UsageError(f"bad MedMNIST name '{name}'", hint=f"use {flag} with --size, or {flag}_SIZE")
    if suffix and size is not None and int(suffix) != size:
        raise UsageError(f"'{name}' and --size {size} disagree", hint=f"use {flag} --size {size}")
    size = int(suffix) if suffix else (size or 28)
    if size not in sizes_offered(flag):
        raise UsageError(f"{flag} has no size {size}",
                         hint=f"sizes offered: {', '.join(map(str, sizes_offered(flag)))}")
    return Variant(flag, size)


def _rows(root: Path) -> list[dict]:
    rows = []
    for entry in registries().datasets:
        factory = entry.obj
        row = {"name": entry.name, "description": factory.description, "provider": str(entry.provider),
               "spatial_dims": list(factory.spatial_dims), "channels": factory.channels}
        if isinstance(factory, MedMNIST):
            info = factory.info(DatasetOptions())
            path = root / factory.variant.file_name
            row.update(family=factory.variant.flag, task=info.task, size=list(info.size), split_sizes=info.split_sizes,
                       sizes_offered=list(sizes_offered(factory.variant.flag)), path=str(path), present=path.is_file())
        else:
            try:
                info = factory.info(DatasetOptions())
                row.update(family=entry.name, task=info.task, size=list(info.size), split_sizes=info.split_sizes)
            except MedformerError:  # needs its argument (folder:PATH) to say more
                row.update(family=entry.name, task="-", size=None, split_sizes={})
            row.update(sizes_offered="any", path=None, present=None)
        rows.append(row)
    return rows


@app.command("list")
def list_datasets(as_json: bool = typer.Option(False, "--json", help="Print JSON for machines (one object per name)."),
                  data_root: Path = DATA_ROOT):
    """Every dataset: task, dims, channels, split sizes, sizes offered, and which files are present."""
    root = default_data_root(data_root)
    rows = _rows(root)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=f"medformer datasets (data root {root})", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("name", "task", "input", "train/val/test", "sizes"):
        table.add_column(column, no_wrap=True)
    families: dict[str, list[dict]] = {}
    for row in rows:
        families.setdefault(row["family"], []).append(row)
    for family, members in families.items():
        first = members[0]
        splits = "/".join(str(first["split_sizes"].get(s, "-")) for s in SPLITS) if first["split_sizes"] else "-"
        if first["path"] is not None:
            present = {r["size"][0] for r in members if r["present"]}
            sizes = " ".join(f"[green]{s}✓[/]" if s in present else str(s) for s in first["sizes_offered"])
        else:
            sizes = "any"
        name = f"{family}:PATH" if family == "folder" else family
        dims = "/".join(f"{d}D" for d in first["spatial_dims"])
        channels = f" {first['channels']}ch" if first["channels"] else ""
        table.add_row(name, SHORT_TASKS.get(first["task"], first["task"]), dims + channels, splits, sizes)
    out.print(table)
    out.print("✓ = file present in the data root. Get one with `medformer datasets download NAME --size S`; "
              "sizes above 28 are named NAME_SIZE (e.g. retinamnist_64).", soft_wrap=True)


@app.command("info")
def info(name: str = typer.Argument(..., help="A dataset: retinamnist, adrenalmnist3d_64, folder:PATH, a directory."),
         data_root: Path = DATA_ROOT):
    """One dataset: what it holds, its labels and splits, and (MedMNIST) where its file is."""
    factory, options = resolve_dataset(name, data_root=data_root)
    details = factory.info(options)
    out.print(f"[bold]{details.name}[/]: {factory.description}", soft_wrap=True)
    axes = "x, y" + (", z" if details.spatial_dims == 3 else "")
    out.print(f"  shape:   {details.channels} channel(s) x {'x'.join(map(str, reversed(details.size)))} "
              f"({details.spatial_dims}D{'' if len(set(details.size)) == 1 else f'; {axes}'})", soft_wrap=True)
    if details.spacing:
        out.print(f"  spacing: {'x'.join(f'{s:g}' for s in reversed(details.spacing))} mm; samples are crops",
                  soft_wrap=True)
    out.print(f"  task:    {details.task}", soft_wrap=True)
    if details.has_masks:
        out.print(f"  masks:   {', '.join(f'{k}: {v}' for k, v in details.mask_labels.items())}", soft_wrap=True)
    if details.labels:
        out.print(f"  labels:  {', '.join(f'{k}: {v}' for k, v in details.labels.items())}", soft_wrap=True)
    out.print(f"  splits:  {', '.join(f'{k} {v}' for k, v in details.split_sizes.items())}", soft_wrap=True)
    if isinstance(factory, MedMNIST):
        variant = factory.variant
        path = options.data_root / variant.file_name
        state = "present" if path.is_file() else f"missing (`{variant.download_command(options.data_root)}`)"
        out.print(f"  file:    {path} ({state})", soft_wrap=True)
        out.print(f"  sizes:   {', '.join(map(str, sizes_offered(variant.flag)))}; MD5 {variant.md5}", soft_wrap=True)
        out.print(f"  source:  {variant.url} ({variant.meta['license']})", soft_wrap=True)
        out.print(f"  about:   {escape(variant.meta['description'])}", soft_wrap=True, highlight=False)


@app.command("download")
def download(name: str = typer.Argument(..., help="A MedMNIST dataset (retinamnist, chestmnist, ...) or 'all'."),
             size: int = typer.Option(None, "--size", help="28 (default), 64, 128 or 224 (3D: 28 or 64)."),
             data_root: Path = DATA_ROOT,
             force: bool = typer.Option(False, "--force", help="Download again even if a good file is present."),
             ignore_md5: bool = typer.Option(False, "--ignore-md5",
                                             help="Keep a file whose MD5 differs from medmnist.INFO."),
             mirror: str = typer.Option(None, "--mirror",
                                        help="Base URL holding the official file names "
                                             "[env MEDFORMER_MEDMNIST_MIRROR]."),
             ):
    """Download MedMNIST files into the data root (atomic, MD5-checked)."""
    root = default_data_root(data_root)
    if name == "all":
        variants = [Variant(flag, size or 28) for flag in info_table() if (size or 28) in sizes_offered(flag)]
    else:
        variants = [_variant(name, size)]
    failures = 0
    for variant in variants:
        try:
            with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                          TransferSpeedColumn(), console=err, transient=True, disable=not err.is_terminal) as progress:
                task = progress.add_task(variant.file_name, total=None)
                path, fetched = download_file(
                    variant, root, force=force, ignore_md5=ignore_md5, mirror=mirror,
                    progress=lambda done, total: progress.update(task, completed=done, total=total))
        except DataError as exc:
            if len(variants) == 1:
                raise
            failures += 1
            err.print(f"[red]FAIL[/] {variant.name}: {escape(str(exc))}", soft_wrap=True, highlight=False)
            continue
        out.print(f"{variant.name}: {'downloaded to' if fetched else 'already present and verified at'} {path}",
                  soft_wrap=True)
    if failures:
        raise DataError(f"{failures} of {len(variants)} download(s) failed",
                        hint="the others were saved; rerun to retry")


@app.command("verify")
def verify(name: str = typer.Argument(None, help="A MedMNIST dataset (all its local sizes) or NAME_SIZE; "
                                                 "default: every local file."),
           data_root: Path = DATA_ROOT,
           md5: bool = typer.Option(True, "--md5/--no-md5",
                                    help="Check MD5 against medmnist.INFO (reads the whole file)."),
           ):
    """Check local MedMNIST files: MD5 and layout (keys, shapes, dtypes, label ranges)."""
    root = default_data_root(data_root)
    if name is None:
        variants = [Variant(f, s) for f in info_table() for s in sizes_offered(f)
                    if (root / Variant(f, s).file_name).is_file()]
        if not variants:
            raise DataError(f"no MedMNIST files in {root}",
                            hint="download one with `medformer datasets download NAME --size S`")
    elif "_" in name or name not in info_table():
        variants = [_variant(name, None)]
    else:
        variants = [Variant(name, s) for s in sizes_offered(name) if (root / Variant(name, s).file_name).is_file()]
        variants = variants or [Variant(name, 28)]  # none present: report the default file as missing
    failures = 0
    for variant in variants:
        path = root / variant.file_name
        try:
            if not path.is_file():
                raise DataError(f"{variant.name}: file {path} not found",
                                hint=f"download it with `{variant.download_command(root)}`")
            sizes = verify_file(variant, path, md5=md5)
        except MedformerError as exc:
            failures += 1
            err.print(f"[red]FAIL[/] {escape(str(exc))}", soft_wrap=True, highlight=False)
            continue
        checked = "MD5 and layout" if md5 else "layout"
        out.print(f"[green]ok[/]   {path}: {checked} ({', '.join(f'{k} {v}' for k, v in sizes.items())})",
                  soft_wrap=True)
    if failures:
        raise DataError(f"{failures} of {len(variants)} file(s) failed verification")


@app.command("preview")
def preview(name: str = typer.Argument(..., help="A dataset: retinamnist, adrenalmnist3d, folder:PATH, a directory."),
            output: Path = typer.Option(..., "--out", help="PNG file to write."),
            split: str = typer.Option("train", help="train, val or test."),
            count: int = typer.Option(16, min=1, max=64, help="Number of samples."),
            seed: int = typer.Option(0, help="Which samples (seeded draw)."),
            data_root: Path = DATA_ROOT):
    """Write a montage of random samples with their labels (volumes: orthogonal middle slices)."""
    if output.suffix.lower() != ".png":
        raise UsageError(f"--out must name a .png file, got {output}")
    factory, options = resolve_dataset(name, data_root=data_root, seed=seed)
    data = factory.build(split, options)
    picks = np.sort(np.random.default_rng(seed).choice(len(data), size=min(count, len(data)), replace=False))
    batch = data.batch(picks)
    labels = batch["label"].numpy() if "label" in batch else None
    picture = montage(data.info, batch["image"].numpy(), labels)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        picture.save(output)
    except OSError as exc:
        raise UsageError(f"cannot write {output}: {exc.strerror or exc}") from None
    shown = ", ".join(label_text(data.info, None if labels is None else labels[i]) for i in range(min(4, len(picks))))
    out.print(f"wrote {output}: {len(picks)} samples of {data.info.name}/{split} ({shown}, ...)", soft_wrap=True)
