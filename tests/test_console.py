"""The job commands' console: pixfleet's lines reach it, the libraries' chatter goes to the log."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from pixfleet.console import ConsoleFilter, is_chatter

pytestmark = pytest.mark.timeout(60)

# Lines seen on this project's consoles (Ray 2.60, Ray Train, Ray Data, MLflow, DeepSpeed).
CHATTER = [
    "[2026-12-05 05:16:02,283 E 6706 6706] core_worker.cc:2465: Actor with class name: "
    "'MapWorker(MapBatches(PreprocessStage))' and ID: '54679608' has constructor arguments in the object store "
    "and max_restarts > 0. If the arguments in the object store go out of scope or are lost, the actor restart "
    "will fail. See https://github.com/ray-project/ray/issues/53727 for more details.",
    "2026-12-05 05:16:14,314\tINFO streaming_executor.py:371 -- ✔️  Dataset dataset_0359Ew execution finished",
    "2026/12/05 05:15:22 INFO mlflow.store.db.utils: Creating initial MLflow database tables...",
    "\x1b[36m(TrainController pid=8943)\x1b[0m Requesting resources: {'CPU': 1.5} * 1",
    "\x1b[36m(TrainController pid=8943)\x1b[0m - (ip=192.0.2.2, pid=9060) world_rank=0, local_rank=0, node_rank=0",
    "(RayTrainWorker pid=9060) ✔️  Dataset dataset_0359F15g execution finished in 7.46 seconds",
    "(RayTrainWorker pid=9060) DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully",
    "[2026-12-05 05:09:24,072] [WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator to CPU.",
    "\x1b[36m(ServeController pid=3092)\x1b[0m INFO 2026-12-05 05:11:05,321 controller 3092 -- Adding 1 replica",
    'INFO 2026-12-05 05:11:05,150 serve 2719 -- Started Serve in namespace "serve".',
    "\x1b[36m(ServeReplica:cli:ingress pid=13827)\x1b[0m INFO 2026-12-06 19:22:41,118 cli_ingress rcimcm4i "
    "6e149d33 -- Started <ray.serve._private.router.SharedRouterLongPollClient object at 0x7f2a>.",
    "\x1b[36m(ServeReplica:cli:ingress pid=13827)\x1b[0m INFO 2026-12-06 19:22:45,922 cli_ingress rcimcm4i "
    "b3300bf5 -- POST /v1/generate 200 375.2ms",
    "\x1b[36m(ServeReplica:cli:model-tiny pid=13826)\x1b[0m INFO 2026-12-06 19:22:45,919 cli_model-tiny 1mxer074 "
    "b3300bf5 -- CALL generate OK 329.0ms",
    "\x1b[36m(ServeController pid=12823)\x1b[0m WARNING 2026-12-05 05:21:39,026 controller 12823 -- Cannot deregister "
    "autoscaling state for deployment Deployment(name='ingress', app='cli') because it is not registered",
    "\x1b[33m(raylet)\x1b[0m Task ServeController.graceful_shutdown failed. There are infinite retries remaining, so "
    "the task will be retried. Error: The actor is dead",
    "*** SIGTERM received at time=1796447472 on cpu 0 ***",
    "PC: @     0x7f29102ed545  (unknown)  clock_nanosleep",
    "    @ ... and at least 4 more frames",
    "[2026-12-05 05:11:12,857 E 2719 2719] logging.cc:474:     @     0x7f291025a050  541006472  (unknown)",
    "[2026-12-05 05:11:12,857 E 2719 2719] logging.cc:474: *** SIGTERM received at time=1796447472 on cpu 0 ***",
]
KEPT = [
    "rows 16/32  ok 16  failed 0  skipped 0  |  1.16 images/s  |  ETA 13s",
    "\x1b[36m(RayTrainWorker pid=9060)\x1b[0m step 1/2 | loss 1.1235 | lr 1.00e-03 | 12.0 samples/s | ETA -",
    "error: source.path: /data/x: no images",
    "(MapWorker(MapBatches(GenerateStage)) pid=5) WARNING a row's prompt was cut at 77 tokens",
    "Traceback (most recent call last):",
    "\x1b[36m(ServeReplica:cli:model-tiny pid=13826)\x1b[0m WARNING 2026-12-06 19:22:45,217 cli_model-tiny 1mxer074 "
    "-- model tiny: replica ready in 4.4 s (engine process and model loaded)",
]


@pytest.mark.parametrize("line", CHATTER)
def test_library_progress_is_chatter(line):
    assert is_chatter(line.encode())


@pytest.mark.parametrize("line", KEPT)
def test_pixfleet_lines_warnings_and_errors_are_not(line):
    assert not is_chatter(line.encode())


# A job whose generate actor could not load its model (Ray 2.60): the actor's traceback, the
# raylet's copy of it, Ray Data's own, then pixfleet's lines; trimmed to a few frames each.
ACTOR = "\x1b[36m(MapWorker(MapBatches(GenerateStage)) pid=3259)\x1b[0m "
FAILED_START = [
    ACTOR + "Exception raised in creation task: The actor died because of an error raised in its creation task",
    ACTOR + '  File "/venv/site-packages/diffusers/models/model_loading_utils.py", line 287, in load',
    ACTOR + "    raise ValueError(",
    ACTOR + "ValueError: Cannot load  because conv_in.bias expected shape torch.Size([64])",
    ACTOR + "",
    ACTOR + "pixfleet.models.folders.ModelLoadError: ./broken: cannot be loaded as the base model",
    "\x1b[33m(raylet)\x1b[0m Task MapWorker(MapBatches(GenerateStage)).get_location failed. There are infinite "
    "retries remaining, so the task will be retried. Error: Traceback (most recent call last):",
    '  File "python/ray/_raylet.pyx", line 2198, in ray._raylet.execute_task',
    "           ^^^^^^^^^^^^^^^^^^^",
    "",
    "The above exception was the direct cause of the following exception:",
    "\x1b[36mray::MapWorker(MapBatches(GenerateStage)).__init__()\x1b[39m (pid=3259, ip=127.0.0.1)",
    "pixfleet.models.folders.ModelLoadError: ./broken: cannot be loaded as the base model",
    "2026-12-06 07:51:27,352\tERROR actor_pool_map_operator.py:414 -- MapBatches(GenerateStage): actors died "
    "during initialization 1 consecutive time(s)",
    "2026-12-06 07:51:27,368\tERROR exceptions.py:88 -- Exception occurred in Ray Data or Ray Core internal code.",
    "2026-12-06 07:51:27,368\tERROR exceptions.py:111 -- Full stack trace:",
    "Traceback (most recent call last):",
    '  File "/venv/site-packages/ray/_private/worker.py", line 1055, in get_objects',
    "ray.exceptions.ActorDiedError: The actor died because of an error raised in its creation task",
    "rows 0/8  ok 0  failed 0  skipped 0  |  0.00 images/s  |  ETA -",
    "error: ./broken: cannot be loaded as the base model of task 'controlnet': ValueError: Cannot load",
    "Traceback (most recent call last):",
]


def test_tracebacks_ray_prints_before_the_driver_reports_the_failure_stay_in_the_log():
    shown = ConsoleFilter().shown
    assert [line for line in FAILED_START if shown(f"{line}\n".encode())] == [
        FAILED_START[13],  # Ray Data's one line on it
        "rows 0/8  ok 0  failed 0  skipped 0  |  0.00 images/s  |  ETA -",
        "error: ./broken: cannot be loaded as the base model of task 'controlnet': ValueError: Cannot load",
        "Traceback (most recent call last):",  # outside Ray's copies: the driver's own
    ]


PROGRAM = textwrap.dedent(
    """
    import os, subprocess, sys
    from pixfleet.console import route_console
    print("log:", route_console("probe"), file=sys.stderr)
    print("pixfleet's line")
    os.write(2, {chatter!r}.encode() + b"\\n")  # as Ray's C++ core worker writes it
    subprocess.run([sys.executable, "-c", "print('a child process line')"], check=True)
    sys.stderr.write("the last line, without its newline")
    """
)


def _run(tmp_path, **env):
    program = PROGRAM.format(chatter=CHATTER[0])
    env = {key: value for key, value in os.environ.items() if key != "PIXFLEET_VERBOSE"} | {
        "PIXFLEET_LOG_DIR": str(tmp_path),
        **env,
    }
    return subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=env, timeout=30)


def test_a_routed_process_shows_its_own_lines_and_logs_everything(tmp_path):
    result = _run(tmp_path)

    assert result.returncode == 0, result.stderr
    assert result.stdout == "pixfleet's line\na child process line\n"
    assert "core_worker" not in result.stderr
    assert result.stderr.endswith("the last line, without its newline")  # drained at exit
    (log,) = tmp_path.glob("probe-*.log")
    assert f"log: {log}" in result.stderr
    logged = log.read_text()
    for line in ("pixfleet's line", "a child process line", CHATTER[0], "the last line, without its newline"):
        assert line in logged


def test_verbose_routes_nothing(tmp_path):
    result = _run(tmp_path, PIXFLEET_VERBOSE="1")

    assert result.returncode == 0, result.stderr
    assert "log: None" in result.stderr and CHATTER[0] in result.stderr
    assert not list(tmp_path.glob("*.log"))


def test_library_notices_that_ask_nothing_are_dropped_and_their_neighbours_kept(monkeypatch):
    """diffusers' float32 warning naming no module, torch's "No CUDA runtime" on a CPU run and
    torch.distributed's deprecation of the all-gather DeepSpeed calls; not the warnings beside them."""
    import logging.handlers
    import warnings

    from pixfleet.console import quiet_libraries

    monkeypatch.delenv("PIXFLEET_VERBOSE", raising=False)
    quiet_libraries()
    handler = logging.handlers.BufferingHandler(capacity=10)
    loggers = [logging.getLogger(name) for name in ("diffusers.models.modeling_utils", "torch.utils.cpp_extension")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        for modules in ("[]", "['norm']"):
            loggers[0].warning(f"There are modules in AutoencoderKL that should be kept in float32: {modules}. Cast")
        loggers[1].warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local")
        loggers[1].warning("Error checking compiler version for c++")
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    assert [record.getMessage() for record in handler.buffer] == [
        "There are modules in AutoencoderKL that should be kept in float32: ['norm']. Cast",
        "Error checking compiler version for c++",
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        quiet_libraries()  # its filter goes in front
        for message, category in (
            ("`torch.distributed.all_gather_into_tensor` is deprecated. Please use ...", FutureWarning),
            ("`torch.distributed.reduce_scatter_tensor` is deprecated. Please use ...", FutureWarning),
            ("`torch.distributed.all_reduce_coalesced` will be deprecated.", FutureWarning),
            ("`torch.distributed.all_gather_into_tensor` is deprecated.", DeprecationWarning),
        ):
            warnings.warn(message, category, stacklevel=1)
    assert [str(w.message) for w in caught] == [
        "`torch.distributed.all_reduce_coalesced` will be deprecated.",
        "`torch.distributed.all_gather_into_tensor` is deprecated.",
    ]
