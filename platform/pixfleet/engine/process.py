"""A `PipelineRunner` in a child process, so that a call past its deadline can be stopped for real.

Between denoising steps a call stops itself at its deadline (`PipelineRunner.generate`), but
one step of a huge request can run for minutes inside a single UNet or VAE forward, where no
Python code runs to notice. `EngineProcess` waits for each call until its deadline plus a
grace period; past that it kills the child (the OS frees its memory, GPU memory included) and
hands the model to a fresh one before the next call, so the next request is served within
seconds. `unready_reason` says when a call is stuck past its deadline or a restart is under way.

A spare child can be kept with torch and diffusers imported, waiting: a restart then costs a
model load, not a Python start. Children run `python -m pixfleet.engine.process` and speak pickled
tuples over a socket pair:

    parent -> child   (spec, max_controlnets, detectors)           once: load this pipeline and detectors
                      ("generate", rows, controlnet_folder | None, deadline)
                      ("load_controlnet", folder)
                      ("detect", rows)                             the control maps its detectors make
    child -> parent   ("ready", EngineInfo) once loaded, then ("ok", result) or ("error", kind, message)
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from pixfleet.config import ControlPreprocessConfig, ModelSpec
from pixfleet.engine import columns as C
from pixfleet.errors import one_line

logger = logging.getLogger(__name__)


class EngineStopped(RuntimeError):
    """The call did not finish: its engine process was killed past the deadline, or died."""


class EngineCallFailed(RuntimeError):
    """The pipeline raised; `kind` is 'timeout' (stopped between steps), 'oom' or 'error'."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class EngineInfo:
    """What the loaded pipeline is, as the child reports it."""

    sampler: str
    device: str
    torch_threads: int
    size_multiple: int


class _Child:
    """A `python -m pixfleet.engine.process` process: it imports torch and diffusers at once,
    then waits for the pipeline it is to load."""

    def __init__(self):
        parent_end, child_end = socket.socketpair()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # the owner's imports
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "pixfleet.engine.process", str(child_end.fileno()), str(os.getpid())],
            pass_fds=[child_end.fileno()],
            env=env,
        )
        child_end.close()
        self.connection = Connection(parent_end.detach())

    def kill(self) -> None:
        self.popen.kill()
        self.popen.wait()
        self.connection.close()


class EngineProcess:
    """One child process holding one loaded pipeline (and a spare, if `spare`); calls run one
    at a time.

    Blocking methods: call them from a worker thread when an event loop must stay free.
    """

    def __init__(
        self,
        spec: ModelSpec,
        max_controlnets: int = 0,
        spare: bool = True,
        detectors: Sequence[ControlPreprocessConfig] = (),
    ):
        self.spec = spec
        self.max_controlnets = max_controlnets
        self.detectors = list(detectors)
        self.keep_spare = spare
        self.child: _Child | None = None
        self.spare: _Child | None = None
        self.info: EngineInfo | None = None
        self.restarts = 0
        self.failure: str | None = None  # set when a restart failed: this engine cannot serve
        self._call_deadline: float | None = None  # of the call under way
        self._restarting = False
        self._lock = threading.Lock()

    def start(self, timeout_s: float = 600) -> EngineInfo:
        """Hand the pipeline to the spare child (or a new one), wait until it is loaded, then
        start the next spare (not before: its imports would slow this load on a busy node)."""
        child, self.spare = self.spare or _Child(), None
        child.connection.send((self.spec, self.max_controlnets, self.detectors))
        if not child.connection.poll(timeout_s):
            child.kill()
            raise EngineStopped(f"the engine process did not load {self.spec.base_model} in {timeout_s:.0f} s")
        try:
            message = child.connection.recv()
        except EOFError:
            child.kill()
            code = child.popen.returncode
            raise EngineStopped(f"the engine process exited with code {code} while loading") from None
        if message[0] != "ready":
            child.kill()
            raise EngineStopped(f"the engine process could not load the model: {message[2]}")
        self.child, self.info = child, message[1]
        if self.keep_spare:
            self.spare = _Child()
        return self.info

    @property
    def alive(self) -> bool:
        return self.child is not None and self.child.popen.poll() is None

    def unready_reason(self) -> str | None:
        """Why the engine cannot take a call now, or None: a failed restart, a restart under
        way, or a call still running past its deadline."""
        deadline = self._call_deadline
        if self.failure:
            return self.failure
        if self._restarting:
            return "restarting its engine process after a call ran past its deadline"
        if deadline is not None and time.time() > deadline:
            return f"a call is running {time.time() - deadline:.1f} s past its deadline"
        return None

    def generate(self, rows: list[dict[str, Any]], deadline: float, grace_s: float, controlnet: str | None = None):
        """The runner's images for `rows` (uint8 NHWC). Past `deadline` the child stops between
        steps (EngineCallFailed 'timeout'); past `deadline + grace_s` it is killed and replaced
        (EngineStopped once the replacement is loaded)."""
        return self._call(("generate", rows, controlnet, deadline), deadline, deadline + grace_s)

    def detect(self, rows: list[dict[str, Any]], deadline: float, grace_s: float) -> list[dict[str, Any]]:
        """The control images of `rows` as their detector makes them here (rows without one
        unchanged): each row's control columns only."""
        return self._call(("detect", rows), deadline, deadline + grace_s)

    def load_controlnet(self, folder: str, timeout_s: float = 600) -> None:
        """Load the ControlNet in `folder` beside the base model (LRU of `max_controlnets`)."""
        self._call(("load_controlnet", folder), None, time.time() + timeout_s)

    def _call(self, message: tuple, deadline: float | None, give_up_at: float) -> Any:
        with self._lock:
            if not self.alive:
                self._replace("the engine process was not running")
            connection = self.child.connection
            self._call_deadline = deadline
            try:
                connection.send(message)
                if not connection.poll(max(0.0, give_up_at - time.time())):
                    self._replace("still running past the deadline")
                    raise EngineStopped("its engine process was stopped, still running past the deadline")
                reply = connection.recv()
            except (EOFError, OSError):
                self._replace("it died during a call")
                raise EngineStopped("the engine process died during the call") from None
            finally:
                self._call_deadline = None
        if reply[0] == "error":
            raise EngineCallFailed(reply[1], reply[2])
        return reply[1]

    def _replace(self, why: str) -> None:
        """Kill the active child and load the model in the spare, before the next call."""
        self._restarting = True
        try:
            self.kill()
            self.restarts += 1
            logger.warning("engine process of %s replaced (%s); restart %d", self.spec.base_model, why, self.restarts)
            self.start()
        except EngineStopped as error:
            self.failure = f"the engine process could not be restarted: {error}"
            raise
        finally:
            self._restarting = False

    def kill(self) -> None:
        """Stop the active child at once; its memory (GPU memory too) goes back to the system."""
        if self.child is not None:
            self.child.kill()
            self.child = None

    def close(self) -> None:
        self.kill()
        if self.spare is not None:
            self.spare.kill()
            self.spare = None


def _serve(connection: Connection) -> None:
    """The child: load the pipeline it is given, then answer calls until the pipe closes."""
    try:
        spec, max_controlnets, detector_configs = connection.recv()
    except EOFError:
        return  # a spare that was never needed
    try:
        import torch

        from pixfleet.engine.detectors import load_detector
        from pixfleet.engine.runner import PipelineRunner

        runner = PipelineRunner.load(spec)
        detectors = {config.detector: load_detector(config, runner.device) for config in detector_configs}
        if spec.optimizations.torch_compile or runner.device.type == "cuda":
            runner.warm_up(*runner.native_size)  # compile and set up the GPU before the first request
        info = EngineInfo(runner.sampler, str(runner.device), torch.get_num_threads(), runner.size_multiple)
    except Exception as error:
        connection.send(("error", "load", one_line(error)))
        return
    connection.send(("ready", info))
    controlnets: OrderedDict[str, Any] = OrderedDict()  # folder -> runner sharing the base model
    while True:
        try:
            message = connection.recv()
        except EOFError:
            return
        try:
            if message[0] == "load_controlnet":
                _load_controlnet(runner, spec, controlnets, message[1], max_controlnets)
                connection.send(("ok", None))
            elif message[0] == "detect":
                detected = _detected(message[1], detectors)
                maps = [{k: v for k, v in row.items() if C.control_index(k) is not None} for row in detected]
                connection.send(("ok", maps))
            else:
                _, rows, controlnet, deadline = message
                if controlnet:  # loaded already, unless this process replaced a killed one
                    _load_controlnet(runner, spec, controlnets, controlnet, max_controlnets)
                chosen = controlnets[controlnet] if controlnet else runner
                connection.send(("ok", chosen.generate(_detected(rows, detectors), deadline=deadline)))
        except Exception as error:
            connection.send(("error", _error_kind(error), one_line(error)))


def _detected(rows: list[dict[str, Any]], detectors: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows whose control images a request's detector turns into maps here, beside the pipeline."""
    out = []
    for row in rows:
        if row.get(C.DETECTOR):
            detect = detectors[row[C.DETECTOR]]
            row = {key: detect([v])[0] if C.control_index(key) is not None else v for key, v in row.items()}
        out.append(row)
    return out


def _load_controlnet(runner, spec: ModelSpec, controlnets: OrderedDict, folder: str, max_controlnets: int) -> None:
    from diffusers import ControlNetModel

    from pixfleet.models.optimizations import fuses_by_default, speed_up

    if folder in controlnets:
        controlnets.move_to_end(folder)
        return
    controlnet = ControlNetModel.from_pretrained(folder, dtype=runner.pipe.unet.dtype).to(runner.device)
    options = spec.optimizations
    on_cuda = runner.device.type == "cuda"
    controlnet = speed_up(controlnet, options, on_cuda, fuses_by_default(options, runner.device, bool(spec.loras)))
    controlnets[folder] = runner.with_controlnet(controlnet)
    while len(controlnets) > max(1, max_controlnets):
        controlnets.popitem(last=False)


def _exit_with_owner(owner_pid: int) -> None:
    """Leave when the owner is gone, even in the middle of a call that would run for minutes."""
    while True:
        time.sleep(1.0)
        try:
            os.kill(owner_pid, 0)
        except ProcessLookupError:
            os._exit(1)


def _error_kind(error: Exception) -> str:
    import torch

    from pixfleet.engine.runner import DeadlineExceeded

    if isinstance(error, DeadlineExceeded):
        return "timeout"
    if isinstance(error, torch.OutOfMemoryError):
        return "oom"  # the request was too big for the memory free now: the replica stays up
    return "error"


def child_main(argv: list[str]) -> None:
    """`python -m pixfleet.engine.process FD OWNER_PID`: import, then wait for a pipeline to load."""
    threading.Thread(target=_exit_with_owner, args=(int(argv[2]),), daemon=True).start()
    connection = Connection(int(argv[1]))
    if not connection.poll(0):  # a spare: import every task's classes while it waits
        from pixfleet.models.loading import import_pipeline_classes

        import_pipeline_classes()  # then it loads its model in a fraction of a second
    _serve(connection)


if __name__ == "__main__":
    # Through the package module, so that what the child pickles (EngineInfo) is importable.
    from pixfleet.engine.process import child_main

    child_main(sys.argv)
