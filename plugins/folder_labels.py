"""The folder dataset's labels CSV: a class label, a split and a mask file per sample path.

Columns (a header row; names are case-insensitive): `path` (relative to the folder; else the first
column), `label` (else the first other column; text or integers), `mask` (a mask file, relative to
the folder) and `split` (train, val/validation or test). Every column but the path is optional,
but a CSV needs a label or a mask column.
"""

import csv
from pathlib import Path

from medformer_core import DataError

SPLIT_FOLDERS = {"train": "train", "val": "val", "validation": "val", "test": "test"}


def read_labels(path: Path | None, keys: set[str]) -> tuple[dict[str, object], dict[str, str], int, dict[str, str]]:
    """Labels CSV (columns path[,label][,mask][,split]) -> ({sample key: label value}, {sample key:
    split}, rows naming no sample, {sample key: key of its mask})."""
    if path is None:
        return {}, {}, 0, {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [row for row in csv.reader(f) if row]
    except (OSError, ValueError, csv.Error) as exc:
        raise DataError(f"{path}: not a readable CSV ({str(exc).splitlines()[0]})") from None
    columns = [c.strip().lower() for c in rows[0]] if rows else []
    path_column = "path" if "path" in columns else columns[0] if columns else None
    others = [c for c in columns if c not in (path_column, "split", "mask")]
    label_column = "label" if "label" in columns else others[0] if others else None
    if label_column is None and "mask" not in columns:
        found = ", ".join(columns) or "none"
        raise DataError(f"{path}: expected columns path,label[,split] or path,mask, found {found}")
    labels, splits, unmatched, masks = {}, {}, 0, {}
    for values in rows[1:]:
        if len(values) > len(columns):
            raise DataError(f"{path}: not a readable CSV (row '{','.join(values)}' has more fields than the header)")
        row = dict(zip(columns, values + [""] * (len(columns) - len(values))))
        key = row[path_column].strip().removeprefix("./").rstrip("/")
        if key not in keys:
            unmatched += 1
            continue
        value = row[label_column].strip() if label_column else ""
        if value != "":
            labels[key] = int(value) if value.lstrip("-").isdigit() else value
        if row.get("mask", "").strip():
            masks[key] = row["mask"].strip().removeprefix("./")
        if "split" in row and row["split"].strip():
            split = SPLIT_FOLDERS.get(row["split"].strip().lower())
            if split is None:
                raise DataError(f"{path}: split '{row['split']}' for {key}; use train, val or test")
            splits[key] = split
    return labels, splits, unmatched, masks


def natural_order(value) -> tuple:
    return (0, value, "") if isinstance(value, int) else (1, 0, str(value))
