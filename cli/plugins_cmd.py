"""`medformer plugins list|show`: what is installed, who provides it, what it accepts, what is broken.

Both commands run with two plugins registering one name (list shows both sides); every other command
refuses that conflict.
"""

import dataclasses
import inspect
import json
import typing

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from medformer_cli.console import err, out
from medformer_core.api.data import DatasetOptions
from medformer_core.api.errors import MedformerError
from medformer_core.api.interfaces import DatasetFactory, OutputHead, PretextTask, option_text
from medformer_core.api.lookup import lookup
from medformer_core.api.plugins import Registries, load_registries, medformer_version, registries
from medformer_core.api.registry import BrokenPlugin, Entry
from medformer_plugins.medmnist import MedMNIST

app = typer.Typer(help="List and inspect installed plugins (datasets, adapters, heads, pretext tasks).",
                  no_args_is_help=True)

BROKEN = "broken"
WIDTH = 100  # the listing fits this many columns


def _accepts(obj) -> str:
    dims = "/".join(f"{d}D" for d in obj.spatial_dims)
    channels = "any channels" if obj.channels is None else f"{obj.channels} channels"
    return f"{dims}, {channels}"


def _row(kind: str, entry: Entry, status: str) -> dict:
    obj = entry.obj
    return {"name": entry.name, "kind": kind, "description": obj.description, "accepts": _accepts(obj),
            "spatial_dims": list(obj.spatial_dims), "channels": obj.channels,
            "size": obj.variant.size if isinstance(obj, MedMNIST) else None,
            "family": obj.variant.flag if isinstance(obj, MedMNIST) else entry.name,
            "plugin": entry.provider.plugin, "distribution": entry.provider.distribution,
            "version": entry.provider.version, "status": status}


def _broken_row(broken: BrokenPlugin) -> dict:
    return {"name": broken.plugin, "kind": BROKEN, "description": broken.error, "accepts": "",
            "spatial_dims": [], "channels": None, "size": None, "family": broken.plugin, "plugin": broken.plugin,
            "distribution": broken.distribution, "version": broken.version, "status": BROKEN}


def _rows(regs: Registries, kind: str | None) -> list[dict]:
    """One row per registered name (both sides of a conflict), then the broken plugins (under any kind)."""
    rows = []
    for registry in regs.all():
        if kind not in (None, registry.kind):
            continue
        conflicting = {c.first.name for c in registry.conflicts}
        rows += [_row(registry.kind, e, "conflict" if e.name in conflicting else "ok") for e in registry]
        rows += [_row(registry.kind, c.second, "conflict") for c in registry.conflicts]
    return rows + [_broken_row(b) for b in regs.broken]


def _grouped(rows: list[dict]) -> list[tuple[dict, str]]:
    """(first row, sizes) per dataset family (a MedMNIST dataset at every size) and per other row."""
    families: dict[tuple, list[dict]] = {}
    for row in rows:
        key = (row["kind"], row["family"], row["distribution"]) if row["size"] else id(row)
        families.setdefault(key, []).append(row)
    return [(members[0], _sizes(members)) for members in families.values()]


def _sizes(rows: list[dict]) -> str:
    if rows[0]["size"]:
        return " ".join(str(row["size"]) for row in sorted(rows, key=lambda r: r["size"]))
    return "any" if rows[0]["kind"] == "dataset" else ""


def _inputs(row: dict) -> str:
    dims = "/".join(f"{d}D" for d in row["spatial_dims"])
    return dims + (f" {row['channels']}ch" if row["channels"] else "")


@app.command("list")
def list_plugins(
    kind: str = typer.Option(None, help="Only this kind: dataset, input-adapter, output-head, pretext-task or "
                                        "broken (broken plugins show under every kind)."),
    every: bool = typer.Option(False, "--all", help="One row per registered name (each MedMNIST size)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for machines (one object per name)."),
):
    """List every registered plugin object with the distribution that provides it."""
    regs = load_registries()
    if kind is not None:
        lookup(dict.fromkeys([registry.kind for registry in regs.all()] + [BROKEN]), kind, "plugin kind")
    rows = [row for row in _rows(regs, None if kind == BROKEN else kind) if kind != BROKEN or row["kind"] == BROKEN]
    if as_json:
        print(json.dumps(rows, indent=2))
    elif every:
        _print_table([(row, _sizes([row])) for row in rows])
    else:
        _print_table(_grouped(rows))
        if any(row["size"] for row in rows):
            out.print("sizes: MedMNIST files, named NAME_SIZE above 28 (retinamnist_64); --all lists every name",
                      width=min(out.width, WIDTH), highlight=False)
    for conflict in regs.conflicts():
        err.print(f"[yellow]Conflict:[/] {escape(str(conflict.error()))}", soft_wrap=True, highlight=False)


def _print_table(rows: list[tuple[dict, str]]) -> None:
    """One table of (row, sizes), a heading per kind."""
    table = Table(title=f"medformer {medformer_version()} plugins (built-in: part of medformer)", box=box.SIMPLE_HEAD,
                  pad_edge=False, title_justify="left")
    with_sizes = any(sizes for _, sizes in rows)
    table.add_column("name", no_wrap=True)
    if with_sizes:
        table.add_column("sizes", no_wrap=True)
    table.add_column("input", no_wrap=True)
    table.add_column("description", ratio=1)
    table.add_column("provided by", no_wrap=True)
    kind = None
    for row, sizes in rows:
        if row["kind"] != kind:
            kind = row["kind"]
            table.add_row(f"[bold underline]{kind}[/]")
        style = {"broken": "red", "conflict": "yellow"}.get(row["status"])
        description = escape(row["description"] + (" [conflict]" if row["status"] == "conflict" else ""))
        provider = "built-in" if row["distribution"] == "medformer" else f"{row['distribution']} {row['version']}"
        table.add_row(row["name"], *([sizes] if with_sizes else []), _inputs(row), description, provider, style=style)
    out.print(table, width=min(out.width, WIDTH))


@app.command("show")
def show_plugin(name: str = typer.Argument(..., help="A plugin object's name, e.g. phantoms3d, or a broken plugin's.")):
    """Show one plugin object: kind, description, accepted inputs, provider, options and outputs."""
    regs = registries()
    broken = regs.broken_plugin(name)
    if broken is not None and not any(name in registry for registry in regs.all()):
        _show_broken(broken)
        return
    entry = regs.find(name)
    obj = entry.obj
    out.print(f"[bold]{entry.name}[/] ({obj.kind})")
    out.print(f"  {escape(obj.description)}", soft_wrap=True, highlight=False)
    out.print(f"  accepts:     {_accepts(obj)}")
    out.print(f"  provided by: {entry.provider}")
    if isinstance(obj, PretextTask):
        _show_task(obj)
    if isinstance(obj, OutputHead):
        _show_head(obj)
    if isinstance(obj, DatasetFactory):
        _show_dataset(obj)


def _show_broken(broken: BrokenPlugin) -> None:
    out.print(f"[bold]{broken.plugin}[/] ([red]broken plugin[/]: it registers nothing until fixed)")
    out.print(f"  provided by: {broken.distribution} {broken.version}")
    out.print(f"  error:       {escape(broken.error)}", soft_wrap=True, highlight=False)
    out.print(f"  fix it, uninstall {broken.distribution}, or leave it out with MEDFORMER_LOAD_PLUGINS",
              soft_wrap=True, highlight=False)


def _option_lines(rows: list[tuple[str, str, str]]) -> None:
    """Print (name, type, default) rows as aligned columns under a header."""
    rows = [("option", "type", "default"), *rows]
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    for name, kind, default in rows:
        out.print(escape(f"    {name.ljust(widths[0])}  {kind.ljust(widths[1])}  {default}"), highlight=False)


def _show_task(task: PretextTask) -> None:
    kinds = typing.get_type_hints(task.Options)
    fields = dataclasses.fields(task.Options)
    if fields:
        out.print(f"  options (set with --task-option {task.name}.OPTION=VALUE):", highlight=False)
        _option_lines([(f.name, inspect.formatannotation(kinds[f.name]), option_text(getattr(task.options, f.name)))
                       for f in fields])
    else:
        out.print("  options:     none")
    out.print(f"  weight:      {task.weight}; needs labels: {'yes' if task.needs_labels else 'no'}")


def _show_head(head: OutputHead) -> None:
    parameters = head.spec_parameters()
    if parameters:
        out.print("  options (a task's OutputSpec.options):")
        _option_lines([(p.name, "any" if p.annotation is p.empty else inspect.formatannotation(p.annotation),
                        "required" if p.default is p.empty else option_text(p.default)) for p in parameters])
    else:
        out.print("  options:     none")
    if head.prediction:
        out.print(f"  prediction:  {escape(head.prediction)}", soft_wrap=True, highlight=False)


def _show_dataset(factory: DatasetFactory) -> None:
    try:
        info = factory.info(DatasetOptions())
    except MedformerError as exc:
        out.print(f"  (no details: {escape(str(exc))})", soft_wrap=True, highlight=False)
        return
    out.print(f"  task:        {info.task}; {info.channels} channel(s), size {'x'.join(map(str, info.size))}")
    out.print(f"  labels:      {info.labels}")
    out.print(f"  splits:      {info.split_sizes}")

