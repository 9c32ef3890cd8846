"""The side-by-side page of a `pixfleet eval` run: one row per input (its first image), the
input and its control map, then each model's output with its scores. Written beside
comparison.md by a task; image links are relative, so the folder can move as a whole."""

from __future__ import annotations

import html
import io

import pandas as pd
import pyarrow.parquet as pq

from pixfleet.engine import columns as C
from pixfleet.generation.gallery import html_page, image_tags, scores_text
from pixfleet.storage import Location

SIDE_BY_SIDE = "comparison.html"
MAX_ROWS = 500  # a held-out set's first rows: the manifests and comparison.md hold all of them
EAGER_ROWS = 12


def write_side_by_side(root: Location, outputs: dict[str, str]) -> Location:
    """comparison.html under `root`, over the first MAX_ROWS inputs the first model wrote."""
    manifests = {model: _first_images(output) for model, output in outputs.items()}
    first = next(iter(manifests.values())).head(MAX_ROWS)
    rows = []
    for position, (source_ref, row) in enumerate(first.iterrows()):
        eager = position < EAGER_ROWS
        cells = [
            image_tags(row[C.INPUT_FILES], root, eager),
            image_tags(row[C.CONTROL_MAPS], root, eager),
            html.escape(str(row[C.PROMPT])),
        ]
        for frame in manifests.values():
            found = frame.loc[source_ref] if source_ref in frame.index else None
            cells.append(_output(found, root, eager))
        rows.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
    heading = f"{html.escape(root.name)}: {len(first)} inputs through {', '.join(map(html.escape, manifests))}"
    page = root / SIDE_BY_SIDE
    page.write_text(html_page(heading, "", ["input", "control map", "prompt", *manifests], rows))
    return page


def _first_images(output_dir: str) -> pd.DataFrame:
    """A model's manifest records of each input's first image, indexed by source_ref."""
    manifest = Location.of(output_dir) / "manifest.parquet"
    shown = (C.SOURCE_REF, C.IMAGE_INDEX, C.STATUS, C.ERROR, C.OUTPUT_PATH, C.INPUT_FILES, C.CONTROL_MAPS, C.PROMPT)
    columns = [*shown, *C.SCORE_COLUMNS]  # what the page shows, not the whole record
    table = pq.read_table(io.BytesIO(manifest.read_bytes()), columns=columns).to_pandas()
    return table[table[C.IMAGE_INDEX] == 0].set_index(C.SOURCE_REF).sort_index()


def _output(row: pd.Series | None, root: Location, eager: bool) -> str:
    if row is None:
        return "-"
    if row[C.STATUS] != C.OK:
        return f"failed: {html.escape(str(row[C.ERROR]))}"
    return f'{image_tags([row[C.OUTPUT_PATH]], root, eager)}<br><span class="params">{scores_text(row)}</span>'
