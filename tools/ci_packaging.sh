#!/usr/bin/env bash
# The packaging half of .ci/run (after `make install`, with .venv in place):
#
#  1. the sdist, built from the checkout: it must hold everything a build reads;
#  2. a CPU-only wheel (HANDGRAD_CUDA=0) built from that sdist, named for its
#     torch (+torch2.14.cpu) and pinning it (Requires-Dist: torch==2.14.1);
#  3. the wheel installed into a fresh virtual environment (torch reused from
#     TORCH_ENV when set) and smoke-tested from another folder: the installed
#     copy is the one imported, an op matches native, the command answers;
#  4. the test suite of the sdist run against that installed CPU-only build
#     (the CUDA-emulated and GPU cases skip: that build has neither);
#  5. the documentation, built with warnings as errors.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=$ROOT/.venv/bin/python
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
start=$SECONDS
stage() { echo "ci-packaging: $1 at $((SECONDS - start)) s"; }

"$PY" -m pip install -q build "sphinx>=7" myst-parser

# 1. sdist (no isolation: the checkout's setuptools; the sdist needs no torch)
"$PY" -m build --sdist --no-isolation --outdir "$WORK/dist" "$ROOT" > "$WORK/sdist.log"
sdist=$(ls "$WORK"/dist/handgrad-*.tar.gz)
listing=$(tar tzf "$sdist")
for needed in csrc/version.h csrc/ops/cpu/lstm_rows.inc csrc/common/cuda_launch.cuh \
              csrc/ops/cuda/conv2d.cu tools/build_env.py tools/build_backend.py \
              pyext/module.cpp LICENSE MANIFEST.in python/handgrad/py.typed tests/conftest.py; do
    grep -q "/$needed\$" <<<"$listing" || { echo "ci-packaging: the sdist lacks $needed"; exit 1; }
done
if grep -q "_build_config.py\|\.so\$" <<<"$listing"; then
    echo "ci-packaging: the sdist ships build products"; exit 1
fi
stage "sdist $(basename "$sdist") complete"

# 2. a CPU-only wheel from the sdist, unpacked here (the build sees .venv's torch:
#    no isolation; ccache hits across runs need the unpacked folder as its base)
mkdir "$WORK/src" && tar xzf "$sdist" -C "$WORK/src"
src=$(ls -d "$WORK"/src/handgrad-*)
(cd "$src" && CCACHE_BASEDIR="$src" HANDGRAD_CUDA=0 HANDGRAD_CUDA_EMULATION=0 \
    "$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$WORK/dist" .)
wheel=$(ls "$WORK"/dist/handgrad-*.whl)
torch_release=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")
tag=$("$PY" -c "import sys; sys.path.insert(0, '$ROOT/tools'); import torch, build_env
print(build_env.local_version_tag(torch.__version__, torch.version.cuda, False))")
case "$(basename "$wheel")" in
    handgrad-*+"$tag"-*.whl) ;;
    *) echo "ci-packaging: $(basename "$wheel") lacks the local tag +$tag"; exit 1 ;;
esac
unzip -p "$wheel" '*.dist-info/METADATA' | grep -qx "Requires-Dist: torch==$torch_release" \
    || { echo "ci-packaging: the wheel does not pin torch==$torch_release"; exit 1; }
stage "wheel $(basename "$wheel") built from the sdist"

# 3. a fresh environment, the wheel installed, a smoke test from another folder
"$("$PY" -c 'import sys; print(sys._base_executable)')" -m venv "$WORK/venv"
VPY=$WORK/venv/bin/python
if [ -n "${TORCH_ENV:-}" ]; then
    "$TORCH_ENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" \
        > "$("$VPY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/torch-env.pth"
fi
# setuptools >= 77: the tests run setup.py (a new venv may bring an older one)
"$VPY" -m pip install -q "$wheel[test]" "setuptools>=77"
mkdir "$WORK/elsewhere"
(cd "$WORK/elsewhere" && "$VPY" - "$WORK/venv" <<'PYEOF'
import os, sys
import torch
import handgrad
assert handgrad.__file__.startswith(sys.argv[1]), "imported %s, not the installed wheel" % handgrad.__file__
x, w = torch.randn(2, 3, 9, 9, requires_grad=True), torch.randn(4, 3, 3, 3, requires_grad=True)
torch.testing.assert_close(handgrad.ops.conv2d(x, w, padding=1),
                           torch.nn.functional.conv2d(x, w, padding=1), atol=1e-5, rtol=1e-5)
handgrad.ops.max_pool2d(x, 2).sum().backward()
assert handgrad.info()["cuda_kernels_compiled"] is False
print("smoke test: handgrad", handgrad.__version__, "from", os.path.dirname(handgrad.__file__))
PYEOF
)
(cd "$WORK/elsewhere" && "$WORK/venv/bin/handgrad" --version \
    && "$WORK/venv/bin/handgrad" info > info.txt && head -3 info.txt)
stage "wheel installed into a fresh environment and smoke-tested"

# 4. the sdist's tests against the installed CPU-only build (a clean copy: the
#    wheel's build left its objects in the first one). test_train_cli,
#    test_generative_models and test_distributed are left out: they train
#    through subprocesses for minutes, test Python code that is the same in
#    both builds, and ran in `make test`; the ops they use are tested here by
#    the op tests.
mkdir "$WORK/tests" && tar xzf "$sdist" -C "$WORK/tests"
src=$(ls -d "$WORK"/tests/handgrad-*)
#    Each test function runs its first case (HANDGRAD_TEST_ONE_CASE=1): the
#    kernels are the ones `make test` compared case by case; this checks the
#    installed build end to end within CI's time budget.
(cd "$src" && env -u HANDGRAD_EXPECT_CUDA -u HANDGRAD_EXPECT_EMULATION -u PYTHONPATH \
    HANDGRAD_TEST_ONE_CASE=1 "$VPY" -m pytest tests -q -p no:cacheprovider --ignore tests/test_train_cli.py \
    --ignore tests/test_generative_models.py --ignore tests/test_distributed.py)
stage "CPU-only build passed the tests"

# 5. the documentation (.venv's editable handgrad: the API reference imports it)
"$PY" -m sphinx -W --keep-going -q -b html "$ROOT/docs" "$WORK/html"
stage "documentation built with warnings as errors"
