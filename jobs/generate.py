"""Ray Job entrypoint: a bulk generation job on the cluster this job runs in.

`pixfleet submit generate CONFIG` runs it with the config in $PIXFLEET_JOB_CONFIG; by hand:
    ray job submit --working-dir . -- python jobs/generate.py pipelines_cfg/quickstart.yaml
"""

import sys

from pixfleet.cluster import job_main
from pixfleet.config import GenerationJobConfig
from pixfleet.generation.job import run_generation


def run(job: GenerationJobConfig) -> str:
    return run_generation(job).render()  # connects to the job's cluster ($RAY_ADDRESS)


if __name__ == "__main__":
    sys.exit(job_main(GenerationJobConfig, run, __doc__))
