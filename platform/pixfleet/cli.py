"""The `pixfleet` command line: generate, annotate, train, serve, submit, jobs, models, data."""

from __future__ import annotations

import os
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from pixfleet.errors import UserError, user_error_within
from pixfleet.models.architectures import ARCHITECTURES
from pixfleet.models.tasks import TASKS

app = typer.Typer(help="Controlled image generation at dataset scale on Ray.", no_args_is_help=True)
models_app = typer.Typer(help="Model utilities.", no_args_is_help=True)
data_app = typer.Typer(help="Data set utilities.", no_args_is_help=True)
jobs_app = typer.Typer(help="Jobs on a Ray cluster (the Ray Jobs API).", no_args_is_help=True)
config_app = typer.Typer(help="The config files: every field, and a check without running.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(data_app, name="data")
app.add_typer(jobs_app, name="jobs")
app.add_typer(config_app, name="config")

ConfigKind = StrEnum("ConfigKind", {kind: kind for kind in ("generate", "train", "serve", "annotate", "eval")})
# The annotators' checkpoints by their families' names (hed serves softedge_hed and scribble_hed).
ANNOTATOR_CHECKPOINTS = {
    "lineart": "lineart",
    "lineart_anime": "lineart_anime",
    "hed": "softedge_hed",
    "pidinet": "softedge_pidinet",
    "mlsd": "mlsd",
    "openpose": "openpose",
    "normal_bae": "normal_bae",
}
AnnotatorKind = StrEnum(
    "AnnotatorKind",
    {kind: kind for kind in ("depth", "segmentation", "caption", "clip", "inception", *ANNOTATOR_CHECKPOINTS)},
)
TaskName = StrEnum("TaskName", {task: task for task in TASKS})
ArchName = StrEnum("ArchName", {arch: arch for arch in ARCHITECTURES})
WeightDtype = StrEnum("WeightDtype", {dtype: dtype for dtype in ("float32", "float16", "bfloat16")})

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config field: a.b=value, list items by index (models.0.num_gpus=1)."),
]
AddressOption = Annotated[
    str | None,
    typer.Option(help="Ray cluster address; unset uses $RAY_ADDRESS or an embedded local Ray."),
]

RayProgressOption = Annotated[
    bool, typer.Option(help="Show Ray Data's per-operator progress bars beside pixfleet's line.")
]


EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM; user errors exit with their own code (2, or 3)


@app.callback()
def main(
    verbose: Annotated[
        bool, typer.Option("--verbose", help="Also show the libraries' loading bars and logs.")
    ] = False,
) -> None:
    """Controlled image generation at dataset scale on Ray."""
    from pixfleet.console import set_verbose

    set_verbose(verbose)


_console_log: list[Path] = []  # a job command's log file, once routed


def _route_console(command: str) -> None:
    """A job command's console: pixfleet's lines, warnings and errors; all of it in a log file.
    Before the job's modules import Ray (see `route_console`)."""
    from pixfleet.console import route_console

    if log := route_console(command):
        _console_log.append(log)


def _fail(message: str, code: int = UserError.exit_code) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    if _console_log:
        typer.echo(f"the full log: {_console_log[-1]}", err=True)
    raise typer.Exit(code)


@config_app.command("show")
def config_show(
    kind: Annotated[ConfigKind, typer.Argument(help="Which config.")],
    field: Annotated[str | None, typer.Argument(help="A field or section, e.g. params or models.N.batching.")] = None,
) -> None:
    """Every field of a config with its type, default and description (N stands for a list index)."""
    from pixfleet.config.describe import show

    try:
        typer.echo(show(kind.value, field))
    except UserError as error:
        _fail(str(error), error.exit_code)


@config_app.command("validate")
def config_validate(
    config: Annotated[Path, typer.Argument(help="A generation, training, serving or annotate YAML.")],
    set_: SetOption = None,
) -> None:
    """Check a config file (and its overrides) without running anything; exit 2 naming each problem."""
    from pixfleet.config import load_config
    from pixfleet.config.describe import KINDS, kind_of
    from pixfleet.config.loading import read_config_data

    try:
        if not config.is_file():
            raise UserError(f"config file not found: {config}")
        kind = kind_of(read_config_data(config.read_text(), str(config)))
        load_config(KINDS[kind], config, set_ or [])
    except UserError as error:
        _fail(str(error), error.exit_code)
    typer.echo(f"{config}: a valid {kind} config")


def _run_bulk_job(
    config_class, run, config: Path, set_: list[str] | None, address, ray_progress: bool, **options
) -> None:
    """Load the config, run the Ray Data job, print its summary; errors and interrupts as exit codes."""
    from pixfleet.config import load_config

    try:
        job = load_config(config_class, config, set_ or [])
        summary = run(job, address=address or os.environ.get("RAY_ADDRESS"), ray_progress=ray_progress, **options)
    except UserError as error:
        _fail(str(error), error.exit_code)
    except Exception as error:  # one an actor raised comes wrapped by Ray
        if (user_error := user_error_within(error)) is None:
            raise
        _fail(str(user_error), user_error.exit_code)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the MLflow run is already marked KILLED
        typer.secho("interrupted; rerun the same command to resume", fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    typer.echo(summary.render())


@models_app.command("make-tiny")
def make_tiny(
    task: Annotated[TaskName, typer.Option(help="Task of the pipeline to build.")],
    out: Annotated[Path, typer.Option(help="Folder to save the pipeline in.")],
    controlnets: Annotated[int, typer.Option(help="Number of ControlNets (2+ = multi).")] = 1,
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
    zero_convs: Annotated[
        bool,
        typer.Option(
            help="Keep ControlNets' zero convs at zero, as a fresh ControlNet has them (the control image "
            "then has no effect); by default they get random weights."
        ),
    ] = False,
) -> None:
    """Build a tiny random pipeline of TASK and save it with save_pretrained."""
    from pixfleet.models.tiny import make_tiny_pipeline

    try:
        make_tiny_pipeline(task.value, out, num_controlnets=controlnets, seed=seed, zero_convs=zero_convs)
    except ValueError as error:
        _fail(str(error))
    typer.echo(f"saved tiny {task.value} pipeline to {out}")


@models_app.command("make-tiny-annotator")
def make_tiny_annotator(
    kind: Annotated[
        AnnotatorKind,
        typer.Option(
            help="depth or segmentation detector, captioner, CLIP (evaluate.clip_model), Inception (fid), "
            "or an annotator's checkpoints."
        ),
    ],
    out: Annotated[Path, typer.Option(help="Folder to save the model and its processor in (inception: the file).")],
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
) -> None:
    """Build a tiny random detector, captioner, annotator or evaluation model to load offline.

    DPT, SegFormer, BLIP and CLIP are saved with save_pretrained, clean-fid's Inception as the
    TorchScript file it calls: what `detector.model`, `caption.model`, `evaluate.clip_model` and
    `fid.inception` load. The annotators' kinds write their checkpoint files (full-size, random
    weights) into OUT as lllyasviel/Annotators lays them out: one folder can hold them all."""
    from pixfleet.models import tiny

    if kind.value in ANNOTATOR_CHECKPOINTS:
        from pixfleet.models.annotators import make_random_annotator

        make_random_annotator(ANNOTATOR_CHECKPOINTS[kind.value], out, seed=seed)
        typer.echo(f"saved random {kind.value} checkpoints to {out}")
        return

    makers = {
        "depth": tiny.make_tiny_depth_estimator,
        "segmentation": tiny.make_tiny_segmenter,
        "caption": tiny.make_tiny_captioner,
        "clip": tiny.make_tiny_clip,
        "inception": tiny.make_tiny_inception,
    }
    makers[kind.value](out, seed=seed)
    typer.echo(f"saved tiny {kind.value} model to {out}")


@models_app.command("make-random")
def make_random(
    arch: Annotated[ArchName, typer.Option(help="Published architecture to build.")],
    out: Annotated[Path, typer.Option(help="Folder to save the pipeline in.")],
    dtype: Annotated[WeightDtype, typer.Option(help="dtype of the saved weights.")] = WeightDtype.float16,
    device: Annotated[
        str, typer.Option(help="Where to create the weights: auto (cuda if present), cpu, cuda:0.")
    ] = "auto",
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
) -> None:
    """Build a full-size published architecture with random weights and save it (no download).

    Saved with save_pretrained: a stand-in for the real checkpoint in speed and memory
    measurements."""
    from pixfleet.models.loading import DTYPES, resolve_device
    from pixfleet.models.random_weights import make_random_pipeline

    make_random_pipeline(arch.value, out, dtype=DTYPES[dtype.value], device=resolve_device(device), seed=seed)
    typer.echo(f"saved random-weight {arch.value} pipeline ({dtype.value}) to {out}")


@data_app.command("fill50k")
def fill50k(
    out: Annotated[Path, typer.Option(help="Folder to write the data set in.")],
    n: Annotated[int, typer.Option(help="Number of rows.")] = 100,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 64,
    seed: Annotated[int, typer.Option(help="Seed; the same seed writes the same set.")] = 0,
) -> None:
    """Write a synthetic fill50k set (circles, outlines, captions)."""
    from pixfleet.data.fill50k import make_fill50k

    try:
        make_fill50k(out, n=n, size=size, seed=seed)
    except ValueError as error:
        _fail(str(error))
    typer.echo(f"wrote {n} fill50k rows to {out}")


@app.command()
def generate(
    config: Annotated[Path, typer.Argument(help="Generation job YAML.")],
    set_: SetOption = None,
    address: AddressOption = None,
    ray_progress: RayProgressOption = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            help="Run the whole plan but the diffusers call: read and decode the sources, fit images, run "
            "detectors, resolve and check parameters, derive ids and seeds; no model is loaded. Writes each "
            "row's status (planned, failed with its reason, skipped) to OUTPUT_DIR/dry-run/manifest.parquet."
        ),
    ] = False,
) -> None:
    """Run a bulk generation job on Ray Data.

    Example: pixfleet generate pipelines_cfg/quickstart.yaml --set resources.batch_size=8

    Every field: `pixfleet config show generate`; check a file: `pixfleet config validate FILE`.
    Exit codes: 0 done; 2 a config, source or model problem (nothing ran); 3 stopped past
    max_failed_fraction (rows written stay, rerun to resume); 130 interrupted.
    """
    _route_console("generate")
    from pixfleet.config import GenerationJobConfig
    from pixfleet.generation.job import run_generation

    _run_bulk_job(GenerationJobConfig, run_generation, config, set_, address, ray_progress, dry_run=dry_run)


@app.command()
def annotate(
    config: Annotated[Path, typer.Argument(help="Annotate job YAML.")],
    set_: SetOption = None,
    address: AddressOption = None,
    ray_progress: RayProgressOption = False,
) -> None:
    """Turn raw photos into a ControlNet training set; resumable.

    Control maps from a detector, captions from the source, a model or a template, filters.

    Example: pixfleet annotate pipelines_cfg/annotate_depth.yaml --set source.limit=100

    Exit codes: 0 done; 2 a config or source problem; 3 stopped past max_failed_fraction;
    130 interrupted (rerun to resume).
    """
    _route_console("annotate")
    from pixfleet.annotation.job import run_annotation
    from pixfleet.config.annotation import AnnotateJobConfig

    _run_bulk_job(AnnotateJobConfig, run_annotation, config, set_, address, ray_progress)


@app.command("eval")
def eval_models(
    config: Annotated[Path, typer.Argument(help="Eval YAML: a held-out set, the models, the metrics.")],
    set_: SetOption = None,
    address: AddressOption = None,
    ray_progress: RayProgressOption = False,
    promote: Annotated[
        str | None,
        typer.Option(
            help="Move this registry alias (e.g. champion) to the challenger's version when the config's "
            "promotion rule passes; the decision is tagged on the version either way."
        ),
    ] = None,
) -> None:
    """Measure models on a held-out set with the same seeds and parameters; promote by the numbers.

    Controllability and CLIP scores with 95% bootstrap intervals, one MLflow run with a child per
    model, a comparison table; with --promote ALIAS, the alias moves to the challenger when the
    config's promotion rule passes.

    Example: pixfleet eval pipelines_cfg/eval_sd15_canny.yaml --promote champion

    Exit codes: 0 done (promoted or not: see the table); 2 a config, source or model problem.
    """
    _route_console("eval")
    from pixfleet.comparison.job import run_eval
    from pixfleet.config.evaluation import EvalJobConfig

    _run_bulk_job(EvalJobConfig, run_eval, config, set_, address, ray_progress, promote=promote)


@app.command()
def gallery(output_dir: Annotated[str, typer.Argument(help="A generation job's sink.output_dir.")]) -> None:
    """Write gallery.html (and pages after it) from a generation job's manifest.parquet.

    Inputs, control maps, outputs, prompts, seeds and failures side by side. Jobs write it when
    they end."""
    from pixfleet.generation.gallery import write_gallery
    from pixfleet.storage import Location

    try:
        root = Location.of(output_dir)
        if not (root / "manifest.parquet").is_file():
            _fail(f"{output_dir}: no manifest.parquet (not a generation job's output folder)")
        typer.echo(f"wrote {write_gallery(root)}")
    except UserError as error:
        _fail(str(error), error.exit_code)


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="Training job YAML.")],
    set_: SetOption = None,
    address: AddressOption = None,
) -> None:
    """Fine-tune a ControlNet on Ray Train (DeepSpeed or DDP).

    Example: pixfleet train pipelines_cfg/train_tiny.yaml --set train.max_train_steps=80

    Every field: `pixfleet config show train`; check a file: `pixfleet config validate FILE`.
    """
    _route_console("train")
    from pixfleet.config import load_config
    from pixfleet.config.training import TrainingJobConfig
    from pixfleet.training.trainer import run_training

    try:
        job = load_config(TrainingJobConfig, config, set_ or [])
        summary = run_training(job, address=address or os.environ.get("RAY_ADDRESS"))
    except UserError as error:
        _fail(str(error), error.exit_code)
    except KeyboardInterrupt:
        typer.secho(
            "interrupted; rerun with --set train.resume_from_checkpoint=latest to resume",
            fg=typer.colors.YELLOW,
            err=True,
        )
        raise typer.Exit(EXIT_INTERRUPTED) from None
    typer.echo(summary.render())


@app.command()
def serve(
    config: Annotated[Path, typer.Argument(help="Serving YAML.")],
    set_: SetOption = None,
    address: AddressOption = None,
    write_serve_config: Annotated[
        Path | None, typer.Option(help="Write a Serve config for `serve deploy` here instead of serving.")
    ] = None,
) -> None:
    """Serve models over HTTP on Ray Serve (blocks on an embedded Ray; returns on a cluster).

    Example: pixfleet serve pipelines_cfg/serve_tiny.yaml --set models.0.num_gpus=1

    Every field: `pixfleet config show serve`; check a file: `pixfleet config validate FILE`.
    """
    _route_console("serve")
    from pixfleet.config import load_config
    from pixfleet.config.serving import ServingConfig
    from pixfleet.serving import app as serving

    try:
        job = load_config(ServingConfig, config, set_ or [])
        if write_serve_config:
            import yaml

            write_serve_config.write_text(yaml.safe_dump(serving.serve_config(job), sort_keys=False))
            typer.echo(f"wrote {write_serve_config}; deploy it with: serve deploy {write_serve_config}")
            return
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            typer.echo(f"deployed; API at {serving.start(job, address)}")
        else:
            serving.serve_forever(job)
    except UserError as error:
        _fail(str(error), error.exit_code)
    except KeyboardInterrupt:
        typer.secho("stopped serving", fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None


class JobKind(StrEnum):
    generate = "generate"
    annotate = "annotate"
    train = "train"
    serve = "serve"
    eval = "eval"


JobsAddressOption = Annotated[
    str | None, typer.Option(help="Jobs API of the cluster, http://HEAD:8265; unset uses $RAY_ADDRESS.")
]


@app.command()
def submit(
    kind: Annotated[JobKind, typer.Argument(help="What to run.")],
    config: Annotated[Path, typer.Argument(help="Job YAML (validated on the cluster, where its paths are).")],
    address: JobsAddressOption = None,
    set_: SetOption = None,
    env: Annotated[list[str] | None, typer.Option(help="KEY=VALUE in the job's environment.")] = None,
    working_dir: Annotated[Path, typer.Option(help="Project folder shipped as working_dir.")] = Path("."),
    entrypoint_num_cpus: Annotated[float, typer.Option(help="CPUs reserved for the job's driver.")] = 0,
    entrypoint_num_gpus: Annotated[float, typer.Option(help="GPUs reserved for the job's driver.")] = 0,
    wait: Annotated[bool, typer.Option(help="Wait for the end; exit 1 if the job did not succeed.")] = False,
    follow: Annotated[bool, typer.Option(help="Print the job's log as it runs, then exit like --wait.")] = False,
    promote: Annotated[str | None, typer.Option(help="An eval job's --promote ALIAS (see `pixfleet eval`).")] = None,
) -> None:
    """Submit a generate, annotate, train, serve or eval job to a Ray cluster through the Jobs API."""
    from pixfleet import cluster

    if promote and kind is not JobKind.eval:
        _fail(f"--promote is an eval job's option, not a {kind.value} job's")
    environment = {}
    for item in env or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            _fail(f"--env {item!r}: expected KEY=VALUE")
        environment[key] = value
    try:
        job_id = cluster.submit_job(
            kind.value,
            config,
            address,
            set_ or [],
            environment,
            working_dir.resolve(),
            entrypoint_num_cpus,
            entrypoint_num_gpus,
            ["--promote", promote] if promote else None,
        )
        typer.echo(f"submitted {kind.value} job {job_id}")
        if not (wait or follow):
            return
        client = cluster.job_client(address)
        if follow:
            cluster.stream_logs(client, job_id)
        status = cluster.wait_for_job(client, job_id)
    except UserError as error:
        _fail(str(error), error.exit_code)
    typer.echo(f"job {job_id} {status}")
    if status != "SUCCEEDED":
        if not follow:
            tail = client.get_job_logs(job_id).strip().splitlines()[-20:]
            typer.echo("\n".join(tail), err=True)
        raise typer.Exit(1)


def _jobs_client(address: str | None):
    from pixfleet.cluster import job_client

    try:
        return job_client(address)
    except UserError as error:
        _fail(str(error), error.exit_code)


@jobs_app.command("list")
def jobs_list(address: JobsAddressOption = None) -> None:
    """The cluster's jobs, newest last."""
    for job in sorted(_jobs_client(address).list_jobs(), key=lambda j: j.start_time or 0):
        kind = (job.metadata or {}).get("pixfleet_kind", "-")
        typer.echo(f"{job.submission_id or job.job_id}  {job.status.value:9}  {kind:8}  {job.entrypoint}")


@jobs_app.command("status")
def jobs_status(job_id: str, address: JobsAddressOption = None) -> None:
    """A job's status and message."""
    info = _jobs_client(address).get_job_info(job_id)
    typer.echo(f"{job_id} {info.status.value}: {info.message or ''}")


@jobs_app.command("logs")
def jobs_logs(
    job_id: str,
    address: JobsAddressOption = None,
    follow: Annotated[bool, typer.Option(help="Keep printing until the job ends.")] = False,
) -> None:
    """A job's log."""
    from pixfleet.cluster import stream_logs

    client = _jobs_client(address)
    if follow:
        stream_logs(client, job_id)
    else:
        typer.echo(client.get_job_logs(job_id), nl=False)


@jobs_app.command("stop")
def jobs_stop(job_id: str, address: JobsAddressOption = None) -> None:
    """Stop a running job."""
    stopped = _jobs_client(address).stop_job(job_id)
    typer.echo(f"{job_id}: {'stop requested' if stopped else 'not running'}")


if __name__ == "__main__":
    app()
