# faststyle: `make test` and `make demo` are all a newcomer needs.
# Both create the virtual environment in .venv on first use (the requirements, then faststyle itself in editable
# mode so its packages import from any folder) and reuse it while the requirements are unchanged.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test lint demo clean-venv

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --quiet --no-deps -e .
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest

# Train on the embedded samples (configs/experiment/demo.yaml: ~5 min on a 2-core CPU), then stylize the sample
# photos with the new model into the same run dir. DEMO_ARGS adds train.py overrides (e.g. DEMO_ARGS=device=cuda).
demo: $(STAMP)
	@run=outputs/demo/$$(date +%Y-%m-%d/%H-%M-%S); \
	$(PY) train.py experiment=demo hydra.run.dir=$$run $(DEMO_ARGS) && \
	$(PY) stylize.py model=$$run/model.pth input=data/samples/content output=$$run/stylized && \
	echo "demo done: stylized photos in $$run/stylized, model $$run/model.pth," && \
	echo "  TensorBoard: tensorboard --logdir $$run/tb"

clean-venv:
	rm -rf $(VENV)
