"""MLflow settings shared by every job."""

from __future__ import annotations

from pydantic import Field

from pixfleet.config.base import StrictModel


class TrackingConfig(StrictModel):
    """Where runs are recorded; `MLFLOW_TRACKING_URI` wins over the local default."""

    enabled: bool = Field(True, description="Record the run in MLflow.")
    tracking_uri: str | None = Field(
        None, description="MLflow URI; unset uses $MLFLOW_TRACKING_URI or ./mlruns/mlflow.db."
    )
    experiment: str = Field("pixfleet", description="MLflow experiment name.")
