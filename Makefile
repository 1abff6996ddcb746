# The two commands: `make run` (the main job) and `make test`. Both create the environment first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mrcnn-plugin-env
ENV_INPUTS := tools/install_env.sh tools/detectron2_dist/setup.py setup.py \
	csrc_fallback/setup.py csrc_fallback/mrcnn_plugin_csrc.pth $(wildcard csrc_fallback/mrcnn_plugin_csrc/*.py)

.PHONY: env run test lint format reproduce

$(STAMP): $(ENV_INPUTS)
	tools/install_env.sh $(VENV)
	touch $@

env: $(STAMP)

run: env
	$(PY) tools/main_job.py --output-dir output/main_job

# The paper's ablations (Table 2a-e, 6) at CPU size; REPRODUCE_ARGS e.g. "--tables 2c,2d".
reproduce: env
	$(PY) -m mrcnn_plugin.cli.reproduce --output-dir output/reproduce $(REPRODUCE_ARGS)

lint: env
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest -q tests

format: env
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .
