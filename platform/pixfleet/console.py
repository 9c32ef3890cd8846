"""What reaches the user's console: pixfleet's own lines, warnings that ask something of the
user, and errors. The libraries' loading bars stay off unless `pixfleet --verbose`; the
setting travels in the environment, so Ray's workers, started after it, inherit it.

Some of the libraries' chatter cannot be turned off where it starts (Ray's C++ core worker
writes to the process's stderr; Ray forwards its workers' output), so a job command routes its
own stdout and stderr through `route_console`: every line goes to a log file, and the lines
that are only the libraries' progress stay off the console.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, TextIO

VERBOSE_ENV = "PIXFLEET_VERBOSE"
LOG_DIR_ENV = "PIXFLEET_LOG_DIR"
DEFAULT_LOG_DIR = Path.home() / ".local" / "state" / "pixfleet" / "logs"
DRAIN_S = 5.0  # at exit, how long the last lines may take to reach the console

# Matched after the colour codes and Ray's "(Actor pid=N, ip=...)" prefix are removed.
_CHATTER = re.compile(
    "|".join(
        (
            # log records below WARNING: Ray's, Ray Data's, MLflow's, DeepSpeed's formats
            r"^\[?\d{4}[-/]\d\d[-/]\d\d[ T][\d:.,]+\]?\s+\[?(INFO|DEBUG)\b",
            r"^(INFO|DEBUG) \d{4}-\d\d-\d\d ",  # Ray Serve's
            # every Ray Data actor pool logs this, for arguments Ray Data itself puts in the
            # object store (ray-project/ray#57733): it asks nothing of the user
            r"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object store",
            # Ray Train's and Ray Data's progress, forwarded from their actors without a level
            r"^(Requesting resources|Attempting to start training worker group|Started training worker group"
            r"|Setting up process group for|Checkpoint successfully created at|Reporting training result)|^- \(ip=",
            r"Dataset \S+ execution finished in",
            # Ray Serve at every deploy and at its shutdown, about its own bookkeeping
            r"Cannot deregister autoscaling state for deployment .* because it is not registered"
            r"|Task ServeController\.graceful_shutdown failed\. There are infinite retries remaining",
            # the stack Ray's C++ signal handler prints when the user stops a command
            r"^\*\*\* SIG[A-Z]+ received at time=|^PC: @ |^@ |logging\.cc:\d+: (\*\*\* SIG|PC: @ |\s*@ )",
            # DeepSpeed's one-time op builds and its CPU fallback
            r"^DeepSpeed \S+ built successfully|Setting accelerator to CPU",
        )
    )
)
# A failure Ray prints with its whole traceback before the driver gets it as an exception and
# reports it itself (one `error:` line for a user error, the traceback for a bug): an actor's
# failed start, a task Ray retries, Ray Data's own copy of the error it raises. The lines after
# it that continue it stay in the log too.
_FAILURE_TRACEBACK = re.compile(
    r"^Exception raised in creation task: |^(\(raylet\)\s*)?Task \S+ failed\. There are infinite retries remaining"
    r"|\bERROR exceptions\.py:\d+ -- (Full stack trace:$|Exception occurred in Ray Data or Ray Core internal code)"
)
_TRACEBACK_LINE = re.compile(
    r"^(\s|$|Traceback \(most recent call last\):|The above exception was the direct cause"
    r"|During handling of the above exception|ray::|[\w.]*(Error|Exception)\w*(:|$))"
)
_COLOUR = re.compile(rb"\x1b\[[\d;]*m")
# The process Ray names before a forwarded line: an actor class ("MapWorker(MapBatches(X))"), a
# Serve replica ("ServeReplica:app:deployment"), "raylet", each with its pid.
_RAY_PREFIX = re.compile(rb"^\s*\(\S+ pid=\d+(, ip=[\d.]+)?\)\s*")
_LINE_END = re.compile(rb"(?<=[\r\n])")
_routed_terminals: set[int] = set()  # fds 1 and 2, when they were terminals before routing


def set_verbose(verbose: bool) -> None:
    """Called once by the CLI, before any model library is imported."""
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    else:
        # transformers' and huggingface_hub's bars ("Loading weights", downloads) follow this,
        # MLflow's artifact downloads the other.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def quiet_libraries() -> None:
    """Unless verbose, in a process that loads models (every actor, replica and training rank):
    diffusers' "Loading pipeline components" bar off, and the libraries' notices that ask
    nothing of the user dropped (see the filters)."""
    if os.environ.get(VERBOSE_ENV):
        return
    import diffusers

    diffusers.utils.logging.disable_progress_bar()
    logging.getLogger("diffusers.models.modeling_utils").addFilter(_no_empty_float32_warning)
    logging.getLogger("torch.utils.cpp_extension").addFilter(_no_cuda_runtime_notice)
    # torch 2.14 deprecates collectives DeepSpeed's ZeRO calls (all_gather_into_tensor, ...):
    # a warning per rank, about DeepSpeed's code.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)


def _no_empty_float32_warning(record: logging.LogRecord) -> bool:
    # The SDXL img2img and inpaint pipelines cast their VAE to float32 to encode each batch, and
    # diffusers then warns that "modules ... should be kept in float32: []": it names none.
    return "should be kept in float32: []." not in record.getMessage()


def _no_cuda_runtime_notice(record: logging.LogRecord) -> bool:
    # torch's extension builder (DeepSpeed imports it) on a machine with a CUDA toolkit and no
    # GPU, which is a CPU run: a job that asks for GPUs it lacks fails with its own error.
    return not record.getMessage().startswith("No CUDA runtime is found")


def is_chatter(line: bytes) -> bool:
    """A line only the libraries' progress: logged, kept off the console."""
    text = _RAY_PREFIX.sub(b"", _COLOUR.sub(b"", line)).decode(errors="replace").strip()
    return bool(_CHATTER.search(text))


class ConsoleFilter:
    """Which lines of one stream reach the console: not `is_chatter`, and not inside the
    traceback Ray forwards after a task or actor failure (`_FAILURE_TRACEBACK`): the lines of the
    same Ray process that follow it, or, where Ray names no process, the traceback's own lines."""

    def __init__(self) -> None:
        self._hiding_after: bytes | None = None  # the Ray prefix of the failure being hidden

    def shown(self, line: bytes) -> bool:
        plain = _COLOUR.sub(b"", line)
        prefix = _RAY_PREFIX.match(plain)
        origin = prefix.group(0).strip() if prefix else b""
        text = plain[prefix.end() if prefix else 0 :].decode(errors="replace").rstrip("\r\n")
        if self._hiding_after is not None:
            if origin == self._hiding_after and (origin or _TRACEBACK_LINE.match(text)):
                return False
            self._hiding_after = None
        if _FAILURE_TRACEBACK.search(text.strip()):
            self._hiding_after = origin
            return False
        return not is_chatter(line)


def route_console(command: str) -> Path | None:
    """Send this process's stdout and stderr (file descriptors 1 and 2, so C++ code and child
    processes are caught too) through a filter: all of it into a new log file, the lines that
    are not `is_chatter` on to the console. Returns the log's path; None (nothing routed) when
    verbose, or when stdout and stderr are not the process's own (a test's CliRunner)."""
    if os.environ.get(VERBOSE_ENV) or not _owns_standard_streams():
        return None
    folder = Path(os.environ.get(LOG_DIR_ENV) or DEFAULT_LOG_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    log = path.open("ab", buffering=0)
    lock = threading.Lock()
    pumps = []
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
        fd = stream.fileno()
        console = os.dup(fd)
        if os.isatty(fd):
            _routed_terminals.add(fd)
        read_end, write_end = os.pipe()
        os.dup2(write_end, fd)
        os.close(write_end)
        pump = threading.Thread(target=_pump, args=(read_end, console, log, lock), daemon=True)
        pump.start()
        pumps.append((fd, console, pump))

    def drain() -> None:  # the pipes close when fds 1 and 2 are the console's again
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        for fd, console, _ in pumps:
            os.dup2(console, fd)
        deadline = time.monotonic() + DRAIN_S
        for _, _, pump in pumps:
            pump.join(max(0.0, deadline - time.monotonic()))

    atexit.register(drain)  # before Ray is imported: this runs after Ray's own shutdown
    return path


def is_terminal(stream: TextIO) -> bool:
    """Whether `stream` reaches a terminal, routed or not (a live line rewrites itself there)."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    return fd in _routed_terminals or os.isatty(fd)


def _pump(read_end: int, console: int, log: BinaryIO, lock: threading.Lock) -> None:
    pending = b""
    shown = ConsoleFilter().shown
    while chunk := os.read(read_end, 1 << 16):
        *lines, pending = _LINE_END.split(pending + chunk)
        _emit(lines, shown, console, log, lock)
    _emit([pending] if pending else [], shown, console, log, lock)
    os.close(read_end)


def _emit(
    lines: list[bytes], shown: Callable[[bytes], bool], console: int, log: BinaryIO, lock: threading.Lock
) -> None:
    with lock:
        for line in lines:
            log.write(line)
            if shown(line):
                os.write(console, line)


def _owns_standard_streams() -> bool:
    try:
        return sys.stdout.fileno() == 1 and sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # replaced by an in-memory stream
        return False
