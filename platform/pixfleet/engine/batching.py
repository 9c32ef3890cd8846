"""Which rows can share one pipeline call: without torch, so that a serving replica groups its
requests without importing what only its engine process needs."""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

from pixfleet.engine import columns as C

# Parameters that may differ between rows of one pipeline call.
_PER_ROW = {"prompt", "negative_prompt", "seed"}


def batch_key(row: dict[str, Any]) -> str:
    """Rows with equal keys can share one pipeline call."""
    params = json.loads(row[C.PARAMS])
    shared = {k: v for k, v in params.items() if k not in _PER_ROW}
    shared["has_negative_prompt"] = params["negative_prompt"] is not None
    shared["size"] = image_size(row)
    return json.dumps(shared, sort_keys=True)


def group_rows(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """`rows` split into groups that can each share one pipeline call, in first-seen order."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[batch_key(row)].append(row)
    return list(groups.values())


def image_size(row: dict[str, Any]) -> tuple[int, int]:
    """(width, height) of the row's prepared images."""
    image = row.get(C.SOURCE_IMAGE, row.get(C.control_column(0)))
    return int(image.shape[1]), int(image.shape[0])
