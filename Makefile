# Every target works on a fresh machine with Python 3.11 and pip: it builds .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DS_ACCELERATOR ?= cpu
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test lint format bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	# DeepSpeed compiles its CPU ops (Adam for ZeRO-Offload, shared-memory collectives) the first
	# time a run needs them, minutes on a small machine: build them once, into torch's extension cache.
	$(BIN)/python -c "from deepspeed.ops.op_builder import CPUAdamBuilder, ShareMemCommBuilder; \
		[builder().load(verbose=False) for builder in (CPUAdamBuilder, ShareMemCommBuilder)]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/pixfleet models make-tiny --task controlnet --out outputs/tiny/controlnet
	$(BIN)/pixfleet data fill50k --n 32 --size 64 --out outputs/fill50k
	$(BIN)/pixfleet generate pipelines_cfg/quickstart.yaml

test: $(STAMP) lint
	$(BIN)/pytest -q --durations=25

lint: $(STAMP)
	$(BIN)/ruff check platform tests benchmarks jobs
	$(BIN)/ruff format --check platform tests benchmarks jobs

format: $(STAMP)
	$(BIN)/ruff check --fix platform tests benchmarks jobs
	$(BIN)/ruff format platform tests benchmarks jobs

bench: $(STAMP)
	$(BIN)/python benchmarks/generate_throughput.py
	$(BIN)/python benchmarks/annotate_throughput.py
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/serve_latency.py

clean:
	rm -rf outputs mlruns
