"""Tables of examples with image columns: manifests, imagefolder metadata, `datasets` folders.

Generation and training read the same layouts through here: a `.jsonl`/`.csv`/`.parquet`
file, a folder with `metadata.jsonl` (the imagefolder layout `datasets.load_dataset` reads),
or a folder written by `datasets.save_to_disk`. Image cells end up as bytes or absolute paths;
the bytes of a path are read later, where the work runs (`read_image_bytes`).

Cells keep their exact values: integers stay Python integers (a seed over 2**53 survives a
column with gaps), and a missing cell is None, never NaN.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq

from pixfleet.config import ConfigError
from pixfleet.engine.images import one_line

MANIFEST_SUFFIXES = (".jsonl", ".csv", ".parquet")


@dataclass
class ImageTable:
    """Rows whose image columns hold bytes or absolute paths, and where each row came from."""

    table: pd.DataFrame
    refs: list[str]  # "metadata.jsonl:12", "train[3]": for error messages
    path: Path


def is_datasets_folder(path: Path) -> bool:
    return (path / "dataset_dict.json").exists() or (
        (path / "dataset_info.json").exists() and (path / "state.json").exists()
    )


def metadata_file(folder: Path) -> Path | None:
    """The imagefolder metadata file of `folder`, if it has one."""
    return next((folder / f"metadata{s}" for s in MANIFEST_SUFFIXES if (folder / f"metadata{s}").exists()), None)


def read_image_table(
    path: Path, columns: Mapping[str, str], image_columns: set[str], limit: int | None, field: str
) -> ImageTable:
    """Read the table at `path`, keep at most `limit` rows, check it has every column.

    `columns` maps a label for error messages ("image_column") to a column name; `field` names
    the config field that gave `path`. Raises ConfigError naming what is wrong.
    """
    if path.is_dir() and is_datasets_folder(path):
        loaded = _datasets_folder(path, image_columns, limit, field)
    elif path.is_dir() and not metadata_file(path) and parquet_files(path):
        loaded = _parquet_folder(path, limit, field)
    else:
        file = metadata_file(path) if path.is_dir() else path
        if file is None or file.suffix not in MANIFEST_SUFFIXES:
            raise ConfigError(f"{field} {path}: not a .jsonl, .csv or .parquet table or a folder with one")
        loaded = _manifest_file(file, limit, field)
    _check_columns(loaded, columns, field, path)
    base = loaded.path if loaded.path.is_dir() else loaded.path.parent
    for column in image_columns:
        loaded.table[column] = [_image_ref(value, base) for value in loaded.table[column]]
    return loaded


def _check_columns(loaded: ImageTable, columns: Mapping[str, str], field: str, where: Any) -> None:
    if loaded.table.empty:
        raise ConfigError(f"{field} {where}: no rows")
    missing = [f"{label} ({name})" for label, name in columns.items() if name not in loaded.table.columns]
    if missing:
        raise ConfigError(
            f"{field} {where}: no column for {', '.join(missing)}; columns are {', '.join(loaded.table.columns)}"
        )


def _manifest_file(path: Path, limit: int | None, field: str) -> ImageTable:
    if path.suffix == ".jsonl":
        table = _jsonl(path, field)
    else:
        try:
            if path.suffix == ".csv":  # every cell as written: numbers are parsed with the parameters
                table = pd.read_csv(path, dtype=object, keep_default_na=False)
            else:
                table = pq.read_table(path).to_pandas(integer_object_nulls=True)
        except Exception as error:
            raise ConfigError(f"{field} {path}: cannot read table ({one_line(error)})") from None
    # imagefolder layout: `file_name` is the `image` column, `x_file_name` is `x`.
    renames = {c: "image" if c == "file_name" else c.removesuffix("_file_name") for c in table.columns}
    table = table.rename(columns={c: new for c, new in renames.items() if c.endswith("file_name")})
    table = table.head(limit) if limit else table
    return ImageTable(table.reset_index(drop=True), [f"{path.name}:{i + 1}" for i in range(len(table))], path)


def _jsonl(path: Path, field: str) -> pd.DataFrame:
    records = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as error:
                raise ConfigError(f"{field} {path}:{number}: not valid JSON ({error})") from None
            if not isinstance(record, dict):
                raise ConfigError(f"{field} {path}:{number}: expected a JSON object per line")
            records.append(record)
    return pd.DataFrame(records, dtype=object)


def parquet_files(folder: Path) -> list[Path]:
    """The parquet files `load_dataset("parquet", data_dir=folder)` would read: in the folder, or
    under `data/` as hub datasets lay them out."""
    return sorted(folder.glob("*.parquet")) or sorted((folder / "data").glob("*.parquet"))


def _parquet_folder(path: Path, limit: int | None, field: str) -> ImageTable:
    files = parquet_files(path)
    try:
        tables = [pq.read_table(f).to_pandas(integer_object_nulls=True) for f in files]
    except Exception as error:
        raise ConfigError(f"{field} {path}: cannot read its parquet files ({one_line(error)})") from None
    refs = [f"{f.name}:{i + 1}" for f, table in zip(files, tables, strict=True) for i in range(len(table))]
    table = pd.concat(tables, ignore_index=True)
    table, refs = (table.head(limit), refs[:limit]) if limit else (table, refs)
    return ImageTable(table.reset_index(drop=True), refs, path)


def load_dataset_table(
    name: str,
    config_name: str | None,
    cache_dir: str | None,
    columns: Mapping[str, str],
    image_columns: set[str],
    limit: int | None,
    field: str,
) -> ImageTable:
    """The 'train' split of `datasets.load_dataset(name, config_name)`, checked like `read_image_table`."""
    import datasets

    try:
        ds = datasets.load_dataset(name, config_name, cache_dir=cache_dir)
    except Exception as error:
        raise ConfigError(f"{field} {name}: load_dataset failed ({one_line(error)})") from None
    loaded = _from_datasets(ds, Path(name), image_columns, limit)
    _check_columns(loaded, columns, field, name)
    for column in image_columns:
        loaded.table[column] = [_image_ref(value, Path.cwd()) for value in loaded.table[column]]
    return loaded


def _datasets_folder(path: Path, image_columns: set[str], limit: int | None, field: str) -> ImageTable:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as error:
        raise ConfigError(f"{field} {path}: cannot load dataset ({error})") from None
    return _from_datasets(ds, path, image_columns, limit)


def _from_datasets(ds, path: Path, image_columns: set[str], limit: int | None) -> ImageTable:
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    if limit:
        ds = ds.select(range(min(limit, len(ds))))
    for column in image_columns & set(ds.column_names):  # raw {bytes, path}, not decoded PIL images
        ds = ds.cast_column(column, datasets.Image(decode=False))
    table = ds.with_format("arrow")[:].to_pandas(integer_object_nulls=True)
    return ImageTable(table, [f"{path.name}[{i}]" for i in range(len(ds))], path)


def _image_ref(value: Any, base: Path) -> Any:
    """Relative paths resolve against the table's folder; bytes stay bytes."""
    if isinstance(value, dict):  # {"bytes": ..., "path": ...} as `datasets` stores images
        value = value.get("bytes") or value.get("path")
    if isinstance(value, str) and value and not Path(value).is_absolute():
        return str(base / value)
    return value


class UnreadableImage(ValueError):
    """An image cell that gives no bytes; the message says why (no file, a folder, no permission)."""


def read_image_bytes(value: Any) -> bytes:
    """Bytes as they are, or the file a path names; UnreadableImage saying why not."""
    if isinstance(value, bytes):
        return value
    if not isinstance(value, str) or not value:
        raise UnreadableImage("no image in this row (empty cell)")
    try:
        return Path(value).read_bytes()
    except IsADirectoryError:
        raise UnreadableImage(f"{value} is a folder, not an image file") from None
    except FileNotFoundError:
        raise UnreadableImage(f"{value}: no such file") from None
    except OSError as error:
        raise UnreadableImage(f"{value}: cannot read ({error.strerror or type(error).__name__})") from None
