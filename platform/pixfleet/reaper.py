"""Ends the processes of an embedded Ray whose driver was killed.

When a driver dies by SIGKILL, its GCS and raylet go with it, but Ray's dashboard and runtime
env agents linger for a minute: they notice the raylet is gone, then try to report its death
to the GCS that died too, with Ray's fixed 60 s timeout, before they exit. `ensure_ray`
starts this watcher beside an embedded Ray: it keeps a list of the driver's descendants (the
agents are children of the raylet, itself the driver's child) and, once the driver is gone,
kills those still running (by pid and start time, so never another process).

    python -m pixfleet.reaper DRIVER_PID DRIVER_START_TIME
"""

from __future__ import annotations

import sys
import time

import psutil

GRACE_S = 2.0  # let a driver's own shutdown finish first


def reap(driver_pid: int, driver_started: float, poll_s: float = 1.0) -> list[int]:
    """Watch the driver until it ends, then kill what is left of its descendants; the pids killed."""
    seen: dict[int, float] = {}
    me = psutil.Process().pid  # started by the driver too
    try:
        driver = psutil.Process(driver_pid)
        while driver.create_time() == driver_started and driver.status() != psutil.STATUS_ZOMBIE:
            for child in driver.children(recursive=True):
                if child.pid != me:
                    seen.setdefault(child.pid, child.create_time())
            time.sleep(poll_s)
    except psutil.NoSuchProcess:
        pass
    time.sleep(GRACE_S)
    killed = []
    for pid, started in seen.items():
        try:
            process = psutil.Process(pid)
            if process.create_time() == started:
                process.kill()
                killed.append(pid)
        except psutil.NoSuchProcess:
            continue
    return killed


if __name__ == "__main__":
    reap(int(sys.argv[1]), float(sys.argv[2]))
