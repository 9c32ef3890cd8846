"""Sources: every input format becomes a Ray dataset with the same canonical columns.

Canonical columns (see `columns`): `row_id` (may be empty: hashed later), `source_ref`,
`prompt`, image bytes in `control_image_<i>`, `source_image`, `mask_image` (those the task
needs), plus any per-row parameter column (`seed`, `negative_prompt`, `guidance_scale`, ...).
Image bytes load inside Ray tasks; the driver only lists rows and checks the schema, so a
source that cannot work fails before any work starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import ray.data

from pixfleet.config import ConfigError, GenerationParams, SourceConfig
from pixfleet.data.tables import (
    MANIFEST_SUFFIXES,
    is_datasets_folder,
    metadata_file,
    read_image_bytes,
    read_image_table,
)
from pixfleet.generation import columns as C
from pixfleet.models.tasks import task_info

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
# Reads must fit beside the actors that hold whole CPUs, or Ray Data waits forever.
LOAD_CPUS = 0.1


@dataclass(frozen=True)
class ImageRoles:
    """Which source column feeds which canonical image column, for one task."""

    mapping: dict[str, str]  # canonical column -> source column

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
    """A readable source: its Ray dataset of canonical rows, and how many rows it has."""

    dataset: ray.data.Dataset
    num_rows: int
    description: str


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
    roles = ImageRoles.for_task(task, config, num_controlnets)
    readers = {
        "folder": _folder,
        "manifest": _table,
        "hf_dataset": _table,
        "webdataset": _webdataset,
    }
    return readers[detect_format(config)](config, roles, rows_per_block)


def _in_blocks(table: pd.DataFrame, rows_per_block: int) -> ray.data.Dataset:
    return ray.data.from_pandas([table.iloc[i : i + rows_per_block] for i in range(0, len(table), rows_per_block)])


def _folder(config: SourceConfig, roles: ImageRoles, rows_per_block: int) -> Source:
    """Each image is a row: it feeds every image role but the mask; the prompt is the default."""
    root = Path(config.path)
    if not root.is_dir():
        raise ConfigError(f"source.path {root}: not a folder")
    if C.MASK_IMAGE in roles.mapping:
        raise ConfigError(f"source.path {root}: inpaint needs masks; use a manifest with a mask column")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[: config.limit]
    if not files:
        raise ConfigError(f"source.path {root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    table = pd.DataFrame({C.SOURCE_REF: [str(p) for p in files], "_path": [str(p) for p in files]})
    image_paths = {canonical: "_path" for canonical in roles.mapping}
    dataset = _load_images(_in_blocks(table, rows_per_block), image_paths, id_column=None, prompt_column=None)
    return Source(dataset, len(table), f"folder {root} ({len(table)} images)")


def _table(config: SourceConfig, roles: ImageRoles, rows_per_block: int) -> Source:
    """A manifest, imagefolder metadata or `datasets` folder: image paths or bytes per row."""
    columns = dict(roles.mapping)
    if config.id_column:
        columns["id_column"] = config.id_column
    loaded = read_image_table(
        Path(config.path), columns, set(roles.mapping.values()), config.limit, field="source.path"
    )
    table = loaded.table
    table[C.SOURCE_REF] = loaded.refs
    dataset = _load_images(_in_blocks(table, rows_per_block), roles.mapping, config.id_column, config.prompt_column)
    return Source(dataset, len(table), f"{config.path} ({len(table)} rows)")


def _webdataset(config: SourceConfig, roles: ImageRoles, rows_per_block: int) -> Source:
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
    return Source(dataset, count, f"webdataset {path} ({len(shards)} shards, {count} samples)")


def _check_columns(path: Path, available: list[str], config: SourceConfig, roles: ImageRoles) -> None:
    needed = {f"{role} ({name})": name for role, name in roles.mapping.items()}
    if config.id_column:
        needed[f"id_column ({config.id_column})"] = config.id_column
    missing = [label for label, name in needed.items() if name not in available]
    if missing:
        raise ConfigError(
            f"source.path {path}: no column for {', '.join(missing)}; columns are {', '.join(available)}"
        )


def _load_images(
    dataset: ray.data.Dataset, image_columns: dict[str, str], id_column: str | None, prompt_column: str | None
) -> ray.data.Dataset:
    return dataset.map_batches(
        _LoadImageFiles(image_columns, id_column, prompt_column), batch_format="pandas", num_cpus=LOAD_CPUS
    )


class _LoadImageFiles:
    """Map canonical image columns from source columns, reading paths into bytes."""

    def __init__(self, image_columns: dict[str, str], row_id_column, prompt_column):
        self.image_columns = image_columns
        self.row_id_column = row_id_column
        self.prompt_column = prompt_column

    def __call__(self, table: pd.DataFrame) -> pd.DataFrame:
        out = pd.DataFrame({C.SOURCE_REF: table[C.SOURCE_REF]})
        out[C.ROW_ID] = table[self.row_id_column].astype(str) if self.row_id_column else ""
        has_prompt = self.prompt_column and self.prompt_column in table
        out[C.PROMPT] = table[self.prompt_column] if has_prompt else None
        for canonical, column in self.image_columns.items():
            out[canonical] = [read_image_bytes(v) for v in table[column]]
        for name in GenerationParams.model_fields:
            if name in table and name != "prompt":
                out[name] = table[name]
        return out


class _WebDatasetRows:
    """Rename webdataset keys to canonical columns; `json` may carry prompt and parameters."""

    def __init__(self, image_columns: dict[str, str], prompt_column: str):
        self.image_columns = image_columns
        self.prompt_column = prompt_column

    def __call__(self, table: pd.DataFrame) -> pd.DataFrame:
        out = pd.DataFrame({C.SOURCE_REF: table["__key__"].astype(str), C.ROW_ID: ""})
        for canonical, column in self.image_columns.items():
            out[canonical] = table.get(column)
        metadata = [json.loads(v) if v else {} for v in table.get("json", [None] * len(table))]
        prompts = table["txt"] if "txt" in table else [m.get(self.prompt_column) for m in metadata]
        out[C.PROMPT] = [p.decode() if isinstance(p, bytes) else p for p in prompts]
        for name in GenerationParams.model_fields:
            values = [m.get(name) for m in metadata]
            if name != "prompt" and any(v is not None for v in values):
                out[name] = values
        return out
