"""Tables of examples with image columns: manifests, imagefolder metadata, `datasets` folders.

Generation, annotation and training read the same layouts through here: a `.jsonl`, `.csv`
or `.parquet` file, a folder with `metadata.jsonl` (the imagefolder layout
`datasets.load_dataset` reads), a folder of parquet files (`data/*.parquet` as hub datasets
lay them out), or a folder written by `datasets.save_to_disk`; on local disk or in an object
store alike (`pixfleet.storage`).

The driver plans (`plan_table`) and never holds a row: it lists the files, reads parquet
footers (row counts, columns, which columns hold any value) or a JSONL/CSV table's first rows
(columns), and cuts the files into chunks: parquet row groups, line-aligned byte ranges of
JSON lines (counted as they are cut, so each row keeps its line number), whole CSV and Arrow
files. Tasks read chunks (`read_chunk`), and image cells become bytes or the URI of a file,
whose bytes are read later, where the work runs (`read_image_bytes`).

Cells keep their exact values: integers stay Python integers (a seed over 2**53 survives a
column with gaps), and a missing cell is None, never NaN.
"""

from __future__ import annotations

import io
import json
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pixfleet.config import ConfigError
from pixfleet.errors import one_line
from pixfleet.storage import Location, StorageError

MANIFEST_SUFFIXES = (".jsonl", ".csv", ".parquet")
JSONL_CHUNK_BYTES = 4 << 20  # a read task's share of a JSON-lines file
SAMPLE_BYTES = 1 << 20  # what the driver reads of a JSONL or CSV table to learn its columns
LISTING_THREADS = 16  # footers and line counts of many files, read at once
ROW = "_row"  # a chunk row's 1-based number in its file
ROW_ERROR = "_row_error"  # why a row could not be read (a bad JSON line), else None


@dataclass(frozen=True)
class Chunk:
    """Part of one file that one task reads."""

    file: int  # index into TablePlan.files
    start: int = 0  # parquet: first row group; jsonl: byte offset of its first line
    stop: int = 0  # parquet: the row group after its last; jsonl: the byte offset after its last line
    first_row: int = 1  # 1-based number of its first row in the file
    num_rows: int | None = None  # when known without reading the rows


@dataclass(frozen=True)
class TablePlan:
    """Where a table's rows are, without the rows: small enough for the driver at any size."""

    label: str  # the table as messages name it
    format: str  # parquet, jsonl, csv, arrow
    files: tuple[Location, ...]
    chunks: tuple[Chunk, ...]
    columns: tuple[str, ...]  # after the imagefolder renames (`file_name` -> `image`)
    filled: frozenset[str]  # columns known to hold a value in some row (all of them when unknown)
    base: Location  # relative image paths resolve against this folder
    image_columns: frozenset[str] = frozenset()
    renames: Mapping[str, str] = field(default_factory=dict)

    @property
    def num_rows(self) -> int | None:
        """Rows in the table, when the format says so without reading them (None otherwise)."""
        counts = [chunk.num_rows for chunk in self.chunks]
        return None if None in counts else sum(counts)

    def limited(self, limit: int | None) -> TablePlan:
        """The plan of the first `limit` rows, where the counts allow cutting it here; readers
        apply the limit again (`Dataset.limit`) for tables whose counts are unknown."""
        if not limit:
            return self
        kept, total = [], 0
        for chunk in self.chunks:
            if chunk.num_rows is None or total >= limit:
                if total < limit:
                    kept.append(chunk)
                continue
            kept.append(chunk)
            total += chunk.num_rows
        return replace(self, chunks=tuple(kept))

    def with_counts(self) -> TablePlan:
        """Every chunk counted (reading the CSV and Arrow files whose counts are unknown), so that
        a row number locates its row: what training's seeded order needs."""
        todo = [i for i, chunk in enumerate(self.chunks) if chunk.num_rows is None]
        with ThreadPoolExecutor(LISTING_THREADS) as pool:
            counts = dict(zip(todo, pool.map(lambda i: len(read_chunk(self, self.chunks[i])), todo), strict=True))
        return replace(
            self, chunks=tuple(replace(c, num_rows=counts.get(i, c.num_rows)) for i, c in enumerate(self.chunks))
        )

    def ref(self, chunk: Chunk, row_number: int) -> str:
        return f"{self.files[chunk.file].name}:{row_number}"


class RowLocator:
    """Table row numbers (0-based, over the whole table) to rows: what each training rank's
    readers hold instead of the table. A chunk is read when one of its rows is first asked for,
    and its cells are kept, but for image bytes embedded in the table: those are read again,
    a few chunks at a time, when their rows come up. A table of paths thus ends up as its text
    in memory; its images, and the bytes of an embedded table, stay in storage."""

    def __init__(self, plan: TablePlan, full_chunks: int = 2):
        counts = [chunk.num_rows for chunk in plan.chunks]
        if None in counts:
            raise ValueError("RowLocator needs a counted plan (TablePlan.with_counts)")
        self.plan = plan
        self.starts = np.cumsum([0, *counts])
        self.light: dict[int, pd.DataFrame] = {}  # chunk -> its rows, embedded image bytes left out
        self.full: OrderedDict[int, pd.DataFrame] = OrderedDict()  # the last chunks read whole
        self.full_chunks = full_chunks

    def __len__(self) -> int:
        return int(self.starts[-1])

    def rows(self, numbers: Iterable[int]) -> pd.DataFrame:
        """The rows at `numbers`, in that order, each with its `source_ref`."""
        numbers = np.asarray(list(numbers), dtype=np.int64)
        chunks = np.searchsorted(self.starts, numbers, side="right") - 1
        picked = []
        for chunk, number in zip(chunks, numbers, strict=True):
            offset = int(number - self.starts[chunk])
            row = self._light(int(chunk)).iloc[offset].to_dict()
            missing = [c for c in self.plan.image_columns if row.get(c, "") is None]
            if missing:  # bytes embedded in the table
                full = self._full(int(chunk)).iloc[offset]
                row.update({c: full[c] for c in missing})
            picked.append(row)
        return pd.DataFrame(picked)

    def _light(self, index: int) -> pd.DataFrame:
        if index not in self.light:
            table = self._read(index)
            for column in self.plan.image_columns & set(table.columns):
                table[column] = [None if isinstance(v, bytes) else v for v in table[column]]
            self.light[index] = table
        return self.light[index]

    def _full(self, index: int) -> pd.DataFrame:
        if index not in self.full:
            self.full[index] = self._read(index)
            while len(self.full) > self.full_chunks:
                self.full.popitem(last=False)
        self.full.move_to_end(index)
        return self.full[index]

    def _read(self, index: int) -> pd.DataFrame:
        chunk = self.plan.chunks[index]
        table = read_chunk(self.plan, chunk)
        bad = table[table[ROW_ERROR].notna()] if ROW_ERROR in table else table.iloc[:0]
        if len(bad):
            raise ConfigError(f"{self.plan.ref(chunk, bad[ROW].iloc[0])}: {bad[ROW_ERROR].iloc[0]}")
        table["source_ref"] = [self.plan.ref(chunk, n) for n in table[ROW]]
        return table


def is_datasets_folder(folder: Location) -> bool:
    return (folder / "dataset_dict.json").exists() or (
        (folder / "dataset_info.json").exists() and (folder / "state.json").exists()
    )


def metadata_file(folder: Location) -> Location | None:
    """The imagefolder metadata file of `folder`, if it has one."""
    return next((m for s in MANIFEST_SUFFIXES if (m := folder / f"metadata{s}").is_file()), None)


def parquet_files(folder: Location) -> list[Location]:
    """The parquet files `load_dataset("parquet", data_dir=folder)` would read: in the folder, or
    under `data/` as hub datasets lay them out."""
    return folder.files((".parquet",), recursive=False) or (folder / "data").files((".parquet",), recursive=False)


def plan_table(location: Location, columns: Mapping[str, str], image_columns: set[str], field: str) -> TablePlan:
    """The plan of the table at `location`, checked to have every column of `columns` (a label
    for messages, like "image_column", to a column name); ConfigError naming `field` otherwise."""
    try:
        plan = _plan(location, field)
    except StorageError as error:
        raise ConfigError(f"{field}: {error}") from None
    plan = replace(plan, image_columns=frozenset(image_columns))
    if plan.num_rows == 0:
        raise ConfigError(f"{field} {location}: no rows")
    missing = [f"{label} ({name})" for label, name in columns.items() if name not in plan.columns]
    if missing:
        raise ConfigError(
            f"{field} {location}: no column for {', '.join(missing)}; columns are {', '.join(plan.columns)}"
        )
    return plan


def _plan(location: Location, field: str) -> TablePlan:
    if location.is_dir():
        if is_datasets_folder(location):
            return _plan_arrow(location, field)
        if metadata_file(location) is None and (files := parquet_files(location)):
            return _plan_parquet(location, files, location, field)
        folder, location = location, metadata_file(location)
        if location is None:
            raise ConfigError(f"{field} {folder}: not a .jsonl, .csv or .parquet table or a folder with one")
    elif location.suffix not in MANIFEST_SUFFIXES:
        raise ConfigError(f"{field} {location}: not a .jsonl, .csv or .parquet table or a folder with one")
    elif not location.exists():
        raise ConfigError(f"{field} {location}: no such file")
    planner = {".jsonl": _plan_jsonl, ".csv": _plan_csv, ".parquet": _plan_parquet_file}[location.suffix]
    return planner(location, field)


def _renamed(columns: Iterable[str]) -> tuple[tuple[str, ...], dict[str, str]]:
    """The imagefolder layout: `file_name` is the `image` column, `x_file_name` is `x`."""
    renames = {c: "image" if c == "file_name" else c.removesuffix("_file_name") for c in columns}
    renames = {c: new for c, new in renames.items() if c.endswith("file_name")}
    return tuple(renames.get(c, c) for c in columns), renames


def _plan_parquet_file(file: Location, field: str) -> TablePlan:
    return _plan_parquet(file, [file], file.parent, field)


def _plan_parquet(where: Location, files: list[Location], base: Location, field: str) -> TablePlan:
    def footer(file: Location) -> pq.FileMetaData:
        try:
            with file.open_input_file() as f:
                return pq.ParquetFile(f).metadata
        except pa.ArrowException as error:
            raise ConfigError(f"{field} {file}: cannot read table ({one_line(error)})") from None

    with ThreadPoolExecutor(LISTING_THREADS) as pool:
        footers = list(pool.map(footer, files))
    schema = footers[0].schema.to_arrow_schema()
    names = schema.names
    empty = {field.name for field in schema if pa.types.is_null(field.type)}  # no value in any row
    chunks, filled = [], set()
    for index, metadata in enumerate(footers):
        first = 1
        for group in range(metadata.num_row_groups):
            rows = metadata.row_group(group).num_rows
            chunks.append(Chunk(index, group, group + 1, first, rows))
            first += rows
            for i in range(metadata.num_columns):
                column = metadata.row_group(group).column(i)
                stats = column.statistics
                if rows and (stats is None or not stats.has_null_count or stats.null_count < rows):
                    filled.add(column.path_in_schema.split(".")[0])
    columns, renames = _renamed(names)
    filled = {renames.get(c, c) for c in filled - empty}
    return TablePlan(
        str(where), "parquet", tuple(files), tuple(chunks), columns, frozenset(filled), base, renames=renames
    )


def _plan_jsonl(file: Location, field: str) -> TablePlan:
    """Line-aligned chunks with their first line numbers and row counts, cut in one pass."""
    chunks, offset, line = [], 0, 1
    with file.fs.open_input_stream(file.path) as stream:
        carry = b""
        while True:
            data = stream.read(JSONL_CHUNK_BYTES)
            buffer = carry + data
            end = len(buffer) if not data else buffer.rfind(b"\n") + 1
            if end > 0:
                body = buffer[:end]
                rows = sum(1 for text in body.splitlines() if text.strip())
                chunks.append(Chunk(0, offset, offset + end, line, rows))
                offset, line = offset + end, line + body.count(b"\n") + (0 if body.endswith(b"\n") else 1)
            carry = buffer[end:]
            if not data:
                break
    sample = _jsonl_records(file.read_range(0, SAMPLE_BYTES) if chunks else b"", sample=True)
    names = list(dict.fromkeys(key for record in sample for key in record))
    columns, renames = _renamed(names)
    filled = {renames.get(k, k) for record in sample for k, v in record.items() if v not in (None, "")}
    return TablePlan(
        str(file), "jsonl", (file,), tuple(chunks), columns, frozenset(filled), file.parent, renames=renames
    )


def _plan_csv(file: Location, field: str) -> TablePlan:
    try:
        sample = pd.read_csv(
            io.BytesIO(_whole_lines(file.read_range(0, SAMPLE_BYTES))), dtype=object, keep_default_na=False
        )
    except (ValueError, pd.errors.ParserError) as error:
        raise ConfigError(f"{field} {file}: cannot read table ({one_line(error)})") from None
    columns, renames = _renamed(sample.columns)
    filled = {renames.get(c, c) for c in sample.columns if (sample[c] != "").any()}
    return TablePlan(str(file), "csv", (file,), (Chunk(0),), columns, frozenset(filled), file.parent, renames=renames)


def _plan_arrow(folder: Location, field: str) -> TablePlan:
    """A `datasets.save_to_disk` folder: its Arrow files (of the 'train' split of a DatasetDict)."""
    if (folder / "dataset_dict.json").exists():
        splits = json.loads((folder / "dataset_dict.json").read_text())["splits"]
        folder = folder / ("train" if "train" in splits else splits[0])
    try:
        state = json.loads((folder / "state.json").read_text())
        files = [folder / entry["filename"] for entry in state["_data_files"]]
        with files[0].fs.open_input_stream(files[0].path) as stream:
            names = pa.ipc.open_stream(stream).schema.names
    except (KeyError, IndexError, ValueError, pa.ArrowException) as error:
        raise ConfigError(f"{field} {folder}: cannot load dataset ({one_line(error)})") from None
    chunks = tuple(Chunk(i) for i in range(len(files)))
    return TablePlan(str(folder), "arrow", tuple(files), chunks, tuple(names), frozenset(names), folder)


def read_chunk(plan: TablePlan, chunk: Chunk, columns: Iterable[str] | None = None) -> pd.DataFrame:
    """A chunk's rows as a DataFrame of plain values (`columns` only, when given), with each
    row's number in its file (`_row`) and, for a JSON line that cannot be read, why
    (`_row_error`); image cells as bytes or URIs."""
    file = plan.files[chunk.file]
    wanted = None if columns is None else list(dict.fromkeys(columns))
    inverse = {new: old for old, new in plan.renames.items()}
    try:
        if plan.format == "parquet":
            with file.open_input_file() as f:
                source = [inverse.get(c, c) for c in wanted] if wanted else None
                table = pq.ParquetFile(f).read_row_groups(range(chunk.start, chunk.stop), columns=source)
            frame = table.to_pandas(integer_object_nulls=True)
        elif plan.format == "jsonl":
            records = _jsonl_records(file.read_range(chunk.start, chunk.stop - chunk.start))
            frame = pd.DataFrame(records, columns=_record_columns(records), dtype=object)
        elif plan.format == "csv":
            frame = pd.read_csv(io.BytesIO(file.read_bytes()), dtype=object, keep_default_na=False)
        else:
            with file.fs.open_input_stream(file.path) as stream:
                frame = pa.ipc.open_stream(stream).read_all().to_pandas(integer_object_nulls=True)
    except (pa.ArrowException, ValueError, pd.errors.ParserError) as error:
        raise ConfigError(f"{file}: cannot read table ({one_line(error)})") from None
    frame = frame.rename(columns=plan.renames)
    if plan.format == "jsonl":  # each record knows its line's offset in the chunk
        frame[ROW] = [chunk.first_row + offset for offset in frame[ROW]]
    else:
        frame[ROW] = range(chunk.first_row, chunk.first_row + len(frame))
    if wanted:
        for name in wanted:
            if name not in frame:
                frame[name] = None
        frame = frame[[*wanted, ROW, *([ROW_ERROR] if ROW_ERROR in frame else [])]]
    for column in plan.image_columns & set(frame.columns):
        frame[column] = [_image_ref(value, plan.base) for value in frame[column]]
    return frame.reset_index(drop=True)


def _jsonl_records(data: bytes, sample: bool = False) -> list[dict[str, Any]]:
    """One dict per non-empty line; a line that is not a JSON object becomes `{_row_error: why}`
    (the sample the driver reads stops at its last whole line and skips such lines)."""
    if sample:
        data = _whole_lines(data)
    records = []
    for offset, text in enumerate(data.split(b"\n")):  # the line's offset in the chunk
        if not text.strip():
            continue
        try:
            record = json.loads(text)
            if not isinstance(record, dict):
                raise ValueError("expected a JSON object per line")
        except ValueError as error:
            if sample:
                continue
            record = {ROW_ERROR: f"not valid JSON ({one_line(error)})"}
        if not sample:
            record[ROW] = offset
        records.append(record)
    return records


def _record_columns(records: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(key for record in records for key in record))


def _whole_lines(data: bytes) -> bytes:
    end = data.rfind(b"\n")
    return data if end < 0 else data[: end + 1]


def _image_ref(value: Any, base: Location) -> Any:
    """Bytes stay bytes; a path becomes the URI of its file (relative paths against the table's
    folder), read where the work runs."""
    if isinstance(value, dict):  # {"bytes": ..., "path": ...} as `datasets` stores images
        value = value.get("bytes") or value.get("path")
    if isinstance(value, str) and value:
        return base.resolve(value).uri
    return value


def load_dataset_table(
    name: str,
    config_name: str | None,
    cache_dir: str | None,
    columns: Mapping[str, str],
    image_columns: set[str],
    field: str,
) -> TablePlan:
    """The 'train' split of `datasets.load_dataset(name, config_name)`, planned over the Arrow
    cache files it wrote (on this node's disk: a multi-node run needs a shared `cache_dir`)."""
    import datasets

    try:
        ds = datasets.load_dataset(name, config_name, cache_dir=cache_dir)
    except Exception as error:
        raise ConfigError(f"{field} {name}: load_dataset failed ({one_line(error)})") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    files = tuple(Location.of(f["filename"]) for f in ds.cache_files)
    sizes = _arrow_counts(files)
    chunks = tuple(Chunk(i, num_rows=n) for i, n in enumerate(sizes))
    plan = TablePlan(
        name, "arrow", files, chunks, tuple(ds.column_names), frozenset(ds.column_names), Location.of(".")
    )
    plan = replace(plan, image_columns=frozenset(image_columns))
    missing = [f"{label} ({c})" for label, c in columns.items() if c not in plan.columns]
    if missing:
        raise ConfigError(f"{field} {name}: no column for {', '.join(missing)}; columns are {', '.join(plan.columns)}")
    return plan


def _arrow_counts(files: tuple[Location, ...]) -> list[int]:
    counts = []
    for file in files:
        with pa.memory_map(file.path) as source:
            counts.append(sum(batch.num_rows for batch in pa.ipc.open_stream(source)))
    return counts


class UnreadableImage(ValueError):
    """An image cell that gives no bytes; the message says why (no file, a folder, no permission)."""


def read_image_bytes(value: Any) -> bytes:
    """Bytes as they are, or the file a URI or path names; UnreadableImage saying why not."""
    if isinstance(value, bytes):
        return value
    if not isinstance(value, str) or not value:
        raise UnreadableImage("no image in this row (empty cell)")
    try:
        return Location.of(value).read_bytes()
    except StorageError as error:
        raise UnreadableImage(str(error)) from None
