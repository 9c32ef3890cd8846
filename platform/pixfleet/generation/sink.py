"""Sink: image files named from row ids plus a parquet manifest, written so reruns resume.

The write side is `stages/write_stage.py`; this module holds the layout and the read side.
`output_dir` is a local folder or an object store prefix (`pixfleet.storage`); the layout and
the guarantees are the same.

Layout under `output_dir`:
  images/<row_id>[_<k>].<ext>      one write each (a PUT; temp file + rename on local disk)
  control_maps/<row_id>_<i>.png    the maps fed to ControlNet i, with sink.save_control_maps
  manifest/part-<digest>.parquet   one per written batch, after its images; the name derives
                                   from the batch's row ids, so a retried batch replaces its part
  manifest.parquet                 every row once: the parts merged at the end of a run
A row is finished when the manifest or a part records it ok; a rerun skips finished rows, and a
killed run loses at most the batches in flight. No write is ever renamed in a store: a part
lands after its images, and a merge deletes the parts only once `manifest.parquet` holds them.

Resume state is compact: the finished rows' ids as sorted 12-byte digests (120 MB at ten
million rows), built by a Ray task from the manifest's id columns and read zero-copy by every
decode task from Ray's object store; the driver holds only its reference. The merge streams
too: a task reads the id columns to pick each row's winning record, then copies the winners
file by file into `manifest.parquet`.
"""

from __future__ import annotations

import hashlib
import io
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from pixfleet.engine import columns as C
from pixfleet.evaluation.summary import ScoreTally
from pixfleet.storage import Location

MANIFEST_SCHEMA = pa.schema(
    [
        (C.ROW_ID, pa.string()),
        (C.IMAGE_INDEX, pa.int32()),
        (C.STATUS, pa.string()),
        (C.ERROR, pa.string()),
        (C.OUTPUT_PATH, pa.string()),
        (C.SOURCE_REF, pa.string()),
        (C.INPUT_FILES, pa.list_(pa.string())),  # the input image files, "" for embedded bytes
        (C.CONTROL_MAPS, pa.list_(pa.string())),
        (C.PROMPT, pa.string()),
        ("negative_prompt", pa.string()),
        (C.SEED, pa.int64()),
        (C.WIDTH, pa.int32()),
        (C.HEIGHT, pa.int32()),
        ("num_inference_steps", pa.int32()),
        ("guidance_scale", pa.float64()),
        ("image_guidance_scale", pa.float64()),
        ("strength", pa.float64()),
        ("controlnet_conditioning_scale", pa.list_(pa.float64())),
        ("guess_mode", pa.bool_()),
        ("control_guidance_start", pa.list_(pa.float64())),
        ("control_guidance_end", pa.list_(pa.float64())),
        ("num_images_per_prompt", pa.int32()),
        (C.SAMPLER, pa.string()),
        (C.PROMPT_TOKENS, pa.int32()),
        (C.PROMPT_TRUNCATED, pa.bool_()),
        ("model", pa.string()),  # JSON: names as configured, content hashes, settings
        ("model_hash", pa.string()),  # A1111's short `Model hash` of the base model
        ("control_preprocessing", pa.string()),  # JSON: per ControlNet, the module and settings of its map
        (C.GENERATE_SECONDS, pa.float64()),
        ("write_s", pa.float64()),
        # with an `evaluate` section; null without one (and for rows the scorers could not process)
        (C.CONTROL_SCORES, pa.list_(pa.float64())),
        (C.CONTROL_METRICS, pa.list_(pa.string())),
        (C.CLIP_SCORE, pa.float64()),
        (C.CLIP_IMAGE_SIMILARITY, pa.float64()),
        (C.CLIP_DIRECTIONAL_SIMILARITY, pa.float64()),
    ]
)
# What each written row reports back to the driver (counts, failures, timings).
DRIVER_COLUMNS = (
    C.ROW_ID,
    C.IMAGE_INDEX,
    C.STATUS,
    C.ERROR,
    C.SOURCE_REF,
    C.OUTPUT_PATH,
    C.SEED,
    C.GENERATE_SECONDS,
)
# Resolved parameters recorded as manifest columns of their own.
PARAM_COLUMNS = [
    "negative_prompt",
    "num_inference_steps",
    "guidance_scale",
    "image_guidance_scale",
    "strength",
    "controlnet_conditioning_scale",
    "guess_mode",
    "control_guidance_start",
    "control_guidance_end",
    "num_images_per_prompt",
]
KEY_COLUMNS = [C.ROW_ID, C.IMAGE_INDEX, C.STATUS, "num_images_per_prompt"]
MANIFEST_FILE, PARTS_DIR = "manifest.parquet", "manifest"
SAMPLE_OUTPUTS = 16  # outputs the merge reports for the run's sample grid


def control_map_location(root: Location, row_id: str, index: int) -> Location:
    return root / "control_maps" / f"{row_id}_{index}.png"


def save_control_map(root: Location, row_id: str, index: int, image: np.ndarray) -> None:
    """The control map of ControlNet `index` for a row, as a PNG under `control_maps/`."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    control_map_location(root, row_id, index).write_bytes(buffer.getvalue())


def output_name(row_id: str, image_index: int, num_images: int) -> str:
    return row_id if num_images == 1 else f"{row_id}_{image_index}"


def row_digests(row_ids) -> np.ndarray:
    """12-byte digests of row ids, the compact form resume state keeps (a collision between two
    of ten million rows has a chance of about 1e-15)."""
    return np.array([hashlib.blake2b(r.encode(), digest_size=12).digest() for r in row_ids], dtype="S12")


class FinishedRows:
    """Rows an earlier run wrote, as sorted digests: an array, or a Ray object reference to one
    (each process fetches it once, zero-copy from the object store)."""

    def __init__(self, digests):
        self._digests = digests

    @classmethod
    def of(cls, row_ids) -> FinishedRows:
        return cls(np.unique(row_digests(row_ids)))

    @property
    def digests(self) -> np.ndarray:
        if not isinstance(self._digests, np.ndarray):
            import ray

            self._digests = ray.get(self._digests)
        return self._digests

    def __len__(self) -> int:
        return len(self.digests)

    def __contains__(self, row_id: str) -> bool:
        digests = self.digests
        if not len(digests):
            return False
        key = row_digests([row_id])[0]
        position = int(np.searchsorted(digests, key))
        return position < len(digests) and digests[position] == key

    def __getstate__(self):
        return {"_digests": self._digests}


@dataclass
class MergeResult:
    """What a merge wrote: rows by status, and the first outputs for a sample grid."""

    rows: int = 0
    ok: int = 0
    failed: int = 0
    sample_outputs: list[str] = field(default_factory=list)
    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # ScoreTally.summary of the records


class Manifest:
    """Read side of the sink: the manifest's files, finished rows, the merge."""

    def __init__(self, output_dir: str | Location):
        self.root = output_dir if isinstance(output_dir, Location) else Location.of(output_dir)

    @property
    def merged(self) -> Location:
        return self.root / MANIFEST_FILE

    def files(self) -> list[Location]:
        """manifest.parquet first, then the parts oldest first: later records win ties."""
        parts = (self.root / PARTS_DIR).file_infos((".parquet",))
        merged = [self.merged] if self.merged.is_file() else []
        return merged + [part for part, _ in sorted(parts, key=lambda p: (p[1].mtime_ns or 0, p[0].path))]

    def read(self) -> pd.DataFrame:
        """Every record of every file, for tests and small outputs; jobs use `merge` and `finished`."""
        tables = [_read_table(f) for f in self.files()]
        return pa.concat_tables(tables).to_pandas() if tables else MANIFEST_SCHEMA.empty_table().to_pandas()

    def finished(self) -> FinishedRows:
        """Rows all of whose images the manifest or a part records ok."""
        keys = _keys(self.files())
        ok = keys.ok
        if not ok.any():
            return FinishedRows(np.zeros(0, dtype="S12"))
        digests, index, wanted = keys.digest[ok], keys.image_index[ok], keys.wanted[ok]
        order = np.lexsort((index, digests))
        digests, index, wanted = digests[order], index[order], wanted[order]
        new_image = np.r_[True, (digests[1:] != digests[:-1]) | (index[1:] != index[:-1])]
        digests, wanted = digests[new_image], wanted[new_image]
        starts = np.flatnonzero(np.r_[True, digests[1:] != digests[:-1]])
        images = np.diff(np.r_[starts, len(digests)])
        return FinishedRows(digests[starts][images >= wanted[starts]])

    def merge(self) -> MergeResult:
        """One record per (row_id, image_index) in manifest.parquet: ok wins over failed, the
        latest record otherwise; then the merged parts are deleted. Streams: besides the id
        columns, one file's rows at a time are in memory, and the merged file goes to local
        disk before it is stored whole."""
        files = self.files()
        result = MergeResult()
        keys = _keys(files)
        if not len(keys.digest):
            return result
        position = np.arange(len(keys.digest))
        order = np.lexsort((position, keys.ok, keys.image_index, keys.digest))  # per image: ok last, then latest
        digests, index = keys.digest[order], keys.image_index[order]
        last = np.r_[(digests[1:] != digests[:-1]) | (index[1:] != index[:-1]), True]
        keep = np.zeros(len(position), dtype=bool)
        keep[order[last]] = True
        scores = ScoreTally()
        with tempfile.TemporaryDirectory(prefix="pixfleet-merge-") as scratch:
            merged = Path(scratch) / MANIFEST_FILE
            with pq.ParquetWriter(merged, MANIFEST_SCHEMA) as writer:
                for number, file in enumerate(files):
                    table = _read_table(file).filter(pa.array(keep[keys.file == number]))
                    writer.write_table(table)
                    _tally(result, table)
                    scores.add(table)
            self.merged.put_file(merged)
        result.scores = scores.summary()
        for part in files[1:] if files[0] == self.merged else files:
            part.delete()
        return result


def _tally(result: MergeResult, table: pa.Table) -> None:
    status = table.column(C.STATUS).to_pylist()
    result.rows += table.num_rows
    result.ok += status.count(C.OK)
    result.failed += status.count(C.FAILED)
    if len(result.sample_outputs) < SAMPLE_OUTPUTS:
        outputs = table.column(C.OUTPUT_PATH).to_pylist()
        result.sample_outputs += [p for p, s in zip(outputs, status, strict=True) if s == C.OK][
            : SAMPLE_OUTPUTS - len(result.sample_outputs)
        ]


@dataclass
class _Keys:
    """The id columns of every record of a list of manifest files, compactly."""

    digest: np.ndarray  # S12
    image_index: np.ndarray
    ok: np.ndarray
    wanted: np.ndarray  # num_images_per_prompt
    file: np.ndarray  # the record's file number


def _read_table(file: Location, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(io.BytesIO(file.read_bytes()), schema=MANIFEST_SCHEMA, columns=columns)


def _keys(files: list[Location]) -> _Keys:
    parts = {name: [] for name in ("digest", "image_index", "ok", "wanted", "file")}
    for number, file in enumerate(files):
        table = _read_table(file, KEY_COLUMNS)
        parts["digest"].append(row_digests(table.column(C.ROW_ID).to_pylist()))
        parts["image_index"].append(table.column(C.IMAGE_INDEX).to_numpy(zero_copy_only=False))
        parts["ok"].append(pc.equal(table.column(C.STATUS), C.OK).to_numpy(zero_copy_only=False))
        wanted = pc.fill_null(table.column("num_images_per_prompt"), 1)
        parts["wanted"].append(wanted.to_numpy(zero_copy_only=False))
        parts["file"].append(np.full(table.num_rows, number, dtype=np.int32))
    empty = {"digest": "S12", "image_index": np.int32, "ok": bool, "wanted": np.int32, "file": np.int32}
    return _Keys(**{k: np.concatenate(v) if v else np.zeros(0, empty[k]) for k, v in parts.items()})


def finished_digests(output: Location) -> np.ndarray:
    """The resume index of `output` (a task of its own: this module imports neither torch nor
    diffusers, so a worker starts it in a fraction of a second)."""
    return Manifest(output).finished().digests
