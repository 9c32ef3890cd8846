"""A user error raised where the work runs (a Ray Data actor, a Ray task) reaches the driver as
that error, one line with its exit code, however Ray wrapped it on the way."""

from __future__ import annotations

import pandas as pd
import pytest

from pixfleet.errors import UserError, one_line, user_error_within
from pixfleet.models.folders import ModelLoadError

pytestmark = pytest.mark.timeout(120)


class RefusedModel:
    """A stage whose model cannot be loaded."""

    def __init__(self):
        raise ModelLoadError("/models/sd15: cannot be loaded as the base model of task 'controlnet': OSError: gone")

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return batch


class StoppedRun(UserError):
    exit_code = 3


@pytest.mark.usefixtures("ray_session")
def test_the_error_of_an_actor_that_could_not_start_and_of_a_task_come_back_whole():
    import ray

    with pytest.raises(Exception) as failed:  # Ray Data's ActorDiedError, the actor's error as text
        ray.data.range(4).map_batches(RefusedModel, batch_format="pandas", concurrency=1).take_all()
    assert not isinstance(failed.value, UserError)
    found = user_error_within(failed.value)
    assert str(found) == "/models/sd15: cannot be loaded as the base model of task 'controlnet': OSError: gone"
    assert found.exit_code == 2

    @ray.remote
    def stop():
        raise StoppedRun("past max_failed_fraction")

    with pytest.raises(Exception) as failed:  # a RayTaskError, the error itself as its cause
        ray.get(stop.remote())
    found = user_error_within(failed.value)
    assert type(found) is StoppedRun and str(found) == "past max_failed_fraction" and found.exit_code == 3

    with pytest.raises(Exception) as failed:
        ray.get(ray.remote(lambda: 1 / 0).remote())
    assert user_error_within(failed.value) is None  # a bug stays a traceback
    assert one_line(ZeroDivisionError("division by zero")) == "ZeroDivisionError: division by zero"
