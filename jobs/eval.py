"""Ray Job entrypoint: `pixfleet eval` (models measured on a held-out set, promotion by the
numbers) on the cluster this job runs in.

`pixfleet submit eval CONFIG [--promote ALIAS]` runs it with the config in $PIXFLEET_JOB_CONFIG; by hand:
    ray job submit --working-dir . -- python jobs/eval.py pipelines_cfg/eval_sd15_canny.yaml --promote champion
"""

import sys

from pixfleet.cluster import job_main
from pixfleet.comparison.job import run_eval
from pixfleet.config.evaluation import EvalJobConfig


def run(job: EvalJobConfig, promote: str | None = None) -> str:
    return run_eval(job, promote=promote).render()  # connects to the job's cluster ($RAY_ADDRESS)


if __name__ == "__main__":
    promote_help = "move this registry alias to the challenger when the promotion rule passes"
    sys.exit(job_main(EvalJobConfig, run, __doc__, options={"promote": promote_help}))
