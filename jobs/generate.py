"""Ray Job entrypoint: a bulk generation job on the cluster this job runs in.

`pixfleet submit generate CONFIG` runs it with the config in $PIXFLEET_JOB_CONFIG; by hand:
    ray job submit --working-dir . -- python jobs/generate.py pipelines_cfg/quickstart.yaml
"""

from __future__ import annotations

import argparse
import sys

from pixfleet.cluster import load_job_config
from pixfleet.config import ConfigError, GenerationJobConfig
from pixfleet.generation.job import GenerationFailed, run_generation
from pixfleet.models.loading import ModelLoadError
from pixfleet.models.registry import RegistryError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", help="job YAML; default: $PIXFLEET_JOB_CONFIG")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="a.b=value")
    args = parser.parse_args(argv)
    try:
        job = load_job_config(GenerationJobConfig, args.config, args.overrides)
        summary = run_generation(job)  # connects to the job's cluster ($RAY_ADDRESS)
    except (ConfigError, ModelLoadError, RegistryError, GenerationFailed) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summary.render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
