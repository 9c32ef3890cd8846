"""One live progress line for a generation job, and the same numbers as MLflow metrics.

    rows 1200/3000  ok 1180  failed 12  skipped 8  |  4.21 images/s  |  ETA 7m 08s

A source whose format does not say how many rows it has (CSV, folders, shards) shows
`rows 1200/?` and no ETA. On a terminal the line is rewritten in place; in a log (not a TTY)
a line is printed every `log_interval_s`. MLflow gets the counts every `metrics_interval_s`,
so a run can be watched in the MLflow UI while it goes.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO

from pixfleet.console import is_terminal
from pixfleet.tracking import format_duration


@dataclass
class Counts:
    """Rows of a job by status so far, and the images written."""

    rows_in: int | None  # None while the source's total is unknown
    rows_ok: int = 0
    rows_failed: int = 0
    rows_skipped: int = 0
    rows_filtered: int = 0  # kept out by a filter (annotate jobs)
    images_ok: int = 0

    @property
    def rows_done(self) -> int:
        return self.rows_ok + self.rows_failed + self.rows_skipped + self.rows_filtered


class ProgressLine:
    """Prints `Counts` as one line; `update` often, `close` once at the end."""

    def __init__(
        self,
        stream: TextIO | None = None,
        mlflow: Any = None,
        log_interval_s: float = 10.0,
        metrics_interval_s: float = 10.0,
    ):
        self.stream = stream or sys.stderr
        self.mlflow = mlflow
        self.live = is_terminal(self.stream)
        self.log_interval_s = log_interval_s
        self.metrics_interval_s = metrics_interval_s
        self.start = time.perf_counter()
        self.last_line = self.last_metrics = float("-inf")

    def render(self, counts: Counts, elapsed: float) -> str:
        rate = counts.images_ok / elapsed if elapsed > 0 else 0.0
        # Skipped rows cost nothing: the ETA counts only rows this run computes.
        computed = counts.rows_ok + counts.rows_failed + counts.rows_filtered
        total = "?" if counts.rows_in is None else str(counts.rows_in)
        remaining = None if counts.rows_in is None else counts.rows_in - counts.rows_done
        eta = format_duration(remaining * elapsed / computed) if computed and remaining else "-"
        filtered = f"filtered {counts.rows_filtered}  " if counts.rows_filtered else ""
        return (
            f"rows {counts.rows_done:>{len(total)}}/{total}  ok {counts.rows_ok}  {filtered}"
            f"failed {counts.rows_failed}  skipped {counts.rows_skipped}  |  {rate:.2f} images/s  |  ETA {eta}"
        )

    def update(self, counts: Counts) -> None:
        now = time.perf_counter()
        if self.live or now - self.last_line >= self.log_interval_s:
            self._print(counts, now, end="\r" if self.live else "\n")
            self.last_line = now
        if self.mlflow and now - self.last_metrics >= self.metrics_interval_s:
            self._log_metrics(counts)
            self.last_metrics = now

    def close(self, counts: Counts) -> None:
        self._print(counts, time.perf_counter(), end="\n")
        if self.mlflow:
            self._log_metrics(counts)

    def _print(self, counts: Counts, now: float, end: str) -> None:
        line = self.render(counts, now - self.start)
        self.stream.write(("\r\033[K" if self.live else "") + line + end)
        self.stream.flush()

    def _log_metrics(self, counts: Counts) -> None:
        elapsed = time.perf_counter() - self.start
        self.mlflow.log_metrics(
            {
                "progress/rows_done": counts.rows_done,
                "progress/rows_failed": counts.rows_failed,
                "progress/images_ok": counts.images_ok,
                "progress/images_per_second": counts.images_ok / elapsed if elapsed > 0 else 0.0,
            },
            step=counts.rows_done,
        )
