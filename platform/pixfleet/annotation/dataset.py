"""The training set under `output_dir`, on local disk or in a bucket: each kept row once, resumably.

Layout (the imagefolder `pixfleet train` and `datasets` read):
  images/<row_id>.png, conditioning_images/<row_id>.png   written by the write stage
  records/part-<n>.jsonl   one per block, written whole by the record stage after the block's
                           files: every row's record
  manifest.jsonl           every row this folder has seen: status (ok, filtered, failed), reason,
                           source, size, perceptual hash, map coverage, caption
  metadata.jsonl           file_name, conditioning_image_file_name, text: one line per kept row
  annotate.json            the settings that decide a row's outputs; a rerun must match them

A part is one write, so a block's rows are recorded all or none. At the end of a run a Ray task
rewrites manifest.jsonl and metadata.jsonl from the records (streamed through local files) and
removes the parts they now hold; a killed run leaves its parts for the next run to read. A rerun
skips rows recorded ok or filtered (failed ones are tried again). The record stage is a single
actor: the one writer of records, and where near-duplicates are found (`dedupe.HashIndex`).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pixfleet.engine import columns as C
from pixfleet.errors import UserError
from pixfleet.generation.sink import FinishedRows, row_digests
from pixfleet.storage import Location

TEXT = "text"  # the caption: from the source, the captioner or the template
PHASH = "phash"  # 64-bit perceptual hash of the photo, 16 hex digits
COVERAGE = "map_coverage"  # fraction of the map's pixels that differ from its most common value
FILTERED = "filtered"  # kept out of the training set by a filter; the reason is in `error`
IMAGES_DIR, MAPS_DIR = "images", "conditioning_images"
MANIFEST_FIELDS = (C.ROW_ID, C.STATUS, C.ERROR, C.SOURCE_REF, TEXT, C.WIDTH, C.HEIGHT, PHASH, COVERAGE)
MANIFEST, METADATA, SETTINGS, RECORDS_DIR = "manifest.jsonl", "metadata.jsonl", "annotate.json", "records"
SAMPLE_ROWS = 8  # kept rows the merge reports for the run's sample grid


class SettingsChanged(UserError, ValueError):
    """The output folder holds rows annotated with other settings."""


def check_settings(root: Location, settings: dict) -> None:
    """Record `settings` in a new folder; refuse a folder annotated with others."""
    path = root / SETTINGS
    if path.exists() and json.loads(path.read_text()) != settings:
        raise SettingsChanged(
            f"output_dir {root} holds rows annotated with other detector, resolution, caption or "
            "filter settings; use another output_dir (or delete this one)"
        )
    path.write_text(json.dumps(settings, indent=2, sort_keys=True))


def metadata_line(record: dict[str, Any]) -> dict[str, str]:
    """A kept row's line of metadata.jsonl."""
    row_id = record[C.ROW_ID]
    return {
        "file_name": f"{IMAGES_DIR}/{row_id}.png",
        "conditioning_image_file_name": f"{MAPS_DIR}/{row_id}.png",
        "text": record[TEXT],
    }


def record_parts(root: Location) -> list[Location]:
    return (root / RECORDS_DIR).files((".jsonl",), recursive=False)


def iter_records(root: Location) -> Iterator[dict[str, Any]]:
    """Every record in the order rows were recorded: manifest.jsonl, then the parts."""
    manifest = root / MANIFEST
    for file in ([manifest] if manifest.is_file() else []) + record_parts(root):
        for line in file.read_text().splitlines():
            if line.strip():
                yield json.loads(line)


def finished_digests(root: Location) -> np.ndarray:
    """Rows a rerun skips (recorded ok or filtered), as `FinishedRows` digests."""
    done = {r[C.ROW_ID] for r in iter_records(root) if r[C.STATUS] in (C.OK, FILTERED)}
    return FinishedRows.of(done).digests


class Records:
    """The record stage's state: the kept rows' hashes (searchable), ids and sources; and the
    next part's number. Loaded from what the folder holds, so a restarted actor or a rerun goes
    on where the last one stopped."""

    def __init__(self, root: Location, near_duplicate_distance: int | None):
        from pixfleet.annotation.dedupe import HashIndex

        self.root = root
        self.identical_only = near_duplicate_distance is None
        self.index = HashIndex(near_duplicate_distance or 0)
        self.kept_digests = np.zeros(0, dtype="S12")
        self.kept_sources: list[str] = []
        parts = record_parts(root)
        self.next_part = 1 + max((int(p.stem.removeprefix("part-")) for p in parts), default=-1)
        kept = [r for r in iter_records(root) if r[C.STATUS] == C.OK]
        self._keep(kept, np.array([int(r[PHASH], 16) for r in kept], dtype=np.uint64))

    def record(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Drop near-duplicates of kept rows (and identical files), record every row in a new
        part; the rows with their final status."""
        candidates = [i for i, row in enumerate(rows) if row[C.STATUS] == C.OK]
        hashes = np.array([int(rows[i][PHASH], 16) for i in candidates], dtype=np.uint64)
        first = len(self.kept_sources)
        positions, apart = self.index.keep_new(hashes)
        digests = row_digests([rows[i][C.ROW_ID] for i in candidates])
        self._grow(positions.max(initial=first - 1) + 1)
        for i, position, bits, digest in zip(candidates, positions, apart, digests, strict=True):
            row = rows[i]
            if bits < 0:  # kept
                self.kept_digests[position] = digest
                self.kept_sources[position] = row[C.SOURCE_REF]
            elif self.kept_digests[position] == digest:  # the same file: it shares that row's files
                reason = f"duplicate of {self.kept_sources[position]} (identical file)"
                rows[i] = {**row, C.STATUS: FILTERED, C.ERROR: reason}
            elif self.identical_only:  # as alike as hashes go, but another file: kept too
                self._keep([row], np.array([int(row[PHASH], 16)], dtype=np.uint64))
            else:
                for folder in (IMAGES_DIR, MAPS_DIR):
                    (self.root / folder / f"{row[C.ROW_ID]}.png").delete()
                reason = f"near-duplicate of {self.kept_sources[position]} ({int(bits)} bits apart)"
                rows[i] = {**row, C.STATUS: FILTERED, C.ERROR: reason}
        written = [{k: row[k] for k in MANIFEST_FIELDS} for row in rows if row[C.STATUS] != C.SKIPPED]
        if written:
            part = self.root / RECORDS_DIR / f"part-{self.next_part:08d}.jsonl"
            part.write_text("".join(json.dumps(record) + "\n" for record in written))
            self.next_part += 1
        return rows

    def _keep(self, records: list[dict[str, Any]], hashes: np.ndarray) -> None:
        """Add rows as kept, whatever their hashes' neighbours (they were kept before)."""
        first = len(self.kept_sources)
        self.index.add(hashes)
        self._grow(first + len(records))
        self.kept_digests[first:] = row_digests([r[C.ROW_ID] for r in records])
        self.kept_sources[first:] = [r[C.SOURCE_REF] for r in records]

    def _grow(self, size: int) -> None:
        if size > len(self.kept_sources):
            extra = size - len(self.kept_sources)
            self.kept_digests = np.concatenate([self.kept_digests, np.zeros(extra, dtype="S12")])
            self.kept_sources += [""] * extra


@dataclass
class MergeResult:
    """What the merge wrote: rows in the manifest, kept rows, sample images."""

    rows: int = 0
    kept: int = 0
    samples: list[tuple[str, str]] = field(default_factory=list)  # (image, control map) URIs


def merge_records(root: Location) -> MergeResult:
    """manifest.jsonl and metadata.jsonl rewritten from every record, then the merged parts
    removed: streamed, one file's records at a time."""
    result = MergeResult()
    parts = record_parts(root)
    with tempfile.TemporaryDirectory(prefix="pixfleet-annotate-") as scratch:
        manifest, metadata = Path(scratch) / MANIFEST, Path(scratch) / METADATA
        with manifest.open("w") as all_rows, metadata.open("w") as kept_rows:
            for record in iter_records(root):
                all_rows.write(json.dumps(record) + "\n")
                result.rows += 1
                if record[C.STATUS] == C.OK:
                    line = metadata_line(record)
                    kept_rows.write(json.dumps(line) + "\n")
                    result.kept += 1
                    if len(result.samples) < SAMPLE_ROWS:
                        result.samples.append(
                            ((root / line["file_name"]).uri, (root / line["conditioning_image_file_name"]).uri)
                        )
        (root / MANIFEST).put_file(manifest)
        (root / METADATA).put_file(metadata)
    for part in parts:
        part.delete()
    return result
