"""Builds that cannot silently mismatch torch: what setup.py records and refuses,
what the import check says, and what the command line still does then.

Building a wheel takes minutes, so the wheel and the sdist themselves are built,
installed into a fresh environment and smoke-tested by .ci/run (tools/ci_packaging.sh);
these tests cover the decisions behind them in seconds."""

import os
import shutil
import subprocess
import sys
import types

import pytest
import torch

import handgrad
from handgrad import _compat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import build_backend  # noqa: E402
import build_env  # noqa: E402


def recorded(**changes):
    facts = dict(version="0.1.0+torch2.14.cu130", torch_version="2.14.1+cu130", torch_cuda="13.0",
                 cuda_kernels=True, cxx11_abi=True)
    facts.update(changes)
    return types.SimpleNamespace(**facts)


def test_the_build_recorded_the_torch_it_compiled_against():
    build = _compat.build
    assert build is not None, "setup.py did not write handgrad/_build_config.py"
    assert build.torch_version == torch.__version__
    assert build.cuda_kernels == handgrad.info()["cuda_kernels_compiled"]
    assert handgrad.__version__ == build.version
    assert build.version.endswith("+" + build_env.local_version_tag(
        torch.__version__, torch.version.cuda, build.cuda_kernels))
    assert handgrad.info()["built_for_torch"] == torch.__version__


def test_local_version_tags_name_the_torch_and_the_variant():
    assert build_env.local_version_tag("2.14.1+cu130", "13.0", True) == "torch2.14.cu130"
    assert build_env.local_version_tag("2.14.1+cu130", "13.0", False) == "torch2.14.cpu"
    assert build_env.local_version_tag("2.13.0+cpu", None, False) == "torch2.13.cpu"
    assert build_env.local_version_tag("2.9.0", "12.6", True) == "torch2.9.cu126"


@pytest.mark.parametrize("torch_version, torch_cuda, build, problem", [
    ("2.14.1+cu130", "13.0", recorded(), None),
    ("2.14.1+cu130", "13.0", recorded(cuda_kernels=False, torch_cuda=None), None),
    ("2.14.1+cpu", None, recorded(cuda_kernels=False, torch_cuda=None), None),
    ("2.13.0+cpu", None, recorded(), "built for torch 2.14.1 (CUDA 13.0), but torch 2.13.0+cpu "
                                     "(CPU-only) is installed"),
    ("2.14.1+cpu", None, recorded(), "but torch 2.14.1+cpu (CPU-only) is installed"),
    ("2.14.1+cu126", "12.6", recorded(), "but torch 2.14.1+cu126 (CUDA 12.6) is installed"),
    ("2.15.0", "13.0", recorded(cuda_kernels=False, torch_cuda=None),
     "built for torch 2.14.1 (CPU-only), but torch 2.15.0"),
])
def test_torch_mismatch(torch_version, torch_cuda, build, problem):
    message = _compat.torch_mismatch(torch_version, torch_cuda, build)
    if problem is None:
        assert message is None
        return
    assert problem in message
    assert "pip install torch==2.14.1" in message and "--no-build-isolation" in message
    assert "\n" not in message


@pytest.fixture(scope="module")
def handgrad_built_for_another_torch(tmp_path_factory):
    """This handgrad as if built for torch 2.13.0 (CPU): a copy of the package whose
    _build_config says so, importable through PYTHONPATH."""
    site = tmp_path_factory.mktemp("site")
    package = os.path.dirname(os.path.abspath(handgrad.__file__))
    copy = site / "handgrad"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__", "_build_config.py",
                                                                 "*.so"))
    for name in os.listdir(package):
        if name.endswith(".so"):
            os.symlink(os.path.join(package, name), copy / name)
    (copy / "_build_config.py").write_text(
        "version = '0.1.0+torch2.13.cpu'\ntorch_version = '2.13.0+cpu'\ntorch_cuda = None\n"
        "cuda_kernels = False\ncxx11_abi = True\n")
    return dict(os.environ, PYTHONPATH=str(site))


def run_python(args, env, cwd="/"):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def test_import_with_another_torch_gives_one_sentence(handgrad_built_for_another_torch):
    proc = run_python(["-c", "import handgrad"], handgrad_built_for_another_torch)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: handgrad 0.1.0+torch2.13.cpu was built for torch 2.13.0 "
                           "(CPU-only), but torch %s" % torch.__version__), last
    assert "pip install torch==2.13.0" in last and "undefined symbol" not in proc.stderr


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["info"], ["train", "--help"]])
def test_the_command_still_answers_with_another_torch(handgrad_built_for_another_torch, args):
    proc = run_python(["-m", "handgrad", *args], handgrad_built_for_another_torch)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    if args == ["--version"]:
        assert proc.stdout.strip() == "handgrad 0.1.0+torch2.13.cpu (built for torch 2.13.0+cpu)"
    if args == ["info"]:
        assert "built_for_torch        2.13.0+cpu" in proc.stdout
        assert "problem" in proc.stdout and "pip install torch==2.13.0" in proc.stdout


def test_training_with_another_torch_is_one_line(handgrad_built_for_another_torch):
    proc = run_python(["-m", "handgrad", "train", "mnist_cnn"], handgrad_built_for_another_torch)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "was built for torch 2.13.0" in lines[0], proc.stderr


def test_an_isolated_build_against_another_torch_is_refused():
    assert build_env.isolated_build_problem("2.14.1+cu130", "2.14.1") is None
    assert build_env.isolated_build_problem("2.14.1+cu130", None) is None
    message = build_env.isolated_build_problem("2.15.0+cu130", "2.14.1")
    assert "against torch 2.15.0" in message and "has torch 2.14.1" in message
    assert message.endswith("pip install --no-build-isolation .")


def test_setup_refuses_an_isolated_build_whose_torch_differs(tmp_path):
    """setup.py as pip's isolated build runs it: a torch from outside the target
    environment (here a stand-in at another version) must not be compiled against."""
    fake = tmp_path / "isolated" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("__version__ = '2.99.0+cu130'\n")
    script = ("import runpy, sys; sys.path.insert(0, %r); sys.argv = ['setup.py', 'bdist_wheel']; "
              "runpy.run_path('setup.py', run_name='__main__')" % str(fake.parent))
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "handgrad: this build would compile handgrad against torch 2.99.0, but the environment it "
        "installs into has torch %s, which could not load it; build against the installed torch "
        "instead: pip install --no-build-isolation ." % build_env.target_torch_version())


def test_setup_without_torch_is_one_sentence():
    script = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = ['setup.py', "
              "'bdist_wheel']; runpy.run_path('setup.py', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("handgrad: building compiles against an installed torch, and "
                                   "this environment has none: pip install torch, then "
                                   "pip install --no-build-isolation .")


def test_setup_names_the_setuptools_it_needs(tmp_path):
    """A stock Python 3.11 venv has setuptools 65, which cannot read pyproject's license."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True,
                   timeout=300)
    python = str(venv / "bin" / "python")
    probe = subprocess.run([python, "-c", "import setuptools; print(setuptools.__version__)"],
                           capture_output=True, text=True)
    if probe.returncode != 0 or int(probe.stdout.split(".")[0]) >= 77:
        pytest.skip("this Python's venv brings no setuptools older than 77 (%s)"
                    % (probe.stdout.strip() or "none"))
    proc = subprocess.run([python, "setup.py", "--version"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        "handgrad: building needs setuptools >= 77.0, but this environment has %s: "
        "pip install -U 'setuptools>=77.0'" % probe.stdout.strip())


def test_the_build_backend_asks_for_the_target_torch():
    assert build_backend.torch_requirement("2.14.1") == "torch==2.14.1"
    assert build_backend.torch_requirement("2.13.0+cpu") == "torch==2.13.0+cpu"
    assert build_backend.torch_requirement(None) == "torch"
    wanted = build_backend.get_requires_for_build_wheel()
    assert "torch==%s" % build_env.target_torch_version() in wanted
    assert not any(r.startswith("torch") for r in build_backend.get_requires_for_build_sdist())


def test_the_sdist_manifest_holds_everything_the_build_reads():
    with open(os.path.join(ROOT, "MANIFEST.in")) as f:
        manifest = f.read()
    for needed in ("csrc *.h", "*.cuh", "*.inc", "tools *.py", "pyext *.cpp", "LICENSE",
                   "python/handgrad/py.typed"):
        assert needed in manifest, needed
    assert "exclude python/handgrad/_build_config.py" in manifest


def test_py_typed_marks_the_package_as_typed():
    assert os.path.exists(os.path.join(os.path.dirname(handgrad.__file__), "py.typed"))


def test_a_broken_build_gives_one_sentence(tmp_path):
    """The recorded torch matches, but the compiled module is missing (a partial build)."""
    package = os.path.dirname(os.path.abspath(handgrad.__file__))
    shutil.copytree(package, tmp_path / "handgrad",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    proc = run_python(["-c", "import handgrad"], env)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: handgrad's compiled module could not be loaded "
                           "(handgrad._C is missing: the build did not finish or was not "
                           "installed); rebuild it:"), last
    proc = run_python(["-m", "handgrad", "info"], env)
    assert proc.returncode == 0 and "could not be loaded" in proc.stdout
