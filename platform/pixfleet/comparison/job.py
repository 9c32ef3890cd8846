"""`pixfleet eval CONFIG [--promote ALIAS]`: the held-out set through every model with the same
seeds and parameters (a generation job each, with its `evaluate` scores, a child MLflow run of
one parent), the comparison of their scores (`report.py`), and with `--promote`, the alias
moved to the challenger's registered version when the numbers say so. The decision, its
reason, the figures and the run id go into the challenger version's tags either way."""

from __future__ import annotations

from dataclasses import dataclass

import ray

from pixfleet.cluster import ensure_ray, run_beside
from pixfleet.comparison.fid import model_fids
from pixfleet.comparison.gallery import SIDE_BY_SIDE, write_side_by_side
from pixfleet.comparison.report import Report, build_report
from pixfleet.config import ConfigError, ModelSpec
from pixfleet.config.evaluation import EvalJobConfig, EvalModelConfig
from pixfleet.config.paths import is_mlflow_uri
from pixfleet.evaluation.statistics import Figure
from pixfleet.generation.job import run_generation
from pixfleet.generation.sources import open_image_source
from pixfleet.models.registry import pin_version
from pixfleet.storage import Location, check_writable
from pixfleet.tracking import mlflow_run, tracking_uri

REPORT_MD, REPORT_JSON = "comparison.md", "comparison.json"
TAG_PREFIX = "pixfleet.eval."


@dataclass
class EvalSummary:
    report: Report
    output_dir: str
    mlflow_run_id: str | None = None
    promoted: str | None = None  # "NAME/VERSION is now ALIAS"

    def render(self) -> str:
        lines = [self.report.as_markdown().rstrip(), "", f"comparison         {self.output_dir}/{REPORT_MD}"]
        lines.append(f"side by side       {self.output_dir}/{SIDE_BY_SIDE}")
        lines.append(f"mlflow run         {self.mlflow_run_id or '-'}")
        if self.promoted:
            lines.append(f"promoted           {self.promoted}")
        return "\n".join(lines)


def run_eval(job: EvalJobConfig, address: str | None = None, ray_progress: bool = False, promote: str | None = None):
    """Measure every model of `job`; with `promote`, move that alias to the challenger's version
    when the promotion rule passes."""
    if promote and not job.promotion:
        raise ConfigError("--promote needs a promotion section (primary metric, rule, guards) in the config")
    registry = tracking_uri(job.tracking)
    # Aliases resolved once: the models measured are the versions promoted, whatever moves meanwhile.
    models = [entry.model_copy(update={"model": _pinned(entry.model, registry)}) for entry in job.models]
    challenger = _registered_version(_entry(models, job.promotion.challenger), promote) if promote else None
    root = check_writable(job.sink.output_dir, "sink.output_dir")
    ensure_ray(address)
    params = job.model_dump(mode="json")
    with mlflow_run(job.tracking, job.name, params) as mlflow:
        outputs = {}
        for entry in models:
            generation = job.generation_job(entry, (root / entry.name).uri)
            outputs[entry.name] = run_generation(generation, address=address, ray_progress=ray_progress).output_dir
        baseline = job.promotion.champion if job.promotion else models[0].name
        fids = _fids(job, outputs) if job.fid else None
        report = ray.get(run_beside(build_report, outputs, baseline, job.bootstrap_samples, job.promotion, fids))
        summary = EvalSummary(report, root.uri, mlflow.active_run().info.run_id if mlflow else None)
        (root / REPORT_MD).write_text(report.as_markdown())
        (root / REPORT_JSON).write_text(report.as_json())
        ray.get(run_beside(write_side_by_side, root, outputs))
        if mlflow:
            _log(mlflow, report, root)
        if challenger:
            measured = job.promotion.challenger
            summary.promoted = apply_decision(
                report, measured, challenger, promote, registry, summary.mlflow_run_id, mlflow
            )
    return summary


def _fids(job: EvalJobConfig, outputs: dict[str, str]) -> dict[str, Figure]:
    """Every model's FID against the set's own images, in a task with the evaluation's resources."""
    source = job.source.model_copy(update={"source_image_column": job.fid.image_column})
    images = open_image_source(source, job.resources.rows_per_block).dataset
    task = ray.remote(num_cpus=job.evaluate.num_cpus_per_actor, num_gpus=job.evaluate.num_gpus_per_actor)(model_fids)
    return ray.get(task.remote(job.fid.inception, images, outputs, job.fid.bootstrap_samples))


def _pinned(spec: ModelSpec, registry: str) -> ModelSpec:
    return spec.model_copy(
        update={
            "base_model": pin_version(spec.base_model, registry),
            "controlnets": [pin_version(c, registry) for c in spec.controlnets],
        }
    )


def _entry(models: list[EvalModelConfig], name: str) -> EvalModelConfig:
    return next(entry for entry in models if entry.name == name)


def _registered_version(entry: EvalModelConfig, alias: str) -> tuple[str, str]:
    """(NAME, VERSION) of the one registry model in the challenger's spec: what `alias` moves to."""
    uris = [u for u in (entry.model.base_model, *entry.model.controlnets) if u and is_mlflow_uri(u)]
    registered = [u for u in uris if u.startswith("models:/")]
    if len(registered) != 1:
        raise ConfigError(
            f"--promote {alias}: the challenger ({entry.name}) must load exactly one registered model "
            f"(models:/NAME@ALIAS), it loads {registered or 'none'}"
        )
    name, _, version = registered[0].removeprefix("models:/").partition("/")
    return name, version


def _log(mlflow, report: Report, root: Location) -> None:
    mlflow.log_metrics(
        {
            f"{model}.{score}.{stat}": value
            for model, by_score in report.figures.items()
            for score, figure in by_score.items()
            for stat, value in figure.as_dict().items()
        }
    )
    mlflow.log_text(report.as_markdown(), REPORT_MD)
    mlflow.log_text(report.as_json(), REPORT_JSON)
    if (root / SIDE_BY_SIDE).is_local:
        mlflow.log_artifact((root / SIDE_BY_SIDE).path)
    mlflow.set_tag("comparison", (root / REPORT_MD).uri)


def apply_decision(
    report: Report,
    measured: str,
    version: tuple[str, str],
    alias: str,
    registry: str,
    run_id: str | None,
    mlflow,
) -> str | None:
    """Tag the challenger's version with the decision and its figures (as `measured`); move `alias` to it when
    the decision is to promote. Returns what moved, or None."""
    import mlflow as mlflow_module

    name, number = version
    decision = report.decision
    client = mlflow_module.MlflowClient(registry)
    tags = {
        "decision": "promoted" if decision.promote else "refused",
        "reason": decision.reason,
        "alias": alias,
        "run_id": run_id or "",
    }
    for score, figure in report.figures.get(measured, {}).items():
        tags[score] = str(figure)
    for key, value in tags.items():
        client.set_model_version_tag(name, number, TAG_PREFIX + key, value)
    if mlflow:
        mlflow.set_tags({f"{TAG_PREFIX}{k}": v for k, v in tags.items() if k in ("decision", "reason", "alias")})
    if not decision.promote:
        return None
    client.set_registered_model_alias(name, alias, number)
    return f"{name}/{number} is now {alias}"
