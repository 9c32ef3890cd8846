"""Ray Job entrypoint: deploy the serving app on the cluster this job runs in, then return
(Serve keeps it running; `serve status` shows it, `serve shutdown` stops it).

`pixfleet submit serve CONFIG` runs it with the config in $PIXFLEET_JOB_CONFIG; by hand:
    ray job submit --working-dir . -- python jobs/serve.py pipelines_cfg/serve_sd15.yaml
"""

import os
import sys

from pixfleet.cluster import job_main
from pixfleet.config.serving import ServingConfig
from pixfleet.serving.app import start


def run(config: ServingConfig) -> str:
    url = start(config, address=os.environ.get("RAY_ADDRESS", "auto"))
    return f"deployed {', '.join(m.name for m in config.models)} at {url}"


if __name__ == "__main__":
    sys.exit(job_main(ServingConfig, run, __doc__))
