"""Evaluate stage (actor pool, the detectors and CLIP loaded once per actor): images -> scores.

Needs: row_id, status, image, prompt; the control image columns (controllability), the
       source image (CLIP image similarity, for tasks that edit one) and an edit's captions
       (input_caption, edited_caption: CLIP directional similarity), which the stages before
       pass on for this stage only.
Adds:  control_scores and control_metrics (one per ControlNet), clip_score,
       clip_image_similarity, clip_directional_similarity; drops the columns passed on for it.
Runs only when the job has an `evaluate` section. The metrics are `pixfleet.evaluation`'s. A row
the scorers cannot process keeps its image and gets no scores (the reason is logged): an
evaluation never costs a generated image.
"""

from __future__ import annotations

import logging

import pandas as pd
import ray.data

from pixfleet.config import ControlPreprocessConfig, EvaluateConfig, GenerationJobConfig
from pixfleet.engine import columns as C
from pixfleet.engine.preprocess import control_for
from pixfleet.errors import one_line
from pixfleet.generation.stages import PlannedStage, caption_columns
from pixfleet.models.tasks import task_info

logger = logging.getLogger(__name__)
ADDS = C.SCORE_COLUMNS


class EvaluateStage:
    """Callable class for `map_batches(compute=ActorPoolStrategy(...))`."""

    def __init__(
        self,
        controls: dict[str, ControlPreprocessConfig],
        clip_model: str | None,
        source_column: str | None,
        captions: tuple[str, ...] = (),
    ):
        import torch

        from pixfleet.evaluation.controllability import ControllabilityScorer
        from pixfleet.evaluation.metrics import ClipScorer

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.controllability = {column: ControllabilityScorer(control, device) for column, control in controls.items()}
        self.clip = ClipScorer(clip_model, device) if clip_model else None
        self.source_column = source_column if self.clip else None
        self.captions = captions if self.source_column else ()
        self.passed = [*controls, *([self.source_column] if self.source_column else []), *self.captions]
        self.needs = self.columns_needed(self.passed)

    @classmethod
    def plan(cls, job: GenerationJobConfig, image_columns: list[str]) -> PlannedStage:
        evaluate = job.evaluate
        controls, source = cls.inputs(job, image_columns)
        captions = tuple(caption_columns(job)) if source else ()
        options = {
            "fn_constructor_args": (controls, evaluate.clip_model, source, captions),
            "batch_size": job.resources.batch_size,
            "num_cpus": evaluate.num_cpus_per_actor,
            "num_gpus": evaluate.num_gpus_per_actor,
            "compute": ray.data.ActorPoolStrategy(size=evaluate.actors),
        }
        passed = [*controls, *([source] if source else []), *captions]
        return PlannedStage(cls, cls.columns_needed(passed), ADDS, options)

    @staticmethod
    def columns_needed(passed: list[str]) -> tuple[str, ...]:
        return (C.ROW_ID, C.STATUS, C.IMAGE, C.PROMPT, *passed)

    @staticmethod
    def inputs(
        job: GenerationJobConfig, image_columns: list[str]
    ) -> tuple[dict[str, ControlPreprocessConfig], str | None]:
        """The control columns scored (each with the detector that made its map) and the source
        image column the CLIP image similarity takes: the columns the generate stage passes on."""
        evaluate: EvaluateConfig = job.evaluate
        controls = {}
        if evaluate.controllability:
            detectors = evaluate.controls(job.preprocess)
            controls = {c: control_for(detectors, c) for c in image_columns if C.control_index(c) is not None}
        edits = evaluate.clip_model and task_info(job.model.task).needs_source_image
        return controls, (C.SOURCE_IMAGE if edits and C.SOURCE_IMAGE in image_columns else None)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        C.require_columns(batch, self.needs, "evaluate stage")
        scores = {column: [None] * len(batch) for column in ADDS}
        ok = [position for position, status in enumerate(batch[C.STATUS]) if status == C.OK]
        try:
            self._score(batch, ok, scores)
        except Exception:  # find the rows the scorers cannot process; the others keep their scores
            for position in ok:
                try:
                    self._score(batch, [position], scores)
                except Exception as error:  # the image stays; its scores stay empty
                    logger.warning("row %s: no scores: %s", batch[C.ROW_ID].iloc[position], one_line(error))
        return batch.drop(columns=self.passed).assign(**scores)

    def _score(self, batch: pd.DataFrame, positions: list[int], scores: dict[str, list]) -> None:
        if not positions:
            return
        rows = batch.iloc[positions]
        images = list(rows[C.IMAGE])
        if self.controllability:
            per_control = [scorer(images, list(rows[column])) for column, scorer in self.controllability.items()]
            metrics = [scorer.metric for scorer in self.controllability.values()]
            for k, position in enumerate(positions):
                scores[C.CONTROL_SCORES][position] = [values[k] for values in per_control]
                scores[C.CONTROL_METRICS][position] = metrics
        if self.clip:
            clip_scores = self.clip.clip_scores(images, list(rows[C.PROMPT]))
            sources = list(rows[self.source_column]) if self.source_column else None
            similarity = self.clip.image_similarity(sources, images) if sources else None
            directional = None
            if self.captions:
                before, after = (list(rows[column]) for column in self.captions)
                directional = self.clip.directional_similarity(sources, images, before, after)
            for k, position in enumerate(positions):
                scores[C.CLIP_SCORE][position] = float(clip_scores[k])
                if similarity is not None:
                    scores[C.CLIP_IMAGE_SIMILARITY][position] = float(similarity[k])
                if directional is not None:
                    scores[C.CLIP_DIRECTIONAL_SIMILARITY][position] = float(directional[k])
