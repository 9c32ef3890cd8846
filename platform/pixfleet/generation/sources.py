"""Sources: every input format becomes a Ray dataset with the same canonical columns.

Canonical columns (see `engine.columns`): `row_id` (may be empty: hashed later), `source_ref`,
`row_params` (JSON of the row's own prompt and parameters: `seed`, `negative_prompt`,
`guidance_scale`, ...; an empty cell is left out, so the config's value applies), image bytes
in `control_image_<i>`, `source_image`, `mask_image` (those the task needs), and
`load_errors` (JSON: why an image column has no bytes). Parameters travel as JSON so that
integers stay exact (a seed over 2**53 in a column with gaps would otherwise become a float).
Image bytes load inside Ray tasks; the driver only lists rows and checks the schema, so a
source that cannot work fails before any work starts.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray.data

from pixfleet.config import ConfigError, GenerationParams, SourceConfig
from pixfleet.config.generation import PER_CONTROLNET
from pixfleet.data.tables import (
    MANIFEST_SUFFIXES,
    UnreadableImage,
    is_datasets_folder,
    metadata_file,
    read_image_bytes,
    read_image_table,
)
from pixfleet.engine import columns as C
from pixfleet.models.tasks import task_info, unused_parameters

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
# Reads must fit beside the actors that hold whole CPUs, or Ray Data waits forever.
LOAD_CPUS = 0.1


@dataclass(frozen=True)
class ImageRoles:
    """Which source column feeds which canonical image column, for one task."""

    mapping: dict[str, str]  # canonical column -> source column

    def labels(self, folder: bool) -> dict[str, str]:
        """Canonical column -> the name error messages use: the user's column, or the file."""
        return {canonical: "image file" if folder else column for canonical, column in self.mapping.items()}

    @classmethod
    def for_task(cls, task: str, source: SourceConfig, num_controlnets: int) -> ImageRoles:
        info = task_info(task)
        mapping = {}
        for i in range(num_controlnets):
            names = source.control_columns
            mapping[C.control_column(i)] = names[i] if len(names) > 1 else names[0]
        if info.needs_source_image:
            mapping[C.SOURCE_IMAGE] = source.source_image_column
        if info.needs_mask:
            mapping[C.MASK_IMAGE] = source.mask_column
        return cls(mapping)


@dataclass
class Source:
    """A readable source: its Ray dataset of canonical rows, how many rows it has, and the
    names its image columns go by in messages."""

    dataset: ray.data.Dataset
    num_rows: int
    description: str
    image_labels: dict[str, str]


def detect_format(config: SourceConfig) -> str:
    """'auto' -> the format the path's contents say."""
    if config.format != "auto":
        return config.format
    path = Path(config.path)
    if path.is_file():
        if path.suffix in MANIFEST_SUFFIXES:
            return "manifest"
        raise ConfigError(f"source.path {path}: not a .jsonl, .csv or .parquet manifest")
    if is_datasets_folder(path):
        return "hf_dataset"
    if any(path.glob("*.tar")):
        return "webdataset"
    if metadata_file(path):
        return "manifest"
    return "folder"


def open_source(config: SourceConfig, task: str, num_controlnets: int, rows_per_block: int) -> Source:
    """Check `config` against `task` and return its canonical dataset.

    Blocks hold `rows_per_block` rows, a few generation batches: Ray Data streams block by
    block, so small blocks keep every stage busy at once and a failure loses only a block, but
    each block costs every stage a task, which large blocks amortize.
    """
    return _open(config, task, ImageRoles.for_task(task, config, num_controlnets), rows_per_block)


def open_image_source(config: SourceConfig, rows_per_block: int) -> Source:
    """Rows of one image each (`source_image_column`) and its caption (`prompt_column`), for jobs
    that read photos rather than generation inputs; other columns are not parameters here."""
    return _open(config, None, ImageRoles({C.SOURCE_IMAGE: config.source_image_column}), rows_per_block)


def _open(config: SourceConfig, task: str | None, roles: ImageRoles, rows_per_block: int) -> Source:
    readers = {
        "folder": _folder,
        "manifest": _table,
        "hf_dataset": _table,
        "webdataset": _webdataset,
    }
    return readers[detect_format(config)](config, task, roles, rows_per_block)


def _in_blocks(table: pd.DataFrame, rows_per_block: int) -> ray.data.Dataset:
    return ray.data.from_pandas([table.iloc[i : i + rows_per_block] for i in range(0, len(table), rows_per_block)])


def _folder(config: SourceConfig, task: str | None, roles: ImageRoles, rows_per_block: int) -> Source:
    """Each image is a row: it feeds every image role but the mask; the prompt is the default."""
    root = Path(config.path)
    if not root.is_dir():
        raise ConfigError(f"source.path {root}: not a folder")
    if C.MASK_IMAGE in roles.mapping:
        raise ConfigError(f"source.path {root}: inpaint needs masks; use a manifest with a mask column")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[: config.limit]
    if not files:
        raise ConfigError(f"source.path {root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    paths = [str(p) for p in files]
    table = pd.DataFrame({C.SOURCE_REF: paths, C.ROW_ID: "", C.ROW_PARAMS: "{}", "_path": paths})
    image_paths = {canonical: "_path" for canonical in roles.mapping}
    dataset = _in_blocks(table, rows_per_block).map_batches(
        _LoadImageFiles(image_paths), batch_format="pandas", num_cpus=LOAD_CPUS
    )
    return Source(dataset, len(table), f"folder {root} ({len(table)} images)", roles.labels(folder=True))


def _table(config: SourceConfig, task: str | None, roles: ImageRoles, rows_per_block: int) -> Source:
    """A manifest, imagefolder metadata or `datasets` folder: image paths or bytes per row."""
    columns = dict(roles.mapping)
    if config.id_column:
        columns["id_column"] = config.id_column
    loaded = read_image_table(
        Path(config.path), columns, set(roles.mapping.values()), config.limit, field="source.path"
    )
    table = loaded.table
    parameter_columns = [name for name in GenerationParams.model_fields if task and name in table and name != "prompt"]
    filled = [name for name in parameter_columns if any(_cell(v, False) is not _UNSET for v in table[name])]
    unused = unused_parameters(task, filled)  # an empty column of a shared manifest is fine
    if unused:
        raise ConfigError(
            f"source.path {config.path}: column {unused[0]!r} is a parameter task {task!r} does not take"
        )
    own = [config.prompt_column, *parameter_columns] if config.prompt_column in table else parameter_columns
    canonical = pd.DataFrame(
        {
            C.SOURCE_REF: loaded.refs,
            C.ROW_ID: [_row_id(v) for v in table[config.id_column]] if config.id_column else "",
            C.ROW_PARAMS: [row_params(record, config.prompt_column) for record in table[own].to_dict("records")],
            **{column: table[column] for column in set(roles.mapping.values())},
        }
    )
    dataset = _in_blocks(canonical, rows_per_block).map_batches(
        _LoadImageFiles(roles.mapping), batch_format="pandas", num_cpus=LOAD_CPUS
    )
    return Source(dataset, len(table), f"{config.path} ({len(table)} rows)", roles.labels(folder=False))


def _webdataset(config: SourceConfig, task: str | None, roles: ImageRoles, rows_per_block: int) -> Source:
    """Tar shards; a sample's files are columns by extension key (`control.png`, `txt`, `json`)."""
    import tarfile

    path = Path(config.path)
    shards = sorted(str(p) for p in path.glob("*.tar"))
    keys, count = set(), 0
    for shard in shards:
        with tarfile.open(shard) as tar:
            names = [m.name for m in tar.getmembers() if m.isfile()]
        keys |= {name.split(".", 1)[1] for name in names if "." in name}
        count += len({name.split(".", 1)[0] for name in names})
    if count == 0:
        raise ConfigError(f"source.path {path}: no samples in {len(shards)} shard(s)")
    _check_columns(path, sorted(keys), config, roles)
    dataset = ray.data.read_webdataset(shards, decoder=None).repartition(target_num_rows_per_block=rows_per_block)
    dataset = dataset.map_batches(
        _WebDatasetRows(roles.mapping, config.prompt_column), batch_format="pandas", num_cpus=LOAD_CPUS
    )
    if config.limit:
        dataset, count = dataset.limit(config.limit), min(count, config.limit)
    description = f"webdataset {path} ({len(shards)} shards, {count} samples)"
    return Source(dataset, count, description, roles.labels(folder=False))


def _check_columns(path: Path, available: list[str], config: SourceConfig, roles: ImageRoles) -> None:
    needed = {f"{role} ({name})": name for role, name in roles.mapping.items()}
    if config.id_column:
        needed[f"id_column ({config.id_column})"] = config.id_column
    missing = [label for label, name in needed.items() if name not in available]
    if missing:
        raise ConfigError(
            f"source.path {path}: no column for {', '.join(missing)}; columns are {', '.join(available)}"
        )


def row_params(record: dict[str, Any], prompt_column: str | None) -> str:
    """The row's own prompt and parameters as JSON; empty cells are left out (not set)."""
    own = {}
    for column, value in record.items():
        name = "prompt" if column == prompt_column else column
        value = _cell(value, per_controlnet=name in PER_CONTROLNET)
        if value is not _UNSET:
            own[name] = value
    return json.dumps(own)


_UNSET = object()


def _cell(value: Any, per_controlnet: bool) -> Any:
    """A table cell as a plain Python value, or _UNSET for an empty one (None, NaN, "")."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return _UNSET
    if isinstance(value, str):
        if not value.strip():
            return _UNSET
        if per_controlnet and value.lstrip().startswith("["):  # "[1.0, 0.5]" from a CSV cell
            with contextlib.suppress(ValueError):
                return json.loads(value)
    return value


def _row_id(value: Any) -> str:
    value = _cell(value, per_controlnet=False)
    return "" if value is _UNSET else str(value)


class _LoadImageFiles:
    """Read canonical image columns from source columns (paths or bytes); why a cell gave no
    bytes goes to `load_errors`."""

    def __init__(self, image_columns: dict[str, str]):
        self.image_columns = image_columns

    def __call__(self, table: pd.DataFrame) -> pd.DataFrame:
        out = table[[C.SOURCE_REF, C.ROW_ID, C.ROW_PARAMS]].copy()
        errors = [{} for _ in range(len(table))]
        for canonical, column in self.image_columns.items():
            images = []
            for i, value in enumerate(table[column]):
                try:
                    images.append(read_image_bytes(value))
                except UnreadableImage as error:
                    images.append(None)
                    errors[i][canonical] = str(error)
            out[canonical] = images
        out[C.LOAD_ERRORS] = [json.dumps(e) for e in errors]
        cells = table[list(dict.fromkeys(self.image_columns.values()))].to_dict("records")
        out[C.INPUT_FILES] = [
            json.dumps([row[c] if isinstance(row[c], str) else "" for c in self.image_columns.values()])
            for row in cells
        ]
        return out


class _WebDatasetRows:
    """Rename webdataset keys to canonical columns; `json` may carry prompt and parameters."""

    def __init__(self, image_columns: dict[str, str], prompt_column: str):
        self.image_columns = image_columns
        self.prompt_column = prompt_column

    def __call__(self, table: pd.DataFrame) -> pd.DataFrame:
        out = pd.DataFrame({C.SOURCE_REF: table["__key__"].astype(str), C.ROW_ID: ""})
        errors = [{} for _ in range(len(table))]
        for canonical, column in self.image_columns.items():
            out[canonical] = table.get(column)
            for i, data in enumerate(out[canonical]):
                if data is None:
                    errors[i][canonical] = f"sample has no {column!r} file"
        metadata = [json.loads(v) if v else {} for v in table.get("json", [None] * len(table))]
        if "txt" in table:
            for record, text in zip(metadata, table["txt"], strict=True):
                record[self.prompt_column] = text.decode() if isinstance(text, bytes) else text
        wanted = set(GenerationParams.model_fields) | {self.prompt_column}
        out[C.ROW_PARAMS] = [
            row_params({k: v for k, v in m.items() if k in wanted}, self.prompt_column) for m in metadata
        ]
        out[C.LOAD_ERRORS] = [json.dumps(e) for e in errors]
        out[C.INPUT_FILES] = json.dumps([""] * len(self.image_columns))  # the files are inside the shards
        return out
