# handgrad's commands. The two quick-start targets install everything they need
# first (a virtual environment in .venv, torch and torchvision from the package
# index, handgrad built with its C++ and CUDA kernels):
#
#   make bench        benchmark every op against native PyTorch
#   make test         run the test suite
#
# Other targets: install, cmake-test (C++ library + ctest), gpu-check (the
# one-shot GPU check, tools/gpu_check.py: CUDA tests, GPU benchmarks and short
# training runs, a report in gpu-report/), tsan (the CUDA kernels on the
# emulator under ThreadSanitizer, tools/emulation_build.py), mutation (mutmut over the Python,
# tools/mutation.py; MUTATION_ARGS="--groups conv2d --budget-minutes 10"),
# kernel-mutations (tools/kernel_mutations.py: one-line C++/CUDA mutations
# against the CPU and emulated CUDA tests; see docs/mutation.md), clean.
# Build switches pass through the environment: HANDGRAD_CUDA=auto|1|0,
# TORCH_CUDA_ARCH_LIST, HANDGRAD_CPU_ARCH, CUDA_HOME, MAX_JOBS (see setup.py).
# HANDGRAD_CUDA_EMULATION=1 (the default here) also builds the CUDA emulation
# module, with which the tests run every CUDA kernel on the CPU.
# TORCH_ENV=DIR makes .venv use the torch and torchvision installed in the
# environment DIR (through a .pth file) instead of installing them: .ci/run
# keeps one such environment between runs (5 GB, minutes to install).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export MAX_JOBS ?= 2
export HANDGRAD_CUDA_EMULATION ?= 1

SOURCES := $(shell find csrc pyext -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' -o -name '*.h' -o -name '*.inc') \
	setup.py pyproject.toml tools/build_env.py tools/build_backend.py
TORCH_STAMP := $(VENV)/.torch-installed
BUILD_STAMP := $(VENV)/.handgrad-built

.PHONY: bench test install cmake-test gpu-check tsan mutation kernel-mutations clean

bench: $(BUILD_STAMP)
	$(PY) benchmarks/run.py $(BENCH_ARGS)

test: $(BUILD_STAMP)
	$(PY) -m pytest tests $(TEST_ARGS)

install: $(BUILD_STAMP)

# torch and torchvision come from the package index (its newest torch is a CUDA
# build; torchvision does not work with the CPU-only wheel). PIP_FIND_LINKS is
# cleared so that no local CPU wheel is picked instead.
$(TORCH_STAMP):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
ifdef TORCH_ENV
	$(TORCH_ENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" \
		> "$$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/torch-env.pth"
else
	PIP_FIND_LINKS= $(PY) -m pip install torch torchvision
endif
	$(PY) -m pip install ninja "setuptools>=77" wheel pytest expecttest hypothesis numpy tqdm matplotlib
	$(PY) -c "import torch, torchvision; print('torch', torch.__version__, 'CUDA', torch.version.cuda, '| torchvision', torchvision.__version__)"
	touch $@

$(BUILD_STAMP): $(TORCH_STAMP) $(SOURCES)
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	$(PY) -m handgrad info
	touch $@

cmake-test: $(BUILD_STAMP)
	cmake -S . -B cmake-build $$($(PY) tools/build_env.py cmake-args) $(CMAKE_ARGS)
	cmake --build cmake-build -j $(MAX_JOBS)
	ctest --test-dir cmake-build --output-on-failure

gpu-check: $(BUILD_STAMP)
	$(PY) tools/gpu_check.py --out gpu-report $(GPU_CHECK_ARGS)

# ThreadSanitizer: the emulation module rebuilt with -fsanitize=thread; first a
# deliberately racy kernel must be reported, then the emulator's own tests and
# the first case of each op test that compares a CUDA kernel family with native
# (TSan slows the emulator about tenfold; a race shows at any size).
TSAN_TESTS := tests/test_conv2d.py tests/test_conv2d_cuda_paths.py tests/test_max_pool2d.py \
	tests/test_cross_entropy.py tests/test_lstm.py tests/test_attention.py tests/test_attention_cuda_paths.py
TSAN_SELECT := (matches_native or match_float64 or depthwise or forward_and_input or dropout_pattern) \
	and not gradcheck and not fuzz and not property and not split
tsan: $(BUILD_STAMP)
	$(PY) tools/emulation_build.py build tsan
	$(PY) tools/emulation_build.py tsan-check
	$(PY) tools/emulation_build.py test tsan tests/test_cuda_emulation.py tests/test_tensor_core.py \
		-q -p no:cacheprovider
	HANDGRAD_TEST_DEVICES=cuda-emulated HANDGRAD_TEST_ONE_CASE=1 $(PY) tools/emulation_build.py \
		test tsan $(TSAN_TESTS) -k "$(TSAN_SELECT)" -q -p no:cacheprovider

mutation: $(BUILD_STAMP)
	$(PY) -c "import mutmut" 2>/dev/null || $(PY) -m pip install mutmut
	$(PY) tools/mutation.py $(MUTATION_ARGS)

kernel-mutations: $(BUILD_STAMP)
	$(PY) tools/kernel_mutations.py $(KERNEL_MUTATION_ARGS)

clean:
	rm -rf build cmake-build python/handgrad/*.so python/handgrad/_build_config.py *.egg-info \
		python/*.egg-info docs/_build
