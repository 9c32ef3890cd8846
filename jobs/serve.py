"""Ray Job entrypoint: deploy the serving app on the cluster this job runs in, then return
(Serve keeps it running; `serve status` shows it, `serve shutdown` stops it).

`pixfleet submit serve CONFIG` runs it with the config in $PIXFLEET_JOB_CONFIG; by hand:
    ray job submit --working-dir . -- python jobs/serve.py pipelines_cfg/serve_sd15.yaml
"""

from __future__ import annotations

import argparse
import os
import sys

from pixfleet.cluster import load_job_config
from pixfleet.config import ConfigError
from pixfleet.config.serving import ServingConfig
from pixfleet.models.loading import ModelLoadError
from pixfleet.serving.app import start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", help="serving YAML; default: $PIXFLEET_JOB_CONFIG")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="a.b=value")
    args = parser.parse_args(argv)
    try:
        config = load_job_config(ServingConfig, args.config, args.overrides)
        url = start(config, address=os.environ.get("RAY_ADDRESS", "auto"))
    except (ConfigError, ModelLoadError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"deployed {', '.join(m.name for m in config.models)} at {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
