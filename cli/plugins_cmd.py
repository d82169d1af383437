"""`medformer plugins list|show`: what is installed, who provides it, what it accepts."""

import dataclasses
import json

import typer
from rich.table import Table

from medformer_cli.console import out
from medformer_core.api.data import DatasetOptions
from medformer_core.api.errors import MedformerError
from medformer_core.api.interfaces import DatasetFactory, PretextTask
from medformer_core.api.plugins import registries

app = typer.Typer(help="List and inspect installed plugins (datasets, adapters, heads, pretext tasks).",
                  no_args_is_help=True)


def _accepts(obj) -> str:
    dims = "/".join(f"{d}D" for d in obj.spatial_dims)
    channels = "any channels" if obj.channels is None else f"{obj.channels} channels"
    return f"{dims}, {channels}"


def _rows(kind: str | None) -> list[dict]:
    regs = registries()
    rows = []
    for registry in regs.all():
        if kind and registry.kind != kind:
            continue
        for entry in registry:
            rows.append({
                "name": entry.name,
                "kind": registry.kind,
                "description": entry.obj.description,
                "accepts": _accepts(entry.obj),
                "plugin": entry.provider.plugin,
                "distribution": entry.provider.distribution,
                "version": entry.provider.version,
                "status": "ok",
            })
    if kind is None:
        for broken in regs.broken:
            rows.append({
                "name": broken.plugin,
                "kind": "broken",
                "description": broken.error,
                "accepts": "",
                "plugin": broken.plugin,
                "distribution": broken.distribution,
                "version": broken.version,
                "status": "broken",
            })
    return rows


@app.command("list")
def list_plugins(
    kind: str = typer.Option(None, help="Only this kind: dataset, input-adapter, output-head, pretext-task."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for machines."),
):
    """List every registered plugin object with the distribution that provides it."""
    if kind is not None:
        registries().kind(kind)  # validates the name
    rows = _rows(kind)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title="medformer plugins")
    for column in ("name", "kind", "description", "accepts", "provided by"):
        table.add_column(column, overflow="fold")
    for row in rows:
        style = "red" if row["status"] == "broken" else None
        table.add_row(row["name"], row["kind"], row["description"], row["accepts"],
                      f"{row['distribution']} {row['version']}", style=style)
    out.print(table)


@app.command("show")
def show_plugin(name: str = typer.Argument(..., help="A plugin object's name, e.g. phantoms3d.")):
    """Show one plugin object: kind, description, accepted inputs, provider, and dataset facts."""
    entry = registries().find(name)
    obj = entry.obj
    out.print(f"[bold]{entry.name}[/] ({obj.kind})")
    out.print(f"  {obj.description}")
    out.print(f"  accepts:     {_accepts(obj)}")
    out.print(f"  provided by: {entry.provider}")
    if isinstance(obj, PretextTask):
        options = ", ".join(f"{f.name}={getattr(obj.options, f.name)!r}" for f in dataclasses.fields(obj.options))
        out.print(f"  options:     {options or 'none'} (set with --task-option {obj.name}.OPTION=VALUE)")
        out.print(f"  weight:      {obj.weight}; needs labels: {'yes' if obj.needs_labels else 'no'}")
    if isinstance(obj, DatasetFactory):
        try:
            info = obj.info(DatasetOptions())
        except MedformerError as exc:
            out.print(f"  (no details without an argument: {exc})")
            return
        out.print(f"  task:        {info.task}; {info.channels} channel(s), size {'x'.join(map(str, info.size))}")
        out.print(f"  labels:      {info.labels}")
        out.print(f"  splits:      {info.split_sizes}")
