"""Ray Job entrypoint: an annotate job (control maps and captions for a training set) on the
cluster this job runs in.

`pixfleet submit annotate CONFIG` runs it with the config in $PIXFLEET_JOB_CONFIG; by hand:
    ray job submit --working-dir . -- python jobs/annotate.py pipelines_cfg/annotate_tiny.yaml
"""

import sys

from pixfleet.annotation.job import run_annotation
from pixfleet.cluster import job_main
from pixfleet.config.annotation import AnnotateJobConfig


def run(job: AnnotateJobConfig) -> str:
    return run_annotation(job).render()  # connects to the job's cluster ($RAY_ADDRESS)


if __name__ == "__main__":
    sys.exit(job_main(AnnotateJobConfig, run, __doc__))
