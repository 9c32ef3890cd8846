#!/usr/bin/env bash
# The wheels the GPU suite's engine layer needs on a machine that has torch and accelerate but
# not diffusers or pydantic (the lent GPU machines: Python 3.12, nothing to download from there);
# transformers comes along so the suite runs the version the tests ran, not the image's.
# Writes benchmarks/gpu/wheels/ (ignored by git, about 22 MiB); see
# benchmarks/RESULTS.md for the command that carries it and runs the suite.
set -euo pipefail
cd "$(dirname "$0")"
rm -rf wheels && mkdir wheels
# Same versions as this checkout's environment, so the suite runs the code the tests ran.
pins=$(../../.venv/bin/python -m pip list --format=freeze 2>/dev/null \
  | grep -iE '^(diffusers|pydantic|pydantic[-_]core|annotated[-_]types|typing[-_]inspection|transformers)==' )
for platform in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do platforms+=(--platform "$platform"); done
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" --platform any -d wheels $pins
ls -la wheels
du -sh wheels
