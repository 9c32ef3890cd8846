"""Ray Job entrypoint: a ControlNet fine-tuning run on the cluster this job runs in.

`pixfleet submit train CONFIG` runs it with the config in $PIXFLEET_JOB_CONFIG; by hand:
    ray job submit --working-dir . -- python jobs/train.py pipelines_cfg/train_tiny.yaml
"""

import sys

from pixfleet.cluster import job_main
from pixfleet.config.training import TrainingJobConfig
from pixfleet.training.trainer import run_training


def run(job: TrainingJobConfig) -> str:
    return run_training(job).render()  # connects to the job's cluster ($RAY_ADDRESS)


if __name__ == "__main__":
    sys.exit(job_main(TrainingJobConfig, run, __doc__))
