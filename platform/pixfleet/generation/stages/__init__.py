"""One module per stage. Each stage declares the columns it needs and adds (see
`engine.columns`) and how Ray runs it: its `plan` classmethod returns a `PlannedStage` with
its Ray Data options (resources, batch size, actor pool), so `plan.py` only chains them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pixfleet.config import GenerationJobConfig
from pixfleet.engine import columns as C

# Light stages ask for a fraction of a CPU: beside actors holding whole CPUs, whole-CPU tasks
# could wait forever for one (Ray Data's silent deadlock). Different amounts keep stages from
# being fused into one task where that would serialise them.
LIGHT_CPU = 0.1


@dataclass(frozen=True)
class PlannedStage:
    """A stage as the plan runs it: `fn` is a callable (run as tasks) or a class (constructed
    in an actor pool with the options' constructor args), `options` go to `map_batches`."""

    fn: Callable[..., Any] | type
    needs: tuple[str, ...]
    adds: tuple[str, ...]
    options: dict[str, Any] = field(default_factory=dict)


def caption_columns(job: GenerationJobConfig) -> dict[str, str]:
    """The canonical caption columns an evaluation of edits reads, each with the source's column
    (read with the rows, passed on by every stage before the evaluate stage)."""
    evaluate = job.evaluate
    if not evaluate or not evaluate.input_caption_column:
        return {}
    return {C.INPUT_CAPTION: evaluate.input_caption_column, C.EDITED_CAPTION: evaluate.edited_caption_column}
