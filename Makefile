# precision-serve: `make demo` and `make test` set everything up themselves.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXTRAS := build,openvino,loadtest,triton,dev
REPO ?= model_repository

.PHONY: install demo test lint format bench bench-quick clean system-deps

install: $(STAMP)

# Debian packages: a real Prometheus server for the tests, libpython3.11 for Triton's python-backend stub.
system-deps:
	@if ! command -v prometheus >/dev/null 2>&1 || ! ldconfig -p | grep -q 'libpython3.11.so.1.0'; then \
	  echo ">> installing Debian packages: prometheus libpython3.11"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends prometheus libpython3.11 >/dev/null; \
	fi

$(STAMP): pyproject.toml | system-deps
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch is pinned to the CPU build; torchvision is never installed.
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	@touch $(STAMP)

demo: install
	$(BIN)/python -m loadtest.demo --repository $(REPO)

test: install lint
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python -m bench.run

bench-quick: install
	$(BIN)/python -m bench.run --quick

# ruff, then the layer contract in pyproject.toml ([tool.importlinter]).
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache

format:
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) $(REPO)/*/ $(REPO)/*.json reports .pytest_cache
