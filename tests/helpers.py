"""Helpers shared by tests: tiny model specs and direct pipeline calls."""

from __future__ import annotations

import atexit
import functools
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from pixfleet.config import ModelSpec
from pixfleet.models.tasks import TASKS

PROJECT = Path(__file__).resolve().parents[1]  # the repository: jobs/, pipelines_cfg/
MULTI_CONTROLNET_TASKS = {"sdxl_controlnet"}


def tiny_spec(tiny_dir: Path, task: str, **overrides) -> ModelSpec:
    """A ModelSpec of the tiny `task` pipeline saved under `tiny_dir`."""
    names = ["controlnet", "controlnet_1"] if task in MULTI_CONTROLNET_TASKS else ["controlnet"]
    controlnets = [str(tiny_dir / task / n) for n in names] if TASKS[task].uses_controlnet else []
    return ModelSpec(task=task, base_model=str(tiny_dir / task), controlnets=controlnets, **overrides)


@functools.cache
def _empty_mlflow_store() -> Path:
    import mlflow

    folder = tempfile.mkdtemp(prefix="pixfleet-tests-mlflow-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    path = Path(folder) / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{path}").search_experiments()  # creates and migrates it
    return path


def tracking_uri(folder: Path) -> str:
    """A sqlite MLflow store in `folder`, as a user's existing store is: a copy of an empty one
    made once per test process (a new store's schema migrations take 1.5 s). The tests that
    create a store from nothing name their own path."""
    db = folder / "mlflow.db"
    if not db.exists():
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_empty_mlflow_store(), db)
    return f"sqlite:///{db}"


def random_image(seed: int, size: tuple[int, int] = (64, 64)) -> Image.Image:
    """A seeded noise RGB image of (width, height)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def direct_call(
    pipe, task: str, prompts, seeds, controls=(), sources=(), masks=(), size=(64, 64), controls_2=None, **params
):
    """Call `pipe` as a user would, one generator per prompt; returns uint8 images.

    Built independently of pixfleet's own argument plumbing, as the reference. `size=None`
    passes no width/height where the pipeline derives them from its images; SDXL
    InstructPix2Pix does not (it gets the images' size rounded down to the VAE's multiple),
    and the inpaint pipeline wants multiples of 8 whatever its VAE (it gets them).
    A multi-ControlNet pipeline gets `controls` for both ControlNets unless `controls_2`.
    """
    import inspect

    import torch

    info = TASKS[task]
    kwargs = {"prompt": list(prompts), "num_inference_steps": 2, "output_type": "np", **params}
    kwargs["generator"] = [torch.Generator().manual_seed(s) for s in seeds]
    if size is None and task in ("sdxl_pix2pix", "controlnet_inpaint"):
        multiple = 8 if task == "controlnet_inpaint" else pipe.vae_scale_factor
        width, height = sources[0].size
        size = (width - width % multiple, height - height % multiple)
    if size is not None and "height" in inspect.signature(pipe.__call__).parameters:
        kwargs.update(width=size[0], height=size[1])
    if task in MULTI_CONTROLNET_TASKS:
        per_controlnet = [list(controls), list(controls_2 or controls)]
        if len(prompts) == 1:  # one image per ControlNet, as PIL
            control = [images[0] for images in per_controlnet]
        else:  # one batch per ControlNet, as a [0, 1] tensor
            control = [
                torch.stack([torch.from_numpy(np.array(c)).permute(2, 0, 1) for c in images]).float() / 255
                for images in per_controlnet
            ]
    else:
        control = list(controls)
    if info.uses_controlnet and info.needs_source_image:
        kwargs.update(image=list(sources), control_image=control)
    elif info.uses_controlnet:
        kwargs["image"] = control
    else:
        kwargs["image"] = list(sources)
    if info.needs_mask:
        kwargs["mask_image"] = list(masks)
    images = pipe(**kwargs).images
    return (images * 255).round().astype(np.uint8)


def left_half_mask(size=(64, 64)) -> Image.Image:
    mask = np.zeros((size[1], size[0]), np.uint8)
    mask[:, : size[0] // 2] = 255
    return Image.fromarray(mask)


def call_tiny(pipe, task: str, prompts: list[str], seeds: list[int], size=(64, 64), **params):
    """`direct_call` on seeded noise inputs of `size`; the mask keeps the left half."""
    controls = [random_image(s, size) for s in seeds]
    sources = [random_image(s + 1000, size) for s in seeds] if TASKS[task].uses_controlnet else controls
    masks = [left_half_mask(size)] * len(seeds)
    return direct_call(pipe, task, prompts, seeds, controls, sources, masks, size, **params)


def tiny_job(tiny_dir: Path, task: str, source_path: Path | str, output_dir: Path, new_store=False, **sections):
    """A GenerationJobConfig over the tiny `task` pipeline: 32 px, 2 steps, MLflow in output_dir
    (an existing store there, or with `new_store` one the job creates)."""
    from pixfleet.config import GenerationJobConfig

    spec = tiny_spec(tiny_dir, task)
    data = {
        "name": f"test-{task}",
        "model": spec.model_dump(),
        "source": {"path": str(source_path)},
        "preprocess": {"width": 32, "height": 32},
        "params": {"num_inference_steps": 2},
        "sink": {"output_dir": str(output_dir)},
        "resources": {"batch_size": 4},
        "tracking": {
            "tracking_uri": f"sqlite:///{output_dir}/mlflow.db" if new_store else tracking_uri(output_dir),
            "experiment": "tests",
        },
    }
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values} if isinstance(values, dict) else values
    return GenerationJobConfig.model_validate(data)


def png_bytes(image: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_job_yaml(job, path: Path) -> Path:
    """A job config as the YAML a user would pass to the CLI."""
    import yaml

    path.write_text(yaml.safe_dump(job.model_dump(mode="json")))
    return path


def start_cli(command: str, config_path: Path, cwd: Path):
    """`pixfleet COMMAND CONFIG` in a subprocess with its own embedded Ray; its log in cwd/logs."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1", "PIXFLEET_LOG_DIR": str(cwd / "logs")}
    return subprocess.Popen(
        [sys.executable, "-m", "pixfleet.cli", command, str(config_path)],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the embedded Ray goes down with it
    )


def kill_group(process) -> None:
    """SIGKILL a `start_cli` process and everything it started."""
    import contextlib
    import os
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def register_controlnet(folder: Path, name: str, tracking_uri: str, artifacts: Path, alias: str = "champion") -> str:
    """Log `folder` as a run's artifact, register it as a new version of `name`, move `alias` to it."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    if mlflow.get_experiment_by_name("registry") is None:
        mlflow.create_experiment("registry", artifact_location=artifacts.as_uri())
    mlflow.set_experiment("registry")
    client = mlflow.MlflowClient(tracking_uri)
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(folder), artifact_path="controlnet")
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name)
    version = client.create_model_version(name, f"{run.info.artifact_uri}/controlnet", run.info.run_id)
    client.set_registered_model_alias(name, alias, version.version)
    return version.version


def upload(folder: Path, uri: str) -> str:
    """Copy a local folder's files under `uri` (a bucket prefix), as a user's sync would."""
    from pixfleet.storage import Location

    Location.of(uri).upload_folder(folder)
    return uri


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")  # headless pages: the galleries


def rendered_dom(page: Path | str, virtual_time_s: int = 10) -> str:
    """The DOM of a page (a file, or a URL) once it has loaded and its scripts' requests have
    been answered, as headless Chromium renders it (all rows in view). Its timers run on
    virtual time, which stands still while a request is pending: `virtual_time_s` bounds what
    they may wait in all."""
    result = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--allow-file-access-from-files",
            "--window-size=1600,20000",
            f"--virtual-time-budget={virtual_time_s * 1000}",
            "--dump-dom",
            page if isinstance(page, str) else page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout
