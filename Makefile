# The README's two commands: `make demo` and `make test`. Both install into .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# DeepSpeed JIT-builds its C++ ops on first use (45-65 s each): keep them with the venv.
export TORCH_EXTENSIONS_DIR := $(abspath $(VENV))/torch_extensions
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED := 0

# Build DeepSpeed's shared-memory comm op (loaded by every rank) and CPU Adam (optimizer
# offload) once at install, serially (~45 s each), instead of inside tests and jobs where
# concurrent workers would queue on the build lock. Cluster nodes run the same module
# (cluster/aws.yaml, cluster/kuberay/Dockerfile, the README's `ray start` recipe).
PREBUILD_DEEPSPEED_OPS := -m beit_ray.train.ops

.PHONY: install demo test lint format bench clean deepspeed-wheels

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "torch==2.13.*"
	$(PIP) install -q -c constraints.txt -e ".[test,dev]"
	$(PY) $(PREBUILD_DEEPSPEED_OPS)
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) jobs/demo.py

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/lint-imports

format: install
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

# DeepSpeed + the dependencies a lent GPU machine lacks, as wheels (carry wheels/deepspeed to it;
# bench/gpu_check.py unpacks them there).
deepspeed-wheels: install
	$(PY) bench/deepspeed_wheels.py --out wheels/deepspeed

clean:
	rm -rf runs .pytest_cache
