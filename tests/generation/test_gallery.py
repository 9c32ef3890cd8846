"""The gallery a job writes, opened in a real headless browser: inputs, control maps and
outputs load; failed rows show their reason; pages link up."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from pixfleet.engine import columns as C
from pixfleet.generation import gallery
from pixfleet.generation.job import run_generation
from tests.helpers import CHROMIUM, rendered_dom, tiny_job

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("ray_session")]


@pytest.fixture(scope="module")
def job_output(tiny_dir, fill50k_dir, tmp_path_factory):
    """A job with saved control maps and scores over 6 fill50k rows, one of them pointing at a
    missing file."""
    root = tmp_path_factory.mktemp("gallery")
    rows = pd.read_json(fill50k_dir / "metadata.jsonl", lines=True).head(6)
    rows["conditioning_image_file_name"] = [str(fill50k_dir / p) for p in rows["conditioning_image_file_name"]]
    rows.loc[5, "conditioning_image_file_name"] = str(root / "missing.png")
    rows["file_name"] = [str(fill50k_dir / p) for p in rows["file_name"]]
    rows.to_json(root / "rows.jsonl", orient="records", lines=True)
    out = root / "out"
    job = tiny_job(
        tiny_dir,
        "controlnet",
        root / "rows.jsonl",
        out,
        sink={"save_control_maps": True},
        preprocess={"control": [{"detector": "canny"}]},
        evaluate={},  # each image's canny F1 against its map
        max_failed_fraction=0.5,
    )
    run_generation(job)
    return out


def test_the_job_writes_a_gallery_and_the_manifest_records_inputs_and_control_maps(job_output):
    manifest = pd.read_parquet(job_output / "manifest.parquet")
    ok = manifest[manifest[C.STATUS] == C.OK]
    assert len(ok) == 5 and (job_output / "gallery.html").is_file()
    for files, maps in zip(ok[C.INPUT_FILES], ok[C.CONTROL_MAPS], strict=True):
        assert files[0].endswith(".png") and len(maps) == 1
        assert (job_output / "control_maps").joinpath(maps[0].rsplit("/", 1)[1]).is_file()


@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (Debian package `chromium`; .ci/run installs it)")
def test_the_gallery_loads_every_image_in_a_browser(job_output):
    dom = rendered_dom(job_output / "gallery.html")
    loaded = int(re.search(r'data-images-loaded="(\d+)"', dom).group(1))
    broken = int(re.search(r'data-images-broken="(\d+)"', dom).group(1))
    # 5 good rows x (input, control map, output); the failed row shows its reason instead.
    assert (loaded, broken) == (15, 0)
    assert "missing.png: no such file" in dom
    assert "6 rows, page 1 of 1" in dom


def test_pages_link_up_for_long_jobs(job_output, monkeypatch):
    monkeypatch.setattr(gallery, "PAGE_ROWS", 4)
    gallery.write_gallery(job_output)
    first, second = (job_output / "gallery.html").read_text(), (job_output / "gallery-2.html").read_text()
    assert 'href="gallery-2.html">next' in first and 'href="gallery.html">first' in second
    assert first.count("<tr class=") == 4 and second.count("<tr class=") == 2
    assert 'loading="lazy"' not in first  # the first rows of a page load at once


def test_every_row_shows_its_scores_and_a_page_lists_the_worst_followers_first(job_output):
    manifest = pd.read_parquet(job_output / "manifest.parquet")
    ok = manifest[manifest[C.STATUS] == C.OK]
    f1 = {row: scores[0] for row, scores in zip(ok[C.ROW_ID], ok[C.CONTROL_SCORES], strict=True)}
    first = gallery.write_gallery(job_output).read_text()  # one page again (another test wrote two)
    assert first.count("edge_f1 ") == 5 and f'href="{gallery.WORST_PAGE}">worst first' in first

    worst = (job_output / gallery.WORST_PAGE).read_text()
    shown = re.findall(r'src="images/(\w+)\.png"', worst)  # the outputs, relative to the page
    assert shown == sorted(f1, key=f1.get)  # lowest F1 first, every scored image once
    assert "the 5 images that follow their control least (edge_f1, worst first)" in worst
    if CHROMIUM:
        dom = rendered_dom(job_output / gallery.WORST_PAGE)
        assert re.search(r'data-images-loaded="(\d+)"', dom).group(1) == "15"
