"""A static HTML gallery of a generation job, from its `manifest.parquet`.

One row per input row: its input images, its control maps (with `sink.save_control_maps`),
its outputs, prompt, seed, parameters and scores (with an `evaluate` section); failed rows show
their reason. Pages of `PAGE_ROWS` rows (`gallery.html`, `gallery-2.html`, ...) link to each
other, and images load lazily. With scores, `gallery-worst.html` lists the `PAGE_ROWS` images of
the whole manifest that follow their (first) ControlNet's map least, worst first. A job of
millions of rows gets the first `MAX_ROWS` rows of its manifest and the first `MAX_FAILED`
failures (the manifest has the rest); the manifest is read a batch at a time. Image paths are
relative to the output folder, which can be moved or served as it is (a bucket's static
website, say); the pages live beside the images, locally or in the store.
"""

from __future__ import annotations

import html
import json
import posixpath
import re

import pandas as pd
import pyarrow.parquet as pq

from pixfleet.engine import columns as C
from pixfleet.evaluation.summary import control_badness
from pixfleet.generation.sink import MANIFEST_FILE, Manifest, MergeResult
from pixfleet.storage import Location, is_uri

PAGE_ROWS = 200
MAX_ROWS = 10_000  # ok rows shown: 50 pages
MAX_FAILED = 2_000
EAGER_ROWS = 12  # the first rows of a page load at once, the rest as they scroll into view
WORST_PAGE = "gallery-worst.html"
BADNESS = "badness"  # a gallery-only column: `control_badness` of a record
_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; }
table { border-collapse: collapse; }
td, th { border-bottom: 1px solid #ddd; padding: 6px; vertical-align: top; text-align: left; }
img { max-width: 160px; max-height: 160px; margin: 2px; background: #eee; }
.failed { background: #fff2f2; }
.params { font-family: monospace; font-size: 12px; max-width: 360px; word-break: break-word; }
nav a { margin-right: 1em; }
#broken { color: #b00; }
"""
# Counts the images that loaded and those that did not (a moved output folder, a missing file),
# on the page and in body's data attributes, where a test or a script can read them.
_CHECK_IMAGES = """
window.addEventListener("load", () => {
  const images = [...document.images];
  const loaded = images.filter((i) => i.complete && i.naturalWidth > 0).length;
  const broken = images.filter((i) => i.complete && i.naturalWidth === 0).length;
  document.body.dataset.imagesLoaded = loaded;
  document.body.dataset.imagesBroken = broken;
  if (broken) document.getElementById("broken").textContent = broken + " images did not load";
});
"""


def page_name(number: int) -> str:
    return "gallery.html" if number == 1 else f"gallery-{number}.html"


def write_gallery(output_dir: str | Location) -> Location:
    """Write the gallery pages of `output_dir` from its manifest; the Location of the first page."""
    root = output_dir if isinstance(output_dir, Location) else Location.of(output_dir)
    records, worst, total = _read_manifest(root / MANIFEST_FILE)
    rows = _rows(records)
    pages = max(1, -(-len(rows) // PAGE_ROWS))
    shown = (
        f" (the first {MAX_ROWS} and {MAX_FAILED} failures shown; all in {MANIFEST_FILE})" if total > MAX_ROWS else ""
    )
    for number in range(1, pages + 1):
        chunk = rows[(number - 1) * PAGE_ROWS : number * PAGE_ROWS]
        heading = f"{html.escape(root.name)}: {total} rows{shown}, page {number} of {pages}"
        nav = _nav(number, pages, worst_page=not worst.empty)
        (root / page_name(number)).write_text(_page(root, chunk, heading, nav))
    if not worst.empty:
        first = worst[C.CONTROL_METRICS].iloc[0][0]
        heading = (
            f"{html.escape(root.name)}: the {len(worst)} images that follow their control least ({first}, worst first)"
        )
        (root / WORST_PAGE).write_text(_page(root, _rows(worst, worst_first=True), heading, _nav(0, pages, True)))
    for stale in root.files((".html",), recursive=False):  # from an earlier, longer run
        number = stale.stem.rsplit("-", 1)[-1]
        if (number.isdigit() and int(number) > pages) or (stale.name == WORST_PAGE and worst.empty):
            stale.delete()
    return root / page_name(1)


def _read_manifest(manifest: Location) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """The manifest's first MAX_ROWS ok records and first MAX_FAILED failed ones, its PAGE_ROWS
    worst-scored ok records, and how many rows it has in all, reading it a batch at a time."""
    kept, worst, ok, failed, total = [], pd.DataFrame(), 0, 0, 0
    with manifest.open_input_file() as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=4096):
            frame = batch.to_pandas()
            total += int((frame[C.IMAGE_INDEX] == 0).sum())
            is_ok = frame[C.STATUS] == C.OK
            kept.append(frame[is_ok].head(max(0, MAX_ROWS - ok)))
            kept.append(frame[~is_ok].head(max(0, MAX_FAILED - failed)))
            ok, failed = ok + len(kept[-2]), failed + len(kept[-1])
            if C.CONTROL_SCORES in frame:  # manifests written before evaluation have no scores
                done = frame[is_ok]
                badness = map(control_badness, done[C.CONTROL_SCORES], done[C.CONTROL_METRICS])
                scored = done.assign(**{BADNESS: list(badness)}).dropna(subset=[BADNESS])
                worst = pd.concat([worst, scored]).nlargest(PAGE_ROWS, BADNESS) if len(scored) else worst
    return pd.concat(kept, ignore_index=True), worst, total


def _rows(manifest: pd.DataFrame, worst_first: bool = False) -> list[dict]:
    """One entry per input row, its images gathered, failed rows last; or, `worst_first`, one
    entry per image, the worst-scored first."""
    if worst_first:
        return [{**r, "outputs": [r[C.OUTPUT_PATH]], "seeds": [r[C.SEED]]} for r in manifest.to_dict("records")]
    rows = []
    for _, images in manifest.sort_values([C.ROW_ID, C.IMAGE_INDEX]).groupby(C.ROW_ID, sort=False):
        first = images.iloc[0].to_dict()
        first["outputs"] = [p for p in images[C.OUTPUT_PATH] if p]
        first["seeds"] = list(images[C.SEED])
        rows.append(first)
    return sorted(rows, key=lambda r: (r[C.STATUS] != C.OK, _natural(r[C.SOURCE_REF])))


def _natural(text: str) -> list:
    """`rows.jsonl:9` before `rows.jsonl:10`."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _nav(number: int, pages: int, worst_page: bool) -> str:
    """Links to the first, previous, next and last pages (from page `number`; 0 is the worst page)."""
    links = [
        f'<a href="{page_name(n)}">{label}</a>'
        for n, label in ((1, "first"), (number - 1, "previous"), (number + 1, "next"), (pages, "last"))
        if 1 <= n <= pages and n != number and (number or label == "first")
    ]
    if worst_page and number:
        links.append(f'<a href="{WORST_PAGE}">worst first</a>')
    return "".join(links)


def _page(root: Location, rows: list[dict], heading: str, nav: str) -> str:
    header = ["input", "control map", "output", "prompt", "seed", "parameters", "scores"]
    return html_page(heading, nav, header, [_row(root, row, index < EAGER_ROWS) for index, row in enumerate(rows)])


def html_page(heading: str, nav: str, header: list[str], rows: list[str]) -> str:
    """A gallery page: its heading, links, a table of `rows` under `header`, and the image check."""
    cells = "".join(f"<th>{html.escape(name)}</th>" for name in header)
    body = "\n".join(rows)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>pixfleet gallery: {heading}</title><style>{_STYLE}</style></head>
<body>
<h1>{heading}</h1>
<p id="broken"></p>
<nav>{nav}</nav>
<table>
<tr>{cells}</tr>
{body}
</table>
<nav>{nav}</nav>
<script>{_CHECK_IMAGES}</script>
</body></html>
"""


def link(uri: str, root: Location) -> str:
    """A file's address relative to the gallery's folder: files under it, and any local file
    beside a local gallery; others (another bucket, say) keep their URI."""
    if uri.startswith(root.uri + "/") or (root.is_local and not is_uri(uri)):
        return posixpath.relpath(uri, root.uri)
    return uri


def image_tags(paths, root: Location, eager: bool) -> str:
    loading = "eager" if eager else "lazy"
    return "".join(f'<img src="{html.escape(link(p, root))}" loading="{loading}" alt="">' for p in paths if p)


def _row(root: Location, row: dict, eager: bool) -> str:
    def images(paths) -> str:
        return image_tags(paths, root, eager)

    if row[C.STATUS] == C.FAILED:  # its inputs by name: one may be what is missing
        names = "<br>".join(html.escape(p) for p in row[C.INPUT_FILES] if p) or html.escape(str(row[C.SOURCE_REF]))
        return f'<tr class="failed"><td>{names}</td><td colspan="6">failed: {html.escape(str(row[C.ERROR]))}</td></tr>'
    params = {k: row.get(k) for k in ("num_inference_steps", "guidance_scale", "image_guidance_scale", "strength")}
    params = {k: v for k, v in params.items() if v is not None and v == v}  # NaN for unset columns
    seeds = ", ".join(str(s) for s in row["seeds"])
    return (
        f'<tr class="ok"><td>{images(row[C.INPUT_FILES])}</td><td>{images(row[C.CONTROL_MAPS])}</td>'
        f"<td>{images(row['outputs'])}</td><td>{html.escape(str(row[C.PROMPT]))}</td><td>{seeds}</td>"
        f'<td class="params">{html.escape(json.dumps(params))}<br>{html.escape(str(row[C.SOURCE_REF]))}</td>'
        f'<td class="params">{scores_text(row)}</td></tr>'
    )


def scores_text(row: dict) -> str:
    """The row's scores (its first image's), one per line: `edge_f1 0.8123`, `clip_score 31.2`."""
    scores = row.get(C.CONTROL_SCORES)
    named = list(zip(row.get(C.CONTROL_METRICS), scores, strict=True)) if scores is not None else []
    named += [(name, row.get(name)) for name in (C.CLIP_SCORE, C.CLIP_IMAGE_SIMILARITY, C.CLIP_DIRECTIONAL_SIMILARITY)]
    return "<br>".join(f"{name} {value:.4g}" for name, value in named if value is not None and value == value)


def finish_output(target: Location, gallery: bool) -> MergeResult:
    """The end of a job: its manifest parts merged, then the gallery over the merged manifest.
    A task of its own, in a module that imports neither torch nor diffusers (a worker that
    imported the job's module paid seconds for them before merging)."""
    manifest = Manifest(target)
    result = manifest.merge()
    if gallery and manifest.merged.is_file():  # none when the job failed before its first row
        write_gallery(target)
    return result
