# Two commands for a fresh machine (each builds its own virtual environment):
#   make demo   - the main job: the local multi-node procedure notebook, end to end
#   make test   - lint + the whole test suite
#   make containers - build the image and run docker/compose.yaml with podman (root; tests/deploy/test_containers.py)
VENV   ?= .venv
PYTHON ?= python3
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed-stamp

.PHONY: demo test lint bench clean containers

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/macula-lab procedure 01_local_multi_node --output-dir procedure-runs

lint: $(STAMP)
	$(BIN)/ruff check macula_lab tests bench
	$(BIN)/lint-imports
	$(BIN)/nbqa ruff notebooks --ignore=B018,E402,F704

test: lint
	$(BIN)/pytest

# the container run alone: Debian's podman (installed when missing, as root) stands in for Docker;
# it fails rather than skips when podman cannot run here
containers: $(STAMP)
	sh docker/podman-packages.sh
	MACULA_REQUIRE_CONTAINERS=1 $(BIN)/pytest tests/deploy/test_containers.py -v -p no:cacheprovider

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python bench/transport.py
	$(BIN)/python bench/dht.py
	$(BIN)/python bench/services.py
	$(BIN)/python bench/procedure.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
