"""The training set on disk, written by the driver only: each kept row once, resumably.

Layout under `output_dir` (the imagefolder that `pixfleet train` and `datasets` read):
  images/<row_id>.png, conditioning_images/<row_id>.png   written by the write stage
  metadata.jsonl       file_name, conditioning_image_file_name, text: one line per kept row
  manifest.jsonl       every row this folder has seen: status (ok, filtered, failed), reason,
                       source, size, perceptual hash, map coverage
  annotate.json        the settings that decide a row's outputs; a rerun must match them
A row is appended to metadata.jsonl after its files are written, then to manifest.jsonl; a
rerun skips rows recorded ok or filtered (failed ones are tried again), so a killed run
resumes where it stopped and no row is listed twice. A line cut short by a kill is dropped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pixfleet.annotation.stages import COVERAGE, FILTERED, IMAGES_DIR, MAPS_DIR, PHASH, TEXT
from pixfleet.engine import columns as C
from pixfleet.errors import UserError

MANIFEST_FIELDS = (C.ROW_ID, C.STATUS, C.ERROR, C.SOURCE_REF, TEXT, C.WIDTH, C.HEIGHT, PHASH, COVERAGE)


class SettingsChanged(UserError, ValueError):
    """The output folder holds rows annotated with other settings."""


class JsonLines:
    """An append-only JSON-lines file, synced after each batch of lines."""

    def __init__(self, path: Path):
        self.path = path

    def read(self) -> list[dict[str, Any]]:
        """The complete lines; a last line cut short by a kill is removed from the file."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(len(complete))
        return [json.loads(line) for line in complete.decode().splitlines() if line.strip()]

    def append(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        with open(self.path, "a") as f:
            f.write("".join(json.dumps(record) + "\n" for record in records))
            f.flush()
            os.fsync(f.fileno())


class TrainingSetWriter:
    """Keeps what the folder already holds (kept ids and hashes) and records new batches."""

    def __init__(self, output_dir: str | Path, settings: dict, near_duplicate_distance: int | None):
        self.root = Path(output_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self._check_settings(settings)
        self.metadata = JsonLines(self.root / "metadata.jsonl")
        self.manifest = JsonLines(self.root / "manifest.jsonl")
        self.distance = near_duplicate_distance
        listed = {Path(line["file_name"]).stem for line in self.metadata.read()}
        seen = self.manifest.read()
        self.kept: dict[str, str] = {}  # row id -> source ref, of rows in metadata.jsonl
        hashes = []
        for record in seen:
            if record[C.ROW_ID] in listed and record[C.ROW_ID] not in self.kept:
                self.kept[record[C.ROW_ID]] = record[C.SOURCE_REF]
                hashes.append(int(record[PHASH], 16))
        self.listed = listed  # may hold a row the manifest missed (killed between the two appends)
        self.hashes = np.array(hashes, dtype=np.uint64)
        self.finished = frozenset(listed | {r[C.ROW_ID] for r in seen if r[C.STATUS] in (C.OK, FILTERED)})

    def _check_settings(self, settings: dict) -> None:
        path = self.root / "annotate.json"
        if path.exists() and json.loads(path.read_text()) != settings:
            raise SettingsChanged(
                f"output_dir {self.root} holds rows annotated with other detector, resolution, caption or "
                "filter settings; use another output_dir (or delete this one)"
            )
        path.write_text(json.dumps(settings, indent=2, sort_keys=True))

    def record(self, batch: pd.DataFrame) -> pd.DataFrame:
        """Drop near-duplicates of kept rows, list the kept ones, log every row; the batch's
        rows with their final status."""
        rows = []
        for row in batch.to_dict("records"):
            if row[C.STATUS] == C.OK:
                row = self._deduplicated(row)
            rows.append(row)
        kept = [row for row in rows if row[C.STATUS] == C.OK and row[C.ROW_ID] not in self.listed]
        self.metadata.append(
            [
                {
                    "file_name": f"{IMAGES_DIR}/{row[C.ROW_ID]}.png",
                    "conditioning_image_file_name": f"{MAPS_DIR}/{row[C.ROW_ID]}.png",
                    "text": row[TEXT],
                }
                for row in kept
            ]
        )
        self.listed |= {row[C.ROW_ID] for row in kept}
        self.manifest.append([{k: row[k] for k in MANIFEST_FIELDS} for row in rows if row[C.STATUS] != C.SKIPPED])
        return pd.DataFrame(rows)

    def _deduplicated(self, row: dict[str, Any]) -> dict[str, Any]:
        """`row` kept, or filtered as the duplicate of a kept row: an identical file (it shares
        that row's id and files) or a near-duplicate (its own files are removed)."""
        row_id, phash = row[C.ROW_ID], np.uint64(int(row[PHASH], 16))
        if row_id in self.kept:
            return {**row, C.STATUS: FILTERED, C.ERROR: f"duplicate of {self.kept[row_id]} (identical file)"}
        if self.distance is not None and len(self.hashes):
            distances = np.bitwise_count(self.hashes ^ phash)
            nearest = int(distances.argmin())
            if distances[nearest] <= self.distance:
                for folder in (IMAGES_DIR, MAPS_DIR):
                    (self.root / folder / f"{row_id}.png").unlink(missing_ok=True)
                original = list(self.kept.values())[nearest]
                reason = f"near-duplicate of {original} ({int(distances[nearest])} bits apart)"
                return {**row, C.STATUS: FILTERED, C.ERROR: reason}
        self.kept[row_id] = row[C.SOURCE_REF]
        self.hashes = np.append(self.hashes, phash)
        return row
